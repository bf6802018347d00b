"""Sharded, atomic, resumable checkpoints (torch.distributed.checkpoint) and the Hugging Face export.

Layout under ``<output_dir>/checkpoints``:

    step-00000040/            a complete checkpoint (only complete ones ever carry this name)
      .metadata, __*.distcp     DCP shards of {"model": ..., "optim": ...}: each rank writes its own FSDP2 shards,
                                and a resume may use a different world size (DCP reshards on load)
      trainer.pt                step, LR scheduler, curriculum, task cursor, counters (identical on every rank)
      rng-rank{r}.pt            python / numpy / torch (and CUDA) RNG states of rank r
      COMPLETE                  JSON {step, world_size}, written last, before the rename
    step-00000060.tmp/        a save in progress; renamed to step-00000060 only after every rank finished

A crash mid-save leaves a ``.tmp`` folder that is never loaded and is deleted by the next save, and the previous
checkpoints stay untouched (``keep`` newest are kept; older ones are deleted only after a new one is complete).

The export (``export_hf``) gathers the full student on rank 0 and writes ``save_pretrained`` safetensors plus the
tokenizer: ``AutoModelForCausalLM.from_pretrained(dir)`` loads it, and so does vLLM (``vllm serve <dir>`` or
``vllm.LLM(model=<dir>)``).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from gopd_fast.distributed import DistInfo, barrier

_STEP_DIR = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, info: DistInfo, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.info = info
        self.keep = keep

    # -- discovery ---------------------------------------------------------------------------------------
    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir()
                 if p.is_dir() and _STEP_DIR.match(p.name) and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    # -- save --------------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` atomically; every rank must call it."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):     # left over by a crashed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-rank{self.info.rank}.pt")
        if self.info.is_main:
            torch.save(dict(trainer_state, step=step), tmp / "trainer.pt")
        barrier()   # every rank's shards and RNG file are on disk
        if self.info.is_main:
            with open(tmp / COMPLETE, "w") as f:
                json.dump({"step": step, "world_size": self.info.world_size}, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():                              # re-saving the same step (e.g. final == periodic)
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in self.complete_checkpoints()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final

    # -- load --------------------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore model, optimizer and this rank's RNG from ``path``; returns the trainer state."""
        path = Path(path)
        if not (path / COMPLETE).is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng_file = path / f"rng-rank{self.info.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:   # resumed on more ranks than saved: a fresh, rank-distinct stream
            torch.manual_seed(1_000_003 * (self.info.rank + 1))
        return torch.load(path / "trainer.pt", weights_only=False)


def full_state_dict(model: nn.Module, cpu_offload: bool = False) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict (FSDP2 shards are all-gathered; every rank must call it).

    ``cpu_offload=False``: every rank gets the full tensors on its device (what each rank's rollout engine needs).
    ``cpu_offload=True``: only rank 0 gets them, on the CPU; other ranks get an empty dict (export)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload))


def export_hf(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, info: DistInfo) -> Path | None:
    """Gather the full model and ``save_pretrained`` it (safetensors) with the tokenizer, on rank 0.

    Every rank must call it (the gather is collective). Returns the directory on rank 0, None elsewhere.
    """
    state = full_state_dict(model, cpu_offload=True)
    out = Path(out_dir)
    result = None
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in state.items()}
        model.save_pretrained(str(out), state_dict=state, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
        result = out
    barrier()
    return result
