"""Triton device functions shared by the forward statistics kernels (``forward`` recomputes the logit tiles,
``logit_block`` reads them from a buffer): per-tile sums of docs/algorithm.md §6.2 and the store of a program's
partial statistics. Same conventions as ``logit_tiles``: probability-0 entries contribute nothing, never NaN.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .logit_tiles import safe_max, split_bounds


@triton.jit
def split_program(height, V, split_unit, BLOCK_N: tl.constexpr):
    """(split, num_splits, rows, row_mask, v_start, v_end) of a program on a 2-D grid (token tile, vocabulary split)
    over a [height, V] block of stored logits."""
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    v_start, v_end = split_bounds(split, num_splits, V, split_unit)
    return split, num_splits, rows, rows < height, v_start, v_end


@triton.jit
def zero_sums(BLOCK_N: tl.constexpr):
    """Zeroed per-token accumulators (l_s, l_t, a_sum, b_sum, e_sum, zs_target, zt_target), [BLOCK_N] fp32 each."""
    return (tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32), tl.zeros((BLOCK_N,), tl.float32),
            tl.zeros((BLOCK_N,), tl.float32))


@triton.jit
def target_logit_sums(zs, zt, cols, target):
    """(z_s, z_t) at each token's target column if this tile holds it, else 0 ([BLOCK_N] fp32 each)."""
    hit = cols[None, :] == target[:, None]
    return tl.sum(tl.where(hit, zs, 0.0), axis=1), tl.sum(tl.where(hit, zt, 0.0), axis=1)


@triton.jit
def online_softmax_step(m, l, cross, z, z_other):
    """One tile of a model's online recurrence: running max ``m``, sum ``l`` = sum exp(z - m) and
    ``cross`` = sum exp(z - m) (z - z_other), rescaled by exp(m_old - m_new) when the maximum grows. Returns
    (m, l, cross, e, live, rescale); the student's entropy sum reuses e, live and rescale. Columns outside the
    split must hold -inf. A p > 0 entry that the other model masks adds +inf to ``cross``, which stays infinite."""
    m_new = safe_max(tl.maximum(m, tl.max(z, axis=1)))
    rescale = tl.exp(m - m_new)
    e = tl.exp(z - m_new[:, None])
    live = e > 0.0
    l = l * rescale + tl.sum(e, axis=1)
    cross = tl.where(cross == float("inf"), cross, cross * rescale) \
        + tl.sum(tl.where(live, e * (z - z_other), 0.0), axis=1)
    return tl.maximum(m, tl.max(z, axis=1)), l, cross, e, live, rescale


@triton.jit
def jsd_tile_sums(logp_s, logp_t, col_mask, beta, log_beta, log_one_minus_beta):
    """(KL(p_s || M), JSD_beta) terms of one tile of log-probabilities summed per token, with
    M = beta * p_t + (1 - beta) * p_s. M > 0 wherever p_s or p_t is, so each term is finite; 0 * log(0 / M) := 0."""
    a = logp_t + log_beta
    b = logp_s + log_one_minus_beta
    top = safe_max(tl.maximum(a, b))  # -inf only where both models mask the entry
    log_m = top + tl.log(tl.exp(a - top) + tl.exp(b - top))
    p_s = tl.exp(logp_s)
    p_t = tl.exp(logp_t)
    s_term = tl.where(col_mask[None, :] & (p_s > 0.0), p_s * (logp_s - log_m), 0.0)
    t_term = tl.where(col_mask[None, :] & (p_t > 0.0), p_t * (logp_t - log_m), 0.0)
    return tl.sum(s_term, axis=1), tl.sum(beta * t_term + (1.0 - beta) * s_term, axis=1)


@triton.jit
def store_partials(part_ptr, split, num_splits, height, rows, row_mask,
                   m_s, l_s, m_t, l_t, a_sum, b_sum, e_sum, zs_target, zt_target):
    """A program's partial statistics into part [9, num_splits, height] at [:, split, rows], in the row order
    ``forward.M_S`` ... ``forward.ZT_TARGET`` that ``forward.combine_partials`` reads."""
    out = part_ptr + split * height + rows
    plane = num_splits * height
    tl.store(out + 0 * plane, m_s, mask=row_mask)
    tl.store(out + 1 * plane, l_s, mask=row_mask)
    tl.store(out + 2 * plane, m_t, mask=row_mask)
    tl.store(out + 3 * plane, l_t, mask=row_mask)
    tl.store(out + 4 * plane, a_sum, mask=row_mask)
    tl.store(out + 5 * plane, b_sum, mask=row_mask)
    tl.store(out + 6 * plane, e_sum, mask=row_mask)
    tl.store(out + 7 * plane, zs_target, mask=row_mask)
    tl.store(out + 8 * plane, zt_target, mask=row_mask)
