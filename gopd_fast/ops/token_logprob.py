"""Sampled-token mode: the student's log-prob of given tokens (and its entropy), fused with the LM head.

Policy-gradient style on-policy distillation (tinker, verl, the "sampled-token estimator" of the paper) only
needs, per position, ``log p_s(x_i)`` of the token that was sampled and optionally the entropy ``H(p_s)``; the
advantage ``log p_t(x_i) - log p_s(x_i)`` is computed by the caller. This op gets both from hidden states and
the head weight without materialising the ``[N, V]`` logits: it walks the vocabulary in tiles of
``chunk_size`` columns (and the tokens in blocks of ``token_block`` rows), keeping an online log-sum-exp.

The backward recomputes the logit tiles. With upstream gradients ``g`` (for the log-prob) and ``e`` (for the
entropy), per token and vocabulary entry ``v`` (``p = softmax(z)``, ``z = logits / temperature``)::

    d logp(x) / dz_v = 1[v == x] - p_v
    d H / dz_v       = -p_v * (log p_v + H)

Accumulation is float32 (float64 for float64 inputs); logit tiles are computed in that dtype, never rounded to
bf16 first. Under ``torch.autocast`` the operands are cast to the autocast dtype first (``gopd_fast.ops.autocast``).
A ``-inf`` bias entry masks that token: its probability is 0, it adds nothing to the entropy and gets no gradient
from it; the log-prob of a masked target is ``-inf``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from gopd_fast.ops.autocast import autocast_cast, autocast_off
from gopd_fast.ops.checks import check_bias, check_bool, check_int, check_temperature
from gopd_fast.ops.precision import accumulation_dtype

__all__ = ["fused_linear_logprob"]

DEFAULT_CHUNK_SIZE = 4096
DEFAULT_TOKEN_BLOCK = 1024


def logit_tile(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, start: int, stop: int, temperature: float
) -> Tensor:
    """``(hidden @ weight[start:stop].T + bias[start:stop]) / temperature`` in ``hidden``'s (accumulation) dtype."""
    tile = hidden @ weight[start:stop].to(hidden.dtype).T
    if bias is not None:
        tile = tile + bias[start:stop].to(hidden.dtype)
    if temperature != 1.0:
        tile = tile / temperature
    return tile


class HeadGrads:
    """Accumulators of the LM head's input gradients (hidden, weight, bias), filled one dL/dz tile at a time.

    Only the gradients autograd asks for are allocated; they accumulate in ``acc`` and are cast back to the
    inputs' dtypes by ``result``.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, acc: torch.dtype, needs: tuple[bool, ...]) -> None:
        need_h, need_w, need_b = needs[0], needs[1], needs[2]
        self.acc = acc
        self.hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        self.weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None

    def add(self, grad_z: Tensor, h: Tensor, weight: Tensor, rows: slice, start: int, stop: int,
            temperature: float) -> None:
        """Add one tile: ``grad_z`` = dL/d(logits / temperature) of tokens ``rows`` x vocab ``[start, stop)``."""
        if temperature != 1.0:
            grad_z = grad_z / temperature
        if self.hidden is not None:
            self.hidden[rows] += grad_z @ weight[start:stop].to(self.acc)
        if self.weight is not None:
            self.weight[start:stop] += grad_z.T @ h
        if self.bias is not None:
            self.bias[start:stop] += grad_z.sum(dim=0)

    def result(self, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, ...]:
        return (
            None if self.hidden is None else self.hidden.to(hidden.dtype),
            None if self.weight is None else self.weight.to(weight.dtype),
            None if self.bias is None or bias is None else self.bias.to(bias.dtype),
        )


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    bias: Tensor | None,
    temperature: object,
    chunk_size: object,
    token_block: object,
    ignore_index: object,
    return_entropy: object,
) -> tuple[float, int, int, int]:
    """Validates the arguments; returns (temperature, chunk_size, token_block, ignore_index) as numbers."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError(f"hidden must be a float tensor [N, D], got {_describe(hidden)}")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[1] = {hidden.shape[1]}, got {_describe(weight)}"
        )
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got dtype {weight.dtype}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {_describe(bias)}")
        check_bias("bias", bias)
    if not isinstance(target_ids, Tensor) or target_ids.shape != hidden.shape[:1]:
        raise ValueError(f"target_ids must be [N] = [{hidden.shape[0]}], got {_describe(target_ids)}")
    if target_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target_ids must be int64 or int32, got {target_ids.dtype}")
    check_bool("return_entropy", return_entropy)
    return (check_temperature(temperature), check_int("chunk_size", chunk_size, low=1),
            check_int("token_block", token_block, low=1), check_int("ignore_index", ignore_index))


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def _forward_block(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One token block: returns (lse, target logit, sum_v p_v z_v) with an online softmax over vocab tiles."""
    n, vocab = h.shape[0], weight.shape[0]
    running_max = torch.full((n,), float("-inf"), dtype=h.dtype, device=h.device)
    sum_exp = torch.zeros(n, dtype=h.dtype, device=h.device)
    sum_exp_z = torch.zeros(n, dtype=h.dtype, device=h.device)  # sum exp(z - m) * z, for the entropy
    target_logit = torch.zeros(n, dtype=h.dtype, device=h.device)
    for start in range(0, vocab, chunk_size):
        stop = min(start + chunk_size, vocab)
        z = logit_tile(h, weight, bias, start, stop, temperature)
        new_max = torch.maximum(running_max, z.max(dim=1).values)
        shift = torch.where(new_max > -math.inf, new_max, 0.0)  # a tile masked so far (-inf bias) shifts by 0
        rescale = torch.exp(running_max - shift)
        e = torch.exp(z - shift[:, None])
        sum_exp = sum_exp * rescale + e.sum(dim=1)
        sum_exp_z = sum_exp_z * rescale + torch.where(e > 0, e * z, 0.0).sum(dim=1)  # 0 * log 0 = 0
        running_max = new_max
        local = targets - start
        in_tile = (local >= 0) & (local < stop - start)
        picked = z.gather(1, local.clamp(0, stop - start - 1)[:, None]).squeeze(1)
        target_logit = torch.where(in_tile, picked, target_logit)
    lse = running_max + torch.log(sum_exp)
    mean_z = sum_exp_z / sum_exp
    return lse, target_logit, mean_z


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target_ids: Tensor,
        temperature: float,
        ignore_index: int,
        chunk_size: int,
        token_block: int,
    ) -> tuple[Tensor, Tensor]:
        acc = accumulation_dtype(hidden.dtype)
        n = hidden.shape[0]
        logprob = torch.zeros(n, dtype=acc, device=hidden.device)
        entropy = torch.zeros(n, dtype=acc, device=hidden.device)
        lse = torch.zeros(n, dtype=acc, device=hidden.device)
        valid = target_ids != ignore_index
        for r0 in range(0, n, token_block):
            r1 = min(r0 + token_block, n)
            blk_lse, blk_target, blk_mean_z = _forward_block(
                hidden[r0:r1].to(acc), weight, bias, target_ids[r0:r1], temperature, chunk_size
            )
            lse[r0:r1] = blk_lse
            logprob[r0:r1] = torch.where(valid[r0:r1], blk_target - blk_lse, 0.0)
            entropy[r0:r1] = blk_lse - blk_mean_z
        ctx.save_for_backward(hidden, weight, bias, target_ids, lse, entropy)
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.chunk_size, ctx.token_block = chunk_size, token_block
        ctx.mark_non_differentiable(lse)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob: Tensor | None, grad_entropy: Tensor | None):
        with autocast_off(ctx.saved_tensors[0].device):  # a backward under autocast must not re-cast the tiles
            return _FusedLinearLogprob._backward(ctx, grad_logprob, grad_entropy)

    @staticmethod
    def _backward(ctx, grad_logprob: Tensor | None, grad_entropy: Tensor | None):
        hidden, weight, bias, target_ids, lse, entropy = ctx.saved_tensors
        temperature, chunk_size, token_block = ctx.temperature, ctx.chunk_size, ctx.token_block
        acc = lse.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = target_ids != ctx.ignore_index
        g = torch.zeros(n, dtype=acc, device=hidden.device) if grad_logprob is None else grad_logprob.to(acc)
        g = torch.where(valid, g, 0.0)
        e = None if grad_entropy is None else grad_entropy.to(acc)
        grads = HeadGrads(hidden, weight, acc, ctx.needs_input_grad)
        for r0 in range(0, n, token_block):
            r1 = min(r0 + token_block, n)
            h = hidden[r0:r1].to(acc)
            for start in range(0, vocab, chunk_size):
                stop = min(start + chunk_size, vocab)
                z = logit_tile(h, weight, bias, start, stop, temperature)
                log_p = z - lse[r0:r1, None]
                p = torch.exp(log_p)
                # d/dz of g*logp(x) + e*H: -g p (+ g at the target) - e p (log p + H)
                grad_z = -g[r0:r1, None] * p
                if e is not None:  # 0 where p = 0 (a -inf bias: log p = -inf)
                    grad_z = grad_z - torch.where(p > 0, e[r0:r1, None] * p * (log_p + entropy[r0:r1, None]), 0.0)
                local = target_ids[r0:r1] - start
                in_tile = (local >= 0) & (local < stop - start)
                rows = torch.nonzero(in_tile).squeeze(1)
                grad_z[rows, local[rows]] += g[r0:r1][rows]
                grads.add(grad_z, h, weight, slice(r0, r1), start, stop, temperature)
        return (*grads.result(hidden, weight, bias), None, None, None, None, None)


def fused_linear_logprob(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    token_block: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log softmax(hidden @ weight.T + bias)/temperature)[target]`` without ``[N, V]`` logits.

    Args:
        hidden: ``[N, D]`` student hidden states (bf16/fp16/fp32/fp64); receives gradients.
        weight: ``[V, D]`` LM-head weight; receives gradients.
        target_ids: ``[N]`` int64 token ids in ``[0, V)``, or ``ignore_index`` (log-prob 0, no gradient).
        bias: optional ``[V]`` head bias; receives gradients.
        temperature: logits are divided by it (> 0).
        return_entropy: also return the per-token entropy ``H(p_s)`` (differentiable).
        ignore_index: target value that marks a position without a target.
        chunk_size: vocabulary columns per tile (default 4096).
        token_block: token rows per block (default 1024).

    Returns:
        ``logprob [N]`` float32 (float64 for float64 inputs), or ``(logprob, entropy)`` when ``return_entropy``.
        Both are differentiable through a custom autograd Function that recomputes logit tiles in backward.
    """
    hidden, weight, bias = autocast_cast(hidden, weight, bias)  # GEMM operands in the autocast dtype
    temperature, chunk_size, token_block, ignore_index = _check_inputs(
        hidden, weight, target_ids, bias, temperature, DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
        DEFAULT_TOKEN_BLOCK if token_block is None else token_block, ignore_index, return_entropy)
    target_ids = target_ids.long()
    valid = target_ids != ignore_index
    if bool(((target_ids[valid] < 0) | (target_ids[valid] >= weight.shape[0])).any()):
        raise ValueError(
            f"target_ids must lie in [0, V={weight.shape[0]}) or equal ignore_index={ignore_index}"
        )
    with autocast_off(hidden.device):
        logprob, entropy = _FusedLinearLogprob.apply(
            hidden, weight, bias, target_ids, temperature, ignore_index, chunk_size, token_block
        )
    return (logprob, entropy) if return_entropy else logprob
