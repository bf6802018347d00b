"""The naive backend: materialise both [N, V] logit matrices and let autograd do the rest.

It is the readable statement of the loss and is float64-capable, but it holds several [N, V] tensors at once, so it
is only for small problems and comparisons. Contract: ``gopd_fast.ops.problem.KLProblem``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gopd_fast.ops.problem import KLProblem


def _log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype: torch.dtype):
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return torch.log_softmax(logits / temperature, dim=-1)


def fused_linear_kl_naive(problem: KLProblem) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Backend contract: ``KLProblem``. No options."""
    p, dtype = problem, problem.accumulation_dtype
    logp_s = _log_probs(p.student_hidden, p.student_weight, p.student_bias, p.temperature, dtype)
    with torch.no_grad():
        logp_t = _log_probs(p.teacher_hidden, p.teacher_weight, p.teacher_bias, p.temperature, dtype)
    # -inf bias semantics (gopd_fast.ops): 0 * log 0 = 0. Masked entries are swapped for 0 *before* any product
    # so that neither the values nor the gradients see 0 * inf.
    ok_s, ok_t = logp_s > -math.inf, logp_t > -math.inf
    both = ok_s & ok_t
    safe_s, safe_t = torch.where(ok_s, logp_s, 0.0), torch.where(ok_t, logp_t, 0.0)
    p_s, p_t = torch.where(ok_s, safe_s.exp(), 0.0), torch.where(ok_t, safe_t.exp(), 0.0)
    # an entry one model masks and the other does not makes that direction infinite; the reverse KL of such a
    # token has no usable gradient (0), the forward KL keeps its finite gradient p_s - p_t
    rkl_inf = (ok_s & ~ok_t).any(-1)
    reverse_kl = torch.where(both, p_s * (safe_s - safe_t), 0.0).sum(-1)
    reverse_kl = torch.where(rkl_inf, math.inf, reverse_kl)
    rw, fw = p.reverse_weight, p.forward_weight
    forward_kl = None
    if p.uses_forward_kl or p.return_stats:  # sum p_t log p_t - sum p_t log p_s; the second term is -inf where needed
        forward_kl = ((p_t * safe_t).sum(-1) - torch.where(ok_t, p_t * logp_s, 0.0).sum(-1))

    if p.jsd_beta is None:
        loss = _weighted(rw, reverse_kl)
        if p.uses_forward_kl:
            loss = loss + _weighted(fw, forward_kl)
    else:
        beta = p.jsd_beta
        either = ok_s | ok_t  # log M is -inf only where both mask: keep those entries out of logaddexp
        log_m = torch.logaddexp(torch.where(either, logp_t, 0.0) + math.log(beta),
                                torch.where(either, logp_s, 0.0) + math.log1p(-beta))
        jsd = (beta * torch.where(ok_t, p_t * (safe_t - log_m), 0.0).sum(-1)
               + (1.0 - beta) * torch.where(ok_s, p_s * (safe_s - log_m), 0.0).sum(-1))
        loss = rw * jsd

    stats = None
    if p.return_stats:
        with torch.no_grad():
            stats = {
                "reverse_kl": reverse_kl.detach(),
                "forward_kl": forward_kl.detach(),
                "student_entropy": -(p_s * safe_s).sum(-1).detach(),
            }
            if p.target_ids is not None:
                index = p.target_ids.unsqueeze(-1)
                stats["student_logprob"] = logp_s.gather(-1, index).squeeze(-1).detach()
                stats["teacher_logprob"] = logp_t.gather(-1, index).squeeze(-1)
    if p.grad_scale is not None:
        loss = loss.sum() * p.grad_scale
    return loss, stats


def _weighted(weight: Tensor, kl: Tensor) -> Tensor:
    """weight * kl, exactly 0 where the weight is 0 (even where that KL is +inf)."""
    return torch.where(weight != 0, weight * kl, 0.0)
