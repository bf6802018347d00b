"""``logit_block``: the schedule that computes every logit once (1.0x the useful FLOPs, 6NVDs + 2NVDt).

The gradients are computed during the forward pass, one block of ``rows`` tokens at a time:

1. two GEMMs write the raw fp32 logits of the block, student and teacher, into a buffer [2, rows, V];
2. ``_block_stats_kernel`` reduces them to the forward kernel's per-split partial statistics, merged by
   ``forward.combine_partials`` (so the forward's algebra has one owner); the JSD adds ``_block_jsd_kernel``;
3. ``_block_grad_kernel`` forms dz for an incoming gradient of 1 (``logit_tiles.grad_logit_tile``) into an
   operand-dtype buffer [rows, V] (and fp32 dz in place of the student logits when the bias needs column sums);
4. GEMMs turn dz into the student's gradients: grad_h[block] = dz @ W_s, grad_W += dz^T @ h_s[block],
   grad_b += column sums.

The backward only scales the stored gradients by the incoming gradient, in place (``scale_stored``), and hands them
over; a second backward through a retained graph recomputes them with ``one_pass``. Memory: the buffers
take rows x V x (8 + operand bytes) within ``tiling.backward_buffer_bytes()``; the stored gradients are the
gradients themselves, held from the forward to the backward. A 16-bit grad_W is rounded once per token block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tiling
from .backward import fp32_accumulating_mm, mm_accumulate
from .forward import NUM_PARTIALS, combine_partials
from .logit_tiles import safe_max, token_grad_tile
from .objective import grad_coefficients, is_jsd, loss_and_kl_stat
from .tile_sums import jsd_tile_sums, split_program, store_partials, target_logit_sums, zero_sums

# Token alignment of a block on a GPU, and the fewest rows the automatic choice accepts there: every block
# reads and writes all of a 16-bit grad_W (V x Ds), so short blocks turn the schedule memory-bound (at
# V=151936, Ds=4096, 512-row blocks move ~80 GB of grad_W traffic over N=16384 tokens, ~25 ms on an H100).
ROW_ALIGN = 128
MIN_AUTO_ROWS = 512
# Fixed tiles of the memory-bound kernels below (no GEMM inside, so no BLOCK_D; rows x columns per program on a
# GPU), the largest that compile for sm_90a without spills (tests/kernels/test_aot.py): 16 x 512 stats and
# 32 x 256 gradient tiles spill 40-640 bytes per thread.
STATS_TILE = tiling.TileConfig(8, 512, 0, num_warps=8)
GRAD_TILE = tiling.TileConfig(16, 512, 0, num_warps=8)


@triton.jit
def _load_z(z_ptr, b_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_B: tl.constexpr):
    """(raw logits + bias) * inv_temp for one [rows, cols] tile of a contiguous [height, V] fp32 buffer."""
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    if HAS_B:
        z += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z * inv_temp


@triton.jit
def _block_stats_kernel(
    zs_ptr, zt_ptr, bs_ptr, bt_ptr, target_ptr, part_ptr, height, V, split_unit, inv_temp,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, HAS_TARGET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """The forward kernel's partials [9, splits, height] from stored logits: a max sweep, then plain sums (the
    logits are read twice from memory instead of rescaling running sums). -inf logits (docs/algorithm.md §6.5):
    terms of probability-0 entries are dropped (0 * (-inf) := 0), a split masked entirely leaves (m = -inf, l = 0),
    and an entry of p > 0 that the other model masks makes A (B) +inf, as in ``forward._kl_forward_kernel``."""
    pid_s, num_splits, rows, row_mask, v_start, v_end = split_program(height, V, split_unit, BLOCK_N)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        zs = _load_z(zs_ptr, bs_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BS)
        zt = _load_z(zt_ptr, bt_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BT)
        m_s = tl.maximum(m_s, tl.max(tl.where(col_mask[None, :], zs, float("-inf")), axis=1))
        m_t = tl.maximum(m_t, tl.max(tl.where(col_mask[None, :], zt, float("-inf")), axis=1))
    off_s = safe_max(m_s)  # exp offsets: 0 where the split is all -inf, so exp(-inf - off) = 0, never NaN
    off_t = safe_max(m_t)
    l_s, l_t, a_sum, b_sum, e_sum, zs_target, zt_target = zero_sums(BLOCK_N)
    if HAS_TARGET:
        target = tl.load(target_ptr + rows, mask=row_mask, other=-1)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        valid = col_mask[None, :]
        zs = _load_z(zs_ptr, bs_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BS)
        zt = _load_z(zt_ptr, bt_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BT)
        e_s = tl.where(valid, tl.exp(zs - off_s[:, None]), 0.0)
        e_t = tl.where(valid, tl.exp(zt - off_t[:, None]), 0.0)
        live_s = e_s > 0.0
        live_t = e_t > 0.0
        l_s += tl.sum(e_s, axis=1)
        l_t += tl.sum(e_t, axis=1)
        a_sum += tl.sum(tl.where(live_s, e_s * (zs - zt), 0.0), axis=1)
        b_sum += tl.sum(tl.where(live_t, e_t * (zt - zs), 0.0), axis=1)
        e_sum += tl.sum(tl.where(live_s, e_s * zs, 0.0), axis=1)
        if HAS_TARGET:
            hit_s, hit_t = target_logit_sums(zs, zt, cols, target)
            zs_target += hit_s
            zt_target += hit_t
    store_partials(part_ptr, pid_s, num_splits, height, rows, row_mask,
                   m_s, l_s, m_t, l_t, a_sum, b_sum, e_sum, zs_target, zt_target)


@triton.jit
def _block_jsd_kernel(
    zs_ptr, zt_ptr, bs_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, part_ptr, height, V, split_unit, inv_temp,
    beta, log_beta, log_one_minus_beta,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """JSD_beta and KL(p_s || M) partial sums [2, splits, height] from stored logits (``forward._jsd_kernel``'s
    terms, read from the buffer instead of recomputed)."""
    pid_s, num_splits, rows, row_mask, v_start, v_end = split_program(height, V, split_unit, BLOCK_N)
    lse_s = tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0)
    lse_t = tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0)
    jsd = tl.zeros((BLOCK_N,), tl.float32)
    kl_s_m = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        logp_s = _load_z(zs_ptr, bs_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BS) - lse_s[:, None]
        logp_t = _load_z(zt_ptr, bt_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BT) - lse_t[:, None]
        kl_part, jsd_part = jsd_tile_sums(logp_s, logp_t, col_mask, beta, log_beta, log_one_minus_beta)
        kl_s_m += kl_part
        jsd += jsd_part
    out = part_ptr + pid_s * height + rows
    tl.store(out, jsd, mask=row_mask)
    tl.store(out + num_splits * height, kl_s_m, mask=row_mask)


@triton.jit
def _block_grad_kernel(
    zs_ptr, zt_ptr, bs_ptr, bt_ptr, lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr, dz_ptr,
    height, V, inv_temp, log_beta, log_one_minus_beta,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr, FP32_DZ: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """dz [height, V] in dz's dtype; with FP32_DZ also fp32 dz over the student logits (each program rewrites only
    the elements it has read, so the in-place store races with nothing)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < height
    col_mask = cols < V
    zs = _load_z(zs_ptr, bs_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BS)
    zt = _load_z(zt_ptr, bt_ptr, rows, cols, row_mask, col_mask, V, inv_temp, HAS_BT)
    dz = token_grad_tile(zs, zt, rows, row_mask, lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
                         log_beta, log_one_minus_beta, IS_JSD)
    offs = rows.to(tl.int64)[:, None] * V + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if FP32_DZ:
        tl.store(zs_ptr + offs, dz, mask=mask)


def _tile(gpu_tile: tiling.TileConfig) -> dict[str, int]:
    if tiling.interpreting():
        c = tiling.INTERPRETER_CONFIG
        return {"BLOCK_N": c.block_n, "BLOCK_V": c.block_v}
    return {"BLOCK_N": gpu_tile.block_n, "BLOCK_V": gpu_tile.block_v, "num_warps": gpu_tile.num_warps,
            "num_stages": gpu_tile.num_stages}


def _row_align() -> int:
    return tiling.INTERPRETER_CONFIG.block_n if tiling.interpreting() else ROW_ALIGN


def bytes_per_row(vocab: int, operand_bytes: int) -> int:
    """Buffer bytes per token of a block: fp32 student and teacher logits plus the operand-dtype dz."""
    return vocab * (8 + operand_bytes)


def block_rows(n_tokens: int, vocab: int, operand_bytes: int) -> int:
    """Tokens per block within ``tiling.backward_buffer_bytes()``: a multiple of the row alignment, or all the
    tokens when they fit; 0 when not even one aligned block fits."""
    rows = tiling.backward_buffer_bytes() // bytes_per_row(vocab, operand_bytes)
    if rows >= n_tokens:
        return n_tokens
    return rows // _row_align() * _row_align()


def budget_allows(n_tokens: int, vocab: int, operand_bytes: int) -> bool:
    """Whether the automatic choice may take this schedule: blocks of at least ``MIN_AUTO_ROWS`` tokens (the
    interpreter's row tile under the interpreter), or all the tokens in one block."""
    rows = block_rows(n_tokens, vocab, operand_bytes)
    floor = tiling.INTERPRETER_CONFIG.block_n if tiling.interpreting() else MIN_AUTO_ROWS
    return rows > 0 and (rows >= floor or rows == n_tokens)


def _logits_fp32(out: Tensor, hidden: Tensor, weight: Tensor) -> None:
    """out = hidden @ weight^T with fp32 output and no rounding of the products below fp32."""
    if hidden.dtype == torch.float32 or fp32_accumulating_mm(out.device):
        mm_accumulate(out, hidden, weight.to(hidden.dtype).T, first=True)
    else:  # no fp32-output GEMM for 16-bit operands here (CPU, older torch): upcast
        torch.mm(hidden.float(), weight.float().T, out=out)


@dataclass
class StoredGrads:
    """The student's gradients for an incoming gradient of 1 on every token (None where not wanted)."""

    grad_h: Tensor | None
    grad_w: Tensor | None
    grad_b: Tensor | None  # fp32


def logit_block_forward(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    student_bias: Tensor | None, teacher_bias: Tensor | None, target_ids: Tensor | None,
    reverse_weight: Tensor, forward_weight: Tensor, *, temperature: float, jsd_beta: float | None,
    need_grad_h: bool, need_grad_w: bool, need_grad_b: bool,
) -> tuple[dict[str, Tensor], StoredGrads]:
    """``forward.kl_forward``'s statistics (same keys) and the stored gradients, every logit computed once."""
    n_tokens, ds = student_hidden.shape
    vocab = student_weight.shape[0]
    op_dtype, device = student_hidden.dtype, student_hidden.device
    rows = block_rows(n_tokens, vocab, student_hidden.element_size())
    if rows == 0:
        raise ValueError(f"schedule='logit_block' needs at least {_row_align()} tokens x {vocab} x "
                         f"{bytes_per_row(1, student_hidden.element_size())} bytes of buffer; raise "
                         f"{tiling.BUFFER_ENV} (now {tiling.backward_buffer_bytes() / 2**20:.1f} MiB)")
    beta_jsd = is_jsd(jsd_beta)
    log_beta = math.log(jsd_beta) if beta_jsd else 0.0
    log_one_minus_beta = math.log1p(-jsd_beta) if beta_jsd else 0.0
    inv_temp = 1.0 / temperature
    dummy = student_hidden.new_empty(1, dtype=torch.float32)
    bs = dummy if student_bias is None else student_bias
    bt = dummy if teacher_bias is None else teacher_bias
    flags = {"HAS_BS": student_bias is not None, "HAS_BT": teacher_bias is not None}
    need_any = need_grad_h or need_grad_w or need_grad_b

    keys = ["lse_s", "lse_t", "reverse_kl", "forward_kl", "student_entropy", "student_logprob", "teacher_logprob"]
    keys += ["jsd", "kl_student_mixture"] if beta_jsd else []
    stats = {k: tiling.new_output((n_tokens,), torch.float32, device) for k in keys}
    weight_op = student_weight if student_weight.dtype == op_dtype else student_weight.to(op_dtype)
    stored = StoredGrads(
        tiling.new_output((n_tokens, ds), op_dtype, device) if need_grad_h else None,
        tiling.new_output((vocab, ds), student_weight.dtype, device) if need_grad_w else None,
        tiling.new_output((vocab,), torch.float32, device) if need_grad_b else None,
    )
    logits = tiling.new_output((2, rows, vocab), torch.float32, device)
    dz_buffer = tiling.new_output((rows * vocab,), op_dtype, device) if need_any else None
    target = target_ids if target_ids is not None else dummy.to(torch.int64)
    stats_tile, grad_tile = _tile(STATS_TILE), _tile(GRAD_TILE)

    for n_lo in range(0, n_tokens, rows):
        height = min(rows, n_tokens - n_lo)
        block = slice(n_lo, n_lo + height)
        zs, zt = logits[0, :height], logits[1, :height]
        with tiling.annotate("logit_block_gemm"):
            _logits_fp32(zs, student_hidden[block], student_weight)
            _logits_fp32(zt, teacher_hidden[block], teacher_weight)
        num_splits, split_unit = tiling.vocab_splits(height, vocab, device)
        grid = (triton.cdiv(height, stats_tile["BLOCK_N"]), num_splits)
        part = tiling.new_output((NUM_PARTIALS, num_splits, height), torch.float32, device)
        with tiling.annotate("_block_stats_kernel"):
            _block_stats_kernel[grid](zs, zt, bs, bt, target[block] if target_ids is not None else target, part,
                                      height, vocab, split_unit, inv_temp, HAS_TARGET=target_ids is not None,
                                      **flags, **stats_tile)
        block_stats = combine_partials(part)
        if beta_jsd:
            jsd_part = tiling.new_output((2, num_splits, height), torch.float32, device)
            with tiling.annotate("_block_jsd_kernel"):
                _block_jsd_kernel[grid](zs, zt, bs, bt, block_stats["lse_s"], block_stats["lse_t"], jsd_part,
                                        height, vocab, split_unit, inv_temp, float(jsd_beta), log_beta,
                                        log_one_minus_beta, **flags, **stats_tile)
            block_stats["jsd"] = jsd_part[0].sum(0)
            block_stats["kl_student_mixture"] = jsd_part[1].sum(0)
        for k in keys:
            stats[k][block] = block_stats[k]
        if not need_any:
            continue

        rw, fw = reverse_weight[block].float(), forward_weight[block].float()
        _, kl_stat = loss_and_kl_stat(block_stats, rw, fw, jsd_beta)
        coef_a, coef_b = grad_coefficients(torch.ones_like(rw), rw, fw, jsd_beta, temperature)
        dz = dz_buffer[: height * vocab].view(height, vocab)
        grad_grid = (triton.cdiv(height, grad_tile["BLOCK_N"]), triton.cdiv(vocab, grad_tile["BLOCK_V"]))
        with tiling.annotate("_block_grad_kernel"):
            _block_grad_kernel[grad_grid](
                zs, zt, bs, bt, block_stats["lse_s"], block_stats["lse_t"], coef_a, coef_b,
                kl_stat.contiguous(), dz, height, vocab, inv_temp, log_beta, log_one_minus_beta,
                IS_JSD=beta_jsd, FP32_DZ=need_grad_b, **flags, **grad_tile)
        with tiling.annotate("logit_block_gemm"):
            if need_grad_b:  # fp32 dz now lies where the student logits were
                if n_lo == 0:
                    torch.sum(zs, dim=0, out=stored.grad_b)
                else:
                    stored.grad_b += zs.sum(0)
            if need_grad_h:
                torch.mm(dz, weight_op, out=stored.grad_h[block])
            if need_grad_w:
                mm_accumulate(stored.grad_w, dz.T, student_hidden[block], first=n_lo == 0)
    return stats, stored


def uniform_value(grad: Tensor) -> float | None:
    """The common value of a per-token incoming gradient, or None when its entries differ (one device sync)."""
    if grad.numel() == 0:
        return 0.0
    first = grad.reshape(-1)[0]
    return float(first) if bool((grad == first).all()) else None


def scale_stored(stored: StoredGrads, grad_loss: Tensor, b_dtype: torch.dtype | None,
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
    """(grad_h, grad_w, grad_b, weight side done): the stored gradients times the incoming per-token gradient,
    scaled in place (no second copy of grad_W) and handed over: the caller must drop ``stored`` afterwards.
    grad_h scales row by row for any incoming gradient; the weight side sums over tokens and is scaled only when the
    incoming gradient is the same for every token (always so behind ``grad_scale``), else left to the caller
    (``weight side done`` False)."""
    g = grad_loss.float()
    grad_h = stored.grad_h
    if grad_h is not None:
        grad_h.mul_(g[:, None])  # 16-bit times fp32: fp32 arithmetic, one rounding
    if stored.grad_w is None and stored.grad_b is None:
        return grad_h, None, None, True
    common = uniform_value(g)
    if common is None:
        return grad_h, None, None, False
    grad_w, grad_b = stored.grad_w, stored.grad_b
    if common != 1.0:
        for t in (grad_w, grad_b):
            if t is not None:
                t.mul_(common)
    return grad_h, grad_w, None if grad_b is None else grad_b.to(b_dtype), True
