"""What a rollout hands to the trainer: one finished episode as a flat token sequence with per-token roles.

The sequence is the full shared history of the episode, exactly as sampled (token-exact, never re-tokenised):
    [system+task prompt] [turn 1 response] [observation 1 (+ next assistant header)] [turn 2 response] ...
Every token carries a ``Role``: only generated tokens carry loss, and which KL they get depends on who wrote them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum


class Role(IntEnum):
    CONTEXT = 0   # prompt, chat-template scaffolding, observations: no loss
    STUDENT = 1   # sampled by the student (reverse KL by default)
    TEACHER = 2   # sampled by the teacher under guidance (forward KL by default)


@dataclass
class Episode:
    task_id: str
    token_ids: list[int]                       # the whole history, length T
    roles: list[int]                           # length T, values of Role
    logprobs: list[float]                      # length T: sampling log-prob of generated tokens, 0.0 elsewhere
    turn_spans: list[tuple[int, int]]          # [start, end) of each generated turn in token_ids
    turn_roles: list[int]                      # Role.STUDENT / Role.TEACHER per turn
    actions: list[str]                         # parsed action sent to the env, per turn
    score: float                               # final env score, 0-100
    success: bool
    rounds: int                                # turns used
    beta: float                                # guidance probability this episode was rolled out with
    env_failures: int = 0                      # env crashes/hangs recovered from while producing this episode
    info: dict = field(default_factory=dict)   # extra per-episode data (e.g. truncated, expert distance)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.roles) != n or len(self.logprobs) != n:
            raise ValueError(
                f"Episode {self.task_id!r}: roles ({len(self.roles)}) and logprobs ({len(self.logprobs)}) "
                f"must have one entry per token ({n})"
            )
        if len(self.turn_spans) != len(self.turn_roles):
            raise ValueError("Episode: turn_spans and turn_roles must have one entry per turn")
        # the trainer packs these with torch.tensor(..., dtype=long): a float id would be truncated, not refused
        if not all(type(t) is int and t >= 0 for t in self.token_ids):
            bad = next(t for t in self.token_ids if type(t) is not int or t < 0)
            raise ValueError(f"Episode {self.task_id!r}: token_ids must be non-negative ints, got {bad!r} "
                             f"({type(bad).__name__})")
        roles = {int(r) for r in Role}
        if not all(type(r) in (int, Role) and r in roles for r in self.roles):
            bad = next(r for r in self.roles if type(r) not in (int, Role) or r not in roles)
            raise ValueError(f"Episode {self.task_id!r}: roles must be Role values {sorted(roles)}, got {bad!r}")

    @property
    def num_loss_tokens(self) -> int:
        return sum(1 for r in self.roles if r != Role.CONTEXT)

    @property
    def teacher_turn_fraction(self) -> float:
        return sum(r == Role.TEACHER for r in self.turn_roles) / max(len(self.turn_roles), 1)
