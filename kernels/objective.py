"""The objective's per-token algebra shared by every schedule: which forward statistic is the loss, and the
per-token coefficients of ``logit_tiles.grad_logit_tile`` (the one place the chain rule to dz is spelled out)."""
from __future__ import annotations

import torch
from torch import Tensor


def is_jsd(jsd_beta: float | None) -> bool:
    """The generalised JSD form: a ``KLProblem``'s jsd_beta is None (plain KLs) or strictly inside (0, 1)."""
    return jsd_beta is not None


def loss_and_kl_stat(stats: dict[str, Tensor], rw: Tensor, fw: Tensor,
                     jsd_beta: float | None) -> tuple[Tensor, Tensor]:
    """(per-token loss, the KL that dz subtracts: RKL, or KL(p_s || M) for the JSD), all fp32 [N]."""
    if is_jsd(jsd_beta):
        return _weighted(rw, stats["jsd"]), stats["kl_student_mixture"]
    return _weighted(rw, stats["reverse_kl"]) + _weighted(fw, stats["forward_kl"]), stats["reverse_kl"]


def _weighted(weight: Tensor, kl: Tensor) -> Tensor:
    """weight * kl per token, where a zero weight drops the term even if that KL is +inf (a -inf bias masks an entry
    one model gives mass): 0 * inf would be NaN."""
    return torch.where(weight == 0, 0.0, weight * kl)


def grad_coefficients(grad_loss: Tensor, rw: Tensor, fw: Tensor, jsd_beta: float | None,
                      temperature: float) -> tuple[Tensor, Tensor]:
    """(coef_a, coef_b) fp32 [N], contiguous: the incoming per-token gradient times the weights, (1 - beta) for the
    JSD, and 1/temperature (the chain rule back to the unscaled logits)."""
    g = grad_loss.float() * (1.0 / temperature)
    if is_jsd(jsd_beta):
        return (g * rw * (1.0 - jsd_beta)).contiguous(), torch.zeros_like(g)
    return (g * rw).contiguous(), (g * fw).contiguous()
