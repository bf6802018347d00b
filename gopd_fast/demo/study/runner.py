"""The study's phases: cells (teacher references, then size x seed x method), diagnostics, aggregation."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gopd_fast.demo.config import beta_schedule
from gopd_fast.demo.study.cells import TEACHER, Cell, Study, all_cells
from gopd_fast.demo.study.config import StudyConfig, study_trainer_config


def beta_schedules(cfg: StudyConfig) -> dict[str, list[float]]:
    """The beta every trained method uses at each step (for the schedule plot), as the trainer computes it
    (``gopd_fast.demo.config.beta_schedule`` of the method's trainer Config)."""
    demo = cfg.demo_config()
    unused = Path("unused")   # model and output paths do not change the schedule
    return {method: beta_schedule(study_trainer_config(demo, method, 0, unused, unused, unused))
            for method in cfg.methods if method != "zero-shot"}


def run_cells(study: Study, lr: float | None, only: str = "") -> list[dict[str, Any]]:
    """Every cell (skipping finished ones); ``only``: a substring the cell names must contain."""
    cells = [c for c in all_cells(study.cfg) if only in c.name]
    todo = [c for c in cells if not study.cell_path(c).is_file()]
    study.log(f"[study] {len(cells)} cells, {len(cells) - len(todo)} already finished, {len(todo)} to run; lr {lr}")
    t0 = time.perf_counter()
    results = []
    for i, cell in enumerate(cells):
        fresh = not study.cell_path(cell).is_file()
        results.append(study.run_cell(cell, lr))
        if fresh:
            done = todo.index(cell) + 1
            elapsed = time.perf_counter() - t0
            study.log(f"[study] cell {i + 1}/{len(cells)} {cell.name} done; elapsed {elapsed:.0f} s, about "
                      f"{elapsed / done * (len(todo) - done):.0f} s left at this pace")
    return results


def run_diagnostics(study: Study) -> None:
    """Before training (the base) and after (the ``diagnostic_methods`` student of every seed: a run that
    collapses shows where its states and the teacher's reliability part)."""
    cfg = study.cfg
    for size in cfg.sizes:
        study.run_diagnostic(size, "base", study.base_dir(size))
        for method in cfg.diagnostic_methods:
            if method == "zero-shot" or method == TEACHER:
                continue
            for seed in cfg.seeds:
                cell = Cell(size, method, seed)
                study.run_diagnostic(size, f"{method}-seed{seed}", study.train_dir(cell) / "student-hf")


def aggregate(study: Study) -> dict[str, Any]:
    from gopd_fast.demo.study.aggregate import aggregate as write_summary

    return write_summary(study.cells_dir, study.cells_dir.parent,
                         curve_tasks=study.cfg.distill.curve_eval_episodes, beta_schedules=beta_schedules(study.cfg))
