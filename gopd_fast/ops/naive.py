"""The naive backend: materialise both [N, V] logit matrices and let autograd do the rest.

It is the readable statement of the loss and is float64-capable, but it holds several [N, V] tensors at once, so it
is only for small problems and comparisons. Contract: ``gopd_fast.ops`` (module docstring).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, float32 otherwise (bf16/fp16 logits are never rounded)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, dtype: torch.dtype):
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return torch.log_softmax(logits / temperature, dim=-1)


def fused_linear_kl_naive(
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
) -> tuple[Tensor, dict[str, Tensor] | None]:
    dtype = accumulation_dtype(student_hidden, teacher_hidden)
    logp_s = _log_probs(student_hidden, student_weight, student_bias, temperature, dtype)
    with torch.no_grad():
        logp_t = _log_probs(teacher_hidden, teacher_weight, teacher_bias, temperature, dtype)
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
    rw, fw = reverse_weight.to(dtype), forward_weight.to(dtype)
    use_forward = jsd_beta == 0.0 or (jsd_beta is None and bool((fw != 0).any()))
    forward_kl = None
    if use_forward or return_stats:  # sum p_t log p_t - sum p_t log p_s; the second term is -inf where needed
        forward_kl = ((p_t * safe_t).sum(-1) - torch.where(ok_t, p_t * logp_s, 0.0).sum(-1))

    if jsd_beta is None or jsd_beta in (0.0, 1.0):
        if jsd_beta == 0.0:  # TRL/Liger endpoint: forward KL weighted by reverse_weight
            rw, fw = torch.zeros_like(rw), rw
        elif jsd_beta == 1.0:  # reverse KL
            fw = torch.zeros_like(fw)
        loss = _weighted(rw, reverse_kl)
        if use_forward:
            loss = loss + _weighted(fw, forward_kl)
    else:
        beta = float(jsd_beta)
        either = ok_s | ok_t  # log M is -inf only where both mask: keep those entries out of logaddexp
        log_m = torch.logaddexp(torch.where(either, logp_t, 0.0) + math.log(beta),
                                torch.where(either, logp_s, 0.0) + math.log1p(-beta))
        jsd = (beta * torch.where(ok_t, p_t * (safe_t - log_m), 0.0).sum(-1)
               + (1.0 - beta) * torch.where(ok_s, p_s * (safe_s - log_m), 0.0).sum(-1))
        loss = rw * jsd

    stats = None
    if return_stats:
        with torch.no_grad():
            stats = {
                "reverse_kl": reverse_kl.detach(),
                "forward_kl": forward_kl.detach(),
                "student_entropy": -(p_s * safe_s).sum(-1).detach(),
            }
            if target_ids is not None:
                index = target_ids.long().unsqueeze(-1)
                stats["student_logprob"] = logp_s.gather(-1, index).squeeze(-1).detach()
                stats["teacher_logprob"] = logp_t.gather(-1, index).squeeze(-1)
    if grad_scale is not None:
        loss = loss.sum() * grad_scale
    return loss, stats


def _weighted(weight: Tensor, kl: Tensor) -> Tensor:
    """weight * kl, exactly 0 where the weight is 0 (even where that KL is +inf)."""
    return torch.where(weight != 0, weight * kl, 0.0)
