"""``FusedLinearKL``: ``fused_linear_kl`` as an ``nn.Module`` that owns the student and teacher lm_heads.

Fused losses that read ``lm_head.weight`` directly are wrong under FSDP2 (the parameter is a shard) and PEFT (the
LoRA delta lives in other modules). This module resolves the *effective* head once per call:

- FSDP2 / DTensor weights are gathered with ``DTensor.full_tensor()``, once per call (not per vocabulary tile);
  the all-gather is differentiable, so the gradient comes back to the sharded parameter as a DTensor,
  averaged over the ranks like FSDP2's own reduce-scatter. A weight whose dtype differs from the hidden states
  (fp32 master weights, bf16 activations) is cast to the hidden-state dtype, as FSDP2's mixed precision would.
- A PEFT LoRA layer (``base_layer`` + ``lora_A``/``lora_B``) is folded in exactly, dropout included, by widening
  the hidden state instead of merging weights:
      logits = x W^T + s * B(A(dropout(x)))  =  [x, s * A(dropout(x))] @ [W, B]^T
  so gradients reach ``lora_A``/``lora_B`` (and W if it is trainable) through ordinary autograd.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gopd_fast.loss import KLStats, check_options, fused_linear_kl

__all__ = ["FusedLinearKL", "effective_head", "effective_heads"]

_FIXED = ("student_weight", "teacher_weight", "student_bias", "teacher_bias")


def _full(t: Tensor | None) -> Tensor | None:
    """The full tensor behind a (possibly FSDP2-sharded) parameter.

    For a DTensor the all-gather is differentiable; its gradient is declared ``Partial("avg")`` so that backward
    reduce-scatters it and averages over the ranks, as FSDP2 does for every other parameter. (A plain
    ``full_tensor()`` would assume the gradient is already identical on all ranks and keep each rank's own
    shard of its own data's gradient: silently wrong under data parallelism.)
    """
    if t is None or not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _is_lora(head: nn.Module) -> bool:
    return all(hasattr(head, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def effective_head(head: nn.Module, hidden: Tensor, *, cast: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """(hidden', weight, bias) with ``hidden' @ weight^T + bias == head(hidden)`` (for a linear head).

    ``head`` is an ``nn.Linear``-like module (``weight`` [V, D], optional ``bias``), possibly FSDP2-sharded,
    or a PEFT LoRA layer wrapping one. ``cast=True`` casts weight and bias to the hidden states' dtype
    (differentiably), as FSDP2 mixed precision would for a head called through its forward.
    """
    if cast:
        return _cast_to(hidden.dtype, *effective_head(head, hidden))
    if _is_lora(head):
        return _lora_head(head, hidden)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise TypeError(f"expected an nn.Linear-like lm_head with a 2-D .weight, got {type(head).__name__}")
    return hidden, _full(weight), _full(getattr(head, "bias", None))


def _lora_head(head: nn.Module, hidden: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    hidden, weight, bias = effective_head(head.base_layer, hidden)
    if head.disable_adapters or head.merged:  # merged: the delta is already inside the base weight
        return hidden, weight, bias
    if getattr(head, "fan_in_fan_out", False):
        raise ValueError("FusedLinearKL: LoRA with fan_in_fan_out=True (Conv1D heads) is not supported")
    extra_hidden, extra_weight = [hidden], [weight]
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        if name in getattr(head, "lora_variant", {}) or getattr(head, "use_dora", {}).get(name, False):
            raise ValueError(f"FusedLinearKL: LoRA adapter {name!r} uses a variant (e.g. DoRA); only plain LoRA "
                             "can be folded into the fused loss")
        lora_a, lora_b, scaling = head.lora_A[name], head.lora_B[name], head.scaling[name]
        low_rank = lora_a(head.lora_dropout[name](hidden.to(_full(lora_a.weight).dtype))) * scaling
        extra_hidden.append(low_rank.to(hidden.dtype))
        extra_weight.append(_full(lora_b.weight).to(weight.dtype))
        b_bias = _full(getattr(lora_b, "bias", None))
        if b_bias is not None:  # lora_bias=True: B has a bias, scaled like the rest of the delta
            delta = (b_bias * scaling).to(weight.dtype)
            bias = delta if bias is None else bias + delta
    if len(extra_hidden) == 1:
        return hidden, weight, bias
    return torch.cat(extra_hidden, dim=-1), torch.cat(extra_weight, dim=1), bias


Head = tuple[Tensor, Tensor, Tensor | None]   # (hidden', weight, bias) of one effective head


def effective_heads(student_head: nn.Module, teacher_head: nn.Module, student_hidden: Tensor,
                    teacher_hidden: Tensor | None) -> tuple[Head, Head | None]:
    """Both heads resolved once, cast to their hidden states' dtype; the teacher's without gradient (None when
    ``teacher_hidden`` is None). Callers share the result across loss terms: one all-gather per head per call."""
    student = effective_head(student_head, student_hidden, cast=True)
    if teacher_hidden is None:
        return student, None
    with torch.no_grad():
        teacher = effective_head(teacher_head, teacher_hidden, cast=True)
    return student, teacher


def _cast_to(dtype: torch.dtype, hidden: Tensor, weight: Tensor, bias: Tensor | None):
    if not (dtype.is_floating_point and weight.dtype.is_floating_point) or weight.dtype == dtype:
        return hidden, weight, bias
    return hidden, weight.to(dtype), None if bias is None else bias.to(dtype)


class FusedLinearKL(nn.Module):
    """Distillation loss over the student's and teacher's lm_heads, without materialising logits.

    Args:
        student_head: the student's lm_head (``nn.Linear``-like; FSDP2-sharded and PEFT LoRA heads work).
        teacher_head: the teacher's lm_head. It never gets gradients.
        **defaults: default keyword arguments of ``fused_linear_kl`` (e.g. ``temperature``, ``jsd_beta``,
            ``reduction``, ``truncate_teacher_vocab``), validated here; per-call keywords of ``forward`` override
            them. Under ``torch.autocast`` the heads are cast like the operands of an ``nn.Linear``
            (``gopd_fast.ops.autocast``).

    Example::

        loss_fn = FusedLinearKL(student.lm_head, teacher.lm_head, temperature=1.0)
        loss = loss_fn(student_hidden, teacher_hidden, reverse_weight=student_tokens, forward_weight=teacher_tokens)
    """

    def __init__(self, student_head: nn.Module, teacher_head: nn.Module, **defaults: Any) -> None:
        super().__init__()
        bad = sorted(set(defaults) & set(_FIXED))
        if bad:
            raise TypeError(f"FusedLinearKL takes the weights from the heads; do not pass {bad}")
        self.student_head = student_head
        self.teacher_head = teacher_head
        self.defaults = check_options(**defaults)  # a bad default fails here, not at the first step

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor, **kwargs: Any) -> Tensor | tuple[Tensor, KLStats]:
        bad = sorted(set(kwargs) & set(_FIXED))
        if bad:
            raise TypeError(f"FusedLinearKL takes the weights from the heads; do not pass {bad}")
        (h_s, w_s, b_s), (h_t, w_t, b_t) = effective_heads(self.student_head, self.teacher_head, student_hidden,
                                                           teacher_hidden)
        options = {**self.defaults, **kwargs}
        return fused_linear_kl(h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, **options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.defaults.items())
