"""Guidance curricula: ``beta(step)``, the per-turn probability that the teacher writes a turn, and the task cursor.

Every schedule moves from ``beta_start`` to ``beta_end`` over the first ``int(total_steps * ratio)`` steps and
then stays at ``beta_end``. With ``p = min(step / int(total_steps * ratio), 1)``:

    cosine       beta_end + (beta_start - beta_end) * (1 + cos(pi p)) / 2          (the paper's default)
    linear       beta_start + (beta_end - beta_start) * p
    exponential  beta_end + (beta_start - beta_end) * (exp(-k p) - exp(-k)) / (1 - exp(-k)),  k = sharpness
    step         beta_start + (beta_end - beta_start) * floor(p * stages) / stages
    constant     beta_start at every step (the fixed-beta ablation)
    none         0 at every step (vanilla on-policy distillation)

A schedule is a pure function of the step, so resuming only needs the step; ``state_dict`` still records the
schedule's parameters so a resume with a different curriculum is caught instead of silently mixing two.
"""
from __future__ import annotations

import math
import random
from typing import Any

from gopd_fast.config import Config, CurriculumConfig

SCHEDULES = ("cosine", "linear", "exponential", "constant", "step", "none")


class BetaSchedule:
    def __init__(self, cfg: CurriculumConfig, total_steps: int) -> None:
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"curriculum.schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.decay_steps = max(int(total_steps * cfg.ratio), 1)

    def progress(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return min(step / self.decay_steps, 1.0)

    def __call__(self, step: int) -> float:
        c, p = self.cfg, self.progress(step)
        start, end = c.beta_start, c.beta_end
        if c.schedule == "cosine":
            beta = end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0
        elif c.schedule == "linear":
            beta = start + (end - start) * p
        elif c.schedule == "exponential":
            k = c.sharpness
            beta = end + (start - end) * (math.exp(-k * p) - math.exp(-k)) / (1.0 - math.exp(-k))
        elif c.schedule == "step":
            beta = start + (end - start) * math.floor(p * c.stages) / c.stages
        elif c.schedule == "constant":
            beta = start
        else:  # none
            beta = 0.0
        return min(max(beta, 0.0), 1.0)

    def state_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {"schedule": c.schedule, "beta_start": c.beta_start, "beta_end": c.beta_end, "ratio": c.ratio,
                "sharpness": c.sharpness, "stages": c.stages, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"the checkpoint was trained with a different curriculum ({detail}); "
                             "resume with the same [curriculum] and run.total_steps, or start a new output_dir")


def beta_at(cfg: Config, schedule: BetaSchedule, step: int) -> float:
    """The guidance probability of ``step`` under ``run.algorithm``: OPD 0 (the student alone), SFT 1 (the
    teacher writes every turn), Guided-OPD the curriculum's ``schedule``."""
    if cfg.run.algorithm == "opd":
        return 0.0
    if cfg.run.algorithm == "sft":
        return 1.0
    return schedule(step)


class TaskCursor:
    """Deterministic, resumable stream of training task ids: a seeded shuffle per epoch, consumed in order.

    Every rank holds the same cursor and takes the same global slice, so all ranks agree on which tasks a step
    uses without communication; the trainer then gives each rank its share of that slice.
    """

    def __init__(self, task_ids: list[str], seed: int) -> None:
        if not task_ids:
            raise ValueError("TaskCursor needs at least one task id")
        self.task_ids = list(task_ids)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[str]:
        order = list(self.task_ids)
        random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> list[str]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out: list[str] = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            k = min(n - len(out), len(self._order) - self.position)
            out += self._order[self.position:self.position + k]
            self.position += k
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_tasks": len(self.task_ids), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_tasks"] != len(self.task_ids) or state["seed"] != self.seed:
            raise ValueError(f"task cursor mismatch: checkpoint has {state['num_tasks']} tasks / seed "
                             f"{state['seed']}, this run has {len(self.task_ids)} / {self.seed}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled(self.epoch)
