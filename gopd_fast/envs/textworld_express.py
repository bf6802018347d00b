"""TextWorldExpress (Jansen & Côté, 2022) through the ``textworld-express`` package's Java simulator.

Task ids are ``"<game>:<seed>"``, e.g. ``"coin:20003"``. The package fixes disjoint seed ranges per fold
(train 0-999, dev 10000-10999, test 20000-20999 in 1.1.0); ``"eval"`` is the test fold. Score is the game's
normalised 0-1 score x 100 (clipped at 0); success is the game's ``tasksuccess`` flag.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from typing import Any

from gopd_fast.envs.base import Reset, StepResult, register
from gopd_fast.envs.gold_path import GoldPath
from gopd_fast.envs.jvm import JavaGoldPathEnv, JavaSimulator
from gopd_fast.envs.options import check_int, check_seconds, check_str_list, check_task_id, parse_index

GAME_NAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
SPLITS = ("train", "dev", "test", "eval")
_FOLD_OF_SPLIT = {"train": "train", "dev": "dev", "test": "test", "eval": "test"}
_SEEDS: dict[tuple[str, str], dict[str, list[int]]] = {}  # (game, params) -> fold -> seeds; fixed by the jar
_SEEDS_LOCK = threading.Lock()


def _launch() -> Any:
    try:
        from textworld_express import TextWorldExpressEnv
    except ImportError as exc:  # pragma: no cover - the cpu extra installs it
        raise ImportError("the 'textworld-express' env needs `pip install textworld-express==1.1.0` and Java") from exc
    return TextWorldExpressEnv(envStepLimit=10**9)  # the turn limit is ours (max_turns), not the wrapper's


@register("textworld-express")
class TextWorldExpress(JavaGoldPathEnv):
    """TextWorldExpress behind the ``TextEnv`` protocol.

    Args:
        games: games listed by ``tasks()`` (default ``("cookingworld",)``); any of ``GAME_NAMES``.
        game_params: the package's generation parameters per game, e.g. ``{"coin": "numLocations=5"}``
            (comma-separated ``key=value``; ``""`` uses the game's defaults).
        max_turns: turn limit of an episode.
        max_seeds_per_game: keep at most this many seeds per game and split (a ``seed``-ed sample in ascending
            order); None keeps all 1000.
        seed: seed of that sample.
        step_timeout_s: watchdog limit of one simulator call.
    """

    name = "textworld-express"

    def __init__(
        self,
        games: Sequence[str] = ("cookingworld",),
        game_params: dict[str, str] | None = None,
        max_turns: int = 50,
        max_seeds_per_game: int | None = None,
        seed: int = 0,
        step_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(max_turns)
        games = check_str_list("games", games)
        unknown = [g for g in games if g not in GAME_NAMES]
        if unknown or not games:
            raise ValueError(f"unknown TextWorldExpress games {unknown or list(games)}; known: {list(GAME_NAMES)}")
        if game_params is not None and not isinstance(game_params, dict):
            raise TypeError(f"option game_params must be a dict of game name -> parameter str or None, "
                            f"got {game_params!r}")
        game_params = dict(game_params or {})
        bad = [g for g in game_params if g not in GAME_NAMES]
        if bad:
            raise ValueError(f"game_params has unknown games {bad}; known: {list(GAME_NAMES)}")
        if not all(isinstance(p, str) for p in game_params.values()):
            raise TypeError("option game_params values must be strs like 'numLocations=5,includeDoors=1'")
        odd = {g: p for g, p in game_params.items() if not (p.isascii() and p.isprintable())}
        if odd:   # they go to the JVM as they are: only printable ASCII, like every parameter the jar knows
            raise ValueError(f"option game_params values must be printable ASCII like 'numLocations=5', got {odd}")
        self.games = tuple(games)
        self.game_params = {g: game_params.get(g, "") for g in GAME_NAMES}
        self.max_seeds_per_game = check_int("max_seeds_per_game", max_seeds_per_game, low=1, optional=True)
        self.seed = check_int("seed", seed)
        check_seconds("step_timeout_s", step_timeout_s)
        self._sim = JavaSimulator(_launch, name="textworld-express", call_timeout_s=step_timeout_s)
        self._gold = GoldPath()
        self._valid: frozenset[str] = frozenset()  # admissible actions of the current state
        self._started = False
        self._done = True

    # ---- tasks ---------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        """``"<game>:<seed>"`` ids of ``split``. The first listing of a game loads it in the JVM (once per process
        and game parameters), which ends an episode in progress; list splits before starting episodes."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; TextWorldExpress splits: {', '.join(SPLITS)}")
        fold = _FOLD_OF_SPLIT[split]
        ids: list[str] = []
        for game in self.games:
            seeds = self._seeds(game)[fold]
            k = self.max_seeds_per_game
            if k is not None and k < len(seeds):
                seeds = sorted(random.Random(f"{self.seed}:{game}:{fold}").sample(seeds, k))
            ids.extend(f"{game}:{s}" for s in seeds)
        return ids

    def _seeds(self, game: str) -> dict[str, list[int]]:
        key = (game, self.game_params[game])
        with _SEEDS_LOCK:
            if key not in _SEEDS:
                def fetch(h: Any) -> dict[str, list[int]]:
                    self._load(h, game)
                    return {"train": h.getValidSeedsTrain(), "dev": h.getValidSeedsDev(),
                            "test": h.getValidSeedsTest()}

                _SEEDS[key] = self._sim.call(fetch, restart=True)
                self._done = True  # loading another game ends any episode in progress
            return _SEEDS[key]

    def _load(self, h: Any, game: str) -> None:
        message = h.server.load(game, self.game_params[game])
        if message:  # the jar answers an unknown parameter with an error string instead of raising
            raise ValueError(f"TextWorldExpress rejected game_params {self.game_params[game]!r} "
                             f"for {game!r}: {message.strip()}")

    def parse_task_id(self, task_id: str) -> tuple[str, int, str]:
        expected = "'<game>:<seed>' such as 'coin:20003'"
        game, sep, text = check_task_id(task_id, "'coin:20003'").rpartition(":")
        if not sep:
            raise ValueError(f"TextWorldExpress task_id must look like {expected}, got {task_id!r}")
        seed = parse_index(text, task_id, "TextWorldExpress", expected)
        if game not in GAME_NAMES:
            raise ValueError(f"unknown TextWorldExpress game {game!r} in {task_id!r}; known: {list(GAME_NAMES)}")
        for fold, seeds in self._seeds(game).items():
            if seed in seeds:
                return game, seed, fold
        raise ValueError(f"seed {seed} of {task_id!r} is in no fold of {game!r} "
                         "(train 0-999, dev 10000-10999, test 20000-20999)")

    # ---- episode -------------------------------------------------------------------------------------------
    def reset(self, task_id: str) -> Reset:
        game, seed, fold = self.parse_task_id(task_id)

        def start(h: Any) -> tuple[dict[str, Any], list[str]]:
            self._load(h, game)
            _, infos = h.reset(seed=seed, gameFold=fold, gameName=game, gameParams=self.game_params[game],
                               generateGoldPath=True)
            return infos, h.getGoldActionSequence()

        infos, gold = self._sim.call(start, restart=True)
        self._gold = GoldPath(gold)
        self._valid = frozenset(infos["validActions"])
        self.turns = 0
        self._started, self._done = True, False
        info = {"game": game, "seed": seed, "fold": fold}
        return Reset(infos["observation"], infos["taskDescription"], tuple(sorted(infos["validActions"])), info)

    def step(self, action: str) -> StepResult:
        command = self._command(action)
        self._check_steppable()
        observation, _, _, infos = self._sim.call(lambda h: h.step(command))
        self._gold.observe(command)
        self.turns += 1
        success = bool(infos["tasksuccess"])
        failed = bool(infos["taskfailure"])
        score = 100.0 * min(max(float(infos["score"]), 0.0), 1.0)
        truncated = not (success or failed) and self.turns >= self.max_turns
        self._done = success or failed or truncated
        admissible = tuple(sorted(infos["validActions"]))
        result_info: dict[str, Any] = {"raw_score": infos["scoreRaw"]}
        if failed:
            result_info["failed"] = True
        if truncated:
            result_info["truncated"] = True
        if command not in self._valid and command != "help":
            result_info["invalid_action"] = True  # the game answers it with its own "Unknown action" text
        self._valid = frozenset(admissible)
        return StepResult(observation, score, self._done, success, admissible, result_info)
