"""``LigerFusedLinearJSD``: Liger-Kernel's older fused JSD API (``liger_kernel.transformers``), same numbers.

Swap one import line::

    # from liger_kernel.transformers import LigerFusedLinearJSD
    from gopd_fast.compat import LigerFusedLinearJSD

Liger has two functions named ``liger_fused_linear_jsd`` with different signatures; here they have two names:

- ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` -> ``LigerFusedLinearJSDLoss``
- ``liger_kernel.chunked_loss.functional.liger_fused_linear_jsd`` -> ``liger_fused_linear_jsd``
- ``liger_kernel.transformers.LigerFusedLinearJSD`` -> ``LigerFusedLinearJSD`` (this module)
- ``liger_kernel.transformers.functional.liger_fused_linear_jsd`` -> ``liger_fused_linear_jsd_shift_labels`` (here)

Semantics replicated from liger-kernel 0.8.5 (``ops/fused_linear_jsd.py``, ``ops/jsd.py``): with
``valid = shift_labels != ignore_index`` (every token when ``shift_labels`` is None),
``loss = sum_valid JSD_beta(p_s, p_t) / n_valid`` (0 when no token is valid) on ``(input @ weight.T) / temperature``,
``jsd_beta`` in TRL's convention (0 forward ``KL(p_t||p_s)``, 1 reverse ``KL(p_s||p_t)``, the mixture
``M = beta p_t + (1 - beta) p_s`` in between). Only the student's input and weight get gradients. There is no
bias and no hard (label) loss in this API: the labels only mask tokens.

Differences, on the safe side: logits and the JSD are accumulated in float32 whatever ``accum_dtype`` says (it is
accepted for compatibility; gradients come back in the weight's dtype); ``temperature`` must lie in
``gopd_fast.ops.checks.TEMPERATURE_RANGE`` (Liger only asserts ``!= 0``); ``shift_labels`` defaults to None in
``forward`` as in the functional form.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gopd_fast.compat.liger import check_liger_inputs, liger_argument_names
from gopd_fast.loss import check_backend, fused_linear_kl
from gopd_fast.ops.checks import check_int, check_labels, check_probability, check_temperature

__all__ = ["LigerFusedLinearJSD", "liger_fused_linear_jsd_shift_labels"]


def _options(jsd_beta: object, ignore_index: object, temperature: object, accum_dtype: object) -> dict:
    if accum_dtype is not None and not isinstance(accum_dtype, torch.dtype):
        raise TypeError(f"accum_dtype must be None or a torch.dtype, got {type(accum_dtype).__name__}")
    return {"jsd_beta": check_probability("jsd_beta", jsd_beta),
            "ignore_index": check_int("ignore_index", ignore_index),
            "temperature": check_temperature(temperature)}


def _jsd(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
         shift_labels: Tensor | None, *, jsd_beta: float, ignore_index: int, temperature: float,
         backend: str) -> Tensor:
    check_liger_inputs(student_input, student_weight, teacher_input, teacher_weight)
    valid = None if shift_labels is None else check_labels("shift_labels", shift_labels, student_input) != ignore_index
    # reduction="mean" divides by the number of valid tokens, as Liger's n_non_ignore (an all-ignored batch is 0)
    with liger_argument_names():
        return fused_linear_kl(student_input, student_weight, teacher_input, teacher_weight, reverse_weight=valid,
                               jsd_beta=jsd_beta, temperature=temperature, reduction="mean", backend=backend)


def liger_fused_linear_jsd_shift_labels(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    shift_labels: Tensor | None = None,
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    accum_dtype: torch.dtype | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """``liger_kernel.transformers.functional.liger_fused_linear_jsd`` (argument order and defaults)."""
    opts = _options(jsd_beta, ignore_index, temperature, accum_dtype)
    return _jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels,
                backend=check_backend(backend), **opts)


class LigerFusedLinearJSD(torch.nn.Module):
    """Drop-in for ``liger_kernel.transformers.LigerFusedLinearJSD`` (0.8.5): same arguments, same numbers.

    Args:
        jsd_beta: generalised-JSD coefficient in [0, 1] (0: forward KL, 1: reverse KL).
        ignore_index: ``shift_labels`` value of tokens without loss.
        temperature: divides both models' logits.
        accum_dtype: accepted for compatibility (accumulation is always float32).
        backend: ``gopd_fast.fused_linear_kl`` backend (keyword-only extension; "auto" picks Triton on CUDA).
    """

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: torch.dtype | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        for name, value in _options(jsd_beta, ignore_index, temperature, accum_dtype).items():
            setattr(self, name, value)
        self.accum_dtype = accum_dtype
        self.backend = check_backend(backend)

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                shift_labels: Tensor | None = None) -> Tensor:
        return _jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels,
                    jsd_beta=self.jsd_beta, ignore_index=self.ignore_index, temperature=self.temperature,
                    backend=self.backend)

    def extra_repr(self) -> str:
        return f"jsd_beta={self.jsd_beta}, ignore_index={self.ignore_index}, temperature={self.temperature}"
