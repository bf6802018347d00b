"""Sharded, atomic, resumable checkpoints (torch.distributed.checkpoint) and the Hugging Face export.

Layout under ``<output_dir>/checkpoints``:

    step-00000040/            a complete checkpoint (only complete ones ever carry this name)
      .metadata, __*.distcp     DCP shards of {"model": ..., "optim": ...}: each rank writes its own FSDP2 shards,
                                and a resume may use a different world size (DCP reshards on load)
      trainer.pt                step, LR scheduler, curriculum, task cursor, counters (identical on every rank)
      rng-rank{r}.pt            python / numpy / torch (and CUDA) RNG states of rank r
      COMPLETE                  JSON {step, world_size, files: {name: {bytes, sha256}}}: the manifest of every
                                other file, written last, before the rename
    step-00000060.tmp/        a save in progress; renamed to step-00000060 only after every rank finished

A crash mid-save leaves a ``.tmp`` folder that is never loaded and is deleted by the next save, and the previous
checkpoints stay untouched (``keep`` newest are kept; older ones are deleted only after a new one is complete).

Integrity: a checkpoint is used only if its manifest verifies (every listed file present, with its size and
sha256; the ranks hash disjoint shares of the files). ``resume`` takes the newest checkpoint that verifies and
logs every newer one it skips with its path and what is wrong (a missing marker, a missing, truncated or
altered file); checkpoints exist but none verifies: ``CheckpointError``. A save removes every checkpoint newer
than itself (an abandoned line of training: a fresh start, or one resumed past a damaged checkpoint).

What is saved is one object (``Checkpointable``, the shape of DCP's ``Stateful``): its ``state_dict()`` gives the
sharded model and optimizer state and a plain trainer state, and ``load_state_dict`` takes them back
(``save_state`` / ``load_state`` / ``resume_state``; the trainer hands over ``gopd_fast.train_state.TrainState``).
The RNG states are the process's own: the manager saves and restores them on every rank. ``save`` / ``load`` /
``resume`` take a model, an optimizer and a trainer-state dict (``ModelOptimizerState``).

The export (``export_hf``) gathers the full student on rank 0 and writes ``save_pretrained`` safetensors plus the
tokenizer: ``AutoModelForCausalLM.from_pretrained(dir)`` loads it, and so does vLLM (``vllm serve <dir>`` or
``vllm.LLM(model=<dir>)``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

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

from gopd_fast.distributed import DistInfo, all_gather_objects, barrier, broadcast_object

_STEP_DIR = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
_HASH_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was required, or a checkpoint failed to load (the message names its path)."""


@runtime_checkable
class Checkpointable(Protocol):
    """Everything a checkpoint restores, as one object (DCP's ``Stateful`` shape).

    ``state_dict()`` returns ``{"model": ..., "optim": ..., "trainer": {...}}``: the model and optimizer state
    dicts as ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives them (sharded; DCP loads into them
    in place), and plain picklable trainer state, identical on every rank. ``load_state_dict`` receives the same
    keys with the loaded values. RNG states are not part of it: they differ per rank and the manager keeps them.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ModelOptimizerState:
    """A ``Checkpointable`` of a model, its optimizer and a plain trainer-state dict (``trainer``, replaced by the
    loaded one on ``load_state_dict``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 trainer: dict[str, Any] | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.trainer: dict[str, Any] = dict(trainer or {})

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "trainer": self.trainer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        self.trainer = state["trainer"]


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-XXXXXXXX)")
    return int(m.group(1))


def read_manifest(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of checkpoint ``path``; a missing or malformed one is a ``CheckpointError``."""
    marker = path / COMPLETE
    if not marker.is_file():
        raise CheckpointError(f"{path}: no {COMPLETE} marker (an interrupted save, or the marker was deleted)")
    try:
        manifest = json.loads(marker.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: the {COMPLETE} marker is unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    ok = (isinstance(files, dict) and isinstance(manifest.get("step"), int)
          and isinstance(manifest.get("world_size"), int) and manifest["world_size"] >= 1
          and all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                  for v in files.values()))
    if not ok:
        raise CheckpointError(f"{path}: the {COMPLETE} marker holds no valid manifest {{step, world_size, files}} "
                              "(damaged, or written by a version without checksums)")
    if _STEP_DIR.match(path.name) and manifest["step"] != step_of(path):
        raise CheckpointError(f"{path}: the {COMPLETE} marker says step {manifest['step']}")
    return manifest


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, info: DistInfo, keep: int = 2) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.root = Path(root)
        self.info = info
        self.keep = keep

    # -- discovery ---------------------------------------------------------------------------------------
    def step_dirs(self) -> list[Path]:
        """Every checkpoint folder (complete or not, ``.tmp`` saves excluded), oldest first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
                      key=lambda p: p.name)

    def complete_checkpoints(self) -> list[Path]:
        """Checkpoints with a COMPLETE marker (not yet verified), oldest first."""
        return [p for p in self.step_dirs() if (p / COMPLETE).is_file()]

    def latest(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def verify(self, path: str | os.PathLike) -> list[str]:
        """What is wrong with checkpoint ``path`` (empty: its manifest verifies). Every rank must call it."""
        path = Path(path)
        manifest: dict[str, Any] | str
        if self.info.is_main:
            try:
                manifest = read_manifest(path)
            except CheckpointError as e:
                manifest = str(e)
        else:
            manifest = ""
        manifest = broadcast_object(manifest)
        if isinstance(manifest, str):
            return [manifest]
        names = sorted(manifest["files"])
        problems = []
        for name in names[self.info.rank::self.info.world_size]:
            want, file = manifest["files"][name], path / name
            if not file.is_file():
                problems.append(f"{file}: missing")
            elif (size := file.stat().st_size) != want["bytes"]:
                problems.append(f"{file}: {size} bytes, the manifest says {want['bytes']} (truncated or extended)")
            elif file_sha256(file) != want["sha256"]:
                problems.append(f"{file}: sha256 differs from the manifest (the file was altered or damaged)")
        return [p for part in all_gather_objects(problems) for p in part]

    # -- save --------------------------------------------------------------------------------------------
    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``step`` of ``model``, ``optimizer`` and ``trainer_state`` (see ``save_state``)."""
        return self.save_state(step, ModelOptimizerState(model, optimizer, trainer_state))

    def save_state(self, step: int, state: Checkpointable) -> Path:
        """Write checkpoint ``step`` of ``state`` atomically; every rank must call it."""
        _check_checkpointable(state)
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f"step-{step:08d}.tmp"
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("step-*.tmp"):     # left over by a crashed save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        barrier()
        sd = state.state_dict()
        dcp.save({"model": sd["model"], "optim": sd["optim"]}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng-rank{self.info.rank}.pt")
        if self.info.is_main:
            torch.save(dict(sd["trainer"], step=step), tmp / "trainer.pt")
        barrier()   # every rank's shards and RNG file are on disk
        names = broadcast_object(sorted(p.name for p in tmp.iterdir() if p.is_file()) if self.info.is_main else None)
        files = self._hash(tmp, names)
        if self.info.is_main:
            with open(tmp / COMPLETE, "w") as f:
                json.dump({"step": step, "world_size": self.info.world_size, "files": files}, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():                              # re-saving the same step (e.g. final == periodic)
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(step)
        barrier()
        return final

    def _hash(self, folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
        """{name: {bytes, sha256}} of ``names`` in ``folder``, each rank hashing its share (collective)."""
        mine = {name: {"bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)}
                for name in names[self.info.rank::self.info.world_size]}
        out: dict[str, dict[str, Any]] = {}
        for part in all_gather_objects(mine):
            out.update(part)
        return dict(sorted(out.items()))

    def _prune(self, step: int) -> None:
        """Keep the ``keep`` newest complete checkpoints up to ``step``; remove every other checkpoint folder
        (older ones, incomplete ones, and newer ones: those belong to a line of training that was abandoned)."""
        current = [p for p in self.complete_checkpoints() if step_of(p) <= step][-self.keep:]
        for old in self.step_dirs():
            if old not in current:
                shutil.rmtree(old, ignore_errors=True)

    # -- load --------------------------------------------------------------------------------------------
    def load(self, path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Restore ``model`` and ``optimizer`` from checkpoint ``path`` (see ``load_state``); returns the trainer
        state."""
        state = ModelOptimizerState(model, optimizer)
        self.load_state(path, state)
        return state.trainer

    def load_state(self, path: str | os.PathLike, state: Checkpointable) -> None:
        """Verify checkpoint ``path``, then restore ``state`` and this rank's RNG. A checkpoint that does not
        verify is a ``CheckpointError`` naming it and what is wrong. Every rank must call it."""
        _check_checkpointable(state)
        path = Path(path)
        problems = self.verify(path)
        if problems:
            raise CheckpointError(f"{path} is not usable: " + "; ".join(problems))
        self._load_verified(path, state)

    def resume(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[Path, dict[str, Any]] | None:
        """``resume_state`` for a model and its optimizer: (checkpoint, trainer state), or None."""
        state = ModelOptimizerState(model, optimizer)
        path = self.resume_state(state)
        return None if path is None else (path, state.trainer)

    def resume_state(self, state: Checkpointable) -> Path | None:
        """Restore ``state`` from the newest checkpoint that verifies and return its path; None when there is no
        checkpoint at all.

        Every newer checkpoint that does not verify is logged (path and problems) and skipped. Checkpoints
        exist but none verifies: ``CheckpointError`` listing each one. Every rank must call it."""
        _check_checkpointable(state)
        candidates = self.step_dirs()
        if not candidates:
            return None
        rejected: list[str] = []
        for path in reversed(candidates):
            problems = self.verify(path)
            if not problems:
                if rejected and self.info.is_main:
                    log.warning("resuming from %s, the newest checkpoint that verifies", path)
                self._load_verified(path, state)
                return path
            rejected.append("; ".join(problems))   # each problem names its file or the checkpoint
            if self.info.is_main:
                log.warning("checkpoint %s is not usable, skipped: %s", path, "; ".join(problems))
        raise CheckpointError(f"no usable checkpoint in {self.root} ({len(rejected)} found, none verifies): "
                              + " | ".join(rejected))

    def _load_verified(self, path: Path, state: Checkpointable) -> None:
        saved_world = read_manifest(path)["world_size"]
        sd = state.state_dict()
        shards = {"model": sd["model"], "optim": sd["optim"]}
        try:
            dcp.load(shards, checkpoint_id=str(path))
        except Exception as e:   # e.g. a model that does not match the checkpoint's keys or shapes
            raise CheckpointError(f"{path}: the model/optimizer shards do not load into this run's model: "
                                  f"{type(e).__name__}: {e}") from e
        trainer = torch.load(path / "trainer.pt", weights_only=False)
        state.load_state_dict({"model": shards["model"], "optim": shards["optim"], "trainer": trainer})
        rng_file = path / f"rng-rank{self.info.rank}.pt"
        if self.info.rank < saved_world:
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:   # resumed on more ranks than saved: a fresh, rank-distinct stream
            torch.manual_seed(1_000_003 * (self.info.rank + 1))


def _check_checkpointable(state: object) -> None:
    if not isinstance(state, Checkpointable):
        raise TypeError(f"state must be a Checkpointable (state_dict() and load_state_dict()), "
                        f"got {type(state).__name__}")


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
