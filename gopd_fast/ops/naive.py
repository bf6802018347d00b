"""The naive backend: materialise both [N, V] logit matrices and let autograd do the rest.

It is the readable statement of the loss and is float64-capable, but it holds several [N, V] tensors at once, so it
is only for small problems and comparisons. Contract: ``gopd_fast.ops`` (module docstring).
"""
from __future__ import annotations

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
    p_s = logp_s.exp()
    reverse_kl = (p_s * (logp_s - logp_t)).sum(-1)
    rw, fw = reverse_weight.to(dtype), forward_weight.to(dtype)
    use_forward = jsd_beta == 0.0 or (jsd_beta is None and bool((fw != 0).any()))
    p_t = logp_t.exp() if use_forward or return_stats or jsd_beta is not None else None
    forward_kl = (p_t * (logp_t - logp_s)).sum(-1) if use_forward or return_stats else None

    if jsd_beta is None or jsd_beta in (0.0, 1.0):
        if jsd_beta == 0.0:  # TRL/Liger endpoint: forward KL weighted by reverse_weight
            rw, fw = torch.zeros_like(rw), rw
        elif jsd_beta == 1.0:  # reverse KL
            fw = torch.zeros_like(fw)
        loss = rw * reverse_kl + fw * forward_kl if use_forward else rw * reverse_kl
    else:
        beta = float(jsd_beta)
        log_m = torch.logaddexp(logp_t + torch.log(torch.tensor(beta, dtype=dtype)),
                                logp_s + torch.log1p(torch.tensor(-beta, dtype=dtype)))
        jsd = beta * (p_t * (logp_t - log_m)).sum(-1) + (1.0 - beta) * (p_s * (logp_s - log_m)).sum(-1)
        loss = rw * jsd

    stats = None
    if return_stats:
        with torch.no_grad():
            stats = {
                "reverse_kl": reverse_kl.detach(),
                "forward_kl": forward_kl.detach(),
                "student_entropy": -(p_s * logp_s).sum(-1).detach(),
            }
            if target_ids is not None:
                index = target_ids.long().unsqueeze(-1)
                stats["student_logprob"] = logp_s.gather(-1, index).squeeze(-1).detach()
                stats["teacher_logprob"] = logp_t.gather(-1, index).squeeze(-1)
    if grad_scale is not None:
        loss = loss.sum() * grad_scale
    return loss, stats
