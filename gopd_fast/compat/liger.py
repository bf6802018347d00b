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
``chunk_size`` (Liger's token-chunking knobs) are accepted and ignored; ``temperature`` must be > 0 (Liger only
asserts != 0).
"""
from __future__ import annotations

import torch
from torch import Tensor

from gopd_fast.loss import fused_linear_kl
from gopd_fast.ops.token_logprob import fused_linear_logprob

__all__ = ["LigerFusedLinearJSDLoss", "liger_fused_linear_jsd"]


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
    del compiled, chunk_size  # Liger's token chunking / torch.compile knobs: the fused loss tiles on its own
    if not isinstance(true_labels, Tensor):
        raise TypeError(f"true_labels must be an integer tensor [N], got {type(true_labels).__name__}")
    if true_labels.dtype.is_floating_point or true_labels.dtype == torch.bool:
        raise TypeError(f"true_labels must be an integer tensor, got {true_labels.dtype}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = true_labels.reshape(-1)
    if labels.shape[0] != student_input.reshape(-1, student_input.shape[-1]).shape[0]:
        raise ValueError(
            f"true_labels must have one label per token ({student_input.shape[:-1]}), got {tuple(true_labels.shape)}"
        )
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

    soft_sum = fused_linear_kl(
        student_input.reshape(-1, student_input.shape[-1]),
        s_weight,
        teacher_input.reshape(-1, teacher_input.shape[-1]),
        teacher_weight,
        reverse_weight=valid,
        jsd_beta=float(beta),
        temperature=float(temperature),
        student_bias=s_bias,
        teacher_bias=teacher_bias,
        reduction="sum",
        backend=backend,
    )
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
        if temperature == 0:
            raise ValueError("Temperature cannot be 0.")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.weight_hard_loss = weight_hard_loss
        self.weight_soft_loss = weight_soft_loss
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.compiled = compiled
        self.beta = beta
        self.chunk_size = chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss
        self.backend = backend

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
        return liger_fused_linear_jsd(
            student_input,
            student_weight,
            teacher_input,
            teacher_weight,
            true_labels,
            student_bias,
            teacher_bias,
            self.weight_hard_loss,
            self.weight_soft_loss,
            self.beta,
            self.ignore_index,
            self.temperature,
            self.compiled,
            self.chunk_size,
            self.return_soft_hard_loss,
            backend=self.backend,
        )
