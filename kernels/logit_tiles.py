"""Triton device functions shared by the forward and backward kernels: the launch order of tiled grids, operand
loads (TMA descriptors or pointers), one [BLOCK_N, BLOCK_V] tile of student and teacher logits, and the gradient of
the loss with respect to that tile.

Only tl.exp / tl.log / tl.maximum are used (no libdevice), so the same code runs under the Triton interpreter.

Masked vocabulary entries (a -inf bias) give -inf logits. Every function here treats an entry of probability 0 as
contributing nothing (0 * log 0 = 0, 0 * (-inf) := 0) and never produces NaN from the masking itself.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, num_n, num_v, group):
    """(token tile, vocabulary tile or split) of program ``pid``: token tiles fastest within groups of ``group``
    token tiles, so a wave of programs shares weight tiles (read once per group) and hidden-state rows (kept in L2).
    ``tiling.grouped_tile`` is the Python twin used by the traffic model."""
    per_group = group * num_v
    first_n = (pid // per_group) * group
    size = tl.minimum(num_n - first_n, group)
    local = pid % per_group
    return first_n + local % size, local // size


@triton.jit
def grouped_tile_coords(N, V, GROUP_TOKENS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(pid_n, pid_v, r0, c0, rows, cols, row_mask, col_mask) of this program's [BLOCK_N, BLOCK_V] tile of an
    [N, V] logit grid launched 1-D in the grouped order (``GROUP_TOKENS`` exceeds every BLOCK_N, so groups >= 1)."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP_TOKENS // BLOCK_N)
    r0 = pid_n * BLOCK_N
    c0 = pid_v * BLOCK_V
    rows = r0 + tl.arange(0, BLOCK_N)
    cols = c0 + tl.arange(0, BLOCK_V)
    return pid_n, pid_v, r0, c0, rows, cols, rows < N, cols < V


@triton.jit
def split_bounds(split, num_splits, V, split_unit):
    """[start, end) columns of vocabulary split ``split``: balanced whole units of ``split_unit`` columns, the
    longer splits first. ``tiling.split_bounds`` is the Python twin and says why (``tiling.vocab_splits`` picks
    num_splits and the unit)."""
    units = tl.cdiv(V, split_unit)
    short = units // num_splits
    longer = units % num_splits
    start = (split * short + tl.minimum(split, longer)) * split_unit
    end = ((split + 1) * short + tl.minimum(split + 1, longer)) * split_unit
    return start, tl.minimum(end, V)


@triton.jit
def operand_source(ptr, n_rows, n_cols, stride, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                   USE_TMA: tl.constexpr):
    """What ``load_rows`` reads a [n_rows, n_cols] row-major operand from: a TMA tensor descriptor (sm_90+, chosen
    by ``tiling.use_tma``) or the pointer itself. Descriptors are made once per program, outside the tile loops."""
    if USE_TMA:
        return tl.make_tensor_descriptor(ptr, shape=[n_rows, n_cols], strides=[stride, 1],
                                         block_shape=[BLOCK_R, BLOCK_D])
    else:
        return ptr


@triton.jit
def load_rows(src, r0, rows, row_mask, d0, D, stride, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """The [len(rows), BLOCK_D] tile src[rows, d0:d0 + BLOCK_D], zeros outside the operand (TMA fills them, the
    pointer path masks them). ``r0`` is rows[0]; rows past ``row_mask`` but inside the operand may hold data."""
    if USE_TMA:
        return src.load([r0, d0])
    else:
        offs_d = d0 + tl.arange(0, BLOCK_D)
        ptrs = src + rows.to(tl.int64)[:, None] * stride + offs_d[None, :]
        return tl.load(ptrs, mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def operand_sources(hs_ptr, ws_ptr, ht_ptr, wt_ptr, N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """``operand_source`` of the four operands (student hidden [N, Ds] and weight [V, Ds], teacher hidden [N, Dt]
    and weight [V, Dt]) in the order ``logit_tiles`` takes them."""
    hs = operand_source(hs_ptr, N, Ds, stride_hs, BLOCK_N, BLOCK_D, USE_TMA)
    ws = operand_source(ws_ptr, V, Ds, stride_ws, BLOCK_V, BLOCK_D, USE_TMA)
    ht = operand_source(ht_ptr, N, Dt, stride_ht, BLOCK_N, BLOCK_D, USE_TMA)
    wt = operand_source(wt_ptr, V, Dt, stride_wt, BLOCK_V, BLOCK_D, USE_TMA)
    return hs, ws, ht, wt


@triton.jit
def logit_tiles(
    hs_src, ws_src, bs_ptr, ht_src, wt_src, bt_ptr, r0, c0, rows, cols, row_mask, col_mask, Ds, Dt,
    stride_hs, stride_ws, stride_ht, stride_wt, inv_temp,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Student and teacher logit tiles (h[rows] @ w[cols]^T + b[cols]) * inv_temp, fp32-accumulated.

    One loop over the hidden slices both models have feeds both products, so the software pipeline runs without
    a drain between the student's and the teacher's GEMM (the common case Ds == Dt has no other loop); the larger
    model's remaining slices follow. Weight tiles are cast to the hidden-state dtype so that tl.dot runs on tensor
    cores for bf16/fp16; the products are never rounded below fp32. Rows/columns outside the masks read zeros
    (finite logits), so callers only mask their reductions.
    """
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    d_both = tl.minimum(Ds, Dt)
    for d0 in range(0, d_both, BLOCK_D):
        h_s = load_rows(hs_src, r0, rows, row_mask, d0, Ds, stride_hs, BLOCK_D, USE_TMA)
        w_s = load_rows(ws_src, c0, cols, col_mask, d0, Ds, stride_ws, BLOCK_D, USE_TMA)
        h_t = load_rows(ht_src, r0, rows, row_mask, d0, Dt, stride_ht, BLOCK_D, USE_TMA)
        w_t = load_rows(wt_src, c0, cols, col_mask, d0, Dt, stride_wt, BLOCK_D, USE_TMA)
        acc_s = tl.dot(h_s, tl.trans(w_s.to(h_s.dtype)), acc_s, input_precision=PREC_S)
        acc_t = tl.dot(h_t, tl.trans(w_t.to(h_t.dtype)), acc_t, input_precision=PREC_T)
    d_tail = tl.cdiv(d_both, BLOCK_D) * BLOCK_D  # slices [d_tail, D) of the larger model only
    for d0 in range(d_tail, Ds, BLOCK_D):
        h_s = load_rows(hs_src, r0, rows, row_mask, d0, Ds, stride_hs, BLOCK_D, USE_TMA)
        w_s = load_rows(ws_src, c0, cols, col_mask, d0, Ds, stride_ws, BLOCK_D, USE_TMA)
        acc_s = tl.dot(h_s, tl.trans(w_s.to(h_s.dtype)), acc_s, input_precision=PREC_S)
    for d0 in range(d_tail, Dt, BLOCK_D):
        h_t = load_rows(ht_src, r0, rows, row_mask, d0, Dt, stride_ht, BLOCK_D, USE_TMA)
        w_t = load_rows(wt_src, c0, cols, col_mask, d0, Dt, stride_wt, BLOCK_D, USE_TMA)
        acc_t = tl.dot(h_t, tl.trans(w_t.to(h_t.dtype)), acc_t, input_precision=PREC_T)
    if HAS_BS:
        acc_s += tl.load(bs_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BT:
        acc_t += tl.load(bt_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc_s * inv_temp, acc_t * inv_temp


@triton.jit
def tile_logits(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, r0, c0, rows, cols, row_mask, col_mask, N, V, Ds, Dt,
    stride_hs, stride_ws, stride_ht, stride_wt, inv_temp,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(hs, ws, zs, zt) of a program that computes one logit tile: the student's operand sources (for the gradient
    products that follow) and ``logit_tiles`` of the tile at (r0, c0). Kernels that walk many tiles make the
    sources once with ``operand_sources`` instead."""
    hs, ws, ht, wt = operand_sources(hs_ptr, ws_ptr, ht_ptr, wt_ptr, N, V, Ds, Dt, stride_hs, stride_ws, stride_ht,
                                     stride_wt, BLOCK_N, BLOCK_V, BLOCK_D, USE_TMA)
    zs, zt = logit_tiles(hs, ws, bs_ptr, ht, wt, bt_ptr, r0, c0, rows, cols, row_mask, col_mask, Ds, Dt,
                         stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT, PREC_S, PREC_T,
                         USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
    return hs, ws, zs, zt


NEG_BIG = tl.constexpr(-1e30)  # a log-probability floor far below any representable fp32 probability


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One model's logit tile (h[rows] @ w[cols]^T + b[cols]) * inv_temp with pointer loads, fp32-accumulated: the
    single-model form for kernels that need one head only (the fused kernels here use ``logit_tiles``)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        h = load_rows(h_ptr, 0, rows, row_mask, d0, D, stride_h, BLOCK_D, False)
        w = load_rows(w_ptr, 0, cols, col_mask, d0, D, stride_w, BLOCK_D, False)
        acc = tl.dot(h, tl.trans(w.to(h.dtype)), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc * inv_temp


@triton.jit
def safe_max(m):
    """A running maximum usable as an exp offset: -inf (nothing seen but masked entries) becomes 0, so that
    exp(z - m) is 0 for z = -inf and exp(m_old - m) is 0 for m_old = -inf, instead of exp(-inf + inf) = NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def grad_logit_tile(
    zs, zt, lse_s, lse_t, coef_a, coef_b, kl_stat, log_beta, log_one_minus_beta, IS_JSD: tl.constexpr,
):
    """d loss / d z_s for one tile of temperature-scaled logits (all per-token vectors are [BLOCK_N] fp32).

    KL mode:  coef_a * p_s * ((log p_s - log p_t) - RKL) + coef_b * (p_s - p_t),  kl_stat = RKL
    JSD mode: coef_a * p_s * ((log p_s - log M) - KL(p_s || M)),                  kl_stat = KL(p_s || M)
    with M = beta * p_t + (1 - beta) * p_s; coef_* already hold the per-token weight, the incoming gradient,
    (1 - beta) for JSD, and 1/temperature (the chain rule back to the unscaled logits).

    -inf logits: entries with p_s = 0 get no p_s-term (0 * (-inf) := 0) and a token with coef_a = 0 none at all;
    p_s - p_t is always finite. A token whose RKL is +inf (p_s > 0 = p_t somewhere) gets no RKL gradient: the usual
    formula is inf - inf there, and its limit (+inf on the teacher-masked entries, -inf elsewhere) would turn
    grad_h = dz @ W into NaN; its loss is +inf, which the caller reports. So every dz is finite.
    """
    # Log-probabilities clamped at -1e30: a masked entry (-inf) gets p = exp(-1e30) = 0 and finite log terms, so
    # 0 * log-term is 0 without a per-element select (which costs registers the 128 x 128 tiles do not have).
    logp_s = tl.maximum(zs - lse_s[:, None], NEG_BIG)
    logp_t = tl.maximum(zt - lse_t[:, None], NEG_BIG)
    p_s = tl.exp(logp_s)
    # Only a token whose RKL is +inf has an entry with p_s > 0 = p_t (clamped log-ratio ~1e30): it gets no RKL term.
    finite_kl = kl_stat != float("inf")
    coef_a = tl.where(finite_kl, coef_a, 0.0)
    kl_stat = tl.where(finite_kl, kl_stat, 0.0)
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


@triton.jit
def token_grad_tile(zs, zt, rows, row_mask, lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
                    log_beta, log_one_minus_beta, IS_JSD: tl.constexpr):
    """``grad_logit_tile`` with the per-token vectors loaded from their [N] fp32 buffers at ``rows``."""
    return grad_logit_tile(
        zs, zt,
        tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0),
        tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_a_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_b_ptr + rows, mask=row_mask, other=0.0),
        tl.load(kl_ptr + rows, mask=row_mask, other=0.0),
        log_beta, log_one_minus_beta, IS_JSD,
    )


@triton.jit
def atomic_grad_products(
    dz_op, hs, ws, grad_h_ptr, grad_w_ptr, r0, c0, rows, cols, row_mask, col_mask, Ds, stride_hs, stride_ws,
    NEED_GRAD_H: tl.constexpr, NEED_GRAD_W: tl.constexpr, PREC_S: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """grad_h[rows] += dz @ W_s[cols] and grad_W[cols] += dz^T @ h_s[rows] for one tile's operand-dtype dz, one
    BLOCK_D slice at a time, with relaxed fp32 atomics: sums only, so no ordering between programs is needed."""
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, Ds, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < Ds
        if NEED_GRAD_H:
            w = load_rows(ws, c0, cols, col_mask, d0, Ds, stride_ws, BLOCK_D, USE_TMA)
            grad_h = tl.dot(dz_op, w.to(dz_op.dtype), input_precision=PREC_S)
            tl.atomic_add(grad_h_ptr + rows64[:, None] * Ds + d[None, :], grad_h,
                          mask=row_mask[:, None] & d_mask[None, :], sem="relaxed")
        if NEED_GRAD_W:
            h = load_rows(hs, r0, rows, row_mask, d0, Ds, stride_hs, BLOCK_D, USE_TMA)
            grad_w = tl.dot(tl.trans(dz_op), h, input_precision=PREC_S)
            tl.atomic_add(grad_w_ptr + cols64[:, None] * Ds + d[None, :], grad_w,
                          mask=col_mask[:, None] & d_mask[None, :], sem="relaxed")
