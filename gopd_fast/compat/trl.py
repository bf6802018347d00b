"""TRL plug-in: GKD and on-policy distillation trainers whose loss never builds the ``[B, L, V]`` logits.

Tested with trl 1.16.0. Two trainers, one idea: run the student's and the teacher's *backbones* (no ``lm_head``),
then hand the last hidden states and both heads to ``gopd_fast.fused_linear_kl``::

    from gopd_fast.compat.trl import FusedGKDTrainer              # instead of trl.experimental.gkd.GKDTrainer
    from gopd_fast.compat.trl import FusedDistillationTrainer     # instead of trl.DistillationTrainer

- ``FusedGKDTrainer`` replaces ``GKDTrainer.compute_loss``: same generalised JSD (``GKDConfig.beta``, TRL's
  convention: 0 forward KL, 1 reverse KL), same ``labels != -100`` mask, same reduction (``num_items_in_batch``
  when the Trainer passes it, else the mean over unmasked tokens), same temperature 1 as TRL's ``compute_loss``.
- ``FusedDistillationTrainer`` replaces ``DistillationTrainer._compute_loss`` (which already tiles the vocabulary
  in TRL, with a Python loop per chunk); the completion mask, ``num_items_in_batch`` and entropy logging are TRL's.
- ``fused_gkd_loss`` is the loss alone, for custom trainers: same numbers as ``GKDTrainer.generalized_jsd_loss``.

Heads are resolved with ``gopd_fast.module.effective_head``: FSDP2-sharded (DTensor) heads are gathered once per
call and PEFT LoRA heads are folded in exactly, so the loss is right where reading ``lm_head.weight`` would not be.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gopd_fast.loss import fused_linear_kl
from gopd_fast.module import effective_head
from gopd_fast.ops.checks import check_int, check_labels, check_probability, check_real, check_temperature

__all__ = [
    "FusedDistillationTrainer",  # noqa: F822 (built on first access, see __getattr__)
    "FusedGKDMixin",
    "FusedGKDTrainer",  # noqa: F822
    "backbone_hidden_states",
    "fused_gkd_loss",
]


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers stay injected, so they still apply)."""
    try:
        from peft import PeftModel
    except ImportError:
        return model
    return model.base_model.model if isinstance(model, PeftModel) else model


def backbone_hidden_states(model: nn.Module, **inputs: Any) -> Tensor:
    """Last hidden states ``[B, L, D]`` of a causal LM, without running its ``lm_head``.

    ``model.base_model`` is the decoder stack for transformers causal LMs (``Qwen3ForCausalLM.model``).
    """
    inner = _unwrap_peft(model)
    backbone = getattr(inner, "base_model", None)
    if backbone is None or backbone is inner:
        raise TypeError(f"{type(inner).__name__} has no separate backbone (.base_model); pass a *ForCausalLM model")
    return backbone(**inputs, use_cache=False).last_hidden_state


def output_head(model: nn.Module) -> nn.Module:
    """The model's ``lm_head`` module (a LoRA layer if PEFT targets it)."""
    head = _unwrap_peft(model).get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings (lm_head)")
    return head


def _head_config_check(model: nn.Module) -> None:
    config = getattr(_unwrap_peft(model), "config", None)
    if config is None:
        return
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling"):
        if getattr(config, name, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} post-processes its logits ({name}={getattr(config, name)}); the fused "
                "loss supports plain linear heads only"
            )


def fused_gkd_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    num_items_in_batch: int | Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> Tensor:
    """``GKDTrainer.generalized_jsd_loss`` (reduction "batchmean") computed from hidden states and heads.

    Args:
        student_hidden: ``[B, L, Ds]`` (or ``[N, Ds]``) student hidden states, aligned with ``labels``.
        teacher_hidden: ``[B, L, Dt]`` teacher hidden states at the same positions.
        student_head / teacher_head: the ``lm_head`` modules (``nn.Linear``, FSDP2-sharded or PEFT LoRA).
        labels: ``[B, L]`` next-token labels; ``ignore_index`` marks positions without loss. None: every position
            counts.
        beta: generalised-JSD coefficient (0: forward KL, 1: reverse KL).
        temperature: divides both models' logits.
        num_items_in_batch: if given, the loss is ``sum / num_items_in_batch`` (gradient-accumulation correct);
            else ``sum / max(#unmasked, 1)``, or without labels ``sum / B`` (TRL's "batchmean": the size of the
            hidden states' first dimension).
    """
    beta = check_probability("beta", beta)
    temperature = check_temperature(temperature)
    ignore_index = check_int("ignore_index", ignore_index)
    for name, hidden in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        if not isinstance(hidden, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [B, L, D] or [N, D], got {type(hidden).__name__}")
        if hidden.ndim < 2:
            raise ValueError(f"{name} must be [B, L, D] or [N, D], got shape {list(hidden.shape)}")
    mask = None if labels is None else check_labels("labels", labels, student_hidden) != ignore_index
    h_s, w_s, b_s = effective_head(student_head, student_hidden)
    with torch.no_grad():
        h_t, w_t, b_t = effective_head(teacher_head, teacher_hidden.detach())
    total = fused_linear_kl(
        h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, reverse_weight=mask, jsd_beta=beta,
        temperature=temperature, reduction="sum", backend=backend,
    )
    if num_items_in_batch is not None:
        return total / _items_in_batch(num_items_in_batch, total.device)
    if mask is None:  # TRL's batchmean without labels: divide by the batch (first) dimension
        return total / max(student_hidden.shape[0], 1)
    return total / mask.sum().clamp_min(1)


def _items_in_batch(value: int | Tensor, device: torch.device) -> float | Tensor:
    """TRL's ``num_items_in_batch``: a positive number, or a one-element tensor (left on its device: no sync)."""
    if not isinstance(value, Tensor):
        return check_real("num_items_in_batch", value, low=0.0, low_open=True)
    if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
        raise ValueError(f"num_items_in_batch must be a number or a one-element tensor, got shape "
                         f"{list(value.shape)} dtype {value.dtype}")
    return value.to(device).reshape(())


class FusedGKDMixin:
    """Mixin for ``trl.experimental.gkd.GKDTrainer`` (or a subclass): ``compute_loss`` from hidden states.

    Put it first in the bases: ``class MyTrainer(FusedGKDMixin, GKDTrainer)``. Uses ``self.beta``,
    ``self.teacher_model`` and ``self.accelerator`` as GKDTrainer sets them.
    """

    fused_loss_backend: str = "auto"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        _head_config_check(unwrapped)
        if model is not unwrapped:  # DDP/FSDP: go through the wrapper's forward so its hooks fire
            from trl.models.utils import _ForwardRedirection

            loss = _ForwardRedirection()(model, unwrapped, self._fused_gkd_loss, unwrapped, inputs,
                                         num_items_in_batch)
        else:
            loss = self._fused_gkd_loss(unwrapped, inputs, num_items_in_batch)
        # GKDTrainer returns the model outputs (with logits) on request; there are no logits here, and a dict
        # without them is what Trainer.prediction_step handles (it reads the logits from the dict's other keys)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _fused_gkd_loss(self, student: nn.Module, inputs: dict[str, Tensor], num_items_in_batch) -> Tensor:
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        student_hidden = backbone_hidden_states(student, **model_inputs)
        self.teacher_model.eval()
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        _head_config_check(teacher)
        with torch.no_grad():
            if self.teacher_model is not teacher:  # wrapped (DeepSpeed/FSDP): let the wrapper gather its params
                from trl.models.utils import _ForwardRedirection

                teacher_hidden = _ForwardRedirection()(
                    self.teacher_model, teacher, lambda **kw: backbone_hidden_states(teacher, **kw), **model_inputs
                )
            else:
                teacher_hidden = backbone_hidden_states(teacher, **model_inputs)
        # the same causal shift as GKDTrainer.compute_loss: position i predicts token i + 1
        return fused_gkd_loss(
            student_hidden[:, :-1],
            teacher_hidden[:, :-1],
            output_head(student),
            output_head(teacher),
            inputs["labels"][:, 1:],
            beta=self.beta,
            num_items_in_batch=num_items_in_batch,
            backend=self.fused_loss_backend,
        )


_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids")


def _make_trainers() -> tuple[type, type]:
    from trl import DistillationTrainer
    from trl.experimental.gkd import GKDTrainer

    class FusedGKDTrainer(FusedGKDMixin, GKDTrainer):
        """``GKDTrainer`` whose loss is ``gopd_fast.fused_linear_kl`` on hidden states (no full logits)."""

    class FusedDistillationTrainer(DistillationTrainer):
        """``trl.DistillationTrainer`` whose divergence is ``gopd_fast.fused_linear_kl`` (``args.beta``,
        ``args.temperature`` as TRL uses them)."""

        fused_loss_backend: str = "auto"

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            loss_mask = inputs["completion_mask"]
            if "tool_mask" in inputs:
                loss_mask = loss_mask * inputs["tool_mask"]
            logits_to_keep = inputs["completion_ids"].size(1)
            multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}  # VLM fields, as TRL passes them
            _head_config_check(unwrapped_student)
            student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask,
                                                         logits_to_keep, **multimodal)
            self.teacher_model.eval()
            unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
            _head_config_check(unwrapped_teacher)
            with torch.no_grad():
                teacher_hidden = self._forward_redirection(
                    self.teacher_model, unwrapped_teacher, self._get_last_hidden_state, unwrapped_teacher,
                    input_ids, attention_mask, logits_to_keep, **multimodal,
                )
            h_s, w_s, b_s = effective_head(output_head(unwrapped_student), student_hidden)
            with torch.no_grad():
                h_t, w_t, b_t = effective_head(output_head(unwrapped_teacher), teacher_hidden)
            h_t = h_t.to(w_t.device)
            h_s, loss_mask = h_s.to(w_s.device), loss_mask.to(w_s.device)
            total, stats = fused_linear_kl(
                h_s, w_s, h_t, w_t, student_bias=b_s, teacher_bias=b_t, reverse_weight=loss_mask != 0,
                jsd_beta=float(self.beta), temperature=float(self.temperature), reduction="sum",
                return_stats=True, backend=self.fused_loss_backend,
            )
            n_valid = (loss_mask != 0).sum()
            if num_items_in_batch is None:
                loss = total / n_valid.clamp(min=1)
            else:
                loss = total / _items_in_batch(num_items_in_batch, total.device)
            return loss, stats.student_entropy.sum().detach(), n_valid

    for cls in (FusedGKDTrainer, FusedDistillationTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return FusedGKDTrainer, FusedDistillationTrainer


def __getattr__(name: str) -> type:
    # The trainer classes subclass TRL's, so they are built on first access: importing this module (and with it
    # fused_gkd_loss) does not import trl.
    if name in ("FusedGKDTrainer", "FusedDistillationTrainer"):
        gkd, distill = _make_trainers()
        globals().update(FusedGKDTrainer=gkd, FusedDistillationTrainer=distill)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
