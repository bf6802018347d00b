"""The demo's workload, shared by the rollout and training-step benchmarks: household with observe="full" and
15 turns, the committed teacher (gopd_fast/assets/household-full-teacher: Qwen3, hidden 128, 4 layers) and a
2-layer student of the same width (fresh weights, seed 1, the teacher's tokenizer), 32 train tasks."""
from __future__ import annotations

from pathlib import Path

import pytest

TEACHER = Path(__file__).resolve().parent.parent / "gopd_fast" / "assets" / "household-full-teacher"
MAX_TURNS = 15


@pytest.fixture(scope="session")
def demo_workload(tmp_path_factory):
    from gopd_fast import envs as gym
    from gopd_fast import models
    from gopd_fast.rollout.history import ChatFormat

    _, tokenizer = models.load_model(TEACHER)
    student = models.build_model(models.config_for_tokenizer("teacher-tiny", tokenizer, num_hidden_layers=2),
                                 seed=1)
    student_dir = models.save_model(student, tokenizer, tmp_path_factory.mktemp("demo-workload") / "student")
    factory = lambda: gym.make("household", seed=0, observe="full", max_turns=MAX_TURNS)
    env = factory()
    tasks = env.tasks("train")[:32]
    env.close()
    return {"teacher": str(TEACHER), "student": str(student_dir), "tokenizer": tokenizer,
            "chat": ChatFormat(tokenizer), "tasks": tasks, "env_factory": factory}
