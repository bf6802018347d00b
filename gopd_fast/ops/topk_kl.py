"""Top-k teacher mode: KL against a teacher that only sent its top-k (ids, log-probs) per position.

A remote teacher (vLLM ``logprobs=k``) returns, per position ``i``, the ids ``S_i`` of its k most likely tokens
and their log-probs ``log p_t(v)``. We compare the student to it on the k+1 "buckets" ``S_i[0..k-1]`` plus one
tail bucket ``T_i = V \\ S_i`` holding the remaining mass (the exact estimator)::

    q_t = (p_t(S_1), ..., p_t(S_k),  P_t(T)),   P_t(T) = max(1 - sum_S p_t, teacher_tail_floor)  (0 if k == V)
    q_s = (p_s(S_1), ..., p_s(S_k),  P_s(T)),   log P_s(T) = logsumexp_{v not in S} z_v - logsumexp_v z_v
    forward KL  = sum_b q_t(b) (log q_t(b) - log q_s(b))
    reverse KL  = sum_b q_s(b) (log q_s(b) - log q_t(b))

with ``z = (h W^T + b) / temperature`` the student's logits. This is the KL between the two distributions
coarse-grained to the k+1 buckets: it never exceeds the full-vocabulary KL (data processing inequality) and
equals it when the tail carries no mass or the two models agree on the shape of the tail.

``P_s(T)`` is computed as its own log-sum-exp over the non-top-k columns (the top-k entries are masked out of
each tile), never as ``1 - sum_S p_s`` followed by a clamp: when the student puts almost all mass on S that
difference cancels catastrophically, and a clamp has zero gradient, which would silently stop the student from
moving mass out of the tail. The teacher's tail (no gradient needed) is floored at ``teacher_tail_floor`` so a
teacher whose top-k log-probs sum to 1 (rounding, or a truly concentrated teacher) gives a finite reverse KL
that still pushes the student's tail mass down.

Gradient w.r.t. the student logits: with bucket "logits" ``y_b = z_b`` (b in S) and ``y_T = lse_tail`` (so
``q_s = softmax(y)``), ``dKL/dy`` is ``c q_s - q_t`` (forward, ``c = sum_b q_t(b)``) or
``q_s (log q_s - log q_t - KL)`` (reverse); a top-k column gets ``dKL/dy_b``, a tail column ``v`` gets
``dKL/dy_T * exp(z_v - lse_tail)``. The backward recomputes the logit tiles.
"""
from __future__ import annotations

import torch
from torch import Tensor

from gopd_fast.ops.autocast import autocast_cast, autocast_off
from gopd_fast.ops.checks import check_bias, check_bool, check_int, check_real, check_temperature
from gopd_fast.ops.precision import accumulation_dtype
from gopd_fast.ops.token_logprob import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOKEN_BLOCK,
    HeadGrads,
    logit_tile,
)

__all__ = ["fused_linear_topk_kl"]

DEFAULT_TEACHER_TAIL_FLOOR = 1e-8


def _lse_update(running_max: Tensor, sum_exp: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Online log-sum-exp over a tile; rows that are all -inf so far stay (-inf, 0)."""
    new_max = torch.maximum(running_max, z.max(dim=1).values)
    safe_max = torch.where(torch.isfinite(new_max), new_max, 0.0)
    rescale = torch.exp(running_max - safe_max)
    sum_exp = sum_exp * rescale + torch.exp(z - safe_max[:, None]).sum(dim=1)
    return new_max, sum_exp


def _tile_columns(ids: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(ids inside [start, stop), their column in the tile, or the spare column stop - start if outside)."""
    local = ids - start
    in_tile = (local >= 0) & (local < stop - start)
    return in_tile, torch.where(in_tile, local, stop - start)


def _student_buckets(
    h: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, temperature: float, chunk_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One token block: (lse over all columns, lse over the non-top-k columns, top-k logits [n, k])."""
    n, vocab = h.shape[0], weight.shape[0]
    neg_inf = torch.full((n,), float("-inf"), dtype=h.dtype, device=h.device)
    all_max, all_sum = neg_inf.clone(), torch.zeros_like(neg_inf)
    tail_max, tail_sum = neg_inf.clone(), torch.zeros_like(neg_inf)
    topk_logit = torch.zeros(ids.shape, dtype=h.dtype, device=h.device)
    for start in range(0, vocab, chunk_size):
        stop = min(start + chunk_size, vocab)
        z = logit_tile(h, weight, bias, start, stop, temperature)
        all_max, all_sum = _lse_update(all_max, all_sum, z)
        in_tile, column = _tile_columns(ids, start, stop)
        padded = torch.cat([z, torch.zeros_like(z[:, :1])], dim=1)  # out-of-tile ids point at this spare column
        topk_logit = torch.where(in_tile, padded.gather(1, column), topk_logit)
        tail = padded.scatter(1, column, float("-inf"))[:, :-1]
        tail_max, tail_sum = _lse_update(tail_max, tail_sum, tail)
    lse_all = all_max + torch.log(all_sum)
    lse_tail = tail_max + torch.log(tail_sum)  # -inf when k == V (no tail)
    return lse_all, lse_tail, topk_logit


def _xlogy_diff(q: Tensor, log_q: Tensor, log_r: Tensor) -> Tensor:
    """q * (log q - log r), with 0 * (anything) = 0 (an empty bucket contributes nothing)."""
    return torch.where(q > 0, q * (log_q - log_r), 0.0)


class _FusedLinearTopkKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ids: Tensor,
        teacher_logprobs: Tensor,
        reverse_weight: Tensor,
        forward_weight: Tensor,
        temperature: float,
        teacher_tail_floor: float,
        chunk_size: int,
        token_block: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        acc = accumulation_dtype(hidden.dtype)
        n, k = ids.shape
        lse_tail = torch.empty(n, dtype=acc, device=hidden.device)
        bucket_grad = torch.empty(n, k + 1, dtype=acc, device=hidden.device)
        loss = torch.empty(n, dtype=acc, device=hidden.device)
        rkl_out = torch.empty(n, dtype=acc, device=hidden.device)
        fkl_out = torch.empty(n, dtype=acc, device=hidden.device)
        log_qt_topk = teacher_logprobs.to(acc)
        teacher_tail = (1.0 - log_qt_topk.exp().sum(dim=1)).clamp_min(teacher_tail_floor)
        if k == weight.shape[0]:  # no tail bucket: the top-k is the whole vocabulary
            teacher_tail = torch.zeros_like(teacher_tail)
        log_qt = torch.cat([log_qt_topk, teacher_tail.log()[:, None]], dim=1)
        q_t = log_qt.exp()
        rw, fw = reverse_weight.to(acc), forward_weight.to(acc)
        for r0 in range(0, n, token_block):
            r1 = min(r0 + token_block, n)
            lse_all, blk_tail, topk_logit = _student_buckets(
                hidden[r0:r1].to(acc), weight, bias, ids[r0:r1], temperature, chunk_size
            )
            log_qs = torch.cat([topk_logit, blk_tail[:, None]], dim=1) - lse_all[:, None]
            q_s = log_qs.exp()
            rkl = _xlogy_diff(q_s, log_qs, log_qt[r0:r1]).sum(dim=1)
            fkl = _xlogy_diff(q_t[r0:r1], log_qt[r0:r1], log_qs).sum(dim=1)
            # d/dy of rw*RKL + fw*FKL over the k+1 bucket logits y (q_s = softmax(y))
            # a token whose RKL is +inf (the student puts mass where the teacher has none) has no usable gradient
            finite_rkl = torch.isfinite(rkl)[:, None]
            d_rkl = torch.where((q_s > 0) & finite_rkl,
                                q_s * (log_qs - log_qt[r0:r1] - torch.where(finite_rkl, rkl[:, None], 0.0)), 0.0)
            d_fkl = q_t[r0:r1].sum(dim=1, keepdim=True) * q_s - q_t[r0:r1]
            # a zero weight drops its term even where that KL is infinite (0 * inf would be NaN)
            use_r, use_f = rw[r0:r1] > 0, fw[r0:r1] > 0
            bucket_grad[r0:r1] = torch.where(use_r[:, None], rw[r0:r1, None] * d_rkl, 0.0) + torch.where(
                use_f[:, None], fw[r0:r1, None] * d_fkl, 0.0
            )
            loss[r0:r1] = torch.where(use_r, rw[r0:r1] * rkl, 0.0) + torch.where(use_f, fw[r0:r1] * fkl, 0.0)
            rkl_out[r0:r1], fkl_out[r0:r1] = rkl, fkl
            lse_tail[r0:r1] = blk_tail
        ctx.save_for_backward(hidden, weight, bias, ids, lse_tail, bucket_grad)
        ctx.temperature, ctx.chunk_size, ctx.token_block = temperature, chunk_size, token_block
        ctx.mark_non_differentiable(rkl_out, fkl_out)
        return loss, rkl_out, fkl_out

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_rkl: Tensor | None, _grad_fkl: Tensor | None):
        with autocast_off(ctx.saved_tensors[0].device):  # a backward under autocast must not re-cast the tiles
            return _FusedLinearTopkKL._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx, grad_loss: Tensor):
        hidden, weight, bias, ids, lse_tail, bucket_grad = ctx.saved_tensors
        temperature, chunk_size, token_block = ctx.temperature, ctx.chunk_size, ctx.token_block
        acc = bucket_grad.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        scaled = bucket_grad * grad_loss.to(acc)[:, None]
        grads = HeadGrads(hidden, weight, acc, ctx.needs_input_grad)
        for r0 in range(0, n, token_block):
            r1 = min(r0 + token_block, n)
            h = hidden[r0:r1].to(acc)
            tail_rows = torch.isfinite(lse_tail[r0:r1])
            safe_tail = torch.where(tail_rows, lse_tail[r0:r1], 0.0)
            for start in range(0, vocab, chunk_size):
                stop = min(start + chunk_size, vocab)
                z = logit_tile(h, weight, bias, start, stop, temperature)
                # tail columns: dKL/dy_T * (student's distribution within the tail)
                within_tail = torch.where(tail_rows[:, None], torch.exp(z - safe_tail[:, None]), 0.0)
                grad_z = scaled[r0:r1, -1:] * within_tail
                # top-k columns: dKL/dy_b (ids outside this tile land on a spare column that is dropped)
                _, column = _tile_columns(ids[r0:r1], start, stop)
                padded = torch.cat([grad_z, torch.zeros_like(grad_z[:, :1])], dim=1)
                grad_z = padded.scatter(1, column, scaled[r0:r1, :-1])[:, :-1]
                grads.add(grad_z, h, weight, slice(r0, r1), start, stop, temperature)
        return (*grads.result(hidden, weight, bias), *([None] * 8))


def _per_token_weight(value: Tensor | float | None, default: float, n: int, name: str, like: Tensor) -> Tensor:
    if value is None:
        value = default
    if not isinstance(value, Tensor):
        number = check_real(name, value, low=0.0)
        return torch.full((n,), number, dtype=torch.float32, device=like.device)
    if value.shape != (n,) or value.dtype.is_complex:
        raise ValueError(f"{name} must be a number, None or a real [N] = [{n}] tensor, got shape "
                         f"{list(value.shape)} dtype {value.dtype}")
    value = value.detach().float()
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} must be finite, got NaN/inf")
    if bool((value < 0).any()):
        raise ValueError(f"{name} must be >= 0 everywhere")
    return value


def fused_linear_topk_kl(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    reverse_weight: Tensor | float | None = None,
    forward_weight: Tensor | float | None = None,
    student_bias: Tensor | None = None,
    temperature: float = 1.0,
    teacher_tail_floor: float = DEFAULT_TEACHER_TAIL_FLOOR,
    reduction: str = "mean",
    return_stats: bool = False,
    chunk_size: int | None = None,
    token_block: int | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """KL between the student and a top-k teacher on the top-k support plus a tail bucket (see module doc).

    Args:
        student_hidden: ``[N, D]`` student hidden states (receives gradients).
        student_weight: ``[V, D]`` student LM-head weight (receives gradients).
        teacher_topk_ids: ``[N, k]`` int64 distinct token ids per position, in ``[0, V)``.
        teacher_topk_logprobs: ``[N, k]`` the teacher's (normalised, full-vocabulary) log-probs of those ids.
        reverse_weight: per-token ``[N]`` tensor or a float: weight of ``KL(q_s || q_t)``.
        forward_weight: per-token ``[N]`` tensor or a float: weight of ``KL(q_t || q_s)``.
            With both None, the loss is the reverse KL (weight 1) on every token.
        student_bias: optional ``[V]`` head bias (receives gradients).
        temperature: the student's logits are divided by it; the teacher's log-probs are used as given.
        teacher_tail_floor: lower bound on the teacher's tail mass (keeps the reverse KL finite).
        reduction: ``"mean"`` (sum over tokens / N), ``"sum"``, or ``"none"`` (per-token ``[N]``).
        return_stats: also return detached per-token ``{"reverse_kl", "forward_kl"}``.
        chunk_size: vocabulary columns per tile (default 4096). token_block: token rows per block (default 1024).

    Returns:
        The loss (float32, or float64 for float64 inputs), and the stats dict when ``return_stats``.
    """
    # GEMM operands in the autocast dtype (gopd_fast.ops.autocast); everything else in float32
    student_hidden, student_weight, student_bias = autocast_cast(student_hidden, student_weight, student_bias)
    _check(student_hidden, student_weight, teacher_topk_ids, teacher_topk_logprobs, student_bias)
    temperature = check_temperature(temperature)
    teacher_tail_floor = check_real("teacher_tail_floor", teacher_tail_floor, low=0.0, high=1.0, low_open=True,
                                    high_open=True)
    check_bool("return_stats", return_stats)
    if not isinstance(reduction, str) or reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    n = student_hidden.shape[0]
    reverse_default = 1.0 if reverse_weight is None and forward_weight is None else 0.0
    rw = _per_token_weight(reverse_weight, reverse_default, n, "reverse_weight", student_hidden)
    fw = _per_token_weight(forward_weight, 0.0, n, "forward_weight", student_hidden)
    chunk_size = check_int("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size, low=1)
    token_block = check_int("token_block", DEFAULT_TOKEN_BLOCK if token_block is None else token_block, low=1)
    with autocast_off(student_hidden.device):
        per_token, rkl, fkl = _FusedLinearTopkKL.apply(
            student_hidden, student_weight, student_bias, teacher_topk_ids.long(), teacher_topk_logprobs.detach(),
            rw, fw, temperature, teacher_tail_floor, chunk_size, token_block,
        )
    if reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean":
        loss = per_token.sum() / max(n, 1)
    else:
        loss = per_token
    return (loss, {"reverse_kl": rkl, "forward_kl": fkl}) if return_stats else loss


def _check(hidden: Tensor, weight: Tensor, ids: Tensor, logprobs: Tensor, bias: Tensor | None) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 2 or not hidden.is_floating_point():
        raise ValueError("student_hidden must be a float tensor [N, D]")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"student_weight must be [V, D={hidden.shape[1]}], got {tuple(getattr(weight, 'shape', ()))}"
        )
    n, vocab = hidden.shape[0], weight.shape[0]
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != n:
        raise ValueError(f"teacher_topk_ids must be [N={n}, k], got {tuple(getattr(ids, 'shape', ()))}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk_ids must be int64 or int32, got {ids.dtype}")
    if not isinstance(logprobs, Tensor) or logprobs.shape != ids.shape or not logprobs.is_floating_point():
        raise ValueError(
            f"teacher_topk_logprobs must be a float tensor shaped like teacher_topk_ids {tuple(ids.shape)}"
        )
    k = ids.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k = teacher_topk_ids.shape[1] must be in [1, V={vocab}], got {k}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.dim() != 1 or bias.shape[0] != vocab:
            raise ValueError(f"student_bias must be [V={vocab}], got {tuple(getattr(bias, 'shape', ()))}")
        check_bias("student_bias", bias)
    if n == 0:
        return
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"teacher_topk_ids must lie in [0, V={vocab})")
    sorted_ids = ids.sort(dim=1).values
    if k > 1 and bool((sorted_ids[:, 1:] == sorted_ids[:, :-1]).any()):
        raise ValueError("teacher_topk_ids must be distinct within each row")
    if bool((logprobs > 1e-4).any()) or bool(torch.isnan(logprobs).any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (<= 0, not NaN)")
    if bool((logprobs.double().exp().sum(dim=1) > 1 + 1e-3).any()):
        raise ValueError("teacher_topk_logprobs of a row sum to more than probability 1 (not normalised log-probs?)")
