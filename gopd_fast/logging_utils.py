"""Metrics: one JSON object per step in ``metrics.jsonl``, TensorBoard scalars and a tqdm bar (rank 0 only).

Keys of a training record (``"kind": "train"``); means are over the GLOBAL batch (all ranks):

    step                 optimizer step just taken (1-based); lr: its learning rate
    beta                 guidance probability of this step's rollouts (0 for OPD, 1 for SFT)
    loss                 token-mean loss over all loss tokens; loss_student / loss_teacher: per role
    reverse_kl           mean KL(p_s || p_t) over the tokens scored with an exact KL term; forward_kl: KL(p_t || p_s)
    loss_tokens          loss tokens in the global batch (the normalizer); teacher_token_fraction: their teacher share
    teacher_turn_fraction  fraction of generated turns written by the teacher
    grad_norm            global gradient norm before clipping; skipped: 1 if this step was skipped (non-finite)
    skipped_steps        non-finite steps skipped so far
    score / success_rate / rounds   mean env score (0-100), success fraction, turns, of the training rollouts
    prefix_cache_hit_rate  rollout engine's prefix-cache hit rate (when the engine reports one)
    tokens_scored        positions each model scored (whole-episode packing); tokens_per_s: tokens_scored / step time
    time_rollout, time_forward, time_loss, time_backward, time_optim, time_sync, time_step   seconds per phase

Evaluation records (``"kind": "eval"``) carry ``step``, ``eval/episodes`` and ``eval/score``, ``eval/success_rate``,
``eval/rounds``, each with its 95% interval as ``<key>_low`` / ``<key>_high`` (Student's t for Score and Rounds,
Wilson for the Success Rate; NaN bounds with a single episode). TensorBoard gets every numeric key under the same name (``train/<key>`` for train records).

A run that starts at ``initial_step`` (a resume, or 0 for a fresh start) first drops every record after that step
from an existing ``metrics.jsonl`` (and TensorBoard purges its events from there), so each step appears once.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


def truncate_metrics(path: Path, last_step: int) -> int:
    """Rewrite ``path`` (metrics.jsonl) without the records after ``last_step`` and without unreadable lines (a
    line cut by a kill mid-write); atomic (temporary file + rename). Returns the number of records kept."""
    if not path.is_file():
        return 0
    kept = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:    # a partial line (killed mid-write) or non-UTF-8 bytes
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
                kept.append(raw.rstrip(b"\n") + b"\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(kept)


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, initial_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True) -> None:
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._file = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        truncate_metrics(self.path, initial_step)
        self._file = open(self.path, "a")  # noqa: SIM115  (kept open for the run; closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=initial_step + 1)
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        step = int(record.get("step", 0))
        prefix = "train/" if record.get("kind") == "train" else ""
        if self._tb is not None:
            for k, v in record.items():
                if k in ("time", "step", "kind") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                if math.isfinite(v):
                    self._tb.add_scalar(prefix + k, v, step)
        if self._bar is not None:
            if record.get("kind") == "train":
                self._bar.update(1)
                shown = {k: record[k] for k in ("loss", "beta", "score") if k in record}
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if isinstance(v, float)})
            else:
                self._bar.write(json.dumps({k: v for k, v in clean.items() if k != "time"}))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None
