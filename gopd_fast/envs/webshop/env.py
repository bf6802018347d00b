"""WebShop (Yao et al., 2022) as an in-process text environment over the official data files.

Actions are the original text protocol: ``search[keywords]`` and ``click[button text]`` (case-insensitive).
An action that does not parse, or a click on something not on the page, leaves the page unchanged, as in the
original text env (here flagged with ``info["invalid_action"]``). ``click[buy now]`` ends the episode with
Score = reward x 100; success means reward 1.

Task ids are ``"fixed_<goal index>"``, the original web app's session ids, indexing the goal list in the
original order (built per product, shuffled with seed 233).
"""
from __future__ import annotations

import os
import random
import re
import threading
from pathlib import Path
from typing import Any

from gopd_fast.envs.base import Reset, StepResult, TextEnv, register
from gopd_fast.envs.options import (
    action_text,
    check_choice,
    check_int,
    check_path,
    check_task_id,
    parse_index,
)
from gopd_fast.envs.webshop.data import Goal, Product, load_goals, load_products, product_prices
from gopd_fast.envs.webshop.pages import (
    BACK_TO_SEARCH,
    BUY_NOW,
    NEXT_PAGE,
    PREV_PAGE,
    SUB_PAGES,
    Session,
    clickables,
    render,
    results_window,
)
from gopd_fast.envs.webshop.reward import reward, token_set_ratio
from gopd_fast.envs.webshop.search import ProductSearch

EVAL_SESSIONS = range(4096, 4196)  # the validation sessions of this line of work (docs/algorithm.md §5)
_ACTION = re.compile(r"(.+)\[(.+)\]")  # the original parse_action pattern
_PRICE_CLAUSE = re.compile(r", and price lower than [\d.]+ dollars$")


def split_indices(n_goals: int) -> dict[str, list[int]]:
    """Goal indices per split: the original test (0-499) and validation (500-1499) ranges, "eval" = sessions
    4096-4195, "train" = every other index from 1500 on. Indices past the catalogue's goals are dropped."""
    eval_ids = [i for i in EVAL_SESSIONS if i < n_goals]
    held = set(eval_ids)
    return {
        "train": [i for i in range(1500, n_goals) if i not in held],
        "validation": list(range(500, min(1500, n_goals))),
        "test": list(range(min(500, n_goals))),
        "eval": eval_ids,
    }


class Catalogue:
    """Products, fixed prices, goals and the search index of one data folder (shared by envs in a process)."""

    def __init__(self, data_dir: Path, num_products: int | None, human_goals: bool, seed: int) -> None:
        rng = random.Random(seed)  # the original draws prices and price bounds from the unseeded global RNG
        product_list = load_products(data_dir, num_products)
        self.products: dict[str, Product] = {p.asin: p for p in product_list}
        self.prices = product_prices(product_list, rng)
        self.goals: list[Goal] = load_goals(data_dir, product_list, self.prices, rng, human=human_goals)
        self.search = ProductSearch(product_list)
        self.splits = split_indices(len(self.goals))


_CATALOGUES: dict[tuple[Any, ...], Catalogue] = {}
_CATALOGUES_LOCK = threading.Lock()


def default_data_dir() -> Path:
    return Path(os.environ.get("WEBSHOP_DATA") or Path.home() / ".cache" / "webshop" / "data")


@register("webshop")
class WebShop(TextEnv):
    """WebShop behind the ``TextEnv`` protocol.

    Args:
        data_dir: folder with the official ``items_shuffle*.json``, ``items_ins_v2*.json``,
            ``items_human_ins.json`` and optionally ``reviews.json`` (default ``$WEBSHOP_DATA``).
        goals: ``"human"`` (the 12,087 human instructions; the benchmark) or ``"synthetic"``.
        num_products: use only the first N products of the (pre-shuffled) catalogue, as the original does.
        max_turns: turn limit (15 in this line of work).
        seed: seed of the product prices sampled from price ranges and of the goals' price bounds.
    """

    name = "webshop"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        goals: str = "human",
        num_products: int | None = None,
        max_turns: int = 15,
        seed: int = 0,
    ) -> None:
        super().__init__(max_turns)
        check_choice("goals", goals, ("human", "synthetic"))
        check_int("num_products", num_products, low=1, optional=True)
        check_int("seed", seed)
        check_path("data_dir", data_dir, optional=True)
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"no WebShop data folder at {self.data_dir}. Get the official files (items_shuffle.json, "
                "items_ins_v2.json, items_human_ins.json, reviews.json) with the princeton-nlp/WebShop "
                "repository's setup.sh on a machine with internet access, copy its data/ folder here, and pass "
                "data_dir=<folder> or set WEBSHOP_DATA.")
        key = (str(self.data_dir.resolve()), num_products, goals == "human", seed)
        with _CATALOGUES_LOCK:
            if key not in _CATALOGUES:
                _CATALOGUES[key] = Catalogue(self.data_dir, num_products, goals == "human", seed)
        self.catalogue = _CATALOGUES[key]
        self.session: Session | None = None
        self._done = True
        self._expert_search: dict[str, list[str]] = {}
        self._last_reward_info: Any = None

    # ---- tasks ---------------------------------------------------------------------------------------------
    def tasks(self, split: str) -> list[str]:
        if split not in self.catalogue.splits:
            raise ValueError(f"unknown split {split!r}; WebShop splits: {', '.join(self.catalogue.splits)}")
        return [f"fixed_{i}" for i in self.catalogue.splits[split]]

    def _goal_index(self, task_id: str) -> int:
        expected = "'fixed_<goal index>' such as 'fixed_4096'"
        prefix, sep, text = check_task_id(task_id, "'fixed_4096'").partition("_")
        if prefix != "fixed" or not sep:
            raise ValueError(f"WebShop task_id must look like {expected}, got {task_id!r}")
        index = parse_index(text, task_id, "WebShop", expected)
        if index >= len(self.catalogue.goals):
            raise ValueError(f"{task_id!r}: this catalogue has goals 0..{len(self.catalogue.goals) - 1}")
        return index

    # ---- episode -------------------------------------------------------------------------------------------
    def reset(self, task_id: str) -> Reset:
        goal = self.catalogue.goals[self._goal_index(task_id)]
        self.session = Session(goal=goal)
        self.turns = 0
        self._done = False
        return Reset(self._observation(), goal.instruction_text, self._admissible(),
                     {"has_search_bar": True, "goal_asin": goal.asin})

    def step(self, action: str) -> StepResult:
        action = action_text(action)   # a str such as 'search[red shoes]' or 'click[buy now]'
        if self.session is None:
            raise RuntimeError("step() called before reset()")
        if self._done:
            raise RuntimeError("step() called after the episode is done; call reset() first")
        s = self.session
        name, arg = _parse(action)
        valid = True
        if name == "search" and arg:
            self._search(arg.split(" "))
        elif name == "click" and arg is not None and arg != "search" and \
                arg in clickables(s, self.catalogue.products):
            self._click(arg)
        else:
            valid = False
        self.turns += 1
        s = self.session  # "back to search" starts a fresh page state
        bought = s.page == "done"
        score = 100.0 * s.reward if bought else 0.0  # type: ignore[operator]
        success = bought and s.reward is not None and s.reward >= 1.0 - 1e-9
        truncated = not bought and self.turns >= self.max_turns
        self._done = bought or truncated
        info: dict[str, Any] = {"page": s.page, "has_search_bar": s.page == "search"}
        if not valid:
            info["invalid_action"] = True
        if truncated:
            info["truncated"] = True
        if bought:
            info["reward_info"] = self._last_reward_info
        return StepResult(self._observation(), score, self._done, success, self._admissible(), info)

    def _search(self, keywords: list[str]) -> None:
        s = self.session
        assert s is not None
        s.keywords = keywords
        s.results = self.catalogue.search.search(" ".join(keywords))
        s.page, s.page_num, s.asin, s.options, s.sub_page = "results", 1, None, {}, None

    def _click(self, target: str) -> None:
        s = self.session
        assert s is not None
        if target == BUY_NOW.lower():
            product = self.catalogue.products[s.asin]  # type: ignore[index]
            info = reward(product, s.goal, self.catalogue.prices[product.asin], s.options)
            s.page, s.reward, self._last_reward_info = "done", info.reward, info
        elif target == BACK_TO_SEARCH.lower():
            self.session = Session(goal=s.goal)
        elif target == NEXT_PAGE.lower():
            s.page_num += 1
        elif target == PREV_PAGE.lower():
            if s.page == "results":
                s.page_num -= 1
            elif s.page == "sub":
                s.page, s.sub_page = "item", None
            else:  # item page -> the results page it came from (the original re-renders it, options reset)
                s.page, s.asin, s.options = "results", None, {}
        elif target in (p.lower() for p in SUB_PAGES):
            s.page, s.sub_page = "sub", next(p for p in SUB_PAGES if p.lower() == target)
        elif s.page == "results":  # a product ASIN
            s.page, s.asin = "item", target.upper()
        else:  # an option value on the item page: the last option group offering it (the original's lookup)
            product = self.catalogue.products[s.asin]  # type: ignore[index]
            group = [name for name, values in product.options.items() if target in values][-1]
            s.options[group] = target

    def _observation(self) -> str:
        assert self.session is not None
        return render(self.session, self.catalogue.products)

    def _admissible(self) -> tuple[str, ...]:
        """``click[...]`` for every clickable on the page; on the search page, a ``search[...]`` is also valid."""
        assert self.session is not None
        return tuple(f"click[{c}]" for c in clickables(self.session, self.catalogue.products) if c != "search")

    # ---- expert --------------------------------------------------------------------------------------------
    def expert_action(self) -> str | None:
        """An oracle from any state: navigate to the goal's product, choose the goal's options, buy. It searches
        with the instruction (price clause removed), or the product title when that search misses the product;
        None when neither search finds it, or when the episode is over."""
        s = self.session
        if s is None or self._done:
            return None
        target = s.goal.asin
        if s.page == "search":
            keywords = self._expert_keywords()
            return None if keywords is None else f"search[{keywords}]"
        if s.page == "sub":
            return f"click[{PREV_PAGE.lower()}]"
        if s.page == "results":
            if target in results_window(s):
                return f"click[{target.lower()}]"
            if target in s.results:
                before = s.results.index(target) < (s.page_num - 1) * 10
                return f"click[{(PREV_PAGE if before else NEXT_PAGE).lower()}]"
            return f"click[{BACK_TO_SEARCH.lower()}]"
        if s.page == "item":
            if s.asin != target:
                return f"click[{PREV_PAGE.lower()}]"
            for name, value in self._goal_option_choices().items():
                if s.options.get(name) != value:
                    return f"click[{value}]"
            return f"click[{BUY_NOW.lower()}]"
        return None

    def _expert_keywords(self) -> str | None:
        assert self.session is not None
        goal = self.session.goal
        product = self.catalogue.products[goal.asin]
        for keywords in (_PRICE_CLAUSE.sub("", goal.instruction_text).lower(), product.title.lower()):
            keywords = " ".join(keywords.split())
            if keywords not in self._expert_search:
                self._expert_search[keywords] = self.catalogue.search.search(keywords)
            if goal.asin in self._expert_search[keywords]:
                return keywords
        return None

    def _goal_option_choices(self) -> dict[str, str]:
        """Per option group of the goal product, the value that best matches one of the goal's options."""
        goal = self.session.goal  # type: ignore[union-attr]
        wanted = list(goal.goal_options.values()) if isinstance(goal.goal_options, dict) else list(goal.goal_options)
        choices = {}
        for name, values in self.catalogue.products[goal.asin].options.items():
            best = max(((token_set_ratio(w, v), v) for w in wanted for v in values), default=(0, None))
            if best[1] is not None and best[0] > 85:
                choices[name] = best[1]
        return choices


def _parse(action: str) -> tuple[str, str | None]:
    m = _ACTION.match(action.strip())
    if m is None:
        return action.strip(), None
    return m.group(1).strip(), m.group(2).lower()
