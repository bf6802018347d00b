"""ZeRO-3-style partitioned lm_heads for the fused loss.

FSDP2 (DTensor) and PEFT LoRA heads are handled by ``gopd_fast.module.effective_head`` (and so by
``FusedLinearKL`` and the TRL plug-in). This module covers the other layout: each rank holds only a slice of the
head's rows as a plain tensor (ZeRO-3 / hand-rolled vocabulary partitioning), or DeepSpeed ZeRO-3 keeps the
parameter as an empty placeholder outside its module's forward.

- ``gather_rows(local_rows)``: a differentiable all-gather of row partitions (uneven sizes allowed). Its backward
  sums the full-weight gradient over ranks and hands each rank the rows it owns, like a reduce-scatter.
- ``zero3_gathered(*params)``: DeepSpeed's ``GatheredParameters`` for ZeRO-3 parameters that are not available
  (a no-op for anything else), the pattern TRL uses for fused losses. Run the loss inside the model's forward
  (e.g. TRL's ``_ForwardRedirection``) so DeepSpeed's gradient hooks fire.
- ``check_materialized(weight)``: refuses a ZeRO-3 placeholder (``numel() == 0`` with ``ds_shape``) with an
  error that names the fix, instead of a shape error deep inside a matmul.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["check_materialized", "gather_rows", "zero3_gathered"]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_rows: Tensor, group) -> Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([local_rows.shape[0]], dtype=torch.long), group=group)
        counts = [int(c.item()) for c in counts]
        most = max(counts)
        padded = local_rows.new_zeros((most, *local_rows.shape[1:]))
        padded[: local_rows.shape[0]] = local_rows
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.counts, ctx.rank = group, counts, rank
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad_full: Tensor):
        grad_full = grad_full.contiguous().clone()
        dist.all_reduce(grad_full, group=ctx.group)  # sum over ranks; gloo has no reduce_scatter
        start = sum(ctx.counts[: ctx.rank])
        return grad_full[start : start + ctx.counts[ctx.rank]], None


def gather_rows(local_rows: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's ``local_rows`` (rank order) into the full tensor, differentiably.

    Args:
        local_rows: ``[V_r, ...]`` this rank's rows of the head weight (or bias); ``V_r`` may differ by rank.
        group: process group (default: the world).

    Returns:
        ``[sum_r V_r, ...]``. Backward: each rank receives ``sum over ranks`` of the gradient of its own rows, the
        same total gradient a replicated head would get from an all-reduce (divide by the world size yourself
        if your data-parallel convention averages).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gather_rows needs an initialised torch.distributed process group")
    if not isinstance(local_rows, Tensor) or local_rows.dim() < 1:
        raise ValueError(f"local_rows must be a tensor with a row dimension, got {type(local_rows).__name__}")
    return _GatherRows.apply(local_rows, group)


def check_materialized(weight: Tensor, name: str = "weight") -> Tensor:
    """Return ``weight``, or raise if it is a ZeRO-3 placeholder that was read outside a gather."""
    if weight.numel() == 0 and hasattr(weight, "ds_shape"):
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 partitioned placeholder (shape {tuple(weight.shape)}, full shape "
            f"{tuple(weight.ds_shape)}); compute the loss inside `with gopd_fast.sharded.zero3_gathered({name}):`"
        )
    return weight


@contextlib.contextmanager
def zero3_gathered(*params: Tensor | None) -> Iterator[None]:
    """Gather DeepSpeed ZeRO-3 partitioned parameters for the duration of the block; a no-op otherwise."""
    partitioned = {id(p): p for p in params if p is not None and hasattr(p, "ds_id")}
    if not partitioned:
        yield
        return
    import deepspeed  # only reached for DeepSpeed parameters, so DeepSpeed is installed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    to_gather = [p for p in partitioned.values() if p.ds_status != ZeroParamStatus.AVAILABLE]
    if not to_gather:  # already gathered by someone else (e.g. tied embeddings): leave them as they are
        yield
        return
    with deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None):
        yield
