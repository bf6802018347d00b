"""Study cells: one (size, method, seed) each, or the teacher's reference evaluation per seed.

A finished cell writes ``<cells_dir>/<name>.json`` (small: per-task held-out results, the learning curve, timings)
and is skipped by every later run. A trained cell's trainer checkpoints live in ``<run_dir>/train/<name>``: an
interrupted cell resumes from its latest checkpoint (``run.resume=true``) instead of starting over.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gopd_fast.demo.config import ASSETS_DIR, REPO_DIR
from gopd_fast.demo.run import DemoEnvs, evaluate
from gopd_fast.demo.study.config import StudyConfig, study_trainer_config
from gopd_fast.train_setup import make_env

if TYPE_CHECKING:
    from gopd_fast.config import Config

TEACHER = "teacher"


@dataclass(frozen=True)
class Cell:
    size: str      # a key of cfg.sizes, or "teacher" for the teacher's reference cells
    method: str    # one of STUDY_METHODS, or "teacher"
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size}__{self.method}__seed{self.seed}"

    @property
    def trained(self) -> bool:
        return self.method not in (TEACHER, "zero-shot")


def all_cells(cfg: StudyConfig) -> list[Cell]:
    """Teacher references first, then method x size x seed in the config's method order: a partial study has
    every seed of every size for its first methods (list zero-shot, OPD and Guided-OPD first)."""
    cells = [Cell(TEACHER, TEACHER, s) for s in cfg.seeds]
    cells += [Cell(size, m, s) for m in cfg.methods for size in cfg.sizes for s in cfg.seeds]
    return cells


def _repo_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else REPO_DIR / path


def write_json(path: Path, data: Any) -> None:
    """Write-then-rename: a cell file exists only once it is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    """The trainer's metrics.jsonl; a resumed run re-logs the steps after its checkpoint, so the last record of
    each (kind, step) wins."""
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[(rec.get("kind", ""), int(rec.get("step", 0)))] = rec
    return sorted(latest.values(), key=lambda r: (r["step"], r.get("kind", "")))


class Study:
    """Paths, the teacher, the student bases and the evaluation envs of one study run."""

    def __init__(self, cfg: StudyConfig, log=print) -> None:
        self.cfg, self.log = cfg, log
        self.cells_dir = _repo_path(cfg.cells_dir)
        self.run_dir = _repo_path(cfg.run_dir)
        self.teacher_dir = ASSETS_DIR / cfg.teacher.asset
        if not (self.teacher_dir / "config.json").is_file():
            raise FileNotFoundError(f"no teacher at {self.teacher_dir}: build it first with "
                                    f"`python -m gopd_fast.demo.study --config ... --build-teacher`")
        env = make_env(cfg.env_config())
        try:
            self.eval_tasks = env.tasks("eval")[:cfg.eval.tasks]
        finally:
            env.close()
        if len(self.eval_tasks) < cfg.eval.tasks:
            raise ValueError(f"eval.tasks={cfg.eval.tasks} but the eval split has {len(self.eval_tasks)} tasks")
        self._envs: DemoEnvs | None = None

    @property
    def envs(self) -> DemoEnvs:
        if self._envs is None:
            self._envs = DemoEnvs(self.cfg.demo_config())
        return self._envs

    def close(self) -> None:
        if self._envs is not None:
            self._envs.close()
            self._envs = None

    def tokenizer(self):
        from gopd_fast.demo.run import _tokenizer

        return _tokenizer(self.teacher_dir)

    def base_dir(self, size: str) -> Path:
        """The student base of ``size``, built on first use (``gopd_fast.demo.study.teacher.build_student_base``)."""
        from gopd_fast.demo.study.teacher import build_student_base

        out = self.run_dir / "models" / f"base-{size}"
        if not (out / "student_base.json").is_file():
            self.log(f"[study] building the {size} student base in {out}")
            build_student_base(self.cfg, size, self.tokenizer(), out, log=self.log)
        return out

    def base_info(self, size: str) -> dict[str, Any]:
        return json.loads((self.base_dir(size) / "student_base.json").read_text())

    def fingerprint(self, cell: Cell, lr: float | None) -> str:
        """Hash of every setting a cell's result depends on: a finished cell made under other settings is stale.
        ``eval.kv_reuse`` is left out: the KV-cached engine is a speed setting that samples the same episodes."""
        cfg = self.cfg
        evaluation = {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k != "kv_reuse"}
        parts: dict[str, Any] = {"env": cfg.env, "env_options": cfg.env_options, "max_turns": cfg.max_turns,
                                 "teacher": cfg.teacher.asset, "eval": evaluation,
                                 "tasks": len(self.eval_tasks), "cell": dataclasses.asdict(cell)}
        if cell.method != TEACHER:
            parts["base"] = dataclasses.asdict(cfg.sizes[cell.size])
        if cell.trained:
            parts.update(distill=dataclasses.asdict(cfg.distill), lr=lr)
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def cell_path(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.name}.json"

    def train_dir(self, cell: Cell) -> Path:
        return self.run_dir / "train" / cell.name

    # ------------------------------------------------------------------------------------------- training
    def trainer_config(self, cell: Cell, lr: float, out: Path, total_steps: int | None = None,
                       run_values: Mapping[str, Any] | None = None) -> Config:
        """The demo's trainer ``Config`` of the cell's method (by value), the ablation's objective, then
        resumption and the checkpoint cadence; ``run_values``: more ``[run]`` fields."""
        cfg = self.cfg
        dcfg = cfg.demo_config(cell.size, lr)
        if total_steps is not None:
            dcfg = dataclasses.replace(dcfg, distill=dataclasses.replace(dcfg.distill, total_steps=total_steps))
        trainer = study_trainer_config(dcfg, cell.method, cell.seed, self.base_dir(cell.size), self.teacher_dir,
                                       out)
        run = dataclasses.replace(trainer.run, resume=True, save_every=cfg.save_every, **dict(run_values or {}))
        return dataclasses.replace(trainer, run=run)

    def train(self, cell: Cell, lr: float, out: Path | None = None, total_steps: int | None = None,
              run_values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run (or resume, or skip when exported) the cell's distillation in ``out`` (default its train dir);
        returns its curve and timings."""
        from gopd_fast.train import run

        out = out or self.train_dir(cell)
        done_marker = out / "trained.json"
        if done_marker.is_file():
            return json.loads(done_marker.read_text())
        trainer_cfg = self.trainer_config(cell, lr, out, total_steps, run_values)
        t0 = time.perf_counter()
        result = run(trainer_cfg)
        if result.export_dir is None or not (Path(result.export_dir) / "config.json").is_file():
            raise RuntimeError(f"{cell.name}: the trainer exported no student to {result.export_dir}")
        metrics = read_metrics(out)
        train = [r for r in metrics if r.get("kind") == "train"]
        info = {
            "export_dir": str(result.export_dir), "lr": lr,
            "steps": trainer_cfg.run.total_steps, "resumed_from": str(result.resumed_from or ""),
            "seconds_this_process": round(time.perf_counter() - t0, 1),
            "seconds_per_step": (sum(r["time_step"] for r in train) / len(train)) if train else None,
            "rollout_seconds_per_step": (sum(r["time_rollout"] for r in train) / len(train)) if train else None,
            "curve": [[int(r["step"]), float(r["eval/score"])] for r in metrics
                      if r.get("kind") == "eval" and "eval/score" in r],
            "betas": [float(r["beta"]) for r in train],
            "train_scores": [float(r["score"]) for r in train],
            "skipped_steps": result.skipped_steps,
        }
        write_json(done_marker, info)
        return info

    # ------------------------------------------------------------------------------------------ the cells
    def run_cell(self, cell: Cell, lr: float | None) -> dict[str, Any]:
        """The cell's results (from its file when finished, else trained/resumed and evaluated now). ``lr``: the
        distillation rate (None: no rate chosen yet, so a trained cell cannot run)."""
        path = self.cell_path(cell)
        if path.is_file():
            data = json.loads(path.read_text())
            if cell.trained and lr is None:
                return data
            if data.get("fingerprint") != self.fingerprint(cell, lr):
                raise ValueError(f"{path} was made with other settings (fingerprint {data.get('fingerprint')} != "
                                 f"{self.fingerprint(cell, lr)}): delete it (and {self.train_dir(cell)}) to rerun "
                                 f"the cell, or restore the settings it was made with")
            return data
        if cell.trained and lr is None:
            raise FileNotFoundError(f"{cell.name}: no learning rate: set lr in the config or run "
                                    f"`python -m gopd_fast.demo.study --select-lr` first")
        t0 = time.perf_counter()
        load_before = [round(x, 2) for x in os.getloadavg()]
        data: dict[str, Any] = {"cell": dataclasses.asdict(cell), "name": cell.name,
                                "fingerprint": self.fingerprint(cell, lr)}
        if cell.method == TEACHER:
            model_dir = self.teacher_dir
        elif cell.method == "zero-shot":
            model_dir = self.base_dir(cell.size)
            data["base"] = self.base_info(cell.size)
        else:
            data["train"] = self.train(cell, lr)
            model_dir = Path(data["train"]["export_dir"])
        t_eval = time.perf_counter()
        records = evaluate(self.cfg.demo_config(), model_dir, seed=cell.seed, tasks=self.eval_tasks,
                           envs=self.envs)
        data["eval"] = [{k: v for k, v in r.items() if k != "actions"} for r in records]
        data["eval_seconds"] = round(time.perf_counter() - t_eval, 1)
        data["seconds_this_process"] = round(time.perf_counter() - t0, 1)
        data["load_avg"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
        data["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        write_json(path, data)
        mean = sum(r["score"] for r in records) / len(records)
        self.log(f"[study] {cell.name}: held-out Score {mean:.1f} on {len(records)} tasks "
                 f"({data['seconds_this_process']:.0f} s)")
        return data

    # ---------------------------------------------------------------------------------------- diagnostics
    def run_diagnostic(self, size: str, label: str, student_dir: Path) -> dict[str, Any] | None:
        """The failure-mode diagnostic (``gopd_fast.demo.run.run_diagnostics``) for one student, as a cell file."""
        from gopd_fast.demo.run import run_diagnostics

        path = self.cells_dir / f"diagnostic__{size}__{label}.json"
        if path.is_file():
            return json.loads(path.read_text())
        if not (student_dir / "config.json").is_file():
            self.log(f"[study] diagnostic {size}/{label}: no student at {student_dir}; skipped")
            return None
        t0 = time.perf_counter()
        diag = run_diagnostics(self.cfg.demo_config(size), student_dir, self.teacher_dir, self.tokenizer(),
                               envs=self.envs)
        data = {"size": size, "label": label, "seconds": round(time.perf_counter() - t0, 1),
                "failure_mode": {k: v for k, v in diag.items() if k != "states"}}
        write_json(path, data)
        return data
