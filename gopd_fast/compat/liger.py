"""``LigerFusedLinearJSDLoss`` with Liger-Kernel's exact name, constructor, call signature and numbers.

Swap one import line::

    # from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from gopd_fast.compat import LigerFusedLinearJSDLoss

Semantics replicated from liger-kernel 0.8.5 (``chunked_loss/jsd_loss.py`` and ``fused_linear_distillation.py``):

- ``loss = weight_hard_loss * hard + weight_soft_loss * soft`` where, with ``valid = true_labels != ignore_index``
  and ``n = max(valid.sum(), 1)``:
  ``soft = sum_valid JSD_beta(p_s, p_t) / n`` on ``logits / temperature``, and
  ``hard = sum_valid -log softmax(student logits)[true_label] / n`` (cross-entropy, *without* temperature).
- ``beta`` is TRL's/Liger's generalised-JSD coefficient: ``beta=0`` forward ``KL(p_t||p_s)``, ``beta=1`` reverse
  ``KL(p_s||p_t)``, in between ``beta*KL(p_t||M) + (1-beta)*KL(p_s||M)`` with ``M = beta*p_t + (1-beta)*p_s``.
- Biases are added before the temperature. A teacher head with more rows than the student's gets the student's
  logits padded with zeros (Liger's padded-vocabulary rule); a smaller teacher head is an error.
- Only the student's input, weight and bias receive gradients. ``return_soft_hard_loss=True`` returns
  ``(loss, soft, hard)``; the hard loss is skipped (0) when its weight is 0 and it is not returned.

Differences, all on the safe side: no ``[N, V]`` logits are built (``gopd_fast.fused_linear_kl`` for the soft loss,
``gopd_fast.fused_linear_logprob`` for the hard loss, both tiled over the vocabulary); logits are accumulated in
float32 even for bf16 inputs (Liger takes the JSD's log-softmax in the input dtype); ``compiled`` and
``chunk_size`` (Liger's token-chunking knobs) are accepted and ignored; ``temperature`` must lie in
``gopd_fast.ops.checks.TEMPERATURE_RANGE`` (Liger only asserts != 0); every argument is validated when the class is
built (Liger's own checks fail later, e.g. ``beta="0.5"`` with a ``'<='`` TypeError). Under ``torch.autocast`` the
inputs are cast like an ``nn.Linear``'s and the loss accumulates in float32 (``gopd_fast.ops.autocast``). Liger's
older API (``liger_kernel.transformers.LigerFusedLinearJSD``) is ``gopd_fast.compat.liger_transformers``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from gopd_fast.loss import check_backend, fused_linear_kl
from gopd_fast.ops.autocast import autocast_cast
from gopd_fast.ops.checks import (
    check_bool,
    check_int,
    check_labels,
    check_probability,
    check_real,
    check_temperature,
)
from gopd_fast.ops.token_logprob import fused_linear_logprob

__all__ = ["LigerFusedLinearJSDLoss", "check_liger_inputs", "liger_argument_names", "liger_fused_linear_jsd"]


def check_liger_inputs(student_input: object, student_weight: object, teacher_input: object, teacher_weight: object,
                       student_bias: object = None, teacher_bias: object = None) -> None:
    """Liger's tensor arguments, named as Liger names them: inputs [N, hidden] (or [*B, hidden]), weights
    [V, hidden], biases None or [V] (their sizes and dtypes are checked by ``fused_linear_kl``)."""
    for name, t, shape in (("student_input", student_input, "[N, hidden] or [*B, hidden]"),
                           ("student_weight", student_weight, "[V, hidden]"),
                           ("teacher_input", teacher_input, "[N, hidden] or [*B, hidden]"),
                           ("teacher_weight", teacher_weight, "[V, hidden]"),
                           ("student_bias", student_bias, "[V]"), ("teacher_bias", teacher_bias, "[V]")):
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        ndim_ok = t.ndim == 1 if name.endswith("bias") else (t.ndim == 2 if name.endswith("weight") else t.ndim >= 2)
        if not ndim_ok:
            raise ValueError(f"{name} must be {shape}, got shape {list(t.shape)}")


@contextlib.contextmanager
def liger_argument_names() -> Iterator[None]:
    """Errors of ``fused_linear_kl`` renamed to Liger's argument names (student_input, teacher_input)."""
    try:
        yield
    except (TypeError, ValueError) as err:
        message = str(err)
        for ours, theirs in (("student_hidden", "student_input"), ("teacher_hidden", "teacher_input")):
            message = message.replace(ours, theirs)
        if message == str(err):
            raise
        raise type(err)(message) from err


def _options(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
             return_soft_hard_loss) -> dict:
    """The constructor's arguments, validated once (class: at construction; function: per call)."""
    return {
        "weight_hard_loss": check_real("weight_hard_loss", weight_hard_loss),
        "weight_soft_loss": check_real("weight_soft_loss", weight_soft_loss),
        "beta": check_probability("beta", beta),
        "ignore_index": check_int("ignore_index", ignore_index),
        "temperature": check_temperature(temperature),
        "compiled": check_bool("compiled", compiled),
        "chunk_size": check_int("chunk_size", chunk_size, low=1),
        "return_soft_hard_loss": check_bool("return_soft_hard_loss", return_soft_hard_loss),
    }


def liger_fused_linear_jsd(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    true_labels: Tensor,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    weight_hard_loss: float = 0.5,
    weight_soft_loss: float = 0.5,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    compiled: bool = True,
    chunk_size: int = 1024,
    return_soft_hard_loss: bool = False,
    *,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Functional form, argument order of ``liger_kernel.chunked_loss.functional.liger_fused_linear_jsd``."""
    opts = _options(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled, chunk_size,
                    return_soft_hard_loss)
    return _jsd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                     teacher_bias, backend=check_backend(backend), **opts)


def _jsd_loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
              teacher_bias, *, weight_hard_loss: float, weight_soft_loss: float, beta: float, ignore_index: int,
              temperature: float, compiled: bool, chunk_size: int, return_soft_hard_loss: bool, backend: str):
    del compiled, chunk_size  # Liger's token chunking / torch.compile knobs: the fused loss tiles on its own
    check_liger_inputs(student_input, student_weight, teacher_input, teacher_weight, student_bias, teacher_bias)
    labels = check_labels("true_labels", true_labels, student_input)
    if weight_hard_loss != 0 or return_soft_hard_loss:  # the cross-entropy reads the labels as vocabulary ids
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= student_weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"true_labels must lie in [0, {student_weight.shape[0]}) or equal ignore_index="
                             f"{ignore_index}, got {labels[bad][0].item()}")
    # autocast: cast before the zero padding below so the padded head has one dtype
    student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias = autocast_cast(
        student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias)
    valid = labels != ignore_index
    n_valid = valid.sum().clamp_min(1)

    vocab, vocab_t = student_weight.shape[0], teacher_weight.shape[0]
    s_weight, s_bias = student_weight, student_bias
    if vocab_t > vocab:  # Liger pads the student's logits with zeros up to the teacher's vocabulary
        pad = vocab_t - vocab
        s_weight = torch.cat([student_weight, student_weight.new_zeros(pad, student_weight.shape[1])])
        if student_bias is not None:
            s_bias = torch.cat([student_bias, student_bias.new_zeros(pad)])
    elif vocab_t < vocab:
        raise ValueError(f"teacher_weight has {vocab_t} rows, fewer than student_weight's {vocab}")

    with liger_argument_names():
        soft_sum = _soft_sum(student_input, s_weight, teacher_input, teacher_weight, valid, beta, temperature, s_bias,
                             teacher_bias, backend)
    soft = soft_sum / n_valid
    if weight_hard_loss != 0 or return_soft_hard_loss:
        logprob = fused_linear_logprob(
            student_input.reshape(-1, student_input.shape[-1]),
            student_weight,
            labels,
            bias=student_bias,
            ignore_index=ignore_index,
        )
        hard = -logprob.sum() / n_valid
    else:
        hard = soft.new_zeros(())
    loss = weight_hard_loss * hard + weight_soft_loss * soft
    if return_soft_hard_loss:
        return loss, soft, hard
    return loss


def _soft_sum(student_input, s_weight, teacher_input, teacher_weight, valid, beta, temperature, s_bias, teacher_bias,
              backend) -> Tensor:
    return fused_linear_kl(
        student_input.reshape(-1, student_input.shape[-1]),
        s_weight,
        teacher_input.reshape(-1, teacher_input.shape[-1]),
        teacher_weight,
        reverse_weight=valid,
        jsd_beta=beta,
        temperature=temperature,
        student_bias=s_bias,
        teacher_bias=teacher_bias,
        reduction="sum",
        backend=backend,
    )


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (0.8.5): same arguments, same numbers.

    Args:
        weight_hard_loss: weight of the cross-entropy on ``true_labels``.
        weight_soft_loss: weight of the generalised JSD.
        beta: JSD coefficient in [0, 1] (0: forward KL, 1: reverse KL).
        ignore_index: label value of positions without loss.
        temperature: softens both models' logits for the JSD (> 0).
        compiled, chunk_size: accepted for compatibility, unused.
        return_soft_hard_loss: return ``(loss, soft_loss, hard_loss)``.
        backend: ``gopd_fast.fused_linear_kl`` backend (keyword-only extension; "auto" picks Triton on CUDA).
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: int = 1024,
        return_soft_hard_loss: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # validated here, not at the first call (Liger's own asserts would fail later, with a '<=' TypeError)
        for name, value in _options(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, compiled,
                                    chunk_size, return_soft_hard_loss).items():
            setattr(self, name, value)
        self.backend = check_backend(backend)

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        true_labels: Tensor,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        return _jsd_loss(
            student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
            weight_hard_loss=self.weight_hard_loss, weight_soft_loss=self.weight_soft_loss, beta=self.beta,
            ignore_index=self.ignore_index, temperature=self.temperature, compiled=self.compiled,
            chunk_size=self.chunk_size, return_soft_hard_loss=self.return_soft_hard_loss, backend=self.backend,
        )
