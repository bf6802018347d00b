"""The learning-rate schedule: linear warmup, then constant, cosine or linear decay to a floor.

One rule for every loop that trains (the trainer's ``LambdaLR`` and the in-process SFT loop), as a factor of the
peak learning rate.
"""
from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at 0-based ``step``.

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then ``constant`` stays at 1;
    ``cosine`` and ``linear`` decay from 1 to ``min_lr_ratio`` over the remaining ``total_steps - warmup_steps``
    steps and stay there.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    p = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * p)) if schedule == "cosine" else 1.0 - p
    return min_lr_ratio + (1 - min_lr_ratio) * shape
