"""``--select-lr``: the learning rate is chosen on the validation split, never on the held-out tasks.

Procedure (run by the study itself, resumable like a cell): for every rate in ``select_lr.grid``, train
``select_lr.method`` on the first size from its base for ``select_lr.total_steps`` steps with seed
``select_lr.seed`` (not a study seed) and no held-out evaluation; evaluate the student on the first
``select_lr.val_tasks`` validation tasks (train-split indices ``validation_range``, outside the trainer's train
split); pick the rate with the highest mean validation Score. The base's own validation Score is recorded too.
Writes ``<cells_dir>/../select_lr/<rate>.json`` per rate and ``<cells_dir>/../lr.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gopd_fast.demo.run import evaluate
from gopd_fast.demo.study.cells import Cell, Study, write_json
from gopd_fast.train_setup import make_env


def lr_file(study: Study) -> Path:
    return study.cells_dir.parent / "lr.json"


def chosen_lr(study: Study) -> float | None:
    """``cfg.lr`` when set, else the rate ``--select-lr`` wrote, else None (only untrained cells can run)."""
    if study.cfg.lr > 0:
        return study.cfg.lr
    path = lr_file(study)
    return float(json.loads(path.read_text())["lr"]) if path.is_file() else None


def validation_tasks(study: Study) -> list[str]:
    cfg = study.cfg
    env = make_env(cfg.env_config(validation=True))
    try:
        lo, hi = cfg.validation_range
        return env.tasks("train")[lo:min(hi, lo + cfg.select_lr.val_tasks)]
    finally:
        env.close()


def _val_score(study: Study, model_dir: Path, tasks: list[str]) -> dict[str, Any]:
    records = evaluate(study.cfg.demo_config(validation=True), model_dir, seed=study.cfg.select_lr.seed,
                       tasks=tasks)
    return {"score": sum(r["score"] for r in records) / len(records),
            "success_rate": 100.0 * sum(bool(r["success"]) for r in records) / len(records),
            "tasks": len(records)}


def select_lr(study: Study) -> dict[str, Any]:
    cfg, s = study.cfg, study.cfg.select_lr
    size = next(iter(cfg.sizes))
    tasks = validation_tasks(study)
    folder = study.cells_dir.parent / "select_lr"
    results: dict[str, Any] = {}
    base_path = folder / "base.json"
    if not base_path.is_file():
        write_json(base_path, {"lr": 0.0, **_val_score(study, study.base_dir(size), tasks)})
    results["base"] = json.loads(base_path.read_text())
    for lr in s.grid:
        path = folder / f"{lr:g}.json"
        if not path.is_file():
            t0 = time.perf_counter()
            cell = Cell(size, s.method, s.seed)
            info = study.train(cell, lr, out=study.run_dir / "select_lr" / f"{lr:g}", total_steps=s.total_steps,
                               run_values={"eval_every": 0, "eval_at_end": False})
            write_json(path, {"lr": lr, **_val_score(study, Path(info["export_dir"]), tasks),
                              "train_steps": s.total_steps, "seconds_per_step": info["seconds_per_step"],
                              "seconds": round(time.perf_counter() - t0, 1)})
        results[f"{lr:g}"] = json.loads(path.read_text())
        study.log(f"[study] select-lr {lr:g}: validation Score {results[f'{lr:g}']['score']:.1f}")
    best = max(s.grid, key=lambda lr: results[f"{lr:g}"]["score"])
    out = {"lr": best, "method": s.method, "size": size, "seed": s.seed, "total_steps": s.total_steps,
           "validation_tasks": [tasks[0], tasks[-1], len(tasks)], "results": results,
           "procedure": __doc__.split("Procedure")[1].strip()}
    write_json(lr_file(study), out)
    return out
