"""Environment throughput: household steps/s in one process, the oracle's cost, and EnvPool's speed-up.

Cases (each records steps_per_s in benchmark.extra_info; run ``pytest bench/test_bench_envs.py --benchmark-enable``):
    household_step          env.step with a random admissible (or invalid, 1 in 8) action, resets included
    household_oracle_step   the same episodes driven by expert_action() (a shortest-plan search per new state)
    inprocess[step|oracle_step]  the pool cases' exact work on envs in this process (the no-pool baseline)
    pool_step[w]            EnvPool with w workers, 16 episodes in flight, step_many of random actions
    pool_oracle_step[w]     EnvPool with w workers, 16 episodes of the "hard" preset on unseen tasks, each step
                            labelled by the oracle in the worker, 30% deviations (CPU-bound workers)
"""
from __future__ import annotations

import random
from concurrent.futures import Future

import pytest

from gopd_fast import envs
from gopd_fast.envs.pool import EnvPool

STEPS = 20_000
POOL_SLOTS = 16
POOL_ROUNDS = 60
ROUNDS = 5
HARD = {"seed": 0, "difficulty": "hard", "max_turns": 30, "num_train": 100_000}


def _random_steps(env, n_steps: int, seed: int = 0) -> int:
    rng, tasks, done, steps, admissible = random.Random(seed), env.tasks("train"), True, 0, ()
    while steps < n_steps:
        if done:
            admissible = env.reset(tasks[rng.randrange(len(tasks))]).admissible_actions
        action = "jump on the table" if rng.random() < 0.125 else rng.choice(admissible)
        result = env.step(action)
        done, admissible, steps = result.done, result.admissible_actions, steps + 1
    return steps


def _oracle_steps(env, n_steps: int, seed: int = 0) -> int:
    rng, tasks, steps = random.Random(seed), env.tasks("train"), 0
    while steps < n_steps:
        env.reset(tasks[rng.randrange(len(tasks))])
        # one random detour first, so the oracle plans from states off the expert's path
        env.step(rng.choice(env.step("look").admissible_actions))
        steps += 2
        while (action := env.expert_action()) is not None and steps < n_steps:
            env.step(action)
            steps += 1
    return steps


def _record(benchmark, steps: int, **extra) -> None:
    benchmark.extra_info.update(steps=steps, **extra)
    if benchmark.stats is not None:   # None when run with --benchmark-disable (the default: tests only)
        stats = benchmark.stats.stats
        benchmark.extra_info.update(steps_per_s=steps / stats.mean, steps_per_s_median=steps / stats.median)


def test_household_step(benchmark):
    env = envs.make("household", seed=0)
    _random_steps(env, 2000)   # warm the world cache like a long run does
    steps = benchmark.pedantic(_random_steps, args=(env, STEPS), rounds=ROUNDS, iterations=1)
    _record(benchmark, steps)


def test_household_oracle_step(benchmark):
    env = envs.make("household", seed=0)
    steps = benchmark.pedantic(_oracle_steps, args=(env, STEPS // 4), rounds=ROUNDS, iterations=1)
    _record(benchmark, steps)


class _InProcess:
    """The slice of EnvPool's API that _pool_rounds uses, on envs in this process (one per slot): the no-pool
    baseline for exactly the same work."""

    def __init__(self, options: dict) -> None:
        self.options, self.envs = options, {}

    def _env(self, slot: int):
        if slot not in self.envs:
            self.envs[slot] = envs.make("household", **self.options)
        return self.envs[slot]

    @staticmethod
    def _done(value) -> Future:
        future: Future = Future()
        future.set_result(value)
        return future

    def reset_many(self, task_ids, slots=None):
        slots = range(len(task_ids)) if slots is None else slots
        return [self._env(s).reset(t) for s, t in zip(slots, task_ids)]

    def step_many(self, actions):
        return {s: self._env(s).step(a) for s, a in actions.items()}

    def expert_action(self, slot):
        return self._done(self._env(slot).expert_action())


def _pool_rounds(pool: EnvPool | _InProcess, oracle: bool, first_task: int) -> int:
    """POOL_ROUNDS rounds of batched calls over POOL_SLOTS episodes; finished episodes restart on unseen tasks."""
    rng, steps, next_task = random.Random(first_task), 0, first_task + POOL_SLOTS
    tasks = [f"household/train/{i}" for i in range(first_task, first_task + POOL_SLOTS)]
    admissible = {s: r.admissible_actions for s, r in enumerate(pool.reset_many(tasks))}
    for _ in range(POOL_ROUNDS):
        if oracle:
            labels = {s: pool.expert_action(s) for s in admissible}
            actions = {s: (f.result() or "look") for s, f in labels.items()}
        else:
            actions = {s: rng.choice(a) for s, a in admissible.items()}
        results = pool.step_many(actions)
        if oracle:   # students deviate: 30% of the episodes take a random action, the oracle then replans
            deviate = {s: rng.choice(r.admissible_actions) for s, r in results.items() if not r.done}
            deviate = {s: a for s, a in deviate.items() if rng.random() < 0.3}
            results.update(pool.step_many(deviate))
            steps += len(deviate)
        steps += len(actions)
        finished = [s for s, r in results.items() if r.done]
        fresh = [f"household/train/{next_task + i}" for i in range(len(finished))]
        next_task += len(finished)
        for slot, first in zip(finished, pool.reset_many(fresh, slots=finished)):
            admissible[slot] = first.admissible_actions
        for slot, result in results.items():
            if not result.done:
                admissible[slot] = result.admissible_actions
    return steps


@pytest.mark.parametrize("oracle", [False, True], ids=["step", "oracle_step"])
def test_inprocess(benchmark, oracle):
    """The same rounds as test_pool without a pool: the baseline of its speed-up."""
    local = _InProcess(HARD if oracle else {"seed": 0, "num_train": 100_000})
    rounds = iter(range(0, 100_000, 2000))
    _pool_rounds(local, oracle, next(rounds))
    steps = benchmark.pedantic(lambda: _pool_rounds(local, oracle, next(rounds)), rounds=ROUNDS, iterations=1)
    _record(benchmark, steps, workers=0, slots=POOL_SLOTS)


@pytest.mark.parametrize("oracle", [False, True], ids=["step", "oracle_step"])
@pytest.mark.parametrize("workers", [1, 2])
def test_pool(benchmark, workers, oracle):
    """oracle_step runs the "hard" preset on unseen tasks: world generation and plan searches keep the workers'
    CPUs busy, which is the case the pool is for (step cost >> IPC cost); step is IPC-bound."""
    options = HARD if oracle else {"seed": 0, "num_train": 100_000}
    rounds = iter(range(0, 100_000, 2000))
    with EnvPool("household", options, num_workers=workers, reset_timeout_s=120) as pool:
        _pool_rounds(pool, oracle, next(rounds))   # warm-up: workers started
        steps = benchmark.pedantic(lambda: _pool_rounds(pool, oracle, next(rounds)), rounds=ROUNDS, iterations=1)
        _record(benchmark, steps, workers=workers, slots=POOL_SLOTS)
        assert pool.stats().worker_restarts == 0
