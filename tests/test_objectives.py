"""Roles -> per-token loss terms, checked against a float64 full-softmax reference (values and gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gopd_fast.config import ObjectiveConfig
from gopd_fast.objectives import (
    DistillationObjective,
    LossOutput,
    roles_in_play,
    select_loss_tokens,
    token_weights,
)
from gopd_fast.rollout.episode import Role

S, T = int(Role.STUDENT), int(Role.TEACHER)
N, DS, DT, V = 14, 16, 24, 40


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, DS, generator=g, dtype=torch.float64)
    ht = torch.randn(N, DT, generator=g, dtype=torch.float64)
    s_head, t_head = nn.Linear(DS, V, bias=False).double(), nn.Linear(DT, V, bias=False).double()
    with torch.no_grad():
        s_head.weight.copy_(torch.randn(V, DS, generator=g, dtype=torch.float64) * 0.5)
        t_head.weight.copy_(torch.randn(V, DT, generator=g, dtype=torch.float64) * 0.5)
    t_head.requires_grad_(False)
    roles = torch.tensor([S, T] * (N // 2))[torch.randperm(N, generator=g)]
    targets = torch.randint(0, V, (N,), generator=g)
    return hs, ht, s_head, t_head, roles, targets


def _reference(hs, ht, s_head, t_head, roles, targets, student, teacher, normalizer, tau=1.0):
    """float64 reference: full logits, explicit formulas. Returns (loss to differentiate, per-token values)."""
    logp_s = torch.log_softmax(hs @ s_head.weight.T / tau, -1)
    logp_t = torch.log_softmax(ht @ t_head.weight.T / tau, -1).detach()
    rkl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    fkl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    lp_s1 = torch.log_softmax(hs @ s_head.weight.T, -1).gather(-1, targets[:, None])[:, 0]  # tau = 1 for CE
    lp_s = logp_s.gather(-1, targets[:, None])[:, 0]
    lp_t = logp_t.gather(-1, targets[:, None])[:, 0]
    k1 = (lp_s - lp_t).detach()
    terms = {"reverse_kl": (rkl, rkl), "forward_kl": (fkl, fkl), "sampled_kl": (k1 * lp_s, k1),
             "cross_entropy": (-lp_s1, -lp_s1), "none": (torch.zeros_like(rkl), torch.zeros_like(rkl))}
    grad_terms = torch.where(roles == S, terms[student][0], terms[teacher][0])
    values = torch.where(roles == S, terms[student][1], terms[teacher][1])
    return grad_terms.sum() / normalizer, values.detach()


@pytest.mark.parametrize("student,teacher", [
    ("reverse_kl", "forward_kl"),      # default
    ("reverse_kl", "reverse_kl"),      # reverse on both
    ("forward_kl", "reverse_kl"),      # swapped
    ("sampled_kl", "cross_entropy"),   # sampled-token estimator
    ("none", "cross_entropy"),         # SFT on teacher tokens
])
def test_objective_matches_float64_reference(student, teacher):
    hs, ht, s_head, t_head, roles, targets = _problem()
    normalizer = 37.0   # e.g. the global loss-token count of a larger batch
    cfg = ObjectiveConfig(student_tokens=student, teacher_tokens=teacher, temperature=1.0)
    obj = DistillationObjective(cfg, s_head, t_head)
    hs1 = hs.clone().requires_grad_(True)
    out = obj(hs1, ht, targets, roles, normalizer)
    out.loss.backward()
    g_hidden, g_weight = hs1.grad.clone(), s_head.weight.grad.clone()
    s_head.weight.grad = None

    hs2 = hs.clone().requires_grad_(True)
    ref_loss, values = _reference(hs2, ht, s_head, t_head, roles, targets, student, teacher, normalizer)
    ref_loss.backward()
    ref_value = values.sum() / normalizer
    assert float(out.loss.detach()) == pytest.approx(float(ref_value), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(g_hidden, hs2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_weight, s_head.weight.grad, rtol=1e-4, atol=1e-6)
    # the per-role sums the trainer logs
    assert out.sums["student_tokens"] == float((roles == S).sum())
    assert out.sums["loss_student_sum"] == pytest.approx(float(values[roles == S].sum()), rel=1e-5, abs=1e-6)
    assert out.sums["loss_teacher_sum"] == pytest.approx(float(values[roles == T].sum()), rel=1e-5, abs=1e-6)


def test_temperature_scales_both_models():
    hs, ht, s_head, t_head, roles, targets = _problem(1)
    obj = DistillationObjective(ObjectiveConfig(temperature=2.0), s_head, t_head)
    out = obj(hs, ht, targets, roles, 10.0)
    _, values = _reference(hs, ht, s_head, t_head, roles, targets, "reverse_kl", "forward_kl", 10.0, tau=2.0)
    assert float(out.loss.detach()) == pytest.approx(float(values.sum() / 10.0), rel=1e-5)


def test_token_weights_give_each_token_exactly_one_term():
    roles = torch.tensor([S, T, S, T, T])
    w = token_weights(roles, ObjectiveConfig())
    assert w.reverse.tolist() == [1, 0, 1, 0, 0] and w.forward.tolist() == [0, 1, 0, 1, 1]
    w = token_weights(roles, ObjectiveConfig(student_tokens="sampled_kl", teacher_tokens="cross_entropy"))
    assert w.sampled.tolist() == [1, 0, 1, 0, 0] and w.cross_entropy.tolist() == [0, 1, 0, 1, 1]
    assert not w.needs_kl
    w = token_weights(roles, ObjectiveConfig(student_tokens="none", teacher_tokens="cross_entropy"))
    assert not w.needs_teacher


def test_metrics_are_token_means_of_reduced_sums():
    sums = {"loss_sum": 6.0, "loss_student_sum": 2.0, "loss_teacher_sum": 4.0, "student_tokens": 4.0,
            "teacher_tokens": 2.0, "reverse_kl_sum": 3.0, "forward_kl_sum": 1.5, "kl_tokens": 6.0}
    m = LossOutput.metrics(sums)
    assert (m["loss"], m["loss_student"], m["loss_teacher"]) == (1.0, 0.5, 2.0)
    assert (m["reverse_kl"], m["forward_kl"], m["teacher_token_fraction"]) == (0.5, 0.25, pytest.approx(1 / 3))


def test_bad_arguments():
    hs, ht, s_head, t_head, roles, targets = _problem()
    obj = DistillationObjective(ObjectiveConfig(), s_head, t_head)
    with pytest.raises(ValueError, match="normalizer"):
        obj(hs, ht, targets, roles, 0.0)
    with pytest.raises(ValueError, match="share N"):
        obj(hs[:-1], ht, targets, roles, 1.0)
    with pytest.raises(ValueError, match="teacher_hidden"):
        obj(hs, None, targets, roles, 1.0)


@pytest.mark.parametrize("student", ["reverse_kl", "sampled_kl"])
def test_padded_teacher_vocabulary_uses_its_first_rows(student):
    """Qwen-style padded vocabularies (e.g. 152064 teacher rows vs 151936): only the shared rows count."""
    hs, ht, s_head, t_head, roles, targets = _problem(2)
    padded = nn.Linear(DT, V + 8, bias=False).double().requires_grad_(False)
    with torch.no_grad():
        padded.weight[:V] = t_head.weight
        padded.weight[V:] = 5.0   # large logits that would dominate if the padding rows were used
    cfg = ObjectiveConfig(student_tokens=student, teacher_tokens="forward_kl")
    got = DistillationObjective(cfg, s_head, padded)(hs, ht, targets, roles, 9.0)
    want = DistillationObjective(cfg, s_head, t_head)(hs, ht, targets, roles, 9.0)
    assert float(got.loss.detach()) == pytest.approx(float(want.loss.detach()), rel=1e-6)


C = int(Role.CONTEXT)


def _packed(seed=3, rows=2, width=9):
    """A packed micro-batch [R, L] with positions without loss (CONTEXT) between the loss tokens."""
    _, _, s_head, t_head, _, _ = _problem(seed)
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(rows, width, DS, generator=g, dtype=torch.float64)
    ht = torch.randn(rows, width, DT, generator=g, dtype=torch.float64)
    roles = torch.tensor([S, T, C])[torch.randint(0, 3, (rows, width), generator=g)]
    targets = torch.randint(0, V, (rows, width), generator=g)
    return hs, ht, s_head, t_head, roles, targets


@pytest.mark.parametrize("student,teacher", [("reverse_kl", "forward_kl"), ("sampled_kl", "cross_entropy"),
                                             ("none", "cross_entropy")])
def test_a_packed_micro_batch_equals_its_loss_tokens_alone(student, teacher):
    """[R, L] rows in, positions without loss dropped inside: the loss, the sums and the gradients equal those
    of the loss tokens passed flat, and the other positions get an exactly zero gradient."""
    hs, ht, s_head, t_head, roles, targets = _packed()
    cfg = ObjectiveConfig(student_tokens=student, teacher_tokens=teacher)
    obj = DistillationObjective(cfg, s_head, t_head)
    keep = roles != C
    packed_h = hs.clone().requires_grad_(True)
    packed = obj(packed_h, ht, targets, roles, 11.0)
    packed.loss.backward()
    flat_h = hs[keep].clone().requires_grad_(True)
    flat = obj(flat_h, ht[keep], targets[keep], roles[keep], 11.0)
    flat.loss.backward()
    assert float(packed.loss.detach()) == pytest.approx(float(flat.loss.detach()), rel=1e-12)
    assert packed.sums == pytest.approx(flat.sums, rel=1e-12)
    assert packed.sums["student_tokens"] + packed.sums["teacher_tokens"] == float(keep.sum())
    torch.testing.assert_close(packed_h.grad[keep], flat_h.grad, rtol=1e-12, atol=1e-15)
    assert bool((packed_h.grad[~keep] == 0).all()) and bool(packed_h.grad[keep].abs().sum() > 0)


def test_select_loss_tokens_orders_them_by_term_in_contiguous_groups():
    roles = torch.tensor([[T, C, S, S], [C, T, S, C]])
    targets = torch.arange(8).reshape(2, 4)
    cfg = ObjectiveConfig(student_tokens="sampled_kl", teacher_tokens="cross_entropy")
    tokens = select_loss_tokens(targets, roles, cfg)
    # sampled (student) tokens first, then cross-entropy (teacher) ones; each group keeps the batch order
    assert tokens.index.tolist() == [2, 3, 6, 0, 5]
    assert tokens.target_ids.tolist() == [2, 3, 6, 0, 5] and tokens.roles.tolist() == [S, S, S, T, T]
    assert tokens.groups == {"kl": slice(0, 0), "sampled": slice(0, 3), "cross_entropy": slice(3, 5),
                             "none": slice(5, 5)}
    hidden = torch.arange(8.0)[:, None].expand(8, 3).reshape(2, 4, 3)
    assert tokens.gather(hidden)[:, 0].tolist() == [2.0, 3.0, 6.0, 0.0, 5.0]
    # tokens of a role without loss still count (they are in the normalizer), in the last group
    tokens = select_loss_tokens(targets, roles, ObjectiveConfig(student_tokens="none", teacher_tokens="forward_kl"))
    assert tokens.index.tolist() == [0, 5, 2, 3, 6] and tokens.groups["none"] == slice(2, 5)
    with pytest.raises(ValueError, match="share N"):
        select_loss_tokens(targets[:, :3], roles, cfg)


def test_each_head_is_gathered_once_per_call(monkeypatch):
    """The sampled-token and cross-entropy terms both read the student head: it is resolved once."""
    from gopd_fast import module

    hs, ht, s_head, t_head, roles, targets = _problem(4)
    calls = []
    full = module._full
    monkeypatch.setattr(module, "_full", lambda t: (calls.append(t), full(t))[1])
    cfg = ObjectiveConfig(student_tokens="sampled_kl", teacher_tokens="cross_entropy")
    DistillationObjective(cfg, s_head, t_head)(hs, ht, targets, roles, 5.0)
    weights = [t for t in calls if t is not None]
    assert len(weights) == 2 and weights[0] is s_head.weight and weights[1] is t_head.weight


@pytest.mark.parametrize("algorithm,student,teacher,needed", [
    ("gopd", "reverse_kl", "forward_kl", True),
    ("gopd", "none", "cross_entropy", False),
    ("gopd", "sampled_kl", "cross_entropy", True),
    ("opd", "reverse_kl", "cross_entropy", True),
    ("sft", "reverse_kl", "cross_entropy", False),   # student tokens never occur under SFT
    ("sft", "none", "forward_kl", True),
])
def test_the_objective_decides_whether_the_teacher_runs(algorithm, student, teacher, needed):
    hs, _, s_head, t_head, roles, targets = _problem(5)
    cfg = ObjectiveConfig(student_tokens=student, teacher_tokens=teacher)
    obj = DistillationObjective(cfg, s_head, t_head, algorithm=algorithm)
    assert obj.needs_teacher is needed
    in_play = torch.isin(roles, torch.tensor([int(r) for r in roles_in_play(algorithm)]))
    assert token_weights(roles[in_play], cfg).needs_teacher is needed    # the same rule on a batch
    if not needed:   # the teacher's hidden states are not asked for
        out = obj(hs[in_play], None, targets[in_play], roles[in_play], 3.0)
        assert out.sums["kl_tokens"] == 0.0 and float(out.loss.detach()) > 0


def test_a_micro_batch_without_loss_tokens_still_reaches_every_student_input():
    """A rank's padding micro-batch: loss 0, and backward gives zero (not missing) gradients to the hidden states
    and the head, so every rank runs the same collectives."""
    hs, ht, s_head, t_head, roles, targets = _packed(6)
    for cfg, algorithm in ((ObjectiveConfig(), "gopd"),
                           (ObjectiveConfig(student_tokens="none", teacher_tokens="cross_entropy"), "sft")):
        s_head.weight.grad = None
        h = hs.clone().requires_grad_(True)
        out = DistillationObjective(cfg, s_head, t_head, algorithm=algorithm)(
            h, ht, targets, torch.full_like(roles, C), 1.0)
        out.loss.backward()
        assert float(out.loss.detach()) == 0.0 and out.sums["student_tokens"] + out.sums["teacher_tokens"] == 0
        assert h.grad is not None and not bool(h.grad.any())
        assert s_head.weight.grad is not None and not bool(s_head.weight.grad.any())


def test_unknown_algorithm_is_an_error():
    _, _, s_head, t_head, _, _ = _problem()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        DistillationObjective(ObjectiveConfig(), s_head, t_head, algorithm="ppo")
