"""Which backward schedule a call runs: the names, the ``GOPD_BACKWARD`` override and the automatic choice.

``auto`` (the default) takes ``logit_block`` (every logit computed once, gradients stored in the forward; 1.0x
the useful FLOPs) when gradients are needed and ``tiling.backward_buffer_bytes()`` holds blocks tall enough
(``logit_block.budget_allows``), else ``one_pass`` (1.5x the FLOPs, buffers <= 1% of N x V x 4 at the default
budget). ``two_pass``, ``atomic`` (see ``backward``) and ``skip`` (``skip``: opt-in, drops the gradient products
of vocabulary tiles whose dz is negligible) run only when asked for.
"""
from __future__ import annotations

import os

from . import backward, logit_block

SCHEDULE_ENV = "GOPD_BACKWARD"
AUTO = "auto"
LOGIT_BLOCK = "logit_block"
SKIP = "skip"
CHOICES = (AUTO, LOGIT_BLOCK, *backward.SCHEDULES, SKIP)


def check_choice(schedule: str, name: str = "schedule") -> None:
    if schedule not in CHOICES:
        raise ValueError(f"{name} must be one of {', '.join(CHOICES)}; got {schedule!r}")


def schedule_default() -> str:
    """``GOPD_BACKWARD`` (one of ``CHOICES``, case and spaces ignored), else ``auto``."""
    value = os.environ.get(SCHEDULE_ENV, "").strip().lower() or AUTO
    check_choice(value, SCHEDULE_ENV)
    return value


def choose_schedule(requested: str | None, *, needs_grad: bool, n_tokens: int, vocab: int,
                    operand_bytes: int) -> str:
    """The concrete schedule: ``requested`` (None reads ``GOPD_BACKWARD``) unless it is ``auto``, which takes
    ``logit_block`` when gradients are needed and the buffer budget allows it, else ``one_pass``."""
    schedule = schedule_default() if requested is None else requested
    check_choice(schedule)
    if schedule != AUTO:
        return schedule
    if needs_grad and logit_block.budget_allows(n_tokens, vocab, operand_bytes):
        return LOGIT_BLOCK
    return "one_pass"
