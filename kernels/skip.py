"""``skip``: an opt-in backward that skips the gradient products of (token tile x vocabulary tile) blocks whose dz
is negligible, as Cut Cross-Entropy's gradient filter does, for both KL directions and the JSD.

Each program recomputes its student and teacher logit tiles, forms dz (``logit_tiles.grad_logit_tile``) and
tests it against the bound

    |dz[i, j]| <= eps * (|coef_a[i]| + |coef_b[i]|) * sqrt(min(KL[i], 1))    for every element of the tile,

where coef_a, coef_b are the token's coefficients (weights x incoming gradient / temperature) and KL the token's
RKL (KL(p_s || M) for the JSD; an infinite one from a -inf bias counts as 1). The bound is dz
itself, so it holds for every objective: a bound from the probabilities alone would not, since the reverse KL's
p_s * (log p_s - log p_t) grows without limit as p_t -> 0 even when p_s < 2^-12. Passing tiles skip the two
products dz @ W_s and dz^T @ h_s (four fifths of the tile's FLOPs at Ds = Dt; the logits must be recomputed to
know). The bias gradient's column sums are cheap and always kept. Every skipped element is below eps = 2^-12 of
its token's coefficient: less than half a bf16 ulp of a dz of that size, which bf16 operands lose in rounding
anyway.

Masked entries (a -inf bias, docs/algorithm.md §6.5) get ``grad_logit_tile``'s finite dz, 0 where both models
mask the entry, so a tile masked in both heads is skipped at every eps >= 0.

Launch order, logit tiles and operand loads (TMA descriptors on sm_90) as in the ``atomic`` schedule; accumulation
too (fp32 atomics into fp32 gradients, results vary in the last bits);
``skip_backward`` also returns the per-tile skip flags, from which bench scripts report the skip fraction.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tiling
from .logit_tiles import (
    atomic_grad_products,
    grad_logit_tile,
    grouped_tile_coords,
    tile_logits,
)
from .objective import is_jsd

SKIP_EPS = 2.0**-12


@triton.jit
def _backward_skip_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
    grad_h_ptr, grad_w_ptr, grad_b_ptr, skipped_ptr,
    N, V, Ds, Dt, inv_temp, log_beta, log_one_minus_beta, eps, N_BUCKET,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr,
    NEED_GRAD_H: tl.constexpr, NEED_GRAD_W: tl.constexpr, NEED_GRAD_B: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, GROUP_TOKENS: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # The atomic schedule's program: grouped launch order, both logit tiles from one K loop, TMA or pointer loads.
    pid_n, pid_v, r0, c0, rows, cols, row_mask, col_mask = grouped_tile_coords(N, V, GROUP_TOKENS, BLOCK_N, BLOCK_V)
    hs, ws, zs, zt = tile_logits(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, r0, c0, rows, cols, row_mask, col_mask,
                                 N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT,
                                 PREC_S, PREC_T, USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
    coef_a = tl.load(coef_a_ptr + rows, mask=row_mask, other=0.0)
    coef_b = tl.load(coef_b_ptr + rows, mask=row_mask, other=0.0)
    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
    dz = grad_logit_tile(
        zs, zt,
        tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0),
        tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0),
        coef_a, coef_b, kl, log_beta, log_one_minus_beta, IS_JSD,
    )
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_GRAD_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    scale = (tl.abs(coef_a) + tl.abs(coef_b)) * tl.sqrt(tl.minimum(tl.maximum(kl, 0.0), 1.0))
    excess = tl.abs(dz) - eps * scale[:, None]
    keep = tl.max(tl.max(excess, axis=1), axis=0) > 0.0
    tl.store(skipped_ptr + pid_n * tl.cdiv(V, BLOCK_V) + pid_v, (1 - keep.to(tl.int32)).to(tl.int8))
    if keep:
        atomic_grad_products(dz.to(hs_ptr.dtype.element_ty), hs, ws, grad_h_ptr, grad_w_ptr, r0, c0, rows, cols,
                             row_mask, col_mask, Ds, stride_hs, stride_ws, NEED_GRAD_H, NEED_GRAD_W, PREC_S,
                             USE_TMA, BLOCK_D)


_backward_skip = tiling.autotuned(_backward_skip_kernel, tiling.BACKWARD_CONFIGS,
                                  reset_to_zero=["grad_h_ptr", "grad_w_ptr", "grad_b_ptr"])


def skip_backward(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    student_bias: Tensor | None, teacher_bias: Tensor | None, lse_s: Tensor, lse_t: Tensor, coef_a: Tensor,
    coef_b: Tensor, kl_stat: Tensor, *, temperature: float, jsd_beta: float | None, need_grad_h: bool,
    need_grad_w: bool, need_grad_b: bool, eps: float = SKIP_EPS,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """``backward.kl_backward``'s gradients (same arguments and dtypes) with negligible tiles' products skipped,
    and the skip flags [token tiles, vocabulary tiles] (int8, 1 = skipped). eps = 0 skips only all-zero tiles."""
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    n_tokens, ds = student_hidden.shape
    vocab, dt = student_weight.shape[0], teacher_hidden.shape[1]
    device = student_hidden.device
    jsd = is_jsd(jsd_beta)
    dummy = student_hidden.new_empty(1, dtype=torch.float32)
    grad_h = torch.zeros((n_tokens, ds), dtype=torch.float32, device=device) if need_grad_h else dummy
    grad_w = torch.zeros((vocab, ds), dtype=torch.float32, device=device) if need_grad_w else dummy
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_grad_b else dummy
    # One flag per tile of the launched configuration; the autotuner picks it at the first launch, so the buffer
    # is sized for the smallest tiles any candidate has and read back with the tiles of the one that ran.
    configs = [tiling.INTERPRETER_CONFIG] if tiling.interpreting() else list(tiling.BACKWARD_CONFIGS)
    most = max(triton.cdiv(n_tokens, c.block_n) * triton.cdiv(vocab, c.block_v) for c in configs)
    skipped = torch.empty((most,), dtype=torch.int8, device=device)

    def grid(cfg):
        return (triton.cdiv(n_tokens, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)

    with tiling.annotate("_backward_skip_kernel"):
        _backward_skip[grid](
            student_hidden, student_weight, dummy if student_bias is None else student_bias,
            teacher_hidden, teacher_weight, dummy if teacher_bias is None else teacher_bias,
            lse_s, lse_t, coef_a, coef_b, kl_stat, grad_h, grad_w, grad_b, skipped,
            n_tokens, vocab, ds, dt, 1.0 / temperature,
            math.log(jsd_beta) if jsd else 0.0, math.log1p(-jsd_beta) if jsd else 0.0, float(eps),
            tiling.n_bucket(n_tokens),
            student_hidden.stride(0), student_weight.stride(0), teacher_hidden.stride(0), teacher_weight.stride(0),
            HAS_BS=student_bias is not None, HAS_BT=teacher_bias is not None, IS_JSD=jsd,
            NEED_GRAD_H=need_grad_h, NEED_GRAD_W=need_grad_w, NEED_GRAD_B=need_grad_b,
            PREC_S=tiling.dot_precision(student_hidden.dtype), PREC_T=tiling.dot_precision(teacher_hidden.dtype),
            GROUP_TOKENS=tiling.GROUP_TOKENS,
            **tiling.launch_meta(student_hidden, student_weight, teacher_hidden, teacher_weight),
        )
    ran = getattr(_backward_skip, "best_config", None)
    block_n, block_v = ((ran.kwargs["BLOCK_N"], ran.kwargs["BLOCK_V"]) if ran is not None
                        else (tiling.INTERPRETER_CONFIG.block_n, tiling.INTERPRETER_CONFIG.block_v))
    tiles = (triton.cdiv(n_tokens, block_n), triton.cdiv(vocab, block_v))
    return (
        grad_h.to(student_hidden.dtype) if need_grad_h else None,
        grad_w.to(student_weight.dtype) if need_grad_w else None,
        grad_b.to(student_bias.dtype) if need_grad_b else None,
        skipped[: tiles[0] * tiles[1]].view(tiles),
    )
