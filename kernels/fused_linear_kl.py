"""``fused_linear_kl_triton``: the Triton backend of ``gopd_fast.fused_linear_kl`` (contract:
``gopd_fast.ops.problem.KLProblem``).

Forward (``forward.kl_forward``): one pass over vocabulary tiles per token tile computes lse_s, lse_t, both KLs,
the student entropy and the target log-probs; the generalised JSD takes a second pass. Backward
(``backward.kl_backward``): recomputes the logit tiles and accumulates the student's gradients. Memory beyond the
inputs and gradients: a few fp32 [N] vectors, plus the backward's buffers (``tiling.backward_buffer_bytes()``, 94 MiB
by default, for the deterministic schedules; fp32 copies of grad_h and grad_W for the atomic one).

``schedule.choose_schedule`` picks the schedule before the forward: ``logit_block`` replaces both passes above by
one that computes every logit once and stores the gradients (``logit_block``), the backward then only scales them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gopd_fast.ops.problem import KLProblem

from . import logit_block
from .backward import kl_backward
from .forward import kl_forward
from .objective import grad_coefficients, loss_and_kl_stat
from .schedule import LOGIT_BLOCK, SKIP, choose_schedule, schedule_default  # noqa: F401 (schedule_default: re-export)
from .skip import skip_backward
from .tiling import interpreting

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_triton_runnable(*tensors: Tensor | None) -> None:
    """Raise a clear error when the Triton kernels cannot run on these tensors."""
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) != 1:
        raise ValueError(f"backend='triton' needs all tensors on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' cannot run on {device.type} tensors: it needs CUDA tensors (or, for tests only, CPU "
        "tensors with TRITON_INTERPRET=1 set before triton is imported). Use backend='chunked' on CPU."
    )


def _check_inputs(problem: KLProblem) -> None:
    """What the kernels can take: tensors on CUDA (or CPU under the interpreter) in bf16/fp16/fp32. Through
    ``gopd_fast.fused_linear_kl`` this never fails (``gopd_fast.ops.dispatch`` picks another backend or raises
    first); it names the problem for direct callers. Attribute reads only, no device sync."""
    heads = {"student_hidden": problem.student_hidden, "student_weight": problem.student_weight,
             "teacher_hidden": problem.teacher_hidden, "teacher_weight": problem.teacher_weight,
             "student_bias": problem.student_bias, "teacher_bias": problem.teacher_bias}
    check_triton_runnable(*heads.values(), problem.reverse_weight, problem.forward_weight, problem.target_ids)
    for name, t in heads.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports bfloat16, float16 and float32 for {name}, got {t.dtype}; "
                            "use backend='naive' or 'chunked' for float64")


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """The kernels index rows by stride and columns densely; copy only tensors whose last dim is strided."""
    return t if t is None or (t.dim() >= 1 and t.stride(-1) == 1) else t.contiguous()


class FusedLinearKLTriton(torch.autograd.Function):
    """Per-token loss (differentiable w.r.t. the student's hidden, weight, bias) and detached stats.

    Inputs: the student tensors that get gradients (unit last stride), the ``KLProblem`` and the schedule;
    ``backward`` returns those three gradients and None for the problem and the schedule.
    """

    @staticmethod
    def forward(ctx, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                problem: KLProblem, schedule: str):
        teacher = (_unit_stride(problem.teacher_hidden), _unit_stride(problem.teacher_weight),
                   _unit_stride(problem.teacher_bias))
        target_ids = None if problem.target_ids is None else problem.target_ids.contiguous()
        rw, fw = problem.reverse_weight, problem.forward_weight  # float32: dispatch sends no float64 here
        jsd_beta, temperature = problem.jsd_beta, problem.temperature
        ctx.stored = None
        if schedule == LOGIT_BLOCK:
            need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            stats, ctx.stored = logit_block.logit_block_forward(
                student_hidden, student_weight, teacher[0], teacher[1], student_bias, teacher[2],
                target_ids, rw, fw, temperature=temperature, jsd_beta=jsd_beta, need_grad_h=need_h,
                need_grad_w=need_w, need_grad_b=need_b and student_bias is not None)
        else:
            stats = kl_forward(student_hidden, student_weight, teacher[0], teacher[1], student_bias, teacher[2],
                               target_ids, temperature, jsd_beta)
        loss, kl_stat = loss_and_kl_stat(stats, rw, fw, jsd_beta)
        ctx.save_for_backward(student_hidden, student_weight, student_bias, *teacher, rw, fw, stats["lse_s"],
                              stats["lse_t"], kl_stat)
        ctx.jsd_beta, ctx.temperature, ctx.schedule = jsd_beta, temperature, schedule
        outputs = (stats["reverse_kl"], stats["forward_kl"], stats["student_entropy"],
                   stats["student_logprob"], stats["teacher_logprob"])
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
         rw, fw, lse_s, lse_t, kl_stat) = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_b = need_b and student_bias is not None
        grad_h = grad_w = grad_b = None
        schedule = "one_pass" if ctx.schedule == LOGIT_BLOCK else ctx.schedule  # once the stored grads are gone
        if ctx.stored is not None:
            stored, ctx.stored = ctx.stored, None  # handed over: autograd may keep them without a copy
            grad_h, grad_w, grad_b, weight_side_done = logit_block.scale_stored(
                stored, grad_loss, None if student_bias is None else student_bias.dtype)
            del stored
            if weight_side_done:
                return grad_h, grad_w, grad_b, None, None
            need_h = False  # per-token weights on a sum over tokens: recompute the weight side only
        coef_a, coef_b = grad_coefficients(grad_loss, rw, fw, ctx.jsd_beta, ctx.temperature)
        args = (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                lse_s, lse_t, coef_a, coef_b, kl_stat)
        options = {"temperature": ctx.temperature, "jsd_beta": ctx.jsd_beta, "need_grad_h": need_h,
                   "need_grad_w": need_w, "need_grad_b": need_b}
        if schedule == SKIP:
            recomputed = skip_backward(*args, **options)[:3]  # the skip flags are for bench scripts
        else:
            recomputed = kl_backward(*args, **options, schedule=schedule)
        grad_h = recomputed[0] if need_h else grad_h
        return grad_h, recomputed[1], recomputed[2], None, None  # nothing for the problem and the schedule


def fused_linear_kl_triton(problem: KLProblem, *,
                           schedule: str | None = None) -> tuple[Tensor, dict[str, Tensor | str] | None]:
    """Triton backend; contract: ``gopd_fast.ops.problem.KLProblem`` (bf16/fp16/fp32 operands on CUDA, or on
    CPU under ``TRITON_INTERPRET=1``; see ``_check_inputs``).
    ``schedule`` is one of ``schedule.CHOICES`` (``auto``, ``logit_block``, ``one_pass``, ``two_pass``, ``atomic``,
    ``skip``); None reads ``GOPD_BACKWARD``, default ``auto`` (``schedule.choose_schedule``). The stats report the
    schedule that ran under ``"schedule"``.
    """
    _check_inputs(problem)
    schedule = choose_schedule(schedule, needs_grad=any(problem.needs_grad), n_tokens=problem.n_tokens,
                               vocab=problem.vocab, operand_bytes=problem.student_hidden.element_size())
    loss, reverse_kl, forward_kl, entropy, logprob_s, logprob_t = FusedLinearKLTriton.apply(
        _unit_stride(problem.student_hidden), _unit_stride(problem.student_weight),
        _unit_stride(problem.student_bias), problem, schedule)
    stats = None
    if problem.return_stats:
        stats = {"reverse_kl": reverse_kl, "forward_kl": forward_kl, "student_entropy": entropy}
        if problem.target_ids is not None:
            stats["student_logprob"] = logprob_s
            stats["teacher_logprob"] = logprob_t
        stats["schedule"] = schedule
    if problem.grad_scale is not None:
        loss = loss.sum() * problem.grad_scale
    return loss, stats
