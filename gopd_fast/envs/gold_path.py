"""A recorded gold action sequence used as an expert: valid only while the agent follows it.

ScienceWorld and TextWorldExpress produce one gold path per loaded game. It is an open-loop plan, not an
oracle: once the agent takes a different action, the plan's later steps no longer match the state, so the
expert goes silent (``next_action() is None``) instead of suggesting actions that may be wrong.
"""
from __future__ import annotations

from collections.abc import Sequence


def normalize_action(action: str) -> str:
    """Case- and whitespace-insensitive form used to decide whether an action is the gold one."""
    return " ".join(action.lower().split())


class GoldPath:
    def __init__(self, actions: Sequence[str] = ()) -> None:
        self.actions = tuple(actions)
        self.position = 0           # index of the next gold action
        self.deviated = False

    def next_action(self) -> str | None:
        if self.deviated or self.position >= len(self.actions):
            return None
        return self.actions[self.position]

    def observe(self, action: str) -> None:
        """Record the action the agent actually took."""
        expected = self.next_action()
        if expected is not None and normalize_action(action) == normalize_action(expected):
            self.position += 1
        else:
            self.deviated = True
