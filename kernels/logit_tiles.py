"""Triton device functions shared by the forward and backward kernels: one [BLOCK_N, BLOCK_V] tile of logits, and
the gradient of the loss with respect to that tile.

Only tl.exp / tl.log / tl.maximum are used (no libdevice), so the same code runs under the Triton interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(h[rows] @ w[cols]^T + b[cols]) * inv_temp, accumulated in fp32 over BLOCK_D slices of the hidden dimension.

    The weight tile is cast to the hidden-state dtype so that tl.dot runs on tensor cores for bf16/fp16; the
    product is never rounded below fp32. Rows/columns outside the masks read zeros (finite logits), so callers only
    mask their reductions.
    """
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + offs_d[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + offs_d[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_mask = (d0 + offs_d) < D
        h = tl.load(h_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_mask[None, :] & d_mask[:, None], other=0.0)
        acc = tl.dot(h, w.to(h.dtype), acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def grad_logit_tile(
    zs, zt, lse_s, lse_t, coef_a, coef_b, kl_stat, log_beta, log_one_minus_beta, IS_JSD: tl.constexpr,
):
    """d loss / d z_s for one tile of temperature-scaled logits (all per-token vectors are [BLOCK_N] fp32).

    KL mode:  coef_a * p_s * ((log p_s - log p_t) - RKL) + coef_b * (p_s - p_t),  kl_stat = RKL
    JSD mode: coef_a * p_s * ((log p_s - log M) - KL(p_s || M)),                  kl_stat = KL(p_s || M)
    with M = beta * p_t + (1 - beta) * p_s; coef_* already hold the per-token weight, the incoming gradient,
    (1 - beta) for JSD, and 1/temperature (the chain rule back to the unscaled logits).
    """
    logp_s = zs - lse_s[:, None]
    logp_t = zt - lse_t[:, None]
    p_s = tl.exp(logp_s)
    if IS_JSD:
        a = logp_t + log_beta
        b = logp_s + log_one_minus_beta
        top = tl.maximum(a, b)
        log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
        dz = coef_a[:, None] * p_s * ((logp_s - log_m) - kl_stat[:, None])
    else:
        p_t = tl.exp(logp_t)
        dz = coef_a[:, None] * p_s * ((logp_s - logp_t) - kl_stat[:, None]) + coef_b[:, None] * (p_s - p_t)
    return dz
