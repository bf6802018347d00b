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

One filter per micro-batch (``select_loss_tokens``): the objective takes the packed micro-batch as it is
([R, L, D] hidden states, [R, L] roles), drops the positions without loss once, and orders the loss tokens by term
so that each term reads a contiguous slice (a view, no further copy; ``fused_linear_kl`` then finds every token it
gets weighted and compacts nothing). Each lm_head is resolved (FSDP2 all-gather, LoRA fold, cast) once per call
and shared by all terms. Every term the configuration can use runs on every micro-batch, with zero tokens if need
be: the ranks then issue the same head gathers, and the loss stays connected to every student parameter (the
fused ops return a zero that reaches all their inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gopd_fast.config import ObjectiveConfig
from gopd_fast.rollout.episode import Role

__all__ = ["STAT_KEYS", "DistillationObjective", "LossOutput", "LossTokens", "TokenWeights", "roles_in_play",
           "select_loss_tokens", "token_weights"]

_TERM = {"reverse_kl": "reverse", "forward_kl": "forward", "sampled_kl": "sampled", "cross_entropy": "cross_entropy"}
_TEACHER_TERMS = frozenset({"reverse", "forward", "sampled"})   # terms that read the teacher's distribution
_KL_TERMS = frozenset({"reverse", "forward"})                   # one fused_linear_kl call computes both
# Loss tokens are grouped by the call that scores them, in this order; "none" tokens count but carry no loss.
_GROUPS = ("kl", "sampled", "cross_entropy", "none")
_GROUP_OF = {"reverse": "kl", "forward": "kl", "sampled": "sampled", "cross_entropy": "cross_entropy"}
_ALGORITHMS = ("gopd", "opd", "sft")


@dataclass(frozen=True)
class TokenWeights:
    """Per-loss-token weights [N] (float32) for each loss term; each token has weight 1 in exactly one term."""

    reverse: Tensor
    forward: Tensor
    sampled: Tensor
    cross_entropy: Tensor

    @property
    def needs_teacher(self) -> bool:
        return any(bool(getattr(self, term).any()) for term in _TEACHER_TERMS)

    @property
    def needs_kl(self) -> bool:
        return any(bool(getattr(self, term).any()) for term in _KL_TERMS)


def _term(role: Role, cfg: ObjectiveConfig) -> str | None:
    """The loss term of tokens written by ``role`` (None: no loss)."""
    choice = cfg.student_tokens if role == Role.STUDENT else cfg.teacher_tokens
    return _TERM.get(choice)


def token_weights(roles: Tensor, cfg: ObjectiveConfig) -> TokenWeights:
    """Weights for loss tokens with ``roles`` [N] (``Role.STUDENT`` / ``Role.TEACHER``; CONTEXT gets nothing)."""
    if roles.dim() != 1:
        raise ValueError(f"roles must be 1-D [N], got shape {tuple(roles.shape)}")
    weights = {term: torch.zeros(roles.shape, dtype=torch.float32, device=roles.device) for term in _TERM.values()}
    for role in (Role.STUDENT, Role.TEACHER):
        term = _term(role, cfg)
        if term is not None:
            weights[term] += (roles == role).float()
    return TokenWeights(**weights)


def roles_in_play(algorithm: str) -> tuple[Role, ...]:
    """Who writes the generated turns under ``run.algorithm``: OPD only the student (beta = 0), SFT only the
    teacher (beta = 1), Guided-OPD both."""
    if algorithm not in _ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_ALGORITHMS}, got {algorithm!r}")
    return {"opd": (Role.STUDENT,), "sft": (Role.TEACHER,)}.get(algorithm, (Role.STUDENT, Role.TEACHER))


@dataclass(frozen=True)
class LossTokens:
    """The loss tokens of one micro-batch, grouped by the call that scores them (``_GROUPS`` order).

    ``index`` [N] holds flat positions into the micro-batch; ``groups`` maps each group to its contiguous range
    of the N tokens, so ``gather(hidden)[groups["kl"]]`` is a view.
    """

    index: Tensor          # [N] long
    target_ids: Tensor     # [N] long: the token each position predicts
    roles: Tensor          # [N] long: Role.STUDENT / Role.TEACHER
    groups: dict[str, slice]

    @property
    def num_tokens(self) -> int:
        return int(self.index.numel())

    def count(self, group: str) -> int:
        sl = self.groups[group]
        return sl.stop - sl.start

    def gather(self, hidden: Tensor) -> Tensor:
        """[*B, D] hidden states of the micro-batch -> [N, D] at the loss tokens: the one copy per micro-batch
        (differentiable: the gradient flows back to every position, zero where no loss)."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.index)


def select_loss_tokens(target_ids: Tensor, roles: Tensor, cfg: ObjectiveConfig) -> LossTokens:
    """The loss tokens (role STUDENT or TEACHER; CONTEXT carries no loss) of a micro-batch, packed [R, L] or flat
    [N], grouped by term. One host sync (the group sizes)."""
    if roles.shape != target_ids.shape:
        raise ValueError(f"roles {tuple(roles.shape)} and target_ids {tuple(target_ids.shape)} must share N")
    roles, target_ids = roles.reshape(-1), target_ids.reshape(-1)
    key = torch.full_like(roles, len(_GROUPS))   # positions without loss sort last and are cut off
    for role in (Role.STUDENT, Role.TEACHER):
        term = _term(role, cfg)
        key = torch.where(roles == role, _GROUPS.index("none" if term is None else _GROUP_OF[term]), key)
    order = torch.sort(key, stable=True).indices
    sizes = torch.bincount(key, minlength=len(_GROUPS) + 1).tolist()
    groups, start = {}, 0
    for name, size in zip(_GROUPS, sizes):
        groups[name] = slice(start, start + size)
        start += size
    index = order[:start]
    return LossTokens(index=index, target_ids=target_ids[index], roles=roles[index], groups=groups)


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
    """Loss of one packed micro-batch from the two models' final hidden states.

    ``student_head`` / ``teacher_head`` are the models' ``lm_head`` modules (FSDP2-sharded or not); each is
    resolved once per call by ``gopd_fast.module.effective_heads``. The KL terms go through ``fused_linear_kl``
    (never [N, V] logits); the sampled-token and cross-entropy terms through the fused log-prob op.
    ``algorithm`` (``run.algorithm``) says which roles write turns, hence which terms run and whether the teacher
    is needed (``needs_teacher``: the trainer's teacher forward is collective under FSDP, so it is decided from
    the configuration, never from one rank's batch).
    """

    def __init__(self, cfg: ObjectiveConfig, student_head: nn.Module, teacher_head: nn.Module, *,
                 algorithm: str = "gopd") -> None:
        super().__init__()
        from gopd_fast.loss import check_options

        self.cfg = cfg
        self.student_head = student_head
        self.teacher_head = teacher_head
        terms = {_term(role, cfg) for role in roles_in_play(algorithm)} - {None}
        self.groups_in_play = frozenset(_GROUP_OF[t] for t in terms)
        self.needs_teacher = bool(terms & _TEACHER_TERMS)
        # check_finite=False: a NaN/inf propagates into the loss, where the trainer counts and skips the step.
        self.kl_options = check_options(truncate_teacher_vocab=True, check_finite=False)

    def forward(self, student_hidden: Tensor, teacher_hidden: Tensor | None, target_ids: Tensor,
                roles: Tensor, normalizer: float) -> LossOutput:
        """``student_hidden`` [*B, Ds] and ``teacher_hidden`` [*B, Dt] (None if no term needs it) at the positions
        ``target_ids`` [*B] (the token each position predicts) and ``roles`` [*B] (its role; CONTEXT: no loss),
        with *B the packed micro-batch [R, L] or flat [N]; ``normalizer`` (> 0) is the global loss-token count."""
        if not normalizer > 0:
            raise ValueError(f"normalizer must be > 0 (global loss-token count), got {normalizer!r}")
        lead = tuple(roles.shape)
        if tuple(student_hidden.shape[:-1]) != lead or tuple(target_ids.shape) != lead:
            raise ValueError(f"student_hidden {tuple(student_hidden.shape)}, target_ids "
                             f"{tuple(target_ids.shape)} and roles {lead} must share N (their leading dims)")
        tokens = select_loss_tokens(target_ids, roles, self.cfg)
        run = {g for g in _GROUPS[:-1] if g in self.groups_in_play or tokens.count(g)}
        if teacher_hidden is None:
            if self.needs_teacher or "kl" in run or "sampled" in run:
                raise ValueError("teacher_hidden [N, Dt] is required by the configured objective")
        elif tuple(teacher_hidden.shape[:-1]) != lead:
            raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must share N with roles {lead}")
        return self._loss(tokens, run, student_hidden, teacher_hidden, normalizer)

    def _loss(self, tokens: LossTokens, run: set[str], student_hidden: Tensor, teacher_hidden: Tensor | None,
              normalizer: float) -> LossOutput:
        from gopd_fast.loss import fused_linear_kl
        from gopd_fast.module import effective_heads

        n, groups, temperature = tokens.num_tokens, tokens.groups, self.cfg.temperature
        h_s = tokens.gather(student_hidden)
        h_t = None if teacher_hidden is None or not run & {"kl", "sampled"} else tokens.gather(teacher_hidden)
        (h_s, w_s, b_s), teacher = effective_heads(self.student_head, self.teacher_head, h_s, h_t)
        per_token = torch.zeros(n, dtype=torch.float32, device=h_s.device)
        loss = h_s.new_zeros((), dtype=torch.float32)
        rkl_sum = fkl_sum = kl_tokens = 0.0

        if "kl" in run:
            sl = groups["kl"]
            h_t, w_t, b_t = teacher
            w = token_weights(tokens.roles[sl], self.cfg)
            kl_loss, stats = fused_linear_kl(h_s[sl], w_s, h_t[sl], w_t, student_bias=b_s, teacher_bias=b_t,
                                             reverse_weight=w.reverse, forward_weight=w.forward,
                                             temperature=temperature, reduction="sum", return_stats=True,
                                             **self.kl_options)
            loss = loss + kl_loss.float() / normalizer
            rkl, fkl = stats.reverse_kl.float(), stats.forward_kl.float()
            per_token[sl] += (w.reverse * rkl + w.forward * fkl).detach()
            rkl_sum, fkl_sum, kl_tokens = float(rkl.sum()), float(fkl.sum()), float(tokens.count("kl"))

        if "sampled" in run:
            sl = groups["sampled"]
            h_t, w_t, b_t = teacher
            targets = tokens.target_ids[sl]
            logp_s = _logprob(h_s[sl], w_s, b_s, targets, temperature)
            with torch.no_grad():   # a padded teacher vocabulary: its first rows are the shared ones
                vocab = w_s.shape[0]
                logp_t = _logprob(h_t[sl], w_t[:vocab], None if b_t is None else b_t[:vocab], targets, temperature)
            k1 = (logp_s - logp_t).detach()
            # value k1 (the sampled reverse-KL estimate), gradient k1 * d log p_s(x)
            surrogate = k1 + k1 * (logp_s - logp_s.detach())
            loss = loss + surrogate.sum() / normalizer
            per_token[sl] += k1

        if "cross_entropy" in run:
            sl = groups["cross_entropy"]
            nll = -_logprob(h_s[sl], w_s, b_s, tokens.target_ids[sl], 1.0)
            loss = loss + nll.sum() / normalizer
            per_token[sl] += nll.detach()

        is_student, is_teacher = tokens.roles == Role.STUDENT, tokens.roles == Role.TEACHER
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


def _logprob(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float) -> Tensor:
    from gopd_fast.ops.token_logprob import fused_linear_logprob

    return fused_linear_logprob(hidden, weight, targets, bias=bias, temperature=temperature).float()
