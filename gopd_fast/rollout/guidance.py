"""Per-turn guidance (who writes each turn) and ReAct-style action parsing.

Guided OPD (docs/algorithm.md §2, (G1)): ``beta`` is fixed for a whole episode; at every turn an independent
coin ``u ~ U(0, 1)`` decides whether the teacher (``u < beta``) or the student writes the whole turn. Each episode
owns its own generator, seeded from ``(seed, episode_index)``, so the coin sequence of an episode does not depend
on how many episodes are in flight or in which order the engines serve them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from gopd_fast.rollout.episode import Role


class GuidanceCoin:
    """The per-turn coin of one episode: ``draw()`` -> ``Role.TEACHER`` with probability ``beta``."""

    def __init__(self, beta: float, seed: int, episode_index: int = 0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) \
                or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a float in [0, 1], got {beta!r}")
        if not isinstance(seed, int) or not isinstance(episode_index, int) or seed < 0 or episode_index < 0:
            raise ValueError(f"seed and episode_index must be non-negative ints, got {seed!r}, {episode_index!r}")
        self.beta = float(beta)
        self._rng = np.random.default_rng([seed, episode_index])

    def draw(self) -> Role:
        # Draw even when beta is 0 or 1, so the stream stays aligned across betas (paired comparisons).
        u = self._rng.random()
        return Role.TEACHER if u < self.beta else Role.STUDENT


# ReAct: "Thought: ...\nAction: go to kitchen". The last "Action:" line wins (models sometimes restate).
DEFAULT_ACTION_PATTERN = r"Action\s*:\s*(.+)"
_THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


@dataclass(frozen=True)
class ParsedAction:
    action: str      # what goes to the env
    parsed: bool     # False when the pattern did not match and the raw text was sent instead


class ActionParser:
    """Extracts the env action from a generated turn with a regex (group 1, or the whole match without groups).

    Reasoning in ``<think>...</think>`` is ignored. Unparsable text is sent to the env as is (stripped): the env
    answers with its own "invalid action" observation, which is the learning signal the paper relies on.
    """

    def __init__(self, pattern: str = DEFAULT_ACTION_PATTERN, flags: int = re.IGNORECASE) -> None:
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"action pattern {pattern!r} is not a valid regex: {e}") from e
        if self.regex.groups > 1:
            raise ValueError(f"action pattern must have at most one capturing group, got {self.regex.groups}")

    def __call__(self, text: str) -> ParsedAction:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        visible = _THINK_BLOCK.sub("", text)
        matches = list(self.regex.finditer(visible))
        if matches:
            m = matches[-1]
            action = (m.group(1) if self.regex.groups else m.group(0)).strip()
            if action:
                return ParsedAction(action, True)
        return ParsedAction(visible.strip(), False)
