"""Process group, FSDP2 sharding and the few collectives the trainer needs.

Launch with torchrun; it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT:

    torchrun --nproc_per_node=8 -m gopd_fast.train --config configs/scienceworld.toml          # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 \
             --rdzv_id=gopd-run1 -m gopd_fast.train --config configs/scienceworld.toml        # on every node

Backend: NCCL on CUDA, gloo on CPU. A plain ``python -m gopd_fast.train`` (no torchrun) runs as a single
process with no process group and no FSDP wrapping; the collectives below are then identities.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun process group (if launched by torchrun) and pick this rank's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    global _OWNS_GROUP
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        _OWNS_GROUP = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


_OWNS_GROUP = False   # a caller's own process group is left alone by shutdown()


def shutdown() -> None:
    """Destroy the process group if ``init_distributed`` created it."""
    global _OWNS_GROUP
    if _OWNS_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNS_GROUP = False


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each value over ranks (float64, one collective)."""
    if not dist.is_initialized():
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def all_reduce_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a HF causal LM (``model.model.layers`` for Llama/Qwen-style models)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TypeError(f"{type(model).__name__}: expected decoder blocks at model.model.layers")
    return list(layers)


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder block, then the decoder (``model.model``: embeddings + final norm),
    then the root (``lm_head``). The decoder gets its own unit because the trainer calls ``model.model(...)``
    directly for hidden states; the head is then read as a sharded DTensor by the loss (FusedLinearKL gathers it).
    ``param_dtype`` (bf16 on GPU) sets the mixed-precision compute dtype; gradients reduce in float32.
    A no-op in a single process."""
    if not info.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in decoder_layers(model):
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model.model, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def reshard(model: nn.Module) -> None:
    """Return FSDP2 roots to the sharded state after a forward-only pass (see stack.md, caveat 7)."""
    for module in model.modules():
        fn = getattr(module, "reshard", None)
        if fn is not None and type(module).__name__.startswith("FSDP"):
            fn()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in the backward instead of keeping its activations. Uses the HF model's
    own non-reentrant checkpointing, which keeps parameter names (and so checkpoints) unchanged."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable(); expected a HF model")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
