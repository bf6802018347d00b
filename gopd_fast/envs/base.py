"""The text-environment protocol every environment implements, and the registry behind ``envs.make``.

An environment is a stateful, single-episode-at-a-time object:

    env = gopd_fast.envs.make("household", seed=0)
    first = env.reset(env.tasks("train")[0])     # -> Reset
    while not step.done:
        step = env.step("go to kitchen")         # -> StepResult
    env.close()

Scores are the environment's own 0-100 progress score *after* the step (not a per-step reward); ``success`` is
True only when the task is fully solved. ``turns`` counts the ``step`` calls of the current episode and the env
sets ``done`` (with ``info["truncated"] = True``) when it reaches ``max_turns``.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gopd_fast.envs.options import check_int

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass(frozen=True)
class Reset:
    observation: str                      # the first observation the agent sees
    task: str                             # the goal text (may also appear inside the observation)
    admissible_actions: tuple[str, ...] | None = None   # valid actions now, where the env knows them
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The agent's first message: the observation, preceded by the task unless the observation states it
        (ScienceWorld's and TextWorldExpress's first observations do not; household's and ALFWorld's do)."""
        task = self.task.strip()
        if not task or task in self.observation:
            return self.observation
        return f"Task: {task}\n{self.observation}"


@dataclass(frozen=True)
class StepResult:
    observation: str
    score: float                          # 0-100 progress score after this step
    done: bool                            # episode over (solved, failed for good, or turn limit)
    success: bool                         # task fully solved
    admissible_actions: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)   # e.g. {"truncated": True}, {"invalid_action": True}


class EnvError(RuntimeError):
    """An environment failed (crash, hang, lost JVM). The pool restarts the env and re-queues the episode."""


class TextEnv(abc.ABC):
    """Base class of every text environment. Subclasses set ``name`` and implement the abstract methods."""

    name: str = "abstract"

    def __init__(self, max_turns: int) -> None:
        self.max_turns = check_int("max_turns", max_turns, low=1)
        self.turns = 0

    @abc.abstractmethod
    def tasks(self, split: str) -> list[str]:
        """Task ids of ``split`` ("train" or "eval"; some envs add "dev"/"test"), deterministic for the env's seed,
        never in filesystem order. Unknown split -> ValueError naming the known ones."""

    @abc.abstractmethod
    def reset(self, task_id: str) -> Reset:
        """Start an episode of ``task_id``. Unknown id -> ValueError. Resets ``turns`` to 0."""

    @abc.abstractmethod
    def step(self, action: str) -> StepResult:
        """Execute one action. Any str action, however malformed (see ``options.action_text``), gets the env's
        own observation (never an exception); a non-str action -> TypeError. Stepping after ``done`` -> RuntimeError. Stepping before ``reset`` -> RuntimeError."""

    def expert_action(self) -> str | None:
        """The oracle's / gold path's next action from the current state, or None where the env has none."""
        return None

    def close(self) -> None:
        """Release external resources (JVMs, files). Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_REGISTRY: dict[str, Callable[..., TextEnv]] = {}


def register(name: str) -> Callable[[Callable[..., TextEnv]], Callable[..., TextEnv]]:
    """Class/factory decorator: ``@register("household")``."""

    def deco(factory: Callable[..., TextEnv]) -> Callable[..., TextEnv]:
        if name in _REGISTRY:
            raise ValueError(f"environment {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def registered() -> list[str]:
    return sorted(_REGISTRY)


def make(name: str, **options: Any) -> TextEnv:
    """Create an environment by name. Adapters import lazily, so a missing optional package (scienceworld,
    alfworld...) only fails when that env is asked for, with a message that says what to install."""
    from gopd_fast.envs import _load_builtin  # registers the built-in envs on first use

    if not isinstance(name, str):
        raise TypeError(f"environment name must be a str, got {type(name).__name__}")
    _load_builtin(name)
    if name not in _REGISTRY:
        from gopd_fast.envs import _BUILTIN

        raise ValueError(f"unknown environment {name!r}; known: {', '.join(sorted(set(_REGISTRY) | set(_BUILTIN)))}")
    return _REGISTRY[name](**options)
