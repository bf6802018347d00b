"""gopd_fast.ops.naive: the backend contract (a ``KLProblem`` in), checked directly against the independent float64
reference."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.ops.naive import fused_linear_kl_naive
from gopd_fast.ops.problem import build_problem

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(rng, n=9, ds=6, dt=5, v=17, dtype=torch.float64):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)

    return (randn(n, ds).requires_grad_(), randn(v, ds).requires_grad_(), randn(n, dt), randn(v, dt),
            randn(v).requires_grad_(), randn(v))


def _naive(h_s, w_s, h_t, w_t, b_s, b_t, rw, fw, **options):
    return fused_linear_kl_naive(build_problem(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t,
                                               reverse_weight=rw, forward_weight=fw, **options))


@pytest.mark.parametrize("jsd_beta", [None, 0.0, 0.25, 1.0])
def test_per_token_loss_stats_and_grad_scale(rng, reference_loss, jsd_beta):
    h_s, w_s, h_t, w_t, b_s, b_t = _inputs(rng)
    rw = torch.rand(9, generator=rng, dtype=torch.float64)
    fw = torch.rand(9, generator=rng, dtype=torch.float64) if jsd_beta is None else torch.zeros(9, dtype=torch.float64)
    targets = torch.randint(0, 17, (9,), generator=rng)
    kw = {"jsd_beta": jsd_beta, "temperature": 1.3, "target_ids": targets, "return_stats": True}
    loss, stats = _naive(h_s, w_s, h_t, w_t, b_s, b_t, rw, fw, grad_scale=None, **kw)
    ref, ref_stats = reference_loss(h_s, w_s, h_t, w_t, rw=rw, fw=fw, jsd_beta=jsd_beta, temperature=1.3, b_s=b_s,
                                    b_t=b_t, targets=targets)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert set(stats) == set(ref_stats)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-10, atol=1e-12)
    scalar, _ = _naive(h_s, w_s, h_t, w_t, b_s, b_t, rw, fw, grad_scale=0.25, **kw)
    assert scalar.shape == ()
    torch.testing.assert_close(scalar, 0.25 * ref.sum(), rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(scalar, (h_s, w_s, b_s))
    want = torch.autograd.grad(0.25 * ref.sum(), (h_s, w_s, b_s))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_teacher_gets_no_gradient(rng):
    h_s, w_s, h_t, w_t, b_s, b_t = _inputs(rng)
    for t in (h_t, w_t, b_t):
        t.requires_grad_()
    loss, _ = _naive(h_s, w_s, h_t, w_t, b_s, b_t, torch.ones(9), torch.ones(9), jsd_beta=None, temperature=1.0,
                     target_ids=None, grad_scale=1.0, return_stats=False)
    loss.backward()
    assert h_t.grad is None and w_t.grad is None and b_t.grad is None and w_s.grad is not None

