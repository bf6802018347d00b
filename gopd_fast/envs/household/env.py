"""HouseholdEnv: the embedded default environment behind ``envs.make("household")``."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from gopd_fast.envs.base import Reset, StepResult, TextEnv, register
from gopd_fast.envs.household import engine
from gopd_fast.envs.household.observe import OBSERVE_MODES, STATUS_MODES, status, world_map
from gopd_fast.envs.household.oracle import Oracle
from gopd_fast.envs.household.world import PRESETS, World, WorldConfig, generate
from gopd_fast.envs.options import (
    action_text,
    check_bool,
    check_choice,
    check_int,
    check_task_id,
    parse_index,
)

SPLITS = ("train", "eval")
PRESET_LIMITS = {"easy": (20, 15), "medium": (20, 15), "hard": (30, 24)}   # default (max_turns, max_solution)


def world_seed(seed: int, split: str, index: int, attempt: int) -> int:
    """A stable 64-bit seed per task (Python's hash() is salted per process, so it is not used)."""
    digest = hashlib.blake2b(f"household/{seed}/{split}/{index}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def required_doors(world: World) -> frozenset[int]:
    """Locked doors that every solution unlocks. The rooms form a tree and chutes land in the start region, so the
    only way into the rooms behind a door is through it: a door is required iff a goal item, a goal target or the
    key of a required door lies behind it (a fixpoint). tests/envs/test_household.py checks this against search."""
    locks: dict[int, frozenset[int]] = {world.start_room: frozenset()}
    frontier = [world.start_room]
    while frontier:
        room = frontier.pop()
        for d, other in world.exits[room]:
            if other not in locks:
                crossed = {d} if world.doors[d].color is not None else set()
                locks[other] = locks[room] | crossed
                frontier.append(other)
    room_of = world.container_room
    required: set[int] = set()
    for item, target in world.goals:
        required |= locks[room_of[world.start_loc[item]]] | locks[room_of[target]]
    while True:
        keys = [i for i, d in enumerate(world.key_door) if d in required]
        grown = required.union(*(locks[room_of[world.start_loc[i]]] for i in keys))
        if grown == required:
            return frozenset(required)
        required = grown


@register("household")
class HouseholdEnv(TextEnv):
    """Procedurally generated multi-room household tasks; see ``gopd_fast/envs/household/__init__.py``.

    Options: ``seed`` (which worlds the task ids map to), ``difficulty`` ("easy", "medium", "hard") and any
    ``WorldConfig`` field to override it (rooms, locked_doors, goals, distractors, closables, chutes,
    hand_capacity), ``max_turns`` (default 20; "hard": 30), ``num_train`` / ``num_eval`` (split sizes),
    ``max_solution`` (worlds whose oracle solution is longer are regenerated; default 15, "hard": 24, so the default
    turn limit leaves slack), ``report_distance`` (put ``expert_distance`` in every step's info; the reset's info
    always has it), ``observe`` ("room": the current room only, the default; "map": plus a map of the world in the
    first observation; "full": plus the state the oracle plans on in every observation; "full-target": "full" plus
    the room of each goal's target; see ``household/observe.py``). The worlds depend on the seed, the difficulty and
    the world options only, never on max_turns, so one task can be run at any turn limit.
    """

    name = "household"

    def __init__(
        self,
        seed: int = 0,
        difficulty: str = "medium",
        max_turns: int | None = None,
        num_train: int = 1000,
        num_eval: int = 200,
        max_solution: int | None = None,
        report_distance: bool = False,
        observe: str = "room",
        **world_options: Any,
    ) -> None:
        difficulty = check_choice("difficulty", difficulty, PRESETS)
        default_turns, default_solution = PRESET_LIMITS[difficulty]
        super().__init__(default_turns if max_turns is None else max_turns)
        unknown = set(world_options) - set(WorldConfig.__dataclass_fields__)
        if unknown:
            known = ["seed", "difficulty", "max_turns", "num_train", "num_eval", "max_solution", "report_distance",
                     "observe"]
            known += list(WorldConfig.__dataclass_fields__)
            raise TypeError(f"unknown household option(s) {sorted(unknown)}; known: {known}")
        check_int("seed", seed)
        check_int("num_train", num_train, low=1)
        check_int("num_eval", num_eval, low=1)
        self.max_solution = check_int("max_solution", default_solution if max_solution is None else max_solution,
                                      low=1)
        self.observe = check_choice("observe", observe, OBSERVE_MODES)
        self.report_distance = check_bool("report_distance", report_distance)
        self.seed = seed
        self.config = replace(PRESETS[difficulty], **world_options)
        self.split_sizes = {"train": num_train, "eval": num_eval}
        # task id -> (world, its caching oracle, the doors every solution must unlock)
        self._worlds: dict[str, tuple[World, Oracle, frozenset[int]]] = {}
        self.world: World | None = None
        self.task_id: str | None = None
        self.done = False

    # ------------------------------------------------------------------ tasks
    def tasks(self, split: str) -> list[str]:
        if split not in self.split_sizes:
            raise ValueError(f"unknown split {split!r}; household has {list(SPLITS)}")
        return [f"household/{split}/{i}" for i in range(self.split_sizes[split])]

    def parse_task_id(self, task_id: str) -> tuple[str, int]:
        """``"household/<split>/<index>"`` -> (split, index); anything else -> ValueError naming the id."""
        expected = f"'household/<split>/<index>' with split in {list(SPLITS)} and index < the split size " \
                   f"{self.split_sizes}"
        parts = check_task_id(task_id, "'household/train/3'").split("/")
        if len(parts) != 3 or parts[0] != "household" or parts[1] not in self.split_sizes:
            raise ValueError(f"unknown household task id {task_id!r}; expected {expected}")
        index = parse_index(parts[2], task_id, "household", expected)
        if index >= self.split_sizes[parts[1]]:
            raise ValueError(f"unknown household task id {task_id!r}: index {index} is past the split; "
                             f"expected {expected}")
        return parts[1], index

    def world_of(self, task_id: str) -> World:
        """The world of ``task_id`` (generated once, then cached)."""
        return self._load(task_id)[0]

    def _load(self, task_id: str) -> tuple[World, Oracle, frozenset[int]]:
        cached = self._worlds.get(task_id)
        if cached is not None:
            return cached
        split, index = self.parse_task_id(task_id)
        for attempt in range(1000):
            world = generate(world_seed(self.seed, split, index, attempt), self.config)
            oracle = Oracle(world)
            _, dist = oracle.query(engine.State.initial(world).key())
            if dist is not None and 1 <= dist <= self.max_solution:
                break
        else:  # pragma: no cover - only with absurd options
            raise ValueError(f"no world with an oracle solution of <= {self.max_solution} steps for {self.config}")
        if len(self._worlds) > 4096:
            self._worlds.clear()
        self._worlds[task_id] = loaded = (world, oracle, required_doors(world))
        return loaded

    # ---------------------------------------------------------------- episode
    def reset(self, task_id: str) -> Reset:
        self.world, self.oracle, self._required_doors = self._load(task_id)
        self.task_id = task_id
        self.state = engine.State.initial(self.world)
        self.turns = 0
        self.done = False
        self._ever_held: set[int] = set()
        self._unlocked: set[int] = set()
        self._admissible = engine.admissible(self.world, self.state)
        task = self.world.task_text
        observation = self._observed(f"{engine.describe_room(self.world, self.state)} Task: {task}")
        if self.observe == "map":
            observation = f"{observation} {world_map(self.world)}"
        info = {"task_id": task_id, "expert_distance": self.expert_distance()}   # cached by generation: free
        return Reset(observation, task, tuple(self._admissible), info)

    def step(self, action: str) -> StepResult:
        action = action_text(action)
        if self.world is None:
            raise RuntimeError("step() before reset(): call reset(task_id) first")
        if self.done:
            raise RuntimeError(f"step() after the episode of {self.task_id!r} is done; call reset() first")
        self.turns += 1
        world, state = self.world, self.state
        text = action if action in self._admissible else engine.normalize(action)
        op = self._admissible.get(text)
        info: dict[str, Any] = {}
        if op is None:
            observation = engine.refusal(world, state, text)
            info["invalid_action"] = True
        else:
            observation = engine.apply(world, state, op)
            if op[0] == engine.TAKE:
                self._ever_held.add(op[1])
            elif op[0] == engine.UNLOCK:
                self._unlocked.add(op[1])
            self._admissible = engine.admissible(world, state)
        success = engine.solved(world, state.loc)
        score = 100.0 if success else self._partial_score()
        self.done = success or self.turns >= self.max_turns
        if self.done and not success:
            info["truncated"] = True
        observation = self._observed(observation)
        if self.report_distance:   # a search per new off-path state: opt-in, it costs more than the step
            info["expert_distance"] = self.expert_distance()
        return StepResult(observation, score, self.done, success, tuple(self._admissible), info)

    def _observed(self, text: str) -> str:
        if self.observe not in STATUS_MODES:
            return text
        s = self.state
        return f"{text} {status(self.world, s.room, s.loc, s.opened, s.locked, self.observe == 'full-target')}"

    def _partial_score(self) -> float:
        """Sub-goals, equally weighted: every locked door that every solution must open unlocked, every goal item
        picked up, every goal item delivered (the last one is current state: taking a delivered item out again
        loses its credit). 100 exactly when solved."""
        world, loc = self.world, self.state.loc
        total = len(self._required_doors) + 2 * len(world.goals)
        done = len(self._unlocked & self._required_doors)
        for i, c in world.goals:
            done += (i in self._ever_held or loc[i] == c) + (loc[i] == c)
        return round(100.0 * done / total, 2)

    # ----------------------------------------------------------------- oracle
    def expert_action(self) -> str | None:
        """The next action of a shortest plan from the current state (any state, not only the expert's path);
        None when solved or before reset."""
        if self.world is None:
            return None
        op, _ = self.oracle.query(self.state.key())
        return None if op is None else engine.op_text(self.world, op)

    def expert_distance(self) -> int | None:
        """Oracle steps to solve from the current state (0 when solved)."""
        if self.world is None:
            raise RuntimeError("expert_distance() before reset()")
        return self.oracle.query(self.state.key())[1]

    # ------------------------------------------------------ state snapshots
    def snapshot(self) -> tuple:
        """An opaque copy of the episode state; ``restore`` it to branch (e.g. to measure a mistake's cost)."""
        if self.world is None:
            raise RuntimeError("snapshot() before reset()")
        return (self.state.key(), self.turns, self.done, frozenset(self._ever_held), frozenset(self._unlocked))

    def restore(self, snap: tuple) -> None:
        key, self.turns, self.done, held, unlocked = snap
        self.state = engine.State.from_key(key)
        self._ever_held, self._unlocked = set(held), set(unlocked)
        self._admissible = engine.admissible(self.world, self.state)
