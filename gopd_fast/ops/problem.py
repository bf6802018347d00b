"""``KLProblem``: one call of the distillation loss, validated and canonical; the one input of every backend.

Modelled on Cut Cross-Entropy's params dataclass: ``gopd_fast.loss`` checks the arguments once, drops zero-weight
tokens, maps the JSD endpoints and builds this frozen object with ``build_problem``; a backend takes it plus its
own options (tile sizes, schedules) and derives no rule of its own. Its autograd Function takes the student
tensors that get gradients plus this object, and returns those gradients and None for the object.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from gopd_fast.ops.precision import accumulation_dtype

__all__ = ["KLProblem", "build_problem", "canonical_objective"]


@dataclass(frozen=True)
class KLProblem:
    """The per-token loss every backend computes, for token i (p = softmax(z / temperature), z = h W^T + b):

        loss_i = reverse_weight[i] * KL(p_s || p_t) + forward_weight[i] * KL(p_t || p_s)    jsd_beta None
        loss_i = reverse_weight[i] * JSD_beta(p_s, p_t)                                   0 < jsd_beta < 1

    with M = beta p_t + (1 - beta) p_s and JSD_beta = beta KL(p_t || M) + (1 - beta) KL(p_s || M) (the TRL/Liger
    convention, docs/algorithm.md §6; its gradient w.r.t. the student logits is (1 - beta) p_s (log(p_s / M) -
    KL(p_s || M))). The endpoints beta = 0 (forward KL) and beta = 1 (reverse KL) never reach a backend:
    ``canonical_objective`` maps them to plain-KL weights.

    Returns of a backend: ``(loss, stats)``. ``grad_scale`` None: the per-token loss [N], differentiable w.r.t.
    the student's hidden states, weight and bias (a backward may recompute logit tiles). ``grad_scale`` c: the
    0-dim ``c * sum_i loss_i``; the backend may compute the gradients listed in ``needs_grad`` eagerly in the
    forward pass (a second backward with ``retain_graph=True`` accumulates them again). The loss and the stats
    are in ``accumulation_dtype``. Stats (with ``return_stats``; detached, [N]): "reverse_kl", "forward_kl",
    "student_entropy", and with ``target_ids`` "student_logprob", "teacher_logprob". A -inf bias entry follows
    the masking rules of ``gopd_fast.ops``.
    """

    student_hidden: Tensor  # [N, Ds] bf16/fp16/fp32/fp64, contiguous, only tokens with a nonzero weight (N > 0
    #                         from gopd_fast.loss); may require grad
    student_weight: Tensor  # [V, Ds] dtype of student_hidden; may require grad
    student_bias: Tensor | None  # [V] dtype of student_weight; may require grad
    teacher_hidden: Tensor  # [N, Dt] contiguous, detached
    teacher_weight: Tensor  # [V, Dt] detached, already the first V rows of a padded teacher vocabulary
    teacher_bias: Tensor | None  # [V] detached
    reverse_weight: Tensor  # [N] accumulation_dtype, finite, >= 0 (the JSD weight when jsd_beta is set)
    forward_weight: Tensor  # [N] accumulation_dtype, finite, >= 0; all zeros when jsd_beta is set
    jsd_beta: float | None  # None (plain KLs) or strictly inside (0, 1)
    temperature: float  # in gopd_fast.ops.checks.TEMPERATURE_RANGE; divides both models' logits
    target_ids: Tensor | None  # [N] int64 in [0, V), for the log-prob stats
    grad_scale: float | None  # None: per-token loss; c: the scalar c * sum_i loss_i (see the class docstring)
    return_stats: bool
    needs_grad: tuple[bool, bool, bool]  # (student_hidden, student_weight, student_bias) get a gradient
    masked_vocab: bool  # some bias has a -inf entry: backends apply the masking rules, else they may skip them
    accumulation_dtype: torch.dtype  # float32, or float64 when a hidden state is float64

    @property
    def n_tokens(self) -> int:
        return self.student_hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.student_weight.shape[0]

    @cached_property
    def uses_forward_kl(self) -> bool:
        """Some token has a forward-KL term (one host sync, once per problem)."""
        return self.jsd_beta is None and bool((self.forward_weight != 0).any())


def canonical_objective(reverse_weight: Tensor, forward_weight: Tensor,
                        jsd_beta: float | None) -> tuple[Tensor, Tensor, float | None]:
    """The JSD endpoint rule, the one place it is applied: beta = 0 is forward KL and beta = 1 reverse KL, both
    weighted by ``reverse_weight`` (the interior formula itself tends to 0 at both ends); a JSD inside (0, 1) has
    no forward term. The TRL/Liger convention, checked against liger_kernel 0.8.5 (``chunked_loss/jsd_loss.py``,
    ``ops/jsd.py``) and trl 1.16.0 (``GKDTrainer.generalized_jsd_loss``). Returns (reverse, forward, jsd_beta)
    with jsd_beta None or strictly inside (0, 1)."""
    if jsd_beta is None:
        return reverse_weight, forward_weight, None
    if jsd_beta == 0.0:
        return torch.zeros_like(reverse_weight), reverse_weight, None
    if jsd_beta == 1.0:
        return reverse_weight, torch.zeros_like(forward_weight), None
    return reverse_weight, torch.zeros_like(forward_weight), float(jsd_beta)


def build_problem(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    reverse_weight: Tensor,
    forward_weight: Tensor,
    jsd_beta: float | None = None,
    temperature: float = 1.0,
    target_ids: Tensor | None = None,
    grad_scale: float | None = None,
    return_stats: bool = False,
    masked_vocab: bool | None = None,
) -> KLProblem:
    """A ``KLProblem`` from arguments the caller has already checked (``gopd_fast.loss`` validates them; tests
    and benchmarks call backends through this too). Maps the JSD endpoints, detaches the teacher, casts the
    weights to the accumulation dtype and records which student tensors need a gradient. ``masked_vocab`` None
    is read off the biases (one host sync). A teacher head with more rows than the student's is cut to the
    student's vocabulary."""
    dtype = accumulation_dtype(student_hidden, teacher_hidden)
    vocab = student_weight.shape[0]
    reverse_weight, forward_weight, jsd_beta = canonical_objective(
        reverse_weight.detach().to(dtype), forward_weight.detach().to(dtype), jsd_beta)
    if masked_vocab is None:
        masked_vocab = any(b is not None and bool(torch.isneginf(b).any()) for b in (student_bias, teacher_bias))
    grad_on = torch.is_grad_enabled()
    return KLProblem(
        student_hidden=student_hidden,
        student_weight=student_weight,
        student_bias=student_bias,
        teacher_hidden=teacher_hidden.detach(),
        teacher_weight=teacher_weight.detach()[:vocab],
        teacher_bias=None if teacher_bias is None else teacher_bias.detach()[:vocab],
        reverse_weight=reverse_weight,
        forward_weight=forward_weight,
        jsd_beta=jsd_beta,
        temperature=float(temperature),
        target_ids=None if target_ids is None else target_ids.long(),
        grad_scale=None if grad_scale is None else float(grad_scale),
        return_stats=return_stats,
        needs_grad=tuple(grad_on and t is not None and t.requires_grad
                         for t in (student_hidden, student_weight, student_bias)),
        masked_vocab=masked_vocab,
        accumulation_dtype=dtype,
    )
