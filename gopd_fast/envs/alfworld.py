"""ALFWorld (Shridhar et al., 2021), text engine: the ``alfworld`` package's TextWorld/PDDL games, played in-process.

The game data (about 2 GB of ``json_2.1.1/<split>/<task>/<trial>/{traj_data.json, game.tw-pddl}``) is not shipped
with the package and cannot be downloaded at run time; point ``data_dir`` (default ``$ALFWORLD_DATA``, then
``~/.cache/alfworld``) at a copy made by ``alfworld-download``. Games are selected with the package's own
``AlfredTWEnv.collect_game_files`` (same filters: task types, solvable, no movable/sliced), then sorted.

Task ids are game directories relative to ``data_dir``. ALFWorld has no partial score: 100 on success, else 0.
"""
from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gopd_fast.envs.base import Reset, StepResult, TextEnv, register
from gopd_fast.envs.options import action_text, check_choice, check_path, check_task_id

# split name -> (AlfredTWEnv train_eval, folder under json_2.1.1)
SPLITS = {
    "train": ("train", "train"),
    "eval_in_distribution": ("eval_in_distribution", "valid_seen"),
    "eval_out_of_distribution": ("eval_out_of_distribution", "valid_unseen"),  # the 134 unseen games
    "eval": ("eval_out_of_distribution", "valid_unseen"),
}
TASK_TYPES = {1: "pick_and_place_simple", 2: "look_at_obj_in_light", 3: "pick_clean_then_place_in_recep",
              4: "pick_heat_then_place_in_recep", 5: "pick_cool_then_place_in_recep", 6: "pick_two_obj_and_place"}
EXPERTS = ("planner", "handcoded", "none")
NOTHING_HAPPENS = "Nothing happens."
_HOW_TO_GET_DATA = (
    "ALFWorld's game data is not bundled with the package and cannot be downloaded here. On a machine with "
    "internet access run `pip install alfworld==0.4.2 && alfworld-download` (it writes ~/.cache/alfworld, or "
    "$ALFWORLD_DATA if set), copy that folder to this machine, and pass data_dir=<folder> or set ALFWORLD_DATA."
)


def default_data_dir() -> Path:
    return Path(os.environ.get("ALFWORLD_DATA") or Path.home() / ".cache" / "alfworld")


@register("alfworld")
class ALFWorld(TextEnv):
    """ALFWorld's text games behind the ``TextEnv`` protocol.

    Args:
        data_dir: folder holding ``json_2.1.1/{train,valid_seen,valid_unseen}`` (default: ``default_data_dir()``).
        max_turns: turn limit (the line of work uses 30 on the 134 unseen games).
        task_types: ALFWorld task-type ids 1-6 to include (default all six).
        expert: ``"planner"`` (Fast Downward replans from the current state: an oracle from any state),
            ``"handcoded"`` (ALFWorld's rule-based expert, which follows the agent's actual trajectory) or
            ``"none"``.
    """

    name = "alfworld"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        max_turns: int = 30,
        task_types: Sequence[int] = (1, 2, 3, 4, 5, 6),
        expert: str = "planner",
    ) -> None:
        super().__init__(max_turns)
        check_path("data_dir", data_dir, optional=True)
        if isinstance(task_types, (str, bytes)) or not isinstance(task_types, Sequence) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in task_types
        ):
            raise TypeError(f"option task_types must be a list of ints in {sorted(TASK_TYPES)}, got {task_types!r}")
        check_choice("expert", expert, EXPERTS)
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        if not (self.data_dir / "json_2.1.1").is_dir():
            raise FileNotFoundError(f"no ALFWorld game data at {self.data_dir} (expected {self.data_dir}/json_2.1.1/"
                                    f"{{train,valid_seen,valid_unseen}}). {_HOW_TO_GET_DATA}")
        bad = [t for t in task_types if t not in TASK_TYPES]
        if bad or not task_types:
            raise ValueError(f"option task_types must be a non-empty subset of {sorted(TASK_TYPES)}, "
                             f"got {list(task_types)}")
        self.task_types = tuple(task_types)
        self.expert = expert
        self._split_cache: dict[str, list[str]] = {}
        self._env: Any = None       # the wrapped textworld PddlEnv of the current episode
        self._state: Any = None     # its last GameState
        self._handcoded: Any = None
        self._handcoded_next: str | None = None
        self._plan_cache: tuple[int, str | None] | None = None  # (turn, action) of the last planner call
        self._started = False
        self._done = True

    # ---- tasks ---------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; ALFWorld splits: {', '.join(SPLITS)}")
        if split not in self._split_cache:
            self._split_cache[split] = self._collect(SPLITS[split][0])
        return list(self._split_cache[split])

    def _collect(self, train_eval: str) -> list[str]:
        from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

        json_root = self.data_dir / "json_2.1.1"
        config = {
            "env": {"goal_desc_human_anns_prob": 0.0, "task_types": list(self.task_types)},
            "dataset": {"data_path": str(json_root / "train"), "eval_id_data_path": str(json_root / "valid_seen"),
                        "eval_ood_data_path": str(json_root / "valid_unseen"),
                        "num_train_games": -1, "num_eval_games": -1},
        }
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            collector = AlfredTWEnv(config, train_eval=train_eval)  # prints counts and a tqdm bar
        # os.walk order depends on the filesystem; sort for ids that are the same on every machine.
        return sorted(str(Path(p).parent.relative_to(self.data_dir)) for p in collector.game_files)

    def _game_dir(self, task_id: str) -> Path:
        check_task_id(task_id, "a game folder relative to data_dir")
        if not task_id or not task_id.isprintable() or "\x00" in task_id:
            raise ValueError(f"unknown ALFWorld task {task_id!r}: expected a game folder relative to data_dir")
        game_dir = (self.data_dir / task_id).resolve()
        if self.data_dir.resolve() not in game_dir.parents or not (game_dir / "game.tw-pddl").is_file():
            raise ValueError(f"unknown ALFWorld task {task_id!r}: no {task_id}/game.tw-pddl under {self.data_dir}")
        return game_dir

    # ---- episode -------------------------------------------------------------------------------------------
    def reset(self, task_id: str) -> Reset:
        game_file = str(self._game_dir(task_id) / "game.tw-pddl")
        env = self._engine()
        env.load(game_file)
        self._state = env.reset()
        if self.expert == "handcoded":
            from alfworld.agents.expert import HandCodedTWAgent

            self._handcoded = HandCodedTWAgent(max_steps=200)
            self._handcoded.reset(game_file)
            self._handcoded.observe(self._state["feedback"])
        self._plan_cache = None
        self.turns = 0
        self._started, self._done = True, False
        observation = self._state["feedback"]
        task = observation.rsplit("Your task is to: ", 1)[-1].strip().rstrip(".")
        return Reset(observation, task, tuple(self._state["admissible_commands"]), {"gamefile": game_file})

    def _engine(self) -> Any:
        """The textworld engine, built once: every PddlEnv loads its own copy of Fast Downward's shared library,
        which is never unloaded, so one engine per env instance is reused across episodes."""
        if self._env is None:
            import textworld
            from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
            from textworld.envs import PddlEnv

            # The wrapper stack of AlfredTWEnv.init_env (demangled names such as "apple 1", no shuffling) minus
            # the gym batching; the expert is computed on demand in expert_action() instead of at every step.
            infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=self.expert == "handcoded",
                                       extras=["gamefile"])
            self._env = AlfredInfos(AlfredDemangler(PddlEnv(infos), shuffle=False))
        return self._env

    def step(self, action: str) -> StepResult:
        action = action_text(action)
        if not self._started:
            raise RuntimeError("step() called before reset()")
        if self._done:
            raise RuntimeError("step() called after the episode is done; call reset() first")
        command = " ".join(action.split())
        admissible_before = self._state["admissible_commands"]
        self._state, _, _ = self._env.step(command)  # an inadmissible command answers "Nothing happens."
        self.turns += 1
        if self._handcoded is not None:
            try:
                self._handcoded_next = self._handcoded.act(self._state, 0, self._state["won"], command)
            except Exception:  # noqa: BLE001 - a heuristic expert that gives up (timeout, unmodelled state)
                self._handcoded_next = None  # must not end the agent's episode: it just has no advice

        success = bool(self._state["won"])
        truncated = not success and self.turns >= self.max_turns
        self._done = success or truncated
        info: dict[str, Any] = {}
        if command not in admissible_before:
            info["invalid_action"] = True
        if truncated:
            info["truncated"] = True
        return StepResult(self._state["feedback"], 100.0 if success else 0.0, self._done, success,
                          tuple(self._state["admissible_commands"]), info)

    def expert_action(self) -> str | None:
        """Planner: the first action of a fresh Fast Downward plan from the current state (an oracle from any
        state). Handcoded: ALFWorld's rule-based expert's next action, None when it is not admissible.
        None after the episode is done or with ``expert="none"``."""
        if not self._started or self._done or self.expert == "none":
            return None
        admissible = self._state["admissible_commands"]
        if self.expert == "handcoded":
            action = self._handcoded_next if self.turns else "look"  # AlfredExpert starts with "look" as well
            return action if action in admissible else None
        if self._plan_cache is None or self._plan_cache[0] != self.turns:
            pddl = _unwrap(self._env)
            # The same call PddlEnv makes for request_infos.policy_commands, with the demangled names.
            plan = pddl._pddl_state.replan(pddl._entity_infos)
            self._plan_cache = (self.turns, plan[0] if plan else None)
        return self._plan_cache[1]

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._done = None, True


def _unwrap(env: Any) -> Any:
    while hasattr(env, "_wrapped_env") and env._wrapped_env is not None:
        env = env._wrapped_env
    return env
