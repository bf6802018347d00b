"""Evaluate a policy over an env split: Score, Success Rate and Rounds with 95% confidence intervals.

A policy maps what the agent has seen so far to its next action:

    def policy(state: PolicyInput) -> str: ...            # one episode at a time
    policy.batched = True  ->  policy(list[PolicyInput]) -> list[str]   # a model: one call per generation batch
    policy = "oracle"                                    # the env's expert_action()

    report = evaluate("household", policy, split="eval", limit=100, log_path="eval.jsonl")
    print(report)   # Score 97.1 [95.2, 99.0] | Success 0.940 [0.876, 0.972] | Rounds 9.30 [8.85, 9.75] (n=100)

Metrics (the protocol of this line of work): Score is the env's own 0-100 score at the end of the episode, Success Rate
the fraction of fully solved episodes, Rounds the number of turns used (lower is better). Confidence intervals:
Student's t-interval for the means of Score and Rounds (df = n - 1; NaN bounds for n = 1), and the Wilson score
interval for the Success Rate (a binomial proportion, for which a t-interval misbehaves near 0 and 1).

``evaluate`` runs sequentially in this process, or through an ``EnvPool`` (``pool=`` or ``num_workers=``) with many
episodes in flight. An episode whose env fails for good (``EnvError`` after the pool's own replays) is retried
from its start up to ``retries`` times; if it still fails it is logged with its error and counted as an unsolved
episode with score 0 (conservative), and ``EvalReport.errors`` says how many.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gopd_fast.envs.base import EnvError, TextEnv, make
from gopd_fast.envs.pool import EnvPool

ORACLE = "oracle"


@dataclass(frozen=True)
class PolicyInput:
    task_id: str
    task: str
    observations: tuple[str, ...]        # the first observation, then one per step taken
    actions: tuple[str, ...]             # actions taken so far (one fewer than observations)
    admissible_actions: tuple[str, ...] | None


Policy = Callable[[PolicyInput], str]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class EpisodeLog:
    task_id: str
    score: float
    success: bool
    rounds: int
    truncated: bool
    actions: list[str]
    observations: list[str]
    env_failures: int = 0
    error: str | None = None


@dataclass(frozen=True)
class EvalReport:
    n: int
    score: Interval
    success_rate: Interval
    rounds: Interval
    errors: int
    episodes: list[EpisodeLog] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "n": self.n, "errors": self.errors,
            **{name: asdict(getattr(self, name)) for name in ("score", "success_rate", "rounds")},
        }

    def __str__(self) -> str:
        s, p, r = self.score, self.success_rate, self.rounds
        return (
            f"Score {s.mean:.1f} [{s.low:.1f}, {s.high:.1f}] | Success {p} | Rounds {r.mean:.2f} "
            f"[{r.low:.2f}, {r.high:.2f}] (n={self.n}, 95% CI: t-interval, Wilson for success)"
        )


# ------------------------------------------------------------------------------------------------ statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


@functools.lru_cache(maxsize=1024)
def t_quantile(p: float, df: float) -> float:
    """Inverse of ``t_cdf`` by bisection (to ~1e-12), for 0 < p < 1."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and its Student-t confidence interval."""
    n = len(values)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, "t")
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, "t")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """A binomial proportion and its Wilson score interval."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    z = _normal_quantile(0.5 + confidence / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half), "wilson")


def _normal_quantile(p: float) -> float:
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * math.erfc(-mid / math.sqrt(2.0)) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def summarize(episodes: Sequence[EpisodeLog], confidence: float = 0.95) -> EvalReport:
    if not episodes:
        raise ValueError("no episodes to summarize")
    return EvalReport(
        n=len(episodes),
        score=t_interval([e.score for e in episodes], confidence),
        success_rate=wilson_interval(sum(e.success for e in episodes), len(episodes), confidence),
        rounds=t_interval([float(e.rounds) for e in episodes], confidence),
        errors=sum(e.error is not None for e in episodes),
        episodes=list(episodes),
    )


# ------------------------------------------------------------------------------------------------ running
class _Run:
    """One episode's history and result while it runs."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.task = ""
        self.observations: list[str] = []
        self.actions: list[str] = []
        self.admissible: tuple[str, ...] | None = None
        self.score, self.success, self.done, self.truncated = 0.0, False, False, False
        self.env_failures = 0

    def start(self, first: Any) -> None:
        self.task, self.observations, self.actions = first.task, [first.observation], []
        self.admissible = first.admissible_actions
        self.score, self.success, self.done, self.truncated = 0.0, False, False, False

    def record(self, action: str, result: Any, max_turns: int) -> None:
        self.actions.append(action)
        self.observations.append(result.observation)
        self.admissible = result.admissible_actions
        self.score, self.success, self.done = float(result.score), bool(result.success), bool(result.done)
        self.truncated = bool(result.info.get("truncated")) or (not self.done and len(self.actions) >= max_turns)
        self.env_failures = max(self.env_failures, int(result.info.get("env_failures", 0)))
        self.done = self.done or len(self.actions) >= max_turns

    def policy_input(self) -> PolicyInput:
        return PolicyInput(self.task_id, self.task, tuple(self.observations), tuple(self.actions), self.admissible)

    def log(self, error: str | None = None) -> EpisodeLog:
        return EpisodeLog(
            self.task_id, 0.0 if error else self.score, False if error else self.success, len(self.actions),
            self.truncated, list(self.actions), list(self.observations), self.env_failures, error,
        )


def _check_action(action: Any) -> str:
    if not isinstance(action, str):
        raise TypeError(f"the policy must return a str action, got {type(action).__name__}")
    return action


def _ask(policy: Any, runs: list[_Run]) -> list[str]:
    if getattr(policy, "batched", False):
        actions = list(policy([r.policy_input() for r in runs]))
        if len(actions) != len(runs):
            raise ValueError(f"a batched policy must return one action per input ({len(runs)}), got {len(actions)}")
        return [_check_action(a) for a in actions]
    return [_check_action(policy(r.policy_input())) for r in runs]


def evaluate(
    env: str | TextEnv,
    policy: Policy | str,
    split: str = "eval",
    task_ids: Sequence[str] | None = None,
    limit: int | None = None,
    max_turns: int | None = None,
    env_options: Mapping[str, Any] | None = None,
    log_path: str | Path | None = None,
    pool: EnvPool | None = None,
    num_workers: int | None = None,
    retries: int = 2,
    confidence: float = 0.95,
) -> EvalReport:
    """Run ``policy`` on the tasks of ``split`` (or ``task_ids``), first ``limit`` of them, and summarize.

    Args:
        env: an env name (made with ``env_options``) or a ``TextEnv`` instance (sequential runs only).
        policy: a callable (see the module doc) or ``"oracle"``.
        max_turns: the turn limit; defaults to the env's own ``max_turns`` (the env also stops at its own).
        log_path: where to write one JSON line per episode (in task order).
        pool / num_workers: run through this ``EnvPool``, or a temporary one with ``num_workers`` workers.
        retries: how often an episode whose env failed for good is started over before it is logged as an error.
    """
    if not (policy == ORACLE or callable(policy)):
        raise TypeError(f"policy must be a callable or {ORACLE!r}, got {policy!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    pooled = pool is not None or num_workers is not None
    if isinstance(env, TextEnv):
        if pooled or env_options:
            raise ValueError("pass an env name (not an instance) to evaluate through a pool or with env_options")
    elif not isinstance(env, str):
        raise TypeError(f"env must be an env name or a TextEnv, got {type(env).__name__}")
    if not pooled:
        local = env if isinstance(env, TextEnv) else make(env, **dict(env_options or {}))
        try:
            ids, turn_limit = _tasks_and_limit(local.tasks, local.max_turns, split, task_ids, limit, max_turns)
            episodes = _run_sequential(local, policy, ids, turn_limit)
        finally:
            if local is not env:
                local.close()
    else:
        owns_pool = pool is None
        if pool is None:
            if not isinstance(num_workers, int) or num_workers < 1:
                raise ValueError(f"num_workers must be a positive int, got {num_workers!r}")
            pool = EnvPool(env, env_options, num_workers=num_workers)
        elif pool.env_name != env:
            raise ValueError(f"the pool runs {pool.env_name!r}, not {env!r}")
        try:
            ids, turn_limit = _tasks_and_limit(
                lambda s: pool.call(0, "tasks", s).result(), pool.call(0, "max_turns").result(),
                split, task_ids, limit, max_turns,
            )
            episodes = _run_pooled(env, policy, ids, turn_limit, pool, retries)
        finally:
            if owns_pool:
                pool.close()
    report = summarize(episodes, confidence)
    if log_path is not None:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for episode in episodes:
                f.write(json.dumps(asdict(episode)) + "\n")
    return report


def _tasks_and_limit(
    tasks: Callable[[str], list[str]], env_max_turns: int, split: str, task_ids: Sequence[str] | None,
    limit: int | None, max_turns: int | None,
) -> tuple[list[str], int]:
    ids = list(task_ids) if task_ids is not None else list(tasks(split))
    ids = ids[:limit] if limit is not None else ids
    if not ids:
        raise ValueError("no tasks to evaluate")
    turn_limit = env_max_turns if max_turns is None else max_turns
    if not isinstance(turn_limit, int) or isinstance(turn_limit, bool) or turn_limit < 1:
        raise ValueError(f"max_turns must be a positive int, got {max_turns!r}")
    return ids, turn_limit


def _run_sequential(env: TextEnv, policy: Any, ids: list[str], max_turns: int) -> list[EpisodeLog]:
    logs = []
    for task_id in ids:
        run = _Run(task_id)
        run.start(env.reset(task_id))
        while not run.done:
            action = env.expert_action() if policy == ORACLE else _ask(policy, [run])[0]
            if action is None:
                raise ValueError(f"{env.name} has no expert action in {task_id!r}; the oracle policy needs one")
            run.record(action, env.step(action), max_turns)
        logs.append(run.log())
    return logs


def _run_pooled(
    env_name: str, policy: Any, ids: list[str], max_turns: int, pool: EnvPool, retries: int
) -> list[EpisodeLog]:
    slots = max(2 * pool.num_workers, min(len(ids), 16))     # episodes in flight
    queue = list(range(len(ids)))[::-1]            # indices into ids, popped from the end
    logs: dict[int, EpisodeLog] = {}
    attempts = [0] * len(ids)
    runs: dict[int, tuple[int, _Run]] = {}         # slot -> (task index, run)
    futures: dict[Future, tuple[int, str, str | None]] = {}   # future -> (slot, kind, action)
    needs_action: list[int] = []

    def start(slot: int) -> None:
        if queue:
            index = queue.pop()
            runs[slot] = (index, _Run(ids[index]))
            futures[pool.reset(slot, ids[index])] = (slot, "reset", None)

    for slot in range(slots):
        start(slot)
    while futures or needs_action:
        if needs_action:
            waiting, needs_action = needs_action, []
            if policy == ORACLE:
                for slot in waiting:
                    futures[pool.expert_action(slot)] = (slot, "expert", None)
            else:
                for slot, action in zip(waiting, _ask(policy, [runs[s][1] for s in waiting])):
                    futures[pool.step(slot, action)] = (slot, "step", action)
            continue
        done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
        for future in done:
            slot, kind, action = futures.pop(future)
            index, run = runs[slot]
            try:
                value = future.result()
            except EnvError as e:
                pool.restart(slot)
                attempts[index] += 1
                run.env_failures += 1
                if attempts[index] > retries:
                    logs[index] = run.log(error=str(e))
                    start(slot)
                else:
                    runs[slot] = (index, _Run(ids[index]))
                    runs[slot][1].env_failures = run.env_failures
                    futures[pool.reset(slot, ids[index])] = (slot, "reset", None)
                continue
            if kind == "reset":
                run.start(value)
                needs_action.append(slot)
            elif kind == "expert":
                if value is None:
                    raise ValueError(f"{env_name} has no expert action in {run.task_id!r}")
                futures[pool.step(slot, value)] = (slot, "step", value)
            else:
                run.record(action, value, max_turns)
                if run.done:
                    logs[index] = run.log()
                    start(slot)
                else:
                    needs_action.append(slot)
    return [logs[i] for i in range(len(ids))]


class RandomPolicy:
    """Uniform over the admissible actions (a baseline), seeded per (task, turn) so runs are reproducible."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __call__(self, state: PolicyInput) -> str:
        if not state.admissible_actions:
            raise ValueError(f"RandomPolicy needs admissible actions; {state.task_id!r} has none")
        import random

        rng = random.Random(f"{self.seed}/{state.task_id}/{len(state.actions)}")
        return rng.choice(state.admissible_actions)


def main(argv: Sequence[str] | None = None) -> EvalReport:
    """``python -m gopd_fast.envs.evaluate --env household --policy oracle --limit 50 [--workers 2] [--log x.jsonl]
    [--option difficulty=hard ...]``: print the report of a baseline policy."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--env", default="household")
    parser.add_argument("--policy", choices=[ORACLE, "random"], default=ORACLE)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--max-turns", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--log")
    parser.add_argument("--option", action="append", default=[], help="env option key=value (value parsed as JSON)")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option must look like key=value, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    policy = ORACLE if args.policy == ORACLE else RandomPolicy()
    report = evaluate(
        args.env, policy, split=args.split, limit=args.limit, max_turns=args.max_turns, env_options=options,
        log_path=args.log, num_workers=args.workers,
    )
    print(f"{args.env} {args.split} {args.policy}: {report}")
    return report


if __name__ == "__main__":
    main()
