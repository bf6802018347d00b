"""-inf bias semantics of the Triton kernels (masked vocabulary entries) vs a float64 reference of the spec.

The spec: the loss is over the unmasked entries with 0 * log 0 = 0; an entry with probability 0 under both models
adds nothing and gets zero gradient; RKL is +inf for a token where the student gives p > 0 to an entry the teacher
masks, FKL symmetrically; the generalised JSD stays finite; gradients are the usual formulas with 0 * (-inf) := 0
(p_s - p_t stays finite, so an infinite FKL still has a finite gradient); never NaN from the masking itself.
A token whose RKL is +inf gets no gradient from the RKL term (the usual formula is inf - inf there, and its
limit, +inf and -inf in one row, would make grad_h = dz @ W NaN): every gradient is finite.

The reference below implements those rules directly on materialised float64 logits (no gopd_fast code).
"""
from __future__ import annotations

import math

import pytest
import torch
from gopd_fast.kernels.backward import SCHEDULES
from gopd_fast.kernels.forward import kl_forward
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
from gopd_fast.kernels.objective import grad_coefficients, loss_and_kl_stat
from gopd_fast.kernels.schedule import LOGIT_BLOCK, SKIP
from gopd_fast.kernels.skip import skip_backward

from gopd_fast.kernels import tiling
from gopd_fast.ops.problem import build_problem

INF = math.inf
N, V = 37, 203
# Interpreter tiles are 32 columns and this shape gets 3 vocabulary splits of 3, 2 and 2 tiles (the longer first):
# [0, 96) is a whole split, so the all -inf tile and split paths run, plus scattered single entries.
MASKED_RANGE = slice(0, 96)
SCATTERED = [101, 150, 202]


def spec_reference(hs, ws, bs, ht, wt, bt, rw, fw, upstream, *, jsd_beta, temperature):
    """Per-token loss, stats and the student's gradients (h, W, b) of sum(upstream * loss), float64, by the spec."""
    hs, ws, bs = hs.double(), ws.double(), bs.double()
    zs = (hs @ ws.T + bs) / temperature
    zt = (ht.double() @ wt.double().T + bt.double()) / temperature
    logp_s, logp_t = zs.log_softmax(-1), zt.log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    on_s, on_t = p_s > 0, p_t > 0
    zero = torch.zeros((), dtype=torch.float64)
    rkl = torch.where(on_s, p_s * (logp_s - logp_t), zero).sum(-1)  # p_s > 0 = p_t -> +inf
    fkl = torch.where(on_t, p_t * (logp_t - logp_s), zero).sum(-1)
    entropy = -torch.where(on_s, p_s * logp_s, zero).sum(-1)
    rw, fw, g = rw.double(), fw.double(), upstream.double()

    def weighted(w, kl):
        return torch.where(w == 0, zero, w * kl)

    if jsd_beta is None:
        loss = weighted(rw, rkl) + weighted(fw, fkl)
        rev_rows = (rw * g != 0) & torch.isfinite(rkl)  # an infinite RKL gives no gradient
        rev = torch.where(on_s & on_t & rev_rows[:, None], (rw * g)[:, None] * p_s * ((logp_s - logp_t) - rkl[:, None]),
                          zero)
        dz = rev + (fw * g)[:, None] * (p_s - p_t)
    else:
        log_m = torch.log(jsd_beta * p_t + (1 - jsd_beta) * p_s)
        s_terms = torch.where(on_s, p_s * (logp_s - log_m), zero)
        t_terms = torch.where(on_t, p_t * (logp_t - log_m), zero)
        kl_s_m = s_terms.sum(-1)
        loss = weighted(rw, jsd_beta * t_terms.sum(-1) + (1 - jsd_beta) * kl_s_m)
        coef = rw * g * (1 - jsd_beta)
        dz = torch.where(on_s & (coef != 0)[:, None],
                         coef[:, None] * p_s * ((logp_s - log_m) - kl_s_m[:, None]), zero)
    dz = dz / temperature  # back to the unscaled logits
    grads = (dz @ ws, dz.T @ hs, dz.sum(0))
    return loss, {"reverse_kl": rkl, "forward_kl": fkl, "student_entropy": entropy}, grads


def masked(p, side):
    """The problem with -inf biases on MASKED_RANGE and SCATTERED for the student, the teacher or both."""
    p = dict(p)
    cols = list(range(V))[MASKED_RANGE] + SCATTERED
    for name, on in (("bs", side in ("student", "both")), ("bt", side in ("teacher", "both"))):
        if on:
            p[name] = p[name].clone()
            p[name][cols] = -INF
    return p


def run(p, *, jsd_beta, temperature, schedule, upstream):
    hs, ws, bs = (p[k].clone().requires_grad_() for k in ("hs", "ws", "bs"))
    loss, stats = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"], forward_weight=p["fw"],
        jsd_beta=jsd_beta, temperature=temperature, target_ids=None, grad_scale=None,
        return_stats=True), schedule=schedule)
    (loss * upstream).sum().backward()
    return loss.detach(), stats, (hs.grad, ws.grad, bs.grad)


def assert_close(actual, expected, tol, name):
    """Same infinities in the same places, no NaN, finite parts within tol of max |finite expected|."""
    actual, expected = actual.double(), expected.double()
    assert not torch.isnan(actual).any(), f"{name}: NaN"
    assert not torch.isnan(expected).any(), f"{name}: NaN in the reference"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{name}: infinities differ"
    assert torch.equal(actual[torch.isinf(actual)], expected[torch.isinf(expected)]), f"{name}: signs of inf"
    finite = torch.isfinite(expected)
    if not finite.any():
        return
    scale = expected[finite].abs().max().clamp_min(1e-30)
    assert ((actual[finite] - expected[finite]).abs().max() / scale).item() < tol, name


def test_spec_reference_matches_autograd_without_masks(problem, ref):
    """The reference's hand-written gradients are the autograd gradients of the plain loss (no -inf anywhere)."""
    p = problem()
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(7))
    for jsd_beta in (None, 0.4):
        leaves = [p[k].double().requires_grad_() for k in ("hs", "ws", "bs")]
        loss, _ = ref(leaves[0], leaves[1], p["ht"], p["wt"], leaves[2], p["bt"], p["rw"], p["fw"],
                      jsd_beta=jsd_beta, temperature=0.8)
        (loss * upstream.double()).sum().backward()
        spec_loss, _, grads = spec_reference(p["hs"], p["ws"], p["bs"], p["ht"], p["wt"], p["bt"], p["rw"], p["fw"],
                                             upstream, jsd_beta=jsd_beta, temperature=0.8)
        assert torch.allclose(spec_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        for leaf, grad in zip(leaves, grads):
            assert torch.allclose(grad, leaf.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", (*SCHEDULES, LOGIT_BLOCK, SKIP))
@pytest.mark.parametrize("side", ["both", "student", "teacher"])
@pytest.mark.parametrize("jsd_beta", [None, 0.3], ids=["kl", "jsd"])
def test_masked_entries_follow_the_spec(problem, schedule, side, jsd_beta):
    p = masked(problem(), side)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(p["hs"].device)
    got_loss, got_stats, got_grads = run(p, jsd_beta=jsd_beta, temperature=0.9, schedule=schedule,
                                         upstream=upstream)
    want_loss, want_stats, want_grads = spec_reference(
        p["hs"], p["ws"], p["bs"], p["ht"], p["wt"], p["bt"], p["rw"], p["fw"], upstream, jsd_beta=jsd_beta,
        temperature=0.9)
    # The cases this test means to cover: which KL is infinite on every token.
    assert bool(torch.isinf(want_stats["forward_kl"]).all()) == (side == "student")
    assert bool(torch.isinf(want_stats["reverse_kl"]).all()) == (side == "teacher")
    assert_close(got_loss, want_loss, 1e-5, "loss")
    for name, value in want_stats.items():
        assert_close(got_stats[name], value, 1e-5, name)
    for name, g, w in zip(("grad_h", "grad_W", "grad_b"), got_grads, want_grads):
        assert_close(g, w, 2e-5, name)
    assert all(bool(torch.isfinite(g).all()) for g in got_grads)
    if side == "both":  # entries masked in both models get no gradient
        cols = list(range(V))[MASKED_RANGE] + SCATTERED
        assert bool((got_grads[1][cols] == 0).all()) and bool((got_grads[2][cols] == 0).all())


def test_masked_in_both_equals_the_loss_over_the_other_entries(problem):
    """Masking entries in both heads is the same as removing them from the vocabulary."""
    p = masked(problem(), "both")
    keep = [j for j in range(V) if j not in set(list(range(V))[MASKED_RANGE] + SCATTERED)]
    small = {**p, **{k: p[k][keep] for k in ("ws", "wt", "bs", "bt")}}
    upstream = torch.ones(N, device=p["hs"].device)
    loss, stats, grads = run(p, jsd_beta=None, temperature=1.0, schedule="one_pass", upstream=upstream)
    small_loss, small_stats, small_grads = run(small, jsd_beta=None, temperature=1.0, schedule="one_pass",
                                               upstream=upstream)
    assert torch.allclose(loss, small_loss, rtol=1e-5, atol=1e-6)
    assert stats.pop("schedule") == small_stats.pop("schedule") == "one_pass"  # the stats name the schedule
    for name in small_stats:
        assert torch.allclose(stats[name], small_stats[name], rtol=1e-5, atol=1e-5), name
    assert torch.allclose(grads[0], small_grads[0], rtol=1e-4, atol=1e-6)
    assert torch.allclose(grads[1][keep], small_grads[1], rtol=1e-4, atol=1e-6)


def test_zero_weight_drops_an_infinite_kl(problem):
    """Student-masked entries make every FKL +inf; with forward_weight 0 the loss and gradients stay finite."""
    p = masked(problem(), "student")
    p["fw"] = torch.zeros_like(p["fw"])
    loss, stats, grads = run(p, jsd_beta=None, temperature=1.0, schedule="one_pass",
                             upstream=torch.ones(N, device=p["hs"].device))
    assert torch.isinf(stats["forward_kl"]).all()
    assert torch.isfinite(loss).all() and all(bool(torch.isfinite(g).all()) for g in grads)


def test_whole_split_masked_is_exercised():
    """Guard for this file's premise: MASKED_RANGE covers a whole vocabulary split of the forward."""
    splits, unit = tiling.vocab_splits(N, V, torch.device("cpu"))
    assert splits >= 2 and tiling.split_bounds(0, splits, V, unit) == (MASKED_RANGE.start, MASKED_RANGE.stop)


@pytest.mark.parametrize("side", ["both", "student", "teacher"])
def test_skip_at_eps_zero_follows_the_spec_and_skips_tiles_masked_in_both(problem, side):
    """eps = 0 keeps every tile with a nonzero dz, so the gradients are the spec's; the vocabulary tiles of
    MASKED_RANGE (dz = 0 when both heads mask them) are skipped, the others kept."""
    p = masked(problem(), side)
    upstream = torch.ones(N, device=p["hs"].device)
    stats = kl_forward(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], None, 1.0, None)
    _, kl_stat = loss_and_kl_stat(stats, p["rw"], p["fw"], None)
    coef_a, coef_b = grad_coefficients(upstream, p["rw"], p["fw"], None, 1.0)
    *grads, skipped = skip_backward(
        p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], stats["lse_s"], stats["lse_t"], coef_a, coef_b,
        kl_stat.contiguous(), temperature=1.0, jsd_beta=None, need_grad_h=True, need_grad_w=True,
        need_grad_b=True, eps=0.0)
    *_, want_grads = spec_reference(p["hs"], p["ws"], p["bs"], p["ht"], p["wt"], p["bt"], p["rw"], p["fw"],
                                    upstream, jsd_beta=None, temperature=1.0)
    for name, g, w in zip(("grad_h", "grad_W", "grad_b"), grads, want_grads):
        assert_close(g, w, 2e-5, name)
    block_v = tiling.INTERPRETER_CONFIG.block_v
    masked_tiles = MASKED_RANGE.stop // block_v  # MASKED_RANGE starts at 0 and holds whole tiles
    assert bool(skipped[:, :masked_tiles].all()) == (side == "both")
    assert not skipped[:, masked_tiles:].any()
