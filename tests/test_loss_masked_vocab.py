"""The -inf bias semantics of ``fused_linear_kl`` (``gopd_fast.ops`` states them) against a float64 reference.

The reference is written independently: it keeps only the unmasked vocabulary columns of each model (a masked
column has probability 0, so 0 * log 0 = 0 drops it), and states the infinite cases explicitly. Odd sizes: N, V and
the chunk are not multiples of each other.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from gopd_fast import fused_linear_kl

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["naive", "chunked"]
N, DS, DT, V, CHUNK = 11, 7, 9, 61, 13


def problem(rng, student_mask, teacher_mask):
    """float64 inputs whose biases are -inf on the given vocabulary columns."""
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64)

    b_s, b_t = randn(V) * 0.5, randn(V) * 0.5
    b_s[list(student_mask)] = -math.inf
    b_t[list(teacher_mask)] = -math.inf
    return {"student_hidden": randn(N, DS).requires_grad_(), "student_weight": randn(V, DS).requires_grad_(),
            "student_bias": b_s.requires_grad_(), "teacher_hidden": randn(N, DT), "teacher_weight": randn(V, DT),
            "teacher_bias": b_t}


def run(p, backend, **kw):
    return fused_linear_kl(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"],
                           student_bias=p["student_bias"], teacher_bias=p["teacher_bias"], backend=backend,
                           chunk_size=CHUNK, **kw)


def reference(p, objective, beta=None):
    """Per-token loss over the unmasked columns; +inf where the masks make it infinite (exact 0 * log 0 = 0)."""
    b_s, b_t = p["student_bias"], p["teacher_bias"]
    keep_s, keep_t = torch.isfinite(b_s), torch.isfinite(b_t)
    z_s = p["student_hidden"] @ p["student_weight"].T + torch.where(keep_s, b_s, 0.0)
    z_t = p["teacher_hidden"] @ p["teacher_weight"].T + torch.where(keep_t, b_t, 0.0)
    s_cols, t_cols = keep_s.nonzero().squeeze(1), keep_t.nonzero().squeeze(1)
    logp_s_kept = torch.log_softmax(z_s[:, s_cols], -1)  # only the student's unmasked columns
    logp_t_kept = torch.log_softmax(z_t[:, t_cols], -1)
    p_s = torch.zeros(N, V, dtype=torch.float64).index_copy(1, s_cols, logp_s_kept.exp())
    p_t = torch.zeros(N, V, dtype=torch.float64).index_copy(1, t_cols, logp_t_kept.exp())
    if objective == "reverse":
        if bool((keep_s & ~keep_t).any()):  # the student puts mass where the teacher has none
            return torch.full((N,), math.inf, dtype=torch.float64)
        log_t = torch.log_softmax(z_t[:, t_cols], -1)[:, (keep_s[t_cols]).nonzero().squeeze(1)]
        return (logp_s_kept.exp() * (logp_s_kept - log_t)).sum(-1)
    if objective == "forward":
        if bool((keep_t & ~keep_s).any()):
            return torch.full((N,), math.inf, dtype=torch.float64)
        log_s = torch.log_softmax(z_s[:, s_cols], -1)[:, (keep_t[s_cols]).nonzero().squeeze(1)]
        return (logp_t_kept.exp() * (logp_t_kept - log_s)).sum(-1)
    mixture = beta * p_t + (1 - beta) * p_s
    cols = (keep_s | keep_t).nonzero().squeeze(1)  # the mixture is > 0 wherever either model is
    m, ps, pt = mixture[:, cols], p_s[:, cols], p_t[:, cols]
    kl_t = (pt * (torch.log(pt.clamp_min(1e-300)) - m.log())).sum(-1)  # clamp only where pt = 0 (term is 0)
    kl_s = (ps * (torch.log(ps.clamp_min(1e-300)) - m.log())).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def grads(p, loss):
    return torch.autograd.grad(loss, [p["student_hidden"], p["student_weight"], p["student_bias"]])


OBJECTIVES = {"reverse": {}, "forward": {"forward_weight": 1.0, "reverse_weight": 0.0},
              "jsd": {"jsd_beta": 0.3}}
MASKS = {  # student-masked columns, teacher-masked columns
    "student only": ({3, 17, 40}, set()),
    "teacher only": (set(), {5, 17, 59}),
    "both, same entries": ({2, 30, 60}, {2, 30, 60}),
    "both, nested": ({2, 30, 44, 60}, {2, 30}),
    "many entries": (set(range(0, V, 2)) | {1, 7}, set(range(0, V, 2))),
    "a whole tile": (set(range(CHUNK, 2 * CHUNK)), set(range(CHUNK, 2 * CHUNK))),
    "the first tile": (set(range(CHUNK)) | {50}, set(range(CHUNK))),
    "the last entry only": ({V - 1}, {V - 1}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("mask", list(MASKS))
def test_loss_and_gradients_over_the_unmasked_vocabulary(rng, backend, objective, mask):
    p = problem(rng, *MASKS[mask])
    beta = OBJECTIVES[objective].get("jsd_beta")
    want = reference(p, objective, beta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = run(p, backend, reduction="none", **OBJECTIVES[objective])
    infinite = bool(torch.isinf(want).any())
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if infinite:  # reported, with the direction and the token count
        direction = "reverse KL" if objective == "reverse" else "forward KL"
        assert len(messages) == 1 and direction in messages[0] and f"on {N} token(s)" in messages[0]
    else:
        assert messages == []
    got_grads = grads(p, got.sum())
    assert all(bool(torch.isfinite(g).all()) for g in got_grads)  # never NaN/inf from the masking itself
    if not infinite:
        want_grads = grads(p, want.sum())
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)
        masked_both = ~torch.isfinite(p["student_bias"]) & ~torch.isfinite(p["teacher_bias"])
        assert bool((got_grads[1][masked_both] == 0).all()) and bool((got_grads[2][masked_both] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_forward_kl_keeps_its_finite_gradient(rng, backend):
    # the student masks entries the teacher predicts: FKL = +inf, and dFKL/dz_s = p_s - p_t (usual formula)
    p = problem(rng, {4, 9, 33}, set())
    with pytest.warns(RuntimeWarning, match=r"forward KL\(p_t\|\|p_s\) on 11 token"):
        loss = run(p, backend, forward_weight=1.0, reverse_weight=0.0, reduction="sum")
    assert loss.item() == math.inf
    got = grads(p, loss)
    keep_s = torch.isfinite(p["student_bias"])
    z_s = p["student_hidden"] @ p["student_weight"].T + p["student_bias"]
    z_t = p["teacher_hidden"] @ p["teacher_weight"].T + p["teacher_bias"]
    grad_z = (torch.softmax(z_s, -1) - torch.softmax(z_t, -1)).detach()
    want = (grad_z @ p["student_weight"], grad_z.T @ p["student_hidden"], grad_z.sum(0))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.detach(), rtol=1e-9, atol=1e-11)
    assert bool((got[2][~keep_s] < 0).all())  # the teacher's mass there pulls the masked logits up


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_infinite_reverse_kl_is_inf_with_zero_gradient_and_other_tokens_unaffected(rng, backend, reduction):
    # teacher masks an entry the student predicts: RKL = +inf on every weighted token; its gradient is 0, and a
    # token weighted only by the (finite) forward KL keeps its exact gradient
    p = problem(rng, set(), {6})
    rw = torch.zeros(N, dtype=torch.float64)
    rw[:4] = 1.0
    fw = torch.zeros(N, dtype=torch.float64)
    fw[4:] = 0.5
    with pytest.warns(RuntimeWarning, match=r"reverse KL\(p_s\|\|p_t\) on 4 token"):
        loss = run(p, backend, reverse_weight=rw, forward_weight=fw, reduction=reduction)
    if reduction == "none":
        assert bool(torch.isinf(loss[:4]).all()) and bool(torch.isfinite(loss[4:]).all())
    else:
        assert loss.item() == math.inf
    got = grads(p, loss.sum())
    want_loss = 0.5 * reference(p, "forward")[4:].sum()
    want = grads(p, want_loss * (1.0 if reduction != "mean" else 1.0 / N))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_report_infinite_kl_and_zero_weight_tokens_stay_finite(rng, backend):
    p = problem(rng, set(), {6})
    rw = torch.zeros(N, dtype=torch.float64)  # the reverse KL is infinite but weighted 0 everywhere
    loss, stats = run(p, backend, reverse_weight=rw, forward_weight=1.0, reduction="none", return_stats=True)
    assert bool(torch.isfinite(loss).all())
    assert bool(torch.isinf(stats.reverse_kl).all()) and bool(torch.isfinite(stats.forward_kl).all())
    assert bool(torch.isfinite(stats.student_entropy).all())


@pytest.mark.parametrize("name", ["student_bias", "teacher_bias"])
def test_a_model_with_every_entry_masked_is_an_input_error(rng, name):
    p = problem(rng, set(), set())
    with torch.no_grad():
        p[name].fill_(-math.inf)
    with pytest.raises(ValueError, match=f"{name} is -inf at every vocabulary entry"):
        run(p, "chunked")


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_plus_inf_bias_is_an_input_error(rng, value):
    p = problem(rng, set(), set())
    with torch.no_grad():
        p["teacher_bias"][3] = value
    with pytest.raises(ValueError, match="teacher_bias has NaN or \\+inf"):
        run(p, "naive")


def test_masked_teacher_rows_beyond_the_student_vocabulary_are_ignored(rng):
    # truncate_teacher_vocab: only the shared rows count, so a fully masked padding tail is fine
    p = problem(rng, set(), set())
    pad = 5
    w_t = torch.cat([p["teacher_weight"], torch.randn(pad, DT, generator=rng, dtype=torch.float64)])
    b_t = torch.cat([p["teacher_bias"], torch.full((pad,), -math.inf, dtype=torch.float64)])
    got = fused_linear_kl(p["student_hidden"], p["student_weight"], p["teacher_hidden"], w_t,
                          student_bias=p["student_bias"], teacher_bias=b_t, truncate_teacher_vocab=True,
                          reduction="none", backend="chunked", chunk_size=CHUNK)
    torch.testing.assert_close(got, reference(p, "reverse"), rtol=1e-10, atol=1e-12)


def test_a_backend_returning_nan_on_a_masked_vocabulary_is_named(rng, monkeypatch):
    # a backend that does not implement the rules must not pass its NaN off as a result (or as an overflow)
    import gopd_fast.loss as loss_module
    from gopd_fast.ops.chunked import fused_linear_kl_chunked

    def nan_backend(problem):
        loss, stats = fused_linear_kl_chunked(problem)
        return loss * math.nan, stats

    monkeypatch.setattr(loss_module, "backend_fn", lambda name, chunk_size: nan_backend)
    p = problem(rng, {3}, {3})
    with pytest.raises(RuntimeError, match="backend 'naive' returned NaN for a vocabulary masked"):
        run(p, "naive")


def test_infinite_kl_is_reported_also_with_check_finite_false(rng):
    p = problem(rng, set(), {6})
    with pytest.warns(RuntimeWarning, match="reverse KL"):
        assert run(p, "chunked", check_finite=False).item() == math.inf
