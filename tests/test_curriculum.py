"""Guidance schedules against their closed forms, and the resumable task cursor."""
from __future__ import annotations

import itertools
import math

import pytest

from gopd_fast.config import CurriculumConfig
from gopd_fast.curriculum import BetaSchedule, TaskCursor


def cosine_reference(step, total, start=1.0, end=0.0, ratio=0.8):
    p = min(step / int(total * ratio), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


def test_cosine_matches_the_paper_formula():
    s = BetaSchedule(CurriculumConfig(), total_steps=250)
    for step in range(0, 260, 7):
        assert s(step) == pytest.approx(cosine_reference(step, 250), abs=1e-12)
    assert s(0) == 1.0 and s(200) == pytest.approx(0.0, abs=1e-12) and s(249) == 0.0
    assert s(100) == pytest.approx(0.5)   # half-way through the 200-step window
    betas = [s(k) for k in range(250)]
    assert all(a >= b for a, b in itertools.pairwise(betas))


def test_cosine_with_custom_endpoints():
    s = BetaSchedule(CurriculumConfig(beta_start=0.8, beta_end=0.2, ratio=0.5), total_steps=40)
    for step in (0, 5, 10, 19, 20, 39):
        assert s(step) == pytest.approx(cosine_reference(step, 40, 0.8, 0.2, 0.5))


def test_other_schedules():
    total = 100   # window: 80 steps
    lin = BetaSchedule(CurriculumConfig(schedule="linear"), total)
    assert [lin(k) for k in (0, 20, 40, 80, 99)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    exp = BetaSchedule(CurriculumConfig(schedule="exponential", sharpness=3.0), total)
    k = 3.0
    assert exp(40) == pytest.approx((math.exp(-k * 0.5) - math.exp(-k)) / (1 - math.exp(-k)))
    assert (exp(0), exp(80)) == pytest.approx((1.0, 0.0))
    assert exp(40) < lin(40)   # front-loaded decay
    step = BetaSchedule(CurriculumConfig(schedule="step", stages=4), total)
    assert [step(k) for k in (0, 19, 20, 40, 79, 80)] == pytest.approx([1.0, 1.0, 0.75, 0.5, 0.25, 0.0])
    const = BetaSchedule(CurriculumConfig(schedule="constant", beta_start=0.3), total)
    assert {const(k) for k in range(total)} == {0.3}
    none = BetaSchedule(CurriculumConfig(schedule="none"), total)
    assert {none(k) for k in range(total)} == {0.0}


def test_tiny_runs_and_bad_input():
    s = BetaSchedule(CurriculumConfig(), total_steps=1)   # int(1 * 0.8) == 0: window clamps to 1 step
    assert s(0) == 1.0 and s(1) == 0.0
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(ValueError, match="total_steps"):
        BetaSchedule(CurriculumConfig(), total_steps=0)


def test_state_dict_catches_a_different_curriculum_on_resume():
    a = BetaSchedule(CurriculumConfig(), 100)
    BetaSchedule(CurriculumConfig(), 100).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="ratio"):
        BetaSchedule(CurriculumConfig(ratio=0.5), 100).load_state_dict(a.state_dict())


def test_task_cursor_covers_each_epoch_and_resumes_exactly():
    tasks = [f"t{i}" for i in range(10)]
    a = TaskCursor(tasks, seed=3)
    first = a.take(4) + a.take(6)
    assert sorted(first) == sorted(tasks) and first != tasks   # a shuffled full epoch
    a.take(3)
    b = TaskCursor(tasks, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.take(12) == b.take(12)                           # crosses an epoch boundary identically
    with pytest.raises(ValueError, match="task cursor mismatch"):
        TaskCursor(tasks[:5], seed=3).load_state_dict(a.state_dict())
