"""kernels/skip.py: the opt-in backward that skips negligible tiles' gradient products."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels.forward import kl_forward
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
from gopd_fast.kernels.objective import grad_coefficients, loss_and_kl_stat
from gopd_fast.kernels.skip import skip_backward

from gopd_fast.kernels import tiling
from gopd_fast.ops.problem import build_problem

OBJECTIVES = {"reverse": (None, 1.0, 0.0), "forward": (None, 0.0, 1.0), "jsd": (0.5, 1.0, 0.0)}


def peaked_problem(n=40, vocab=300, ds=24, dt=20, seed=0):
    """Few tokens hold the mass (large logits on a Zipf-ish candidate set), so many tiles are quiet."""
    g = torch.Generator().manual_seed(seed)
    ws, wt = torch.randn(vocab, ds, generator=g), torch.randn(vocab, dt, generator=g)
    candidates = torch.randint(0, 12, (n, 2), generator=g)  # the first 12 ids carry all the mass
    hs = 3.0 * ws[candidates].sum(1) + 0.3 * torch.randn(n, ds, generator=g)
    ht = 3.0 * wt[candidates].sum(1) + 0.3 * torch.randn(n, dt, generator=g)
    return hs, ws, ht, wt


def dz_float64(hs, ws, ht, wt, beta, rw, fw):
    """dL/dz_s of sum_i loss_i in float64, by autograd through materialised logits."""
    zs = (hs.double() @ ws.double().T).requires_grad_()
    logp_s, logp_t = zs.log_softmax(-1), (ht.double() @ wt.double().T).log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if beta is None:
        loss = rw.double() * (p_s * (logp_s - logp_t)).sum(-1) + fw.double() * (p_t * (logp_t - logp_s)).sum(-1)
    else:
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        loss = rw.double() * (beta * (p_t * (logp_t - log_m)).sum(-1) + (1 - beta) * (p_s * (logp_s - log_m)).sum(-1))
    return torch.autograd.grad(loss.sum(), zs)[0]


def run_skip(hs, ws, ht, wt, beta, rw, fw, eps):
    stats = kl_forward(hs, ws, ht, wt, None, None, None, 1.0, beta)
    _, kl = loss_and_kl_stat(stats, rw, fw, beta)
    a, b = grad_coefficients(torch.ones_like(rw), rw, fw, beta, 1.0)
    grad_h, grad_w, _, skipped = skip_backward(
        hs, ws, ht, wt, None, None, stats["lse_s"], stats["lse_t"], a, b, kl.contiguous(), temperature=1.0,
        jsd_beta=beta, need_grad_h=True, need_grad_w=True, need_grad_b=False, eps=eps)
    return grad_h, grad_w, skipped, (a.abs() + b.abs()) * kl.clamp(0, 1).sqrt()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_skips_exactly_the_tiles_under_the_bound(objective):
    """The kernel's gradients equal float64 gradients whose dz has exactly the flagged tiles zeroed; every flagged
    tile lies under the bound, and tiles well over it are kept."""
    beta, rw_value, fw_value = OBJECTIVES[objective]
    hs, ws, ht, wt = peaked_problem()
    n, vocab = hs.shape[0], ws.shape[0]
    rw, fw = torch.full((n,), rw_value), torch.full((n,), fw_value)
    eps = 2.0**-6
    grad_h, grad_w, skipped, scale = run_skip(hs, ws, ht, wt, beta, rw, fw, eps)
    block_n, block_v = tiling.INTERPRETER_CONFIG.block_n, tiling.INTERPRETER_CONFIG.block_v
    assert skipped.shape == (-(-n // block_n), -(-vocab // block_v))
    assert 0.2 < skipped.float().mean() < 1.0  # the test means to exercise both outcomes

    dz = dz_float64(hs, ws, ht, wt, beta, rw, fw)
    keep = skipped.repeat_interleave(block_n, 0).repeat_interleave(block_v, 1)[:n, :vocab] == 0
    ratio = dz.abs() / (scale.double()[:, None] * eps)
    tile_max = torch.nn.functional.pad(ratio, (0, (-vocab) % block_v, 0, (-n) % block_n)).unflatten(
        0, (-1, block_n)).unflatten(2, (-1, block_v)).amax(dim=(1, 3))
    assert (tile_max[skipped == 1] <= 1 + 1e-4).all()
    assert (skipped[tile_max > 1.01] == 0).all()
    kept = torch.where(keep, dz, 0.0)
    for got, want in ((grad_h, kept @ ws.double()), (grad_w, kept.T @ hs.double())):
        assert ((got.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_eps_zero_matches_the_atomic_schedule(problem):
    """eps = 0 skips only all-zero tiles (none here): the same gradients as the atomic schedule."""
    p = problem()
    grads = {}
    for schedule in ("skip", "atomic"):
        hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()
        loss, _ = fused_linear_kl_triton(build_problem(
            hs, ws, p["ht"], p["wt"], student_bias=p["bs"], teacher_bias=p["bt"], reverse_weight=p["rw"],
            forward_weight=p["fw"], jsd_beta=None, temperature=0.9, target_ids=None, grad_scale=1.0,
            return_stats=False), schedule=schedule)
        loss.backward()
        grads[schedule] = (hs.grad, ws.grad)
    for a, b in zip(grads["skip"], grads["atomic"]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    p = problem(bias=False)
    _, _, skipped, _ = run_skip(p["hs"], p["ws"], p["ht"], p["wt"], None, p["rw"], p["fw"], 0.0)
    assert not skipped.any()


def test_unweighted_tokens_skip_everything():
    hs, ws, ht, wt = peaked_problem(n=20)
    zero = torch.zeros(20)
    grad_h, grad_w, skipped, _ = run_skip(hs, ws, ht, wt, None, zero, zero, 2.0**-12)
    assert skipped.all() and not grad_h.any() and not grad_w.any()


def test_bad_eps_is_rejected():
    hs, ws, ht, wt = peaked_problem(n=4, vocab=40)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        run_skip(hs, ws, ht, wt, None, torch.ones(4), torch.zeros(4), -1.0)
