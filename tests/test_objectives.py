"""Roles -> per-token loss terms, checked against a float64 full-softmax reference (values and gradients)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gopd_fast.config import ObjectiveConfig
from gopd_fast.objectives import DistillationObjective, LossOutput, token_weights
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
