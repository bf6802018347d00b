"""The failure-mode diagnostic: is the teacher least reliable exactly on the states a student reaches?

Guided-OPD's motivation (docs/algorithm.md §1): on-policy distillation trains the student on states it
reaches itself; after a few student mistakes those states are off the expert's path, where the teacher has seen
little data and its supervision is least reliable. This module measures that on real rollouts:

1. Roll out the student alone (beta = 0) and the teacher alone (beta = 1) on the same held-out tasks.
2. Replay each episode's actions in a fresh env to label every state with the oracle: ``expert_distance()``
   (oracle steps to solve from there) and ``off_path = turn + distance - initial distance``, the number of extra
   steps the episode so far has cost (0 on a shortest path, the ground truth for "off-distribution").
3. One forward pass of each model over each episode gives, per generated turn: the teacher's confidence (mean
   max-probability and entropy of its next-token distribution over the turn's tokens), the per-token
   KL(p_s || p_t) (through ``fused_linear_kl``, the loss the trainer uses), and the teacher's probability of the
   oracle's action at that state (is the teacher *right* there, not only confident?).

Everything is aggregated by turn index and source (student vs teacher rollouts) and by off-path distance.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gopd_fast import fused_linear_kl
from gopd_fast.envs.base import TextEnv
from gopd_fast.rollout.episode import Episode


@dataclass(frozen=True)
class TurnState:
    """The state a turn was generated from, labelled by the oracle, and the env's score after the turn."""

    turn: int                   # 0-based index of the generated turn
    distance: int | None        # oracle steps to solve from the state before this turn (None: env has no oracle)
    off_path: int | None        # extra steps spent so far relative to a shortest path (0 = on the expert path)
    expert_action: str | None   # the oracle's action at this state
    score_after: float          # env score after this turn's action


def replay(env: TextEnv, episode: Episode) -> list[TurnState]:
    """Re-run ``episode.actions`` in ``env`` and label every state with the oracle.

    Deterministic envs only (household, TextWorldExpress): the replayed scores must equal the episode's final
    score, else ValueError (the labels would describe other states than the ones the models saw).
    """
    env.reset(episode.task_id)
    has_distance = hasattr(env, "expert_distance")
    start = env.expert_distance() if has_distance else None  # type: ignore[attr-defined]
    states: list[TurnState] = []
    score = 0.0
    for turn, action in enumerate(episode.actions):
        dist = env.expert_distance() if has_distance else None  # type: ignore[attr-defined]
        off = None if dist is None or start is None else turn + dist - start
        expert = env.expert_action()
        step = env.step(action)
        score = float(step.score)
        states.append(TurnState(turn, dist, off, expert, score))
        if step.done:
            break
    if len(states) != len(episode.actions) or not math.isclose(score, episode.score, abs_tol=1e-6):
        raise ValueError(f"replaying {episode.task_id!r} gave {len(states)} turns / score {score}, but the episode "
                         f"has {len(episode.actions)} turns / score {episode.score}: the env is not deterministic")
    return states


def score_at_turn_limits(states: Sequence[TurnState], limits: Sequence[int]) -> dict[int, float]:
    """Score the episode would have had with each turn limit (the policy never sees the limit, so cutting the
    trajectory is exact)."""
    out = {}
    for limit in limits:
        if limit < 1:
            raise ValueError(f"turn limits must be >= 1, got {limit}")
        out[limit] = states[min(limit, len(states)) - 1].score_after if states else 0.0
    return out


@torch.no_grad()
def _final_hidden(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], dtype=torch.long)
    return model.model(input_ids=x, use_cache=False).last_hidden_state[0].float()


@torch.no_grad()
def turn_signals(student: torch.nn.Module, teacher: torch.nn.Module, episode: Episode) -> list[dict[str, float]]:
    """Per generated turn: teacher max-prob and entropy (means over the turn's positions) and mean KL(p_s||p_t)."""
    h_s, h_t = _final_hidden(student, episode.token_ids), _final_hidden(teacher, episode.token_ids)
    # position p predicts token p + 1: a turn spanning [a, b) is predicted at positions a-1 .. b-2
    pos = torch.cat([torch.arange(a - 1, b - 1) for a, b in episode.turn_spans])
    w_s, w_t = student.lm_head.weight.float(), teacher.lm_head.weight.float()
    kl = fused_linear_kl(h_s[pos], w_s, h_t[pos], w_t, reduction="none", truncate_teacher_vocab=True)
    logp_t = torch.log_softmax(h_t[pos] @ w_t.T, dim=-1)
    maxprob = logp_t.max(dim=-1).values.exp()
    entropy = -(logp_t.exp() * logp_t).sum(-1)
    out, k = [], 0
    for a, b in episode.turn_spans:
        n = b - a
        sl = slice(k, k + n)
        out.append({"teacher_maxprob": float(maxprob[sl].mean()), "teacher_entropy": float(entropy[sl].mean()),
                    "kl_student_teacher": float(kl[sl].mean())})
        k += n
    return out


@torch.no_grad()
def oracle_action_prob(teacher: torch.nn.Module, episode: Episode, turn: int, response_ids: list[int]) -> float:
    """Teacher's probability of generating ``response_ids`` (the oracle's action as a turn) at ``turn``'s state."""
    start = episode.turn_spans[turn][0]
    ids = episode.token_ids[:start] + list(response_ids)
    x = torch.tensor([ids], dtype=torch.long)
    logits = teacher(input_ids=x, use_cache=False).logits[0, start - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids).unsqueeze(-1)).sum()
    return float(logp.exp())


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def failure_mode(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    env: TextEnv,
    rollouts: dict[str, Sequence[Episode]],
    encode_action: Callable[[str], list[int]],
    *,
    max_distance_bucket: int = 4,
) -> dict[str, Any]:
    """Aggregate the diagnostic over ``rollouts`` ({"student": [...], "teacher": [...]}).

    ``encode_action(action)`` -> the token ids of the oracle's action written as a model turn (with eos).
    Returns ``{"by_turn": {source: [row, ...]}, "by_distance": [row, ...], "states": [...]}`` (plain JSON).
    """
    states: list[dict[str, Any]] = []
    for source, episodes in rollouts.items():
        for ep in episodes:
            labels = replay(env, ep)
            signals = turn_signals(student, teacher, ep)
            for lab, sig in zip(labels, signals):
                p_oracle = (oracle_action_prob(teacher, ep, lab.turn, encode_action(lab.expert_action))
                            if lab.expert_action is not None else float("nan"))
                states.append({"source": source, "task_id": ep.task_id, **asdict(lab), **sig,
                               "teacher_p_oracle_action": p_oracle})
    by_turn: dict[str, list[dict[str, float]]] = {}
    for source in rollouts:
        rows = [s for s in states if s["source"] == source]
        turns = sorted({s["turn"] for s in rows})
        by_turn[source] = [{
            "turn": t,
            "states": len(sel := [s for s in rows if s["turn"] == t]),
            "teacher_maxprob": _mean([s["teacher_maxprob"] for s in sel]),
            "teacher_entropy": _mean([s["teacher_entropy"] for s in sel]),
            "kl_student_teacher": _mean([s["kl_student_teacher"] for s in sel]),
            "teacher_p_oracle_action": _mean([s["teacher_p_oracle_action"] for s in sel
                                              if not math.isnan(s["teacher_p_oracle_action"])]),
            # NaN where the env has no oracle from arbitrary states (off_path unknown), never a fake 0
            "off_path_fraction": _mean([float(s["off_path"] > 0) for s in sel if s["off_path"] is not None]),
        } for t in turns]
    by_distance = []
    for d in range(max_distance_bucket + 1):
        sel = [s for s in states if s["off_path"] is not None
               and (s["off_path"] == d if d < max_distance_bucket else s["off_path"] >= d)]
        by_distance.append({
            "distance": d, "open_ended": d == max_distance_bucket, "states": len(sel),
            "teacher_maxprob": _mean([s["teacher_maxprob"] for s in sel]),
            "teacher_entropy": _mean([s["teacher_entropy"] for s in sel]),
            "kl_student_teacher": _mean([s["kl_student_teacher"] for s in sel]),
            "teacher_oracle_agreement": _mean([s["teacher_p_oracle_action"] for s in sel
                                               if not math.isnan(s["teacher_p_oracle_action"])]),
        })
    return {"by_turn": by_turn, "by_distance": by_distance, "states": states}
