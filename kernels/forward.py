"""Forward kernels: per-token log-sum-exps, KLs, entropy, target log-probs (and JSD) without [N, V] logits.

Grid: 1-D over (token tile, vocabulary split) in the grouped launch order (``logit_tiles.grouped_tile`` with
``tiling.forward_group_tokens``): a group of token tiles, whose hidden-state rows stay in L2, walks every split
before the next group, and the group's programs on one split share its weight panels. Each program walks its
vocabulary split one BLOCK_V tile at a time, computes the student and teacher logit tiles with tl.dot (fp32
accumulation) and updates the online recurrences of docs/algorithm.md §6.2 per token ((K1)-(K4); the splits merge
by (K7)):

    m_s, l_s = sum exp(z_s - m_s),   m_t, l_t = sum exp(z_t - m_t)
    A = sum exp(z_s - m_s) (z_s - z_t),   B = sum exp(z_t - m_t) (z_t - z_s),   E = sum exp(z_s - m_s) z_s

rescaling by exp(m_old - m_new) whenever a running maximum grows. Splitting the vocabulary (flash-decoding style)
keeps the GPU full when there are few token tiles; the splits' partial statistics ([9, splits, N] fp32, a few
hundred KiB) are merged in ``combine_partials``. The generalised JSD needs both final log-sum-exps, so it takes a
second pass (``_jsd_kernel``) that sums plain per-tile terms.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .logit_tiles import grouped_tile, logit_tiles, operand_sources, split_bounds
from .objective import is_jsd
from .tile_sums import jsd_tile_sums, online_softmax_step, store_partials, target_logit_sums, zero_sums
from .tiling import (
    FORWARD_CONFIGS,
    annotate,
    autotuned,
    dot_precision,
    forward_group_tokens,
    launch_meta,
    n_bucket,
    new_output,
    vocab_splits,
)

# Rows of the partial-statistics buffer written by _kl_forward_kernel.
M_S, L_S, M_T, L_T, A_SUM, B_SUM, E_SUM, ZS_TARGET, ZT_TARGET = range(9)
NUM_PARTIALS = 9


@triton.jit
def _kl_forward_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, target_ptr, part_ptr,
    N, V, Ds, Dt, num_splits, split_unit, group_tokens, inv_temp, N_BUCKET,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_TARGET: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits,
                                tl.maximum(group_tokens // BLOCK_N, 1))
    r0 = pid_n * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_start, v_end = split_bounds(pid_s, num_splits, V, split_unit)
    hs, ws, ht, wt = operand_sources(hs_ptr, ws_ptr, ht_ptr, wt_ptr, N, V, Ds, Dt, stride_hs, stride_ws, stride_ht,
                                     stride_wt, BLOCK_N, BLOCK_V, BLOCK_D, USE_TMA)

    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l_s, l_t, a_sum, b_sum, e_sum, zs_target, zt_target = zero_sums(BLOCK_N)
    if HAS_TARGET:
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)

    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        zs, zt = logit_tiles(hs, ws, bs_ptr, ht, wt, bt_ptr, r0, v0, rows, cols, row_mask, col_mask, Ds, Dt,
                             stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT, PREC_S, PREC_T,
                             USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
        if HAS_TARGET:
            hit_s, hit_t = target_logit_sums(zs, zt, cols, target)
            zs_target += hit_s
            zt_target += hit_t
        # Columns past the split behave as masked entries (-inf logits, probability 0).
        zs = tl.where(col_mask[None, :], zs, float("-inf"))
        zt = tl.where(col_mask[None, :], zt, float("-inf"))
        # Student, then teacher statistics, so only one tile of exponentials is live besides the logits.
        m_s, l_s, a_sum, e, live, rescale = online_softmax_step(m_s, l_s, a_sum, zs, zt)
        e_sum = e_sum * rescale + tl.sum(tl.where(live, e * zs, 0.0), axis=1)
        m_t, l_t, b_sum, _, _, _ = online_softmax_step(m_t, l_t, b_sum, zt, zs)

    store_partials(part_ptr, pid_s, num_splits, N, rows, row_mask,
                   m_s, l_s, m_t, l_t, a_sum, b_sum, e_sum, zs_target, zt_target)


@triton.jit
def _jsd_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, part_ptr,
    N, V, Ds, Dt, num_splits, split_unit, group_tokens, inv_temp, beta, log_beta, log_one_minus_beta, N_BUCKET,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Second pass for the generalised JSD: sums JSD_beta and KL(p_s || M) per token and vocabulary split
    (same launch order as ``_kl_forward_kernel``)."""
    pid_n, pid_s = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits,
                                tl.maximum(group_tokens // BLOCK_N, 1))
    r0 = pid_n * BLOCK_N
    rows = r0 + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    v_start, v_end = split_bounds(pid_s, num_splits, V, split_unit)
    hs, ws, ht, wt = operand_sources(hs_ptr, ws_ptr, ht_ptr, wt_ptr, N, V, Ds, Dt, stride_hs, stride_ws, stride_ht,
                                     stride_wt, BLOCK_N, BLOCK_V, BLOCK_D, USE_TMA)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    jsd = tl.zeros((BLOCK_N,), tl.float32)
    kl_s_m = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        zs, zt = logit_tiles(hs, ws, bs_ptr, ht, wt, bt_ptr, r0, v0, rows, cols, row_mask, col_mask, Ds, Dt,
                             stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT, PREC_S, PREC_T,
                             USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
        kl_part, jsd_part = jsd_tile_sums(zs - lse_s[:, None], zt - lse_t[:, None], col_mask, beta, log_beta,
                                          log_one_minus_beta)
        kl_s_m += kl_part
        jsd += jsd_part
    out = part_ptr + pid_s * N + rows
    tl.store(out, jsd, mask=row_mask)
    tl.store(out + num_splits * N, kl_s_m, mask=row_mask)


_kl_forward = autotuned(_kl_forward_kernel, FORWARD_CONFIGS)
_jsd = autotuned(_jsd_kernel, FORWARD_CONFIGS)


def combine_partials(part: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merge the per-split online statistics [9, splits, N] into per-token results (all [N] fp32)."""
    m_s, l_s, m_t, l_t, a_sum, b_sum, e_sum = (part[i] for i in (M_S, L_S, M_T, L_T, A_SUM, B_SUM, E_SUM))
    top_s = m_s.amax(dim=0)
    top_t = m_t.amax(dim=0)
    # Empty or fully masked splits carry m = -inf -> weight 0 (a fully masked row is the caller's input error).
    w_s = torch.exp(m_s - top_s.nan_to_num(neginf=0.0))
    w_t = torch.exp(m_t - top_t.nan_to_num(neginf=0.0))
    l_s_total = (l_s * w_s).sum(0)
    l_t_total = (l_t * w_t).sum(0)
    lse_s = top_s + torch.log(l_s_total)
    lse_t = top_t + torch.log(l_t_total)
    mean_diff_s = _weighted_sum(a_sum, w_s) / l_s_total  # E_{p_s}[z_s - z_t], +inf where the teacher masks mass
    mean_diff_t = _weighted_sum(b_sum, w_t) / l_t_total  # E_{p_t}[z_t - z_s]
    return {
        "lse_s": lse_s,
        "lse_t": lse_t,
        "reverse_kl": mean_diff_s - lse_s + lse_t,
        "forward_kl": mean_diff_t - lse_t + lse_s,
        "student_entropy": lse_s - (e_sum * w_s).sum(0) / l_s_total,
        "student_logprob": part[ZS_TARGET].sum(0) - lse_s,
        "teacher_logprob": part[ZT_TARGET].sum(0) - lse_t,
    }


def _weighted_sum(partial: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over splits of partial * weight, where an infinite partial stays infinite even if its weight underflows
    (it came from an entry of positive probability)."""
    return torch.where(torch.isinf(partial), partial, partial * weight).sum(0)


def _common_args(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias):
    dummy = student_hidden.new_empty(1)
    return (
        (student_hidden, student_weight, dummy if student_bias is None else student_bias,
         teacher_hidden, teacher_weight, dummy if teacher_bias is None else teacher_bias),
        {"HAS_BS": student_bias is not None, "HAS_BT": teacher_bias is not None,
         "PREC_S": dot_precision(student_hidden.dtype), "PREC_T": dot_precision(teacher_hidden.dtype)},
    )


def kl_forward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    target_ids: torch.Tensor | None,
    temperature: float,
    jsd_beta: float | None,
) -> dict[str, torch.Tensor]:
    """Per-token statistics [N] fp32: lse_s, lse_t, reverse_kl, forward_kl, student_entropy, student_logprob,
    teacher_logprob (meaningful only with target_ids) and, with jsd_beta (in (0, 1)), jsd and kl_student_mixture."""
    n_tokens, ds = student_hidden.shape
    vocab, dt = teacher_weight.shape[0], teacher_hidden.shape[1]
    device = student_hidden.device
    row_bytes = ds * student_hidden.element_size() + dt * teacher_hidden.element_size()
    num_splits, split_unit = vocab_splits(n_tokens, vocab, device, row_bytes)
    group = forward_group_tokens(row_bytes)
    tensors, flags = _common_args(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  student_bias, teacher_bias)
    strides = (student_hidden.stride(0), student_weight.stride(0), teacher_hidden.stride(0), teacher_weight.stride(0))
    meta = launch_meta(student_hidden, student_weight, teacher_hidden, teacher_weight)

    def grid(cfg):
        return (num_splits * triton.cdiv(n_tokens, cfg["BLOCK_N"]),)

    part = new_output((NUM_PARTIALS, num_splits, n_tokens), torch.float32, device)
    target = target_ids if target_ids is not None else tensors[0].new_empty(1, dtype=torch.int64)
    with annotate("_kl_forward_kernel"):
        _kl_forward[grid](
            *tensors, target, part, n_tokens, vocab, ds, dt, num_splits, split_unit, group, 1.0 / temperature,
            n_bucket(n_tokens),
            *strides,
            HAS_TARGET=target_ids is not None, **flags, **meta,
        )
    stats = combine_partials(part)

    if is_jsd(jsd_beta):
        jsd_part = new_output((2, num_splits, n_tokens), torch.float32, device)
        with annotate("_jsd_kernel"):
            _jsd[grid](
                *tensors, stats["lse_s"], stats["lse_t"], jsd_part, n_tokens, vocab, ds, dt, num_splits, split_unit,
                group,
                1.0 / temperature, float(jsd_beta), math.log(jsd_beta), math.log1p(-jsd_beta), n_bucket(n_tokens), *strides,
                **flags, **meta,
            )
        stats["jsd"] = jsd_part[0].sum(0)
        stats["kl_student_mixture"] = jsd_part[1].sum(0)
    return stats
