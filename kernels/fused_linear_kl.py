"""``fused_linear_kl_triton``: the Triton backend of ``gopd_fast.fused_linear_kl`` (contract: ``gopd_fast.ops``).

Forward (``forward.kl_forward``): one pass over vocabulary tiles per token tile computes lse_s, lse_t, both KLs,
the student entropy and the target log-probs; the generalised JSD takes a second pass. Backward
(``backward.kl_backward``): recomputes the logit tiles and accumulates the student's gradients. Memory beyond the
inputs and gradients: a few fp32 [N] vectors, plus the backward's buffers (``tiling.backward_buffer_bytes()``, 80 MiB
by default, for the deterministic schedules; fp32 copies of grad_h and grad_W for the atomic one).

The grad_scale contract is met by summing the differentiable per-token loss (the backward recomputes tiles either
way; computing gradients eagerly in the forward would need lse_s/lse_t before the first tile is done).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .backward import SCHEDULES, check_schedule, kl_backward
from .forward import kl_forward
from .tiling import interpreting

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCHEDULE_ENV = "GOPD_BACKWARD"
DEFAULT_SCHEDULE = "one_pass"


def schedule_default() -> str:
    """The backward schedule when the caller does not choose: ``GOPD_BACKWARD`` (one of ``backward.SCHEDULES``),
    else ``one_pass`` (see ``backward`` for the trade-offs)."""
    value = os.environ.get(SCHEDULE_ENV, "").strip().lower() or DEFAULT_SCHEDULE
    if value not in SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV} must be one of {', '.join(SCHEDULES)}; got {value!r}")
    return value


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


def _check_dtypes(**tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"backend='triton' supports bfloat16, float16 and float32 for {name}, got {t.dtype}; "
                "use backend='naive' or 'chunked' for float64"
            )


def _unit_stride(t: Tensor | None) -> Tensor | None:
    """The kernels index rows by stride and columns densely; copy only tensors whose last dim is strided."""
    return t if t is None or (t.dim() >= 1 and t.stride(-1) == 1) else t.contiguous()


def _weighted(weight: Tensor, kl: Tensor) -> Tensor:
    """weight * kl per token, where a zero weight drops the term even if that KL is +inf (a -inf bias masks an entry
    one model gives mass): 0 * inf would be NaN."""
    return torch.where(weight == 0, 0.0, weight * kl)


class FusedLinearKLTriton(torch.autograd.Function):
    """Per-token loss (differentiable w.r.t. the student's hidden, weight, bias) and detached stats."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                reverse_weight, forward_weight, target_ids, jsd_beta, temperature, schedule):
        stats = kl_forward(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                           teacher_bias, target_ids, temperature, jsd_beta)
        rw = reverse_weight.float()
        fw = forward_weight.float()
        if jsd_beta is not None and 0.0 < jsd_beta < 1.0:
            loss = _weighted(rw, stats["jsd"])
            kl_stat = stats["kl_student_mixture"]
        else:
            loss = _weighted(rw, stats["reverse_kl"]) + _weighted(fw, stats["forward_kl"])
            kl_stat = stats["reverse_kl"]
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                              teacher_bias, rw, fw, stats["lse_s"], stats["lse_t"], kl_stat)
        ctx.jsd_beta, ctx.temperature, ctx.schedule = jsd_beta, temperature, schedule
        outputs = (stats["reverse_kl"], stats["forward_kl"], stats["student_entropy"],
                   stats["student_logprob"], stats["teacher_logprob"])
        ctx.mark_non_differentiable(*outputs)
        return (loss, *outputs)

    @staticmethod
    def backward(ctx, grad_loss, *_unused_stat_grads):
        (student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
         rw, fw, lse_s, lse_t, kl_stat) = ctx.saved_tensors
        beta, inv_temp = ctx.jsd_beta, 1.0 / ctx.temperature
        g = grad_loss.float() * inv_temp
        if beta is not None and 0.0 < beta < 1.0:
            coef_a, coef_b = g * rw * (1.0 - beta), torch.zeros_like(g)
        else:
            coef_a, coef_b = g * rw, g * fw
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        grad_h, grad_w, grad_b = kl_backward(
            student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
            lse_s, lse_t, coef_a.contiguous(), coef_b.contiguous(), kl_stat,
            temperature=ctx.temperature, jsd_beta=beta, need_grad_h=need_h, need_grad_w=need_w,
            need_grad_b=need_b and student_bias is not None, schedule=ctx.schedule,
        )
        return grad_h, grad_w, None, None, grad_b, None, None, None, None, None, None, None


def fused_linear_kl_triton(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    student_bias: Tensor | None,
    teacher_bias: Tensor | None,
    reverse_weight: Tensor,
    forward_weight: Tensor,
    *,
    jsd_beta: float | None,
    temperature: float,
    target_ids: Tensor | None,
    grad_scale: float | None,
    return_stats: bool,
    schedule: str | None = None,
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Triton backend; see ``gopd_fast.ops`` for the contract. ``schedule`` picks the backward (``one_pass``,
    ``two_pass`` or ``atomic``; see ``backward``); None reads ``GOPD_BACKWARD``, default ``one_pass``.

    jsd_beta = 0 or 1 are the TRL/Liger endpoints: forward KL resp. reverse KL, weighted by reverse_weight.
    target_ids must lie in [0, V) (``gopd_fast.loss`` validates them).
    """
    check_triton_runnable(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                          teacher_bias, reverse_weight, forward_weight, target_ids)
    _check_dtypes(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                  teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias)
    schedule = schedule_default() if schedule is None else schedule
    check_schedule(schedule)  # before the forward, not in the backward
    rw, fw = reverse_weight, forward_weight
    if jsd_beta == 0.0:  # forward-KL endpoint
        rw, fw = torch.zeros_like(reverse_weight), reverse_weight
    elif jsd_beta == 1.0:  # reverse-KL endpoint
        fw = torch.zeros_like(forward_weight)
    beta = None if jsd_beta in (0.0, 1.0) else jsd_beta
    loss, reverse_kl, forward_kl, entropy, logprob_s, logprob_t = FusedLinearKLTriton.apply(
        _unit_stride(student_hidden), _unit_stride(student_weight), _unit_stride(teacher_hidden),
        _unit_stride(teacher_weight), _unit_stride(student_bias), _unit_stride(teacher_bias), rw, fw,
        None if target_ids is None else target_ids.contiguous(), beta, float(temperature), schedule,
    )
    stats = None
    if return_stats:
        stats = {"reverse_kl": reverse_kl, "forward_kl": forward_kl, "student_entropy": entropy}
        if target_ids is not None:
            stats["student_logprob"] = logprob_s
            stats["teacher_logprob"] = logprob_t
    if grad_scale is not None:
        loss = loss.sum() * grad_scale
    return loss, stats
