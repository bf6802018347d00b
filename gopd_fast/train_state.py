"""``TrainState``: everything a resume restores, handed to the checkpoint manager as one object.

It is a ``gopd_fast.checkpoint.Checkpointable`` (DCP's ``Stateful`` shape): the student and its optimizer
(sharded), the LR scheduler, the beta curriculum, the task cursor, the step and the skipped-step counter. The
checkpoint manager adds each rank's RNG state, so a resumed run continues the uninterrupted one exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gopd_fast.checkpoint import ModelOptimizerState
from gopd_fast.curriculum import BetaSchedule, TaskCursor
from gopd_fast.train_step import Trainer

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """The run's resumable state. ``step`` counts completed optimizer steps; ``config`` (the run's configuration
    as a dict) is saved for the record and not restored."""

    trainer: Trainer
    curriculum: BetaSchedule
    cursor: TaskCursor
    step: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def _model_optimizer(self) -> ModelOptimizerState:
        return ModelOptimizerState(self.trainer.student, self.trainer.optimizer)

    def state_dict(self) -> dict[str, Any]:
        trainer = {"scheduler": self.trainer.scheduler.state_dict(), "curriculum": self.curriculum.state_dict(),
                   "cursor": self.cursor.state_dict(), "skipped_steps": self.trainer.skipped_steps,
                   "step": self.step, "config": self.config}
        return {**self._model_optimizer().state_dict(), "trainer": trainer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._model_optimizer().load_state_dict(state)
        t = state["trainer"]
        self.trainer.scheduler.load_state_dict(t["scheduler"])
        self.curriculum.load_state_dict(t["curriculum"])
        self.cursor.load_state_dict(t["cursor"])
        self.trainer.skipped_steps = int(t["skipped_steps"])
        self.step = int(t["step"])
