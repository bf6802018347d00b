"""Backward kernels: recompute logit tiles, form dL/dz per tile, accumulate the student's hidden/weight/bias grads.

Three schedules with the same math (``logit_tiles.grad_logit_tile``), chosen by ``schedule`` (``SCHEDULES``):

* ``one_pass`` (the default): deterministic, one recompute. Token blocks x vocabulary blocks; for each block a
  kernel writes dz [rows, columns] (fp32 logits and softmax, dz stored in the 16-bit operand dtype), and two cuBLAS
  GEMMs consume it: grad_h[rows] += dz @ W_s[columns] into an fp32 accumulator, and grad_W[columns] += dz^T @ h_s[rows]
  in grad_W's own dtype. Memory: the accumulator and two dz blocks share ``tiling.backward_buffer_bytes()``
  (94 MiB unless ``GOPD_BACKWARD_BUFFER_MIB`` says otherwise; ``one_pass_chunks`` sizes the blocks): the block
  pipeline (``pipeline``: on CUDA the kernel of the next block runs on a side stream while the main stream runs
  this block's GEMMs; elsewhere the same steps run in order) alternates between the two; at N=16384, Ds=4096,
  V=151936 in bf16 a 32 MiB accumulator + 2 x 31 MiB of dz, 0.99% of N x V x 4 (``GOPD_BACKWARD_OVERLAP=0``: one
  stream, the same blocks, one dz block). Cost: 1.5x the useful FLOPs at Ds = Dt (logits once in the forward,
  once here), plus the accumulators' read-modify-write traffic. A 16-bit grad_W is rounded once per token block
  (ceil(N / rows) times, e.g. 8 at N=16384, Ds=4096, against once in ``two_pass``).
* ``two_pass``: deterministic, every gradient element written once from a complete reduction done by one GEMM:
  pass 1 walks token chunks, a kernel writes dz for the chunk x all V and grad_h[chunk] = dz @ W_s; pass 2 walks
  vocabulary chunks, a kernel writes dz for all N x the chunk (fp32 when the bias needs sums) and grad_W[chunk] =
  dz^T @ h_s, grad_b[chunk] = sum_i dz. Each dz buffer stays within the same budget, at the price of recomputing
  the logit tiles twice (2.0x the useful FLOPs).
* ``atomic`` (Cut Cross-Entropy style): grid over (token tile x vocabulary tile). Each program recomputes its
  student and teacher logit tiles once, forms dz, and adds dz @ W_s[tile] into grad_h and dz^T @ h_s[tile] into
  grad_W with relaxed fp32 atomics (``tl.atomic_add(sem="relaxed")``), in the grouped launch order
  (``tiling.GROUP_TOKENS`` tokens at a time) so that shared weight tiles stay in L2. Same 1.5x FLOPs as
  ``one_pass``, but fp32 buffers for the whole of grad_h [N, Ds] and grad_W [V, Ds]
  ((N + V) x Ds x 4 bytes: 2.6 GiB, 28% of the fp32 logits at N=16384, Ds=4096, V=151936), V/BLOCK_V resp.
  N/BLOCK_N atomic adds per element, and results that vary in the last bits from run to run. It is kept as a test
  oracle (an independent reduction order for the deterministic schedules), not as a schedule to train with.

When only one side of the gradients is wanted (a frozen lm_head: grad_h only), ``one_pass`` and ``two_pass`` are
the same single pass. Same-shape GEMMs are deterministic, so both deterministic schedules repeat bit for bit.
Which schedule is fastest on a given GPU is for bench/test_bench_fused_linear_kl.py (``triton``,
``triton_two_pass``, ``triton_atomic``) to say; the default follows the FLOP and memory arithmetic until then.

dz is rounded to the input dtype only as an operand of the gradient matmuls (as in every bf16 backward); the
logits and dz themselves are fp32. These schedules never skip a tile whose gradient is negligible (CCE's filter):
skipping is not exact, so it is the opt-in ``skip`` schedule (``skip.py``, exact to bf16 tolerance, its skip
fraction in bench/skip_fraction.py); for a KL the teacher mass makes such tiles rarer than for cross-entropy.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import pipeline, tiling
from .logit_tiles import (
    atomic_grad_products,
    grouped_tile,
    grouped_tile_coords,
    tile_logits,
    token_grad_tile,
)
from .objective import is_jsd
from .tiling import (
    BACKWARD_CONFIGS,
    GROUP_TOKENS,
    annotate,
    autotuned,
    dot_precision,
    launch_meta,
    n_bucket,
    new_output,
)


@triton.jit
def _backward_atomic_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
    grad_h_ptr, grad_w_ptr, grad_b_ptr,
    N, V, Ds, Dt, inv_temp, log_beta, log_one_minus_beta, N_BUCKET,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr,
    NEED_GRAD_H: tl.constexpr, NEED_GRAD_W: tl.constexpr, NEED_GRAD_B: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, GROUP_TOKENS: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _, _, r0, c0, rows, cols, row_mask, col_mask = grouped_tile_coords(N, V, GROUP_TOKENS, BLOCK_N, BLOCK_V)
    hs, ws, zs, zt = tile_logits(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, r0, c0, rows, cols, row_mask, col_mask,
                                 N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT,
                                 PREC_S, PREC_T, USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
    dz = token_grad_tile(zs, zt, rows, row_mask, lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
                         log_beta, log_one_minus_beta, IS_JSD)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if NEED_GRAD_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")

    atomic_grad_products(dz.to(hs_ptr.dtype.element_ty), hs, ws, grad_h_ptr, grad_w_ptr, r0, c0, rows, cols,
                         row_mask, col_mask, Ds, stride_hs, stride_ws, NEED_GRAD_H, NEED_GRAD_W, PREC_S,
                         USE_TMA, BLOCK_D)


@triton.jit
def _grad_logits_kernel(
    hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr,
    lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr, dz_ptr,
    N, V, Ds, Dt, n_lo, height, v_lo, width, inv_temp, log_beta, log_one_minus_beta, N_BUCKET,
    stride_hs, stride_ws, stride_ht, stride_wt,
    HAS_BS: tl.constexpr, HAS_BT: tl.constexpr, IS_JSD: tl.constexpr,
    PREC_S: tl.constexpr, PREC_T: tl.constexpr, GROUP_TOKENS: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dz[i, j] = dL/dz[n_lo + i, v_lo + j] for i < height, j < width, into a contiguous [height, width] buffer
    (stored in the buffer's dtype). 1-D grid in the grouped launch order (``logit_tiles.grouped_tile``)."""
    pid_n, pid_v = grouped_tile(tl.program_id(0), tl.cdiv(height, BLOCK_N), tl.cdiv(width, BLOCK_V),
                                GROUP_TOKENS // BLOCK_N)  # >= 1: GROUP_TOKENS exceeds every BLOCK_N
    local_rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    r0 = n_lo + pid_n * BLOCK_N
    c0 = v_lo + pid_v * BLOCK_V
    rows = n_lo + local_rows
    cols = v_lo + local
    row_mask = (local_rows < height) & (rows < N)
    col_mask = (local < width) & (cols < V)
    _, _, zs, zt = tile_logits(hs_ptr, ws_ptr, bs_ptr, ht_ptr, wt_ptr, bt_ptr, r0, c0, rows, cols, row_mask, col_mask,
                                 N, V, Ds, Dt, stride_hs, stride_ws, stride_ht, stride_wt, inv_temp, HAS_BS, HAS_BT,
                                 PREC_S, PREC_T, USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)
    dz = token_grad_tile(zs, zt, rows, row_mask, lse_s_ptr, lse_t_ptr, coef_a_ptr, coef_b_ptr, kl_ptr,
                         log_beta, log_one_minus_beta, IS_JSD)
    tl.store(dz_ptr + local_rows.to(tl.int64)[:, None] * width + local[None, :], dz,
             mask=row_mask[:, None] & col_mask[None, :])


_backward_atomic = autotuned(_backward_atomic_kernel, BACKWARD_CONFIGS,
                             reset_to_zero=["grad_h_ptr", "grad_w_ptr", "grad_b_ptr"])
_grad_logits = autotuned(_grad_logits_kernel, BACKWARD_CONFIGS)


SCHEDULES = ("one_pass", "two_pass", "atomic")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


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
    schedule: str,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of sum_i loss_i w.r.t. (student_hidden, student_weight, student_bias), each in its input dtype.

    Per-token coefficients (fp32 [N]) carry the weights, incoming gradient and 1/temperature; see
    ``logit_tiles.grad_logit_tile`` for the formula. ``jsd_beta`` strictly inside (0, 1) selects the JSD form.
    ``schedule`` is one of ``SCHEDULES`` (see the module docstring).
    """
    check_schedule(schedule)
    jsd = is_jsd(jsd_beta)
    log_beta = math.log(jsd_beta) if jsd else 0.0
    log_one_minus_beta = math.log1p(-jsd_beta) if jsd else 0.0
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
        "HAS_BS": student_bias is not None, "HAS_BT": teacher_bias is not None, "IS_JSD": jsd,
        "PREC_S": dot_precision(student_hidden.dtype), "PREC_T": dot_precision(teacher_hidden.dtype),
    }
    scalars = (1.0 / temperature, log_beta, log_one_minus_beta, n_bucket(n_tokens))
    if schedule == "atomic":
        grad_h, grad_w, grad_b = _backward_atomic_schedule(
            tensors, strides, flags, scalars, n_tokens, vocab, ds, dt, need_grad_h, need_grad_w, need_grad_b)
    else:
        grad_h, grad_w, grad_b = _backward_gemm_schedule(
            schedule, tensors, strides, flags, scalars, n_tokens, vocab, ds, dt, need_grad_h, need_grad_w,
            need_grad_b)
    return (
        grad_h.to(student_hidden.dtype) if need_grad_h else None,
        grad_w.to(student_weight.dtype) if need_grad_w else None,
        grad_b.to(student_bias.dtype) if need_grad_b else None,
    )


def _backward_atomic_schedule(tensors, strides, flags, scalars, n_tokens, vocab, ds, dt,
                              need_grad_h, need_grad_w, need_grad_b):
    student_hidden = tensors[0]
    dummy = student_hidden.new_empty(1, dtype=torch.float32)
    device = student_hidden.device
    grad_h = torch.zeros((n_tokens, ds), dtype=torch.float32, device=device) if need_grad_h else dummy
    grad_w = torch.zeros((vocab, ds), dtype=torch.float32, device=device) if need_grad_w else dummy
    grad_b = torch.zeros((vocab,), dtype=torch.float32, device=device) if need_grad_b else dummy

    def grid(cfg):
        return (triton.cdiv(n_tokens, cfg["BLOCK_N"]) * triton.cdiv(vocab, cfg["BLOCK_V"]),)

    with annotate("_backward_atomic_kernel"):
        _backward_atomic[grid](
            *tensors, grad_h, grad_w, grad_b, n_tokens, vocab, ds, dt, *scalars, *strides,
            NEED_GRAD_H=need_grad_h, NEED_GRAD_W=need_grad_w, NEED_GRAD_B=need_grad_b, GROUP_TOKENS=GROUP_TOKENS,
            **flags, **launch_meta(*tensors[:2], *tensors[3:5]),
        )
    return grad_h, grad_w, grad_b


def _chunk(budget_bytes: int, bytes_per_unit: int, align: int, limit: int) -> int:
    """Largest multiple of ``align`` (at least ``align``) units within the byte budget, capped at ``limit``."""
    units = budget_bytes // max(bytes_per_unit, 1)
    return min(max(align, units // align * align), limit)


def _alignments() -> tuple[int, int]:
    """(token, vocabulary) alignment of the chunks: whole tiles of every configuration the autotuner may pick."""
    config = tiling.INTERPRETER_CONFIG if tiling.interpreting() else None
    align_n = config.block_n if config else max(c.block_n for c in tiling.BACKWARD_CONFIGS)
    align_v = config.block_v if config else tiling.SPLIT_ALIGN
    return align_n, align_v


def _dz_column_bytes(operand_bytes: int, fp32_dz: bool) -> int:
    """Bytes per dz element: the operand dtype, or fp32 plus an operand-dtype copy when the bias needs fp32 sums."""
    return (4 + (0 if operand_bytes == 4 else operand_bytes)) if fp32_dz else operand_bytes


def two_pass_chunks(n_tokens: int, vocab: int, operand_bytes: int, fp32_columns: bool) -> tuple[int, int]:
    """(tokens per pass-1 chunk, vocabulary columns per pass-2 chunk) of the two-pass schedule, each dz buffer
    within ``tiling.backward_buffer_bytes()``.

    Pass 1 holds dz [rows, V] in the operand dtype; pass 2 holds dz [N, columns] in the operand dtype, or in fp32
    plus an operand-dtype copy when the bias gradient needs an fp32 column sum (``fp32_columns``).
    """
    align_n, align_v = _alignments()
    budget = tiling.backward_buffer_bytes()
    rows = _chunk(budget, vocab * operand_bytes, align_n, n_tokens)
    columns = _chunk(budget, n_tokens * _dz_column_bytes(operand_bytes, fp32_columns), align_v, vocab)
    return rows, columns


def one_pass_dz_bytes(operand_bytes: int, fp32_dz: bool) -> int:
    """Bytes per dz element of one_pass: ``pipeline.DZ_BUFFERS`` dz blocks (fp32 when the bias needs fp32 column
    sums, else the operand dtype), plus the one operand-dtype copy of an fp32 block that the current block's GEMMs
    read (freed before the next block's)."""
    dz = 4 if fp32_dz else operand_bytes
    copy = operand_bytes if fp32_dz and operand_bytes != 4 else 0
    return pipeline.DZ_BUFFERS * dz + copy


def one_pass_chunks(n_tokens: int, vocab: int, ds: int, operand_bytes: int, fp32_dz: bool,
                    partial_bytes: int) -> tuple[int, int]:
    """(tokens, vocabulary columns) per block of the one-pass schedule within ``tiling.backward_buffer_bytes()``.

    Half the budget goes to the token block's fp32 grad_h accumulator ([rows, Ds], plus ``partial_bytes`` per
    element for a 16-bit partial product where the GEMM cannot accumulate into fp32 itself), the rest to its dz
    blocks [rows, columns] (``one_pass_dz_bytes``: both of the block pipeline's buffers, with or without the
    overlap, so the blocks and the sums are the same either way). Fewer, taller token blocks mean fewer roundings
    of a 16-bit grad_W (one per block).
    """
    align_n, align_v = _alignments()
    budget = tiling.backward_buffer_bytes()
    accumulator_row_bytes = ds * (4 + partial_bytes)
    if not tiling.interpreting() and budget // 2 >= GROUP_TOKENS * accumulator_row_bytes:
        align_n = GROUP_TOKENS  # whole L2 groups of _grad_logits' launch order: a weight tile read once per block
    rows = _chunk(budget // 2, accumulator_row_bytes, align_n, n_tokens)
    left = max(budget - rows * accumulator_row_bytes, 0)
    columns = _chunk(left, rows * one_pass_dz_bytes(operand_bytes, fp32_dz), align_v, vocab)
    return rows, columns


def one_pass_blocks(n_tokens: int, vocab: int, ds: int, dtype: torch.dtype, device: torch.device,
                    fp32_dz: bool) -> tuple[int, int]:
    """``one_pass_chunks`` for these operands on this device: a 16-bit partial product is budgeted only where the
    GEMM cannot accumulate into fp32 itself."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    partial_bytes = 0 if dtype == torch.float32 or fp32_accumulating_mm(device) else itemsize
    return one_pass_chunks(n_tokens, vocab, ds, itemsize, fp32_dz, partial_bytes)


def _backward_gemm_schedule(schedule, tensors, strides, flags, scalars, n_tokens, vocab, ds, dt,
                            need_grad_h, need_grad_w, need_grad_b):
    """The two deterministic schedules: a kernel writes dz blocks, cuBLAS GEMMs turn them into gradients."""

    meta = launch_meta(*tensors[:2], *tensors[3:5])

    def grad_logits(dz, n_lo, height, v_lo, width):
        def grid(cfg):
            return (triton.cdiv(height, cfg["BLOCK_N"]) * triton.cdiv(width, cfg["BLOCK_V"]),)

        with annotate("_grad_logits_kernel"):
            _grad_logits[grid](*tensors, dz, n_tokens, vocab, ds, dt, n_lo, height, v_lo, width, *scalars,
                               *strides, GROUP_TOKENS=GROUP_TOKENS, **flags, **meta)

    need_weight_side = need_grad_w or need_grad_b
    if schedule == "one_pass" and need_grad_h and need_weight_side:
        return _one_pass(tensors, grad_logits, n_tokens, vocab, ds, need_grad_w, need_grad_b)
    # two_pass, or only one side of the gradients wanted (then either schedule is a single pass).
    student_hidden = tensors[0]
    rows, columns = two_pass_chunks(n_tokens, vocab, student_hidden.element_size(), fp32_columns=need_grad_b)
    grad_h = _grad_hidden_pass(tensors, grad_logits, n_tokens, vocab, ds, rows) if need_grad_h else None
    grad_w, grad_b = None, None
    if need_weight_side:
        grad_w, grad_b = _grad_weight_pass(tensors, grad_logits, n_tokens, vocab, ds, columns, need_grad_w,
                                           need_grad_b)
    return grad_h, grad_w, grad_b


def _one_pass(tensors, grad_logits, n_tokens, vocab, ds, need_grad_w, need_grad_b):
    """Token blocks x vocabulary blocks; each logit tile is recomputed once and feeds both gradient GEMMs.

    grad_h[block] is summed over the vocabulary blocks in an fp32 accumulator and rounded once. grad_W[columns] and
    grad_b[columns] are summed over the token blocks in their own dtype (exact for fp32; one rounding per token block
    for a 16-bit weight: ``one_pass_chunks`` keeps the blocks tall, e.g. 8 blocks of 2048 tokens, whole L2 groups,
    at N=16384, Ds=4096). The blocks run as ``pipeline.one_pass_steps`` orders them (two dz buffers; on CUDA the
    gradient kernel of the next block on a side stream while the main stream runs this block's GEMMs), unless
    ``GOPD_BACKWARD_OVERLAP=0`` (one buffer, one stream, the same blocks).
    """
    student_hidden, student_weight = tensors[0], tensors[1]
    op_dtype, device = student_hidden.dtype, student_hidden.device
    rows, columns = one_pass_blocks(n_tokens, vocab, ds, op_dtype, device, need_grad_b)
    plan = pipeline.blocks(n_tokens, vocab, rows, columns)
    steps = pipeline.one_pass_steps(len(plan), pipeline.overlap_enabled())
    streams = pipeline.streams_for(device, steps)

    grad_h = new_output((n_tokens, ds), op_dtype, device)
    in_place = op_dtype == torch.float32  # fp32 hidden states: accumulate straight into the gradient
    accumulator = grad_h if in_place else new_output((rows, ds), torch.float32, device)
    grad_w = new_output((vocab, ds), student_weight.dtype, device) if need_grad_w else None
    grad_b = new_output((vocab,), torch.float32, device) if need_grad_b else None
    dz_buffers = [new_output((rows * columns,), torch.float32 if need_grad_b else op_dtype, device)
                  for _ in range(pipeline.buffer_count(steps))]
    for buffer in dz_buffers:
        streams.share(buffer)

    def gemms(block: pipeline.Block, dz: torch.Tensor) -> None:
        n_lo, height, v_lo, width = block.n_lo, block.height, block.v_lo, block.width
        acc = accumulator[n_lo: n_lo + height] if in_place else accumulator[:height]
        if need_grad_b:
            column_sums = dz.sum(0)
            if n_lo == 0:
                grad_b[v_lo: v_lo + width] = column_sums
            else:
                grad_b[v_lo: v_lo + width] += column_sums
        dz_op = dz.to(op_dtype)
        weight = student_weight[v_lo: v_lo + width].to(op_dtype)
        mm_accumulate(acc, dz_op, weight, first=v_lo == 0)
        if need_grad_w:
            mm_accumulate(grad_w[v_lo: v_lo + width], dz_op.T, student_hidden[n_lo: n_lo + height], first=n_lo == 0)
        if block.closes_row and not in_place:
            grad_h[n_lo: n_lo + height] = acc

    def run(step: pipeline.Step) -> None:
        if step.op == pipeline.BEGIN:
            return
        block = plan[step.block]
        dz = dz_buffers[step.buffer][: block.height * block.width].view(block.height, block.width)
        if step.op == pipeline.GRAD_LOGITS:
            grad_logits(dz, block.n_lo, block.height, block.v_lo, block.width)
        else:
            gemms(block, dz)

    pipeline.run_steps(steps, run, streams)
    return grad_h, grad_w, grad_b


@functools.cache
def fp32_accumulating_mm(device: torch.device) -> bool:
    """Whether ``torch.addmm(..., out_dtype=torch.float32, out=...)`` accumulates 16-bit products straight into an
    fp32 matrix on this device (cuBLAS, torch >= 2.8), checked once in the two forms ``mm_accumulate`` uses (beta 0
    over garbage, beta 1 with a transposed operand); elsewhere ``mm_accumulate`` adds a 16-bit partial product."""
    if device.type != "cuda":
        return False
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.bfloat16, device=device)
    out = torch.full((2, 2), float("nan"), dtype=torch.float32, device=device)
    try:
        torch.addmm(out, a, a, out_dtype=torch.float32, beta=0, out=out)  # a @ a = [[7, 10], [15, 22]]
        torch.addmm(out, a.T, a, out_dtype=torch.float32, beta=1, out=out)  # + a^T @ a = [[10, 14], [14, 20]]
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out.cpu(), torch.tensor([[17.0, 24.0], [29.0, 42.0]])))


def mm_accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, first: bool) -> None:
    """out = a @ b (first) or out += a @ b, with the sum kept in out's dtype (fp32 out may take 16-bit a, b)."""
    if out.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif fp32_accumulating_mm(out.device):
        torch.addmm(out, a, b, out_dtype=out.dtype, beta=0 if first else 1, out=out)
    elif first:
        out.copy_(a @ b)
    else:
        out += a @ b


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
