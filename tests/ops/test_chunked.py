"""gopd_fast.ops.chunked: the backend contract (a ``KLProblem`` in), its memory bound, and the online recurrences at
extreme logits."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gopd_fast.ops.chunked import default_chunk_size, fused_linear_kl_chunked
from gopd_fast.ops.problem import build_problem

pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(rng, n, ds, dt, v, dtype=torch.float64, scale=1.0):
    def randn(*shape):
        return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)

    return (randn(n, ds).requires_grad_(), randn(v, ds).requires_grad_(), randn(n, dt), randn(v, dt),
            randn(v).requires_grad_(), randn(v))


def _chunked(args, rw, fw, *, chunk_size=None, cache_bytes=None, **options):
    h_s, w_s, h_t, w_t, b_s, b_t = args
    problem = build_problem(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, reverse_weight=rw,
                            forward_weight=fw, **options)
    backend_options = {} if cache_bytes is None else {"cache_bytes": cache_bytes}
    return fused_linear_kl_chunked(problem, chunk_size=chunk_size, **backend_options)


def _call(args, rw, fw, grad_scale, chunk, jsd_beta=None, targets=None):
    return _chunked(args, rw, fw, jsd_beta=jsd_beta, temperature=0.8, target_ids=targets, grad_scale=grad_scale,
                    return_stats=True, chunk_size=chunk)


@pytest.mark.parametrize("jsd_beta", [None, 0.0, 0.6, 1.0])
@pytest.mark.parametrize("grad_scale", [None, 0.5])
def test_matches_reference(rng, reference_loss, jsd_beta, grad_scale):
    args = _inputs(rng, n=11, ds=7, dt=9, v=53)
    rw = torch.rand(11, generator=rng, dtype=torch.float64)
    fw = torch.rand(11, generator=rng, dtype=torch.float64) if jsd_beta is None else torch.zeros(11, dtype=torch.float64)
    targets = torch.randint(0, 53, (11,), generator=rng)
    loss, stats = _call(args, rw, fw, grad_scale, chunk=10, jsd_beta=jsd_beta, targets=targets)
    h_s, w_s, h_t, w_t, b_s, b_t = args
    ref, ref_stats = reference_loss(h_s, w_s, h_t, w_t, rw=rw, fw=fw, jsd_beta=jsd_beta, temperature=0.8, b_s=b_s,
                                    b_t=b_t, targets=targets)
    upstream = torch.linspace(-1, 2, 11, dtype=torch.float64)
    if grad_scale is None:
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
        loss, ref = (loss * upstream).sum(), (ref * upstream).sum()
    else:
        ref = grad_scale * ref.sum()
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(loss, (h_s, w_s, b_s)), torch.autograd.grad(ref, (h_s, w_s, b_s))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_extreme_logits_stay_finite_and_exact(rng, reference_loss):
    # logits spanning ~±300 in float32: exp() without the running maximum would overflow
    args = _inputs(rng, n=8, ds=16, dt=16, v=300, dtype=torch.float32, scale=4.5)
    rw = torch.ones(8)
    loss, stats = _call(args, rw, torch.ones(8), None, chunk=37)
    h_s, w_s, h_t, w_t, b_s, b_t = args
    ref, ref_stats = reference_loss(h_s, w_s, h_t, w_t, rw=rw, fw=torch.ones(8), temperature=0.8, b_s=b_s, b_t=b_t)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(stats["student_entropy"].double(), ref_stats["student_entropy"], rtol=1e-4, atol=1e-4)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("grad_scale", [None, 1.0])
@pytest.mark.parametrize("jsd_beta", [None, 0.5])
def test_never_materialises_n_by_v(rng, grad_scale, jsd_beta):
    n, d, v, chunk = 96, 8, 600, 50
    args = _inputs(rng, n=n, ds=d, dt=d, v=v, dtype=torch.float32)
    fw = torch.ones(n) if jsd_beta is None else torch.zeros(n)
    with _LargestOutput() as probe:  # cache_bytes=0: the scalar path's optional logit cache is off
        loss, _ = _chunked(args, torch.ones(n), fw, jsd_beta=jsd_beta, temperature=1.0, target_ids=None,
                           grad_scale=grad_scale, return_stats=True, chunk_size=chunk, cache_bytes=0)
        loss.sum().backward()
    # the biggest tensors are one [n, chunk] tile and the [v, d] weight gradient, never [n, v]
    assert probe.largest <= max(n * chunk, v * d) < n * v // 8


def test_default_chunk_size():
    assert default_chunk_size(2048, 151936) * 2048 <= 1 << 22
    assert default_chunk_size(1, 100) == 100  # never larger than the vocabulary
    assert default_chunk_size(10**7, 151936) == 256  # a floor keeps the matmuls efficient


@pytest.mark.parametrize("cache_bytes", [0, 70 * 2 * 50 * 8, 1 << 30])  # recompute, 3 token blocks, one block
@pytest.mark.parametrize("jsd_beta", [None, 0.4])
def test_scalar_path_logit_cache(rng, reference_loss, cache_bytes, jsd_beta):
    n, v = 200, 50
    args = _inputs(rng, n=n, ds=6, dt=5, v=v)
    rw = torch.rand(n, generator=rng, dtype=torch.float64)
    fw = torch.rand(n, generator=rng, dtype=torch.float64) if jsd_beta is None else torch.zeros(n, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=rng)
    loss, stats = _chunked(args, rw, fw, jsd_beta=jsd_beta, temperature=1.1, target_ids=targets, grad_scale=0.3,
                           return_stats=True, chunk_size=16, cache_bytes=cache_bytes)
    h_s, w_s, h_t, w_t, b_s, b_t = args
    ref, ref_stats = reference_loss(h_s, w_s, h_t, w_t, rw=rw, fw=fw, jsd_beta=jsd_beta, temperature=1.1, b_s=b_s,
                                    b_t=b_t, targets=targets)
    ref = 0.3 * ref.sum()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], rtol=1e-10, atol=1e-12)
    for g, w in zip(torch.autograd.grad(loss, (h_s, w_s, b_s)), torch.autograd.grad(ref, (h_s, w_s, b_s))):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
