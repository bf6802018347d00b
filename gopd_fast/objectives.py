"""Roles -> per-token loss weights, and the step's loss from final hidden states (never full logits).

Each generated token gets one loss, chosen by who wrote it (``[objective]`` in the config):

    student_tokens  reverse_kl (default) | forward_kl | sampled_kl | none
    teacher_tokens  forward_kl (default) | reverse_kl | cross_entropy | none

The paper's variants are combinations:

    reverse on student / forward on teacher   student_tokens=reverse_kl  teacher_tokens=forward_kl   (default)
    reverse on both                           student_tokens=reverse_kl  teacher_tokens=reverse_kl
    swapped                                   student_tokens=forward_kl  teacher_tokens=reverse_kl
    sampled-token estimator                   student_tokens=sampled_kl  teacher_tokens=cross_entropy
    SFT on teacher tokens (beta = 1)          run.algorithm=sft          teacher_tokens=cross_entropy

``reverse_kl`` / ``forward_kl`` are exact full-vocabulary KLs through ``fused_linear_kl``. ``sampled_kl`` is the
single-sample estimator on the sampled token x: its value is ``k1 = log p_s(x) - log p_t(x)`` (an unbiased
estimate of the reverse KL) and its gradient is the score-function gradient ``k1 * d log p_s(x)`` (the
policy-gradient form with advantage ``log p_t(x) - log p_s(x)``; on-policy, so the importance ratio is 1).
``cross_entropy`` is ``-log p_s(x)`` of the teacher's sampled token.

Aggregation: every loss is summed over the tokens of this rank and divided by ``normalizer``, the number of loss
tokens in the GLOBAL batch (all ranks), so data parallel training equals one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gopd_fast.config import ObjectiveConfig
from gopd_fast.rollout.episode import Role

__all__ = ["STAT_KEYS", "DistillationObjective", "LossOutput", "TokenWeights", "token_weights"]


@dataclass(frozen=True)
class TokenWeights:
    """Per-loss-token weights [N] (float32) for each loss term; each token has weight 1 in exactly one term."""

    reverse: Tensor
    forward: Tensor
    sampled: Tensor
    cross_entropy: Tensor

    @property
    def needs_teacher(self) -> bool:
        return bool((self.reverse + self.forward + self.sampled).any())

    @property
    def needs_kl(self) -> bool:
        return bool((self.reverse + self.forward).any())


_TERM = {"reverse_kl": "reverse", "forward_kl": "forward", "sampled_kl": "sampled", "cross_entropy": "cross_entropy"}


def token_weights(roles: Tensor, cfg: ObjectiveConfig) -> TokenWeights:
    """Weights for loss tokens with ``roles`` [N] (``Role.STUDENT`` / ``Role.TEACHER``; CONTEXT gets nothing)."""
    if roles.dim() != 1:
        raise ValueError(f"roles must be 1-D [N], got shape {tuple(roles.shape)}")
    weights = {term: torch.zeros(roles.shape, dtype=torch.float32, device=roles.device) for term in _TERM.values()}
    for role, choice in ((Role.STUDENT, cfg.student_tokens), (Role.TEACHER, cfg.teacher_tokens)):
        if choice != "none":
            weights[_TERM[choice]] += (roles == role).float()
    return TokenWeights(**weights)


# Per-step sums that the trainer all-reduces; means are formed after the reduction (see ``LossOutput.metrics``).
STAT_KEYS = ("loss_sum", "loss_student_sum", "loss_teacher_sum", "student_tokens", "teacher_tokens",
             "reverse_kl_sum", "forward_kl_sum", "kl_tokens")


@dataclass
class LossOutput:
    loss: Tensor                 # scalar: sum of this rank's token losses / normalizer (differentiable)
    sums: dict[str, float]       # STAT_KEYS, this rank only

    @staticmethod
    def metrics(sums: dict[str, float]) -> dict[str, float]:
        """Token means from (globally reduced) sums."""
        def mean(a: str, b: str) -> float:
            return sums[a] / sums[b] if sums[b] else float("nan")

        n = sums["student_tokens"] + sums["teacher_tokens"]
        return {
            "loss": sums["loss_sum"] / n if n else float("nan"),
            "loss_student": mean("loss_student_sum", "student_tokens"),
            "loss_teacher": mean("loss_teacher_sum", "teacher_tokens"),
            "reverse_kl": mean("reverse_kl_sum", "kl_tokens"),
            "forward_kl": mean("forward_kl_sum", "kl_tokens"),
            "loss_tokens": n,
            "teacher_token_fraction": sums["teacher_tokens"] / n if n else float("nan"),
        }


class DistillationObjective(nn.Module):
    """Loss of one packed micro-batch from the two models' final hidden states at the loss positions.

    ``student_head`` / ``teacher_head`` are the models' ``lm_head`` modules (FSDP2-sharded or not). The KL terms
    go through ``gopd_fast.FusedLinearKL`` (it gathers sharded heads and never builds [N, V] logits); the
    sampled-token and cross-entropy terms go through the fused log-prob op.
    """

    def __init__(self, cfg: ObjectiveConfig, student_head: nn.Module, teacher_head: nn.Module) -> None:
        super().__init__()
        from gopd_fast import FusedLinearKL

        self.cfg = cfg
        # check_finite=False: a NaN/inf propagates into the loss, where the trainer counts and skips the step.
        self.kl = FusedLinearKL(student_head, teacher_head, truncate_teacher_vocab=True, check_finite=False)
        self.student_head = student_head
        self.teacher_head = teacher_head

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor | None, target_ids: Tensor,
                roles: Tensor, normalizer: float) -> LossOutput:
        """``student_hidden`` [N, Ds], ``teacher_hidden`` [N, Dt] (None if no term needs it), ``target_ids`` [N]
        (the token each position predicts), ``roles`` [N] (its role), ``normalizer`` (> 0, global loss tokens)."""
        from gopd_fast.module import effective_head
        from gopd_fast.ops.token_logprob import fused_linear_logprob

        def logprob(head: nn.Module, hidden: Tensor, targets: Tensor, temperature: float,
                    vocab: int | None = None) -> Tensor:
            h, w, b = effective_head(head, hidden, cast=True)   # gathers FSDP2 shards, folds LoRA, casts
            if vocab is not None and w.shape[0] > vocab:   # padded teacher vocabulary: its first rows are shared
                w, b = w[:vocab], None if b is None else b[:vocab]
            return fused_linear_logprob(h, w, targets, bias=b, temperature=temperature).float()

        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0 (global loss-token count), got {normalizer!r}")
        n = roles.shape[0]
        if student_hidden.shape[0] != n or target_ids.shape[0] != n:
            raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, target_ids "
                             f"{tuple(target_ids.shape)} and roles {tuple(roles.shape)} must share N")
        w = token_weights(roles, self.cfg)
        if w.needs_teacher and (teacher_hidden is None or teacher_hidden.shape[0] != n):
            raise ValueError("teacher_hidden [N, Dt] is required by the configured objective")
        per_token = torch.zeros(n, dtype=torch.float32, device=student_hidden.device)
        loss = student_hidden.new_zeros((), dtype=torch.float32)
        rkl_sum = fkl_sum = kl_tokens = 0.0
        temperature = self.cfg.temperature

        if w.needs_kl:
            kl_mask = (w.reverse + w.forward) > 0
            idx = kl_mask.nonzero().squeeze(-1)
            kl_loss, stats = self.kl(student_hidden[idx], teacher_hidden[idx], reverse_weight=w.reverse[idx],
                                     forward_weight=w.forward[idx], temperature=temperature,
                                     reduction="sum", return_stats=True)
            loss = loss + kl_loss.float() / normalizer
            rkl, fkl = stats.reverse_kl.float(), stats.forward_kl.float()
            per_token[idx] += (w.reverse[idx] * rkl + w.forward[idx] * fkl).detach()
            rkl_sum, fkl_sum, kl_tokens = float(rkl.sum()), float(fkl.sum()), float(idx.numel())

        if bool(w.sampled.any()):
            idx = (w.sampled > 0).nonzero().squeeze(-1)
            logp_s = logprob(self.student_head, student_hidden[idx], target_ids[idx], temperature)
            with torch.no_grad():
                logp_t = logprob(self.teacher_head, teacher_hidden[idx], target_ids[idx], temperature,
                                 vocab=self.student_head.weight.shape[0])
            k1 = (logp_s - logp_t).detach()
            # value k1 (the sampled reverse-KL estimate), gradient k1 * d log p_s(x)
            surrogate = k1 + k1 * (logp_s - logp_s.detach())
            loss = loss + (w.sampled[idx] * surrogate).sum() / normalizer
            per_token[idx] += w.sampled[idx] * k1

        if bool(w.cross_entropy.any()):
            idx = (w.cross_entropy > 0).nonzero().squeeze(-1)
            logp = logprob(self.student_head, student_hidden[idx], target_ids[idx], 1.0)
            loss = loss + (w.cross_entropy[idx] * -logp).sum() / normalizer
            per_token[idx] += (w.cross_entropy[idx] * -logp).detach()

        is_student, is_teacher = roles == Role.STUDENT, roles == Role.TEACHER
        sums = {
            "loss_sum": float(per_token.sum()),
            "loss_student_sum": float(per_token[is_student].sum()),
            "loss_teacher_sum": float(per_token[is_teacher].sum()),
            "student_tokens": float(is_student.sum()),
            "teacher_tokens": float(is_teacher.sum()),
            "reverse_kl_sum": rkl_sum,
            "forward_kl_sum": fkl_sum,
            "kl_tokens": kl_tokens,
        }
        return LossOutput(loss=loss, sums=sums)
