"""ScienceWorld (Wang et al., 2022) through the ``scienceworld`` package's Java simulator.

Task ids are ``"<task-name>:<variation>"``, e.g. ``"boil:21"``. Splits are the package's own variation splits
(``getVariationsTrain/Dev/Test``); ``"eval"`` is the test split, the protocol of this line of work. Score is the
simulator's 0-100 score; success is a score of 100. See docs/envs.md for every difference from the original API.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

from gopd_fast.envs.base import Reset, StepResult, register
from gopd_fast.envs.gold_path import GoldPath
from gopd_fast.envs.jvm import JavaGoldPathEnv, JavaSimulator
from gopd_fast.envs.options import (
    check_bool,
    check_int,
    check_seconds,
    check_str,
    check_str_list,
    check_task_id,
    parse_index,
)

try:
    import scienceworld  # noqa: F401  (fail at make() time, with the fix, when the package is missing)
except ImportError as exc:  # pragma: no cover - the cpu extra installs it
    raise ImportError("the 'scienceworld' env needs `pip install scienceworld==1.2.3` and Java 17") from exc

SPLITS = ("train", "dev", "test", "eval")
# The jar's getPossibleSimplifications() plus the "easy" preset (all of them); checked against the jar in tests.
SIMPLIFICATIONS = ("easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                   "noElectricalAction")
INVALID_ACTION_PREFIX = "No known action matches that input."

# task name -> {"train": [...], "dev": [...], "test": [...]}; the split lists are fixed by the jar, so one
# lookup per task and process is enough.
_VARIATIONS: dict[str, dict[str, list[int]]] = {}
_VARIATIONS_LOCK = threading.Lock()


def _launch() -> Any:
    from scienceworld import ScienceWorldEnv

    return ScienceWorldEnv("", envStepLimit=10**9)  # the turn limit is ours (max_turns), not the wrapper's


def _known_task_names() -> list[str]:
    """The 30 task names, from the package's task table (the same list the jar's getTaskNames() returns)."""
    from scienceworld.constants import ID2TASK
    from scienceworld.utils import infer_task

    return sorted(infer_task(name) for name in ID2TASK.values())


@register("scienceworld")
class ScienceWorld(JavaGoldPathEnv):
    """ScienceWorld behind the ``TextEnv`` protocol.

    Args:
        task_names: restrict ``tasks()`` to these task names (default: all 30).
        simplification: the package's simplification string, e.g. ``"easy"`` or ``"openDoors,teleportAction"``;
            ``""`` (default) is the unsimplified benchmark.
        max_turns: turn limit of an episode.
        max_variations_per_task: keep at most this many variations per task in each split (a ``seed``-ed
            sample, listed in ascending order); None keeps all.
        seed: seed of that sample.
        gold_path: ask the simulator for the gold action sequence at every reset (needed by ``expert_action``).
        admissible_actions: return the simulator's valid action-object combinations with every observation
            (thousands of strings; costs tens of ms per step).
        step_timeout_s: watchdog limit of one simulator call (loading with a gold path included).
    """

    name = "scienceworld"

    def __init__(
        self,
        task_names: Sequence[str] | None = None,
        simplification: str = "",
        max_turns: int = 30,
        max_variations_per_task: int | None = None,
        seed: int = 0,
        gold_path: bool = True,
        admissible_actions: bool = False,
        step_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(max_turns)
        task_names = check_str_list("task_names", task_names, optional=True)
        self.simplification = check_str("simplification", simplification, "a str such as 'easy'")
        self.max_variations_per_task = check_int("max_variations_per_task", max_variations_per_task, low=1,
                                                 optional=True)
        self.seed = check_int("seed", seed)
        self.gold_path = check_bool("gold_path", gold_path)
        self.with_admissible = check_bool("admissible_actions", admissible_actions)
        check_seconds("step_timeout_s", step_timeout_s)
        # The JVM starts on first use (tasks() or reset()), so constructing and validating options is free.
        self._sim = JavaSimulator(_launch, name="scienceworld", call_timeout_s=step_timeout_s)
        self._all_task_names = _known_task_names()
        if task_names is None:
            self.task_names = list(self._all_task_names)
        else:
            unknown = [t for t in task_names if t not in self._all_task_names]
            if unknown:
                raise ValueError(f"unknown ScienceWorld task names {unknown}; known: {self._all_task_names}")
            self.task_names = list(task_names)
        self._validate_simplification()
        self._gold = GoldPath()
        self._done = True
        self._started = False
        self._task_name = ""
        self._variation = -1

    # ---- tasks ---------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        """``"<task>:<variation>"`` ids of ``split``. The first listing of a task loads it in the JVM (once per
        process), which ends an episode in progress; list splits before starting episodes."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; ScienceWorld splits: {', '.join(SPLITS)}")
        which = "test" if split == "eval" else split
        ids: list[str] = []
        for task in self.task_names:
            variations = self._variations(task)[which]
            k = self.max_variations_per_task
            if k is not None and k < len(variations):
                variations = sorted(random.Random(f"{self.seed}:{task}:{which}").sample(variations, k))
            ids.extend(f"{task}:{v}" for v in variations)
        return ids

    def _variations(self, task: str) -> dict[str, list[int]]:
        with _VARIATIONS_LOCK:
            if task not in _VARIATIONS:
                def fetch(h: Any) -> dict[str, list[int]]:
                    h.load(task, 0, "")
                    return {
                        "train": list(h.server.getVariationsTrain()),
                        "dev": list(h.server.getVariationsDev()),
                        "test": list(h.server.getVariationsTest()),
                    }

                _VARIATIONS[task] = self._sim.call(fetch, restart=True)
                self._done = True  # loading another task ends any episode in progress
            return _VARIATIONS[task]

    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        expected = "'<task-name>:<variation>' such as 'boil:21'"
        name, sep, var = check_task_id(task_id, "'boil:21'").rpartition(":")
        if not sep:
            raise ValueError(f"ScienceWorld task_id must look like {expected}, got {task_id!r}")
        variation = parse_index(var, task_id, "ScienceWorld", expected)
        if name not in self._all_task_names:
            raise ValueError(f"unknown ScienceWorld task {name!r} in task_id {task_id!r}")
        n = sum(len(v) for v in self._variations(name).values())
        if variation >= n:
            raise ValueError(f"task {name!r} has variations 0..{n - 1}, got {variation} in {task_id!r}")
        return name, variation

    def _validate_simplification(self) -> None:
        bad = [s for s in self.simplification.split(",") if s and s not in SIMPLIFICATIONS]
        if bad:
            raise ValueError(f"unknown ScienceWorld simplification(s) {bad}; known: {list(SIMPLIFICATIONS)} "
                             "(comma-separated)")

    # ---- episode -------------------------------------------------------------------------------------------
    def reset(self, task_id: str) -> Reset:
        task_name, variation = self.parse_task_id(task_id)

        def start(h: Any) -> tuple[str, str, list[str], tuple[str, ...] | None]:
            # The gold path is read from this very load: mendelian-genetics tasks draw new random parents at
            # every load, so a gold path from another load (or a reset() after it) would not fit this world.
            h.load(task_name, variation, self.simplification, generateGoldPath=self.gold_path)
            gold = list(h.server.getGoldActionSequence()) if self.gold_path else []
            observation = h.server.step("look around")  # what the package's own reset() returns
            return observation, h.server.getTaskDescription(), gold, self._admissible(h)

        observation, task, gold, admissible = self._sim.call(start, restart=True)
        self._gold = GoldPath(gold)
        self._task_name, self._variation = task_name, variation
        self.turns = 0
        self._done = False
        self._started = True
        info = {"task_name": task_name, "variation": variation, "simplification": self.simplification}
        return Reset(observation=observation, task=task, admissible_actions=admissible, info=info)

    def step(self, action: str) -> StepResult:
        command = self._command(action)
        self._check_steppable()

        def act(h: Any) -> tuple[str, float, bool, tuple[str, ...] | None]:
            observation = h.server.step(command)
            return observation, float(h.server.getScore()), bool(h.server.getCompleted()), self._admissible(h)

        observation, raw, completed, admissible = self._sim.call(act)
        self._gold.observe(command)
        self.turns += 1
        raw_score = round(100 * raw)
        failed = raw_score < 0  # ScienceWorld reports -100 when the task can no longer be solved
        score = 0.0 if failed else float(min(max(raw_score, 0), 100))
        success = raw_score >= 100
        truncated = not (success or failed or completed) and self.turns >= self.max_turns
        self._done = success or failed or completed or truncated
        info: dict[str, Any] = {"raw_score": raw_score}
        if failed:
            info["failed"] = True
        if truncated:
            info["truncated"] = True
        if observation.startswith(INVALID_ACTION_PREFIX):
            info["invalid_action"] = True
        return StepResult(observation, score, self._done, success, admissible, info)

    def _admissible(self, h: Any) -> tuple[str, ...] | None:
        if not self.with_admissible:
            return None
        return tuple(sorted(h.server.getValidActionObjectCombinations()))
