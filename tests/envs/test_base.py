"""The env protocol and registry: make / register, the result types, turn-limit validation, context manager."""
from __future__ import annotations

import dataclasses

import pytest

from gopd_fast import envs
from gopd_fast.envs.base import _REGISTRY, Reset, StepResult, TextEnv, register


class _Echo(TextEnv):
    name = "test-echo"

    def __init__(self, max_turns: int = 2, greeting: str = "hi") -> None:
        super().__init__(max_turns)
        self.greeting, self.closed = greeting, 0

    def tasks(self, split: str) -> list[str]:
        if split not in ("train", "eval"):
            raise ValueError(f"unknown split {split!r}")
        return [f"echo/{split}/0"]

    def reset(self, task_id: str) -> Reset:
        self.turns = 0
        return Reset(self.greeting, "say anything")

    def step(self, action: str) -> StepResult:
        self.turns += 1
        done = self.turns >= self.max_turns
        return StepResult(action, 100.0 if done else 0.0, done, done, info={"truncated": False})

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def echo_registered():
    register("test-echo")(_Echo)
    yield
    _REGISTRY.pop("test-echo", None)


def test_make_passes_options_and_context_manager_closes(echo_registered):
    with envs.make("test-echo", greeting="hello", max_turns=3) as env:
        assert env.reset("echo/train/0").observation == "hello"
        assert [env.step("a").done for _ in range(3)] == [False, False, True]
        assert env.expert_action() is None          # the default: no oracle
    assert env.closed == 1
    assert "test-echo" in envs.registered()


def test_register_twice_and_unknown_names(echo_registered):
    with pytest.raises(ValueError, match="already registered"):
        register("test-echo")(_Echo)
    with pytest.raises(ValueError, match=r"unknown environment 'nope'; known: .*household.*scienceworld"):
        envs.make("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        envs.make(None)


@pytest.mark.parametrize(("bad", "error"), [(0, ValueError), (-1, ValueError), (2.5, TypeError), ("3", TypeError),
                                            (True, TypeError), (None, TypeError)])
def test_max_turns_validated(bad, error):
    with pytest.raises(error, match=r"option max_turns must be an int in \[1, inf\], got"):
        _Echo(max_turns=bad)


def test_result_types_are_frozen_with_defaults():
    reset = Reset("obs", "task")
    assert reset.admissible_actions is None and reset.info == {}
    step = StepResult("obs", 50.0, False, False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.score = 100.0
    assert StepResult("o", 1.0, True, True).info is not StepResult("o", 1.0, True, True).info  # no shared dict


def test_builtin_household_is_registered_lazily():
    env = envs.make("household")
    assert isinstance(env, TextEnv) and env.name == "household" and "household" in envs.registered()


def test_envs_import_without_torch():
    """household is pure Python: importing the envs, the pool and the harness must not pull in torch (pool workers
    would each pay for it)."""
    import subprocess
    import sys

    code = ("import sys, gopd_fast.envs, gopd_fast.envs.household, gopd_fast.envs.pool, gopd_fast.envs.evaluate; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reset_prompt_states_the_task_once():
    # ScienceWorld / TextWorldExpress: the first observation is a room view without the task
    assert Reset("You are in the kitchen.", "Boil water.").prompt == "Task: Boil water.\nYou are in the kitchen."
    # household / ALFWorld: the observation already states it, so the prompt is the observation, unchanged
    assert Reset("You are in the hall. Task: Put the mug in the sink.", "Put the mug in the sink.").prompt == (
        "You are in the hall. Task: Put the mug in the sink.")
    assert Reset("obs", "  ").prompt == "obs"


def test_household_prompt_is_its_observation():
    env = envs.make("household", seed=0)
    for task in env.tasks("eval")[:5]:
        first = env.reset(task)
        assert first.prompt == first.observation
