"""Backward kernels: recompute logit tiles, form dL/dz per tile, accumulate the student's hidden/weight/bias grads.

Two schedules with the same math (``logit_tiles.grad_logit_tile``):

* ``atomic`` (Cut Cross-Entropy style, ``deterministic=False``): grid over (token tile x vocabulary tile). Each program recomputes
  its student and teacher logit tiles once, forms dz, and adds dz @ W_s[tile] into grad_h and dz^T @ h_s[tile]
  into grad_W with fp32 atomics (``tl.atomic_add``). Programs are grouped GROUP_N token tiles at a time so that the
  weight tiles they share stay in L2. Summation order varies run to run, so results vary in the last bits.
* ``deterministic`` (the default): no atomics and no fp32 gradient accumulators. Two passes, each writing every gradient
  element once from a complete reduction done by one GEMM: pass 1 walks token chunks, a kernel writes dz for the
  chunk x all V (16-bit operand dtype) and grad_h[chunk] = dz @ W_s; pass 2 walks vocabulary chunks, a kernel
  writes dz for all N x the chunk (fp32, for the bias sum) and grad_W[chunk] = dz^T @ h_s, grad_b[chunk] =
  sum_i dz. Each dz buffer stays within ``tiling.DETERMINISTIC_CHUNK_BYTES`` (80 MiB), so the extra memory is
  below 1% of the N x V fp32 logits at the benchmark's large shapes, at the price of recomputing the logit tiles
  twice. Same-shape GEMMs are deterministic, so repeated runs agree bit for bit.

The atomic schedule recomputes the logits once (1.5x the useful FLOPs at Ds = Dt, against 2x) but accumulates
grad_h [N, Ds] and grad_W [V, Ds] in fp32 buffers: (N + V) x Ds x 4 bytes extra (2.6 GiB, 28% of the fp32 logits
at N=16384, Ds=4096, V=151936), and each element of them takes V/BLOCK_V resp. N/BLOCK_N fp32 atomic adds (about
640 GB of L2 atomic traffic at that shape). The deterministic schedule is therefore the default; which one is
faster on a given GPU is for bench/test_bench_fused_linear_kl.py (``triton`` vs ``triton_atomic``) to say.

dz is rounded to the input dtype only as an operand of the gradient matmuls (as in every bf16 backward); the
logits and dz themselves are fp32. Tiles whose gradient is negligible are not skipped (CCE's filter): for a KL the
teacher mass makes such tiles rarer than for cross-entropy, and skipping is not exact.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import tiling
from .logit_tiles import grad_logit_tile, logit_tile
from .tiling import BACKWARD_CONFIGS, autotuned, dot_precision, launch_meta, new_output

# Token tiles that sweep the vocabulary together in the atomic schedule (L2 reuse of weight tiles).
GROUP_N = 8


@triton.jit
def _backward_atomic_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
    grad_h_ptr, grad_w_ptr, grad_b_ptr,
    N, V, Ds, Dt, inv_temp, log_beta, log_one_minus_beta,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr,
    NEED_GRAD_H: tl.constexpr, NEED_GRAD_W: tl.constexpr, NEED_GRAD_B: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * num_v
    first_n = (pid // per_group) * GROUP
    group_size = tl.minimum(num_n - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < N
    col_mask = cols < V
    zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_mask, col_mask, Ds, stride_hs, stride_ws,
                    inv_temp, HAS_BS, BLOCK_N, BLOCK_V, BLOCK_D, PREC_S)
    zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_mask, col_mask, Dt, stride_ht, stride_wt,
                    inv_temp, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_D, PREC_T)
    dz = grad_logit_tile(
        zs, zt,
        tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0),
        tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_a_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_b_ptr + rows, mask=row_mask, other=0.0),
        tl.load(kl_ptr + rows, mask=row_mask, other=0.0),
        log_beta, log_one_minus_beta, IS_JSD,
    )
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_GRAD_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, axis=0), mask=col_mask)

    dz_op = dz.to(hs_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, Ds, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < Ds
        if NEED_GRAD_H:
            w = tl.load(ws_ptr + cols64[:, None] * stride_ws + d[None, :],
                        mask=col_mask[:, None] & d_mask[None, :], other=0.0)
            grad_h = tl.dot(dz_op, w.to(dz_op.dtype), input_precision=PREC_S)
            tl.atomic_add(grad_h_ptr + rows64[:, None] * Ds + d[None, :], grad_h,
                          mask=row_mask[:, None] & d_mask[None, :])
        if NEED_GRAD_W:
            h = tl.load(hs_ptr + rows64[:, None] * stride_hs + d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            grad_w = tl.dot(tl.trans(dz_op), h, input_precision=PREC_S)
            tl.atomic_add(grad_w_ptr + cols64[:, None] * Ds + d[None, :], grad_w,
                          mask=col_mask[:, None] & d_mask[None, :])


@triton.jit
def _grad_logits_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr, dz_ptr,
    N, V, Ds, Dt, n_lo, height, v_lo, width, inv_temp, log_beta, log_one_minus_beta,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz[i, j] = dL/dz[n_lo + i, v_lo + j] for i < height, j < width, into a contiguous [height, width] buffer
    (stored in the buffer's dtype)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    local_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rows = n_lo + local_rows
    cols = v_lo + local
    row_mask = (local_rows < height) & (rows < N)
    col_mask = (local < width) & (cols < V)
    zs = logit_tile(hs_ptr, ws_ptr, bs_ptr, rows, cols, row_mask, col_mask, Ds, stride_hs, stride_ws,
                    inv_temp, HAS_BS, BLOCK_N, BLOCK_V, BLOCK_D, PREC_S)
    zt = logit_tile(ht_ptr, wt_ptr, bt_ptr, rows, cols, row_mask, col_mask, Dt, stride_ht, stride_wt,
                    inv_temp, HAS_BT, BLOCK_N, BLOCK_V, BLOCK_D, PREC_T)
    dz = grad_logit_tile(
        zs, zt,
        tl.load(lse_s_ptr + rows, mask=row_mask, other=0.0),
        tl.load(lse_t_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_a_ptr + rows, mask=row_mask, other=0.0),
        tl.load(coef_b_ptr + rows, mask=row_mask, other=0.0),
        tl.load(kl_ptr + rows, mask=row_mask, other=0.0),
        log_beta, log_one_minus_beta, IS_JSD,
    )
    tl.store(dz_ptr + local_rows.to(tl.int64)[:, None] * width + local[None, :], dz,
             mask=row_mask[:, None] & col_mask[None, :])


_backward_atomic = autotuned(_backward_atomic_kernel, BACKWARD_CONFIGS,
                             reset_to_zero=["grad_h_ptr", "grad_w_ptr", "grad_b_ptr"])
_grad_logits = autotuned(_grad_logits_kernel, BACKWARD_CONFIGS)


def kl_backward(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    coef_a: torch.Tensor,
    coef_b: torch.Tensor,
    kl_stat: torch.Tensor,
    *,
    temperature: float,
    jsd_beta: float | None,
    need_grad_h: bool,
    need_grad_w: bool,
    need_grad_b: bool,
    deterministic: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_i loss_i w.r.t. (student_hidden, student_weight, student_bias), each in its input dtype.

    Per-token coefficients (fp32 [N]) carry the weights, incoming gradient and 1/temperature; see
    ``logit_tiles.grad_logit_tile`` for the formula. ``jsd_beta`` strictly inside (0, 1) selects the JSD form.
    """
    is_jsd = jsd_beta is not None and 0.0 < jsd_beta < 1.0
    log_beta = math.log(jsd_beta) if is_jsd else 0.0
    log_one_minus_beta = math.log1p(-jsd_beta) if is_jsd else 0.0
    n_tokens, ds = student_hidden.shape
    vocab, dt = student_weight.shape[0], teacher_hidden.shape[1]
    dummy = student_hidden.new_empty(1, dtype=torch.float32)
    tensors = (
        student_hidden, student_weight, dummy if student_bias is None else student_bias,
        teacher_hidden, teacher_weight, dummy if teacher_bias is None else teacher_bias,
        lse_s, lse_t, coef_a, coef_b, kl_stat,
    )
    strides = (student_hidden.stride(0), student_weight.stride(0), teacher_hidden.stride(0), teacher_weight.stride(0))
    flags = {
        "HAS_BS": student_bias is not None, "HAS_BT": teacher_bias is not None, "IS_JSD": is_jsd,
        "PREC_S": dot_precision(student_hidden.dtype), "PREC_T": dot_precision(teacher_hidden.dtype),
    }
    scalars = (1.0 / temperature, log_beta, log_one_minus_beta)
    if deterministic:
        grad_h, grad_w, grad_b = _backward_deterministic(
            tensors, strides, flags, scalars, n_tokens, vocab, ds, dt, need_grad_h, need_grad_w, need_grad_b)
    else:
        grad_h = torch.zeros((n_tokens, ds), dtype=torch.float32, device=student_hidden.device) if need_grad_h else dummy
        grad_w = torch.zeros((vocab, ds), dtype=torch.float32, device=student_hidden.device) if need_grad_w else dummy
        grad_b = torch.zeros((vocab,), dtype=torch.float32, device=student_hidden.device) if need_grad_b else dummy

        def grid(cfg):
            return (triton.cdiv(n_tokens, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)

        _backward_atomic[grid](
            *tensors, grad_h, grad_w, grad_b, n_tokens, vocab, ds, dt, *scalars, *strides,
            NEED_GRAD_H=need_grad_h, NEED_GRAD_W=need_grad_w, NEED_GRAD_B=need_grad_b, GROUP=GROUP_N,
            **flags, **launch_meta(),
        )
    return (
        grad_h.to(student_hidden.dtype) if need_grad_h else None,
        grad_w.to(student_weight.dtype) if need_grad_w else None,
        grad_b.to(student_bias.dtype) if need_grad_b else None,
    )


def _chunk(budget_bytes: int, bytes_per_unit: int, align: int, limit: int) -> int:
    """Largest multiple of ``align`` (at least ``align``) units within the byte budget, capped at ``limit``."""
    units = budget_bytes // max(bytes_per_unit, 1)
    return min(max(align, units // align * align), limit)


def deterministic_chunks(n_tokens: int, vocab: int, operand_bytes: int, fp32_columns: bool) -> tuple[int, int]:
    """(tokens per pass-1 chunk, vocabulary columns per pass-2 chunk) within ``tiling.DETERMINISTIC_CHUNK_BYTES``.

    Pass 1 holds dz [rows, V] in the operand dtype; pass 2 holds dz [N, columns] in the operand dtype, or in fp32
    plus an operand-dtype copy when the bias gradient needs an fp32 column sum (``fp32_columns``).
    """
    config = tiling.INTERPRETER_CONFIG if tiling.interpreting() else None
    align_n = config.block_n if config else max(c.block_n for c in tiling.BACKWARD_CONFIGS)
    align_v = config.block_v if config else tiling.SPLIT_ALIGN
    budget = tiling.DETERMINISTIC_CHUNK_BYTES
    rows = _chunk(budget, vocab * operand_bytes, align_n, n_tokens)
    column_bytes = (4 + (0 if operand_bytes == 4 else operand_bytes)) if fp32_columns else operand_bytes
    columns = _chunk(budget, n_tokens * column_bytes, align_v, vocab)
    return rows, columns


def _backward_deterministic(tensors, strides, flags, scalars, n_tokens, vocab, ds, dt,
                            need_grad_h, need_grad_w, need_grad_b):
    student_hidden = tensors[0]
    rows, columns = deterministic_chunks(n_tokens, vocab, student_hidden.element_size(), fp32_columns=need_grad_b)

    def grad_logits(dz, n_lo, height, v_lo, width):
        def grid(cfg):
            return (triton.cdiv(height, cfg["BLOCK_N"]), triton.cdiv(width, cfg["BLOCK_V"]))

        _grad_logits[grid](*tensors, dz, n_tokens, vocab, ds, dt, n_lo, height, v_lo, width, *scalars, *strides,
                           **flags, **launch_meta())

    grad_h = _grad_hidden_pass(tensors, grad_logits, n_tokens, vocab, ds, rows) if need_grad_h else None
    grad_w, grad_b = None, None
    if need_grad_w or need_grad_b:
        grad_w, grad_b = _grad_weight_pass(tensors, grad_logits, n_tokens, vocab, ds, columns, need_grad_w,
                                           need_grad_b)
    return grad_h, grad_w, grad_b


def _grad_hidden_pass(tensors, grad_logits, n_tokens, vocab, ds, rows):
    """Pass 1: token chunks x the whole vocabulary; grad_h[chunk] = dz @ W_s, one GEMM per chunk."""
    student_hidden, student_weight = tensors[0], tensors[1]
    op_dtype, device = student_hidden.dtype, student_hidden.device
    weight = student_weight if student_weight.dtype == op_dtype else student_weight.to(op_dtype)
    grad_h = new_output((n_tokens, ds), op_dtype, device)
    buffer = new_output((rows * vocab,), op_dtype, device)
    for n_lo in range(0, n_tokens, rows):
        height = min(rows, n_tokens - n_lo)
        dz = buffer[: height * vocab].view(height, vocab)
        grad_logits(dz, n_lo, height, 0, vocab)
        torch.mm(dz, weight, out=grad_h[n_lo: n_lo + height])
    return grad_h


def _grad_weight_pass(tensors, grad_logits, n_tokens, vocab, ds, columns, need_grad_w, need_grad_b):
    """Pass 2: all tokens x vocabulary chunks; grad_W[chunk] = dz^T @ h_s and grad_b[chunk] = column sums."""
    student_hidden, student_weight = tensors[0], tensors[1]
    op_dtype, device = student_hidden.dtype, student_hidden.device
    grad_w = new_output((vocab, ds), student_weight.dtype, device) if need_grad_w else None
    grad_b = new_output((vocab,), torch.float32, device) if need_grad_b else None
    buffer = new_output((n_tokens * columns,), torch.float32 if need_grad_b else op_dtype, device)
    for v_lo in range(0, vocab, columns):
        width = min(columns, vocab - v_lo)
        dz = buffer[: n_tokens * width].view(n_tokens, width)
        grad_logits(dz, 0, n_tokens, v_lo, width)
        if need_grad_b:
            grad_b[v_lo: v_lo + width] = dz.sum(0)
        if need_grad_w:  # straight into the gradient when dtypes allow: no [width, Ds] temporary
            dz_op = dz.to(op_dtype).T
            if grad_w.dtype == op_dtype:
                torch.mm(dz_op, student_hidden, out=grad_w[v_lo: v_lo + width])
            else:
                grad_w[v_lo: v_lo + width] = dz_op @ student_hidden
    return grad_w, grad_b
