"""household is designed so that mistakes compound: they cost more than the turn they take and lead off the
expert's path. "Turns lost" by an action = 1 + expert_distance(after) - expert_distance(before): 0 for an optimal
action, 1 for an action that only wastes its own turn, more when the mistake has to be undone (a wrong room, a
chute, a distractor in full hands, a key carried off)."""
from __future__ import annotations

import random
import statistics

from gopd_fast import envs
from gopd_fast.envs.household import engine


def _early_mistakes(env, n_tasks: int, seed: int):
    """(turns lost, landed off the expert's path) for one random mistake per task, made after 0-2 expert steps."""
    rng, out = random.Random(seed), []
    for tid in env.tasks("train")[:n_tasks]:
        env.reset(tid)
        expert_path = [env.state.key()]
        while env.expert_action() is not None:
            env.step(env.expert_action())
            expert_path.append(env.state.key())
        env.reset(tid)
        for _ in range(rng.randrange(3)):
            env.step(env.expert_action())
        snap, before = env.snapshot(), env.expert_distance()
        mistakes = []
        for action in engine.admissible(env.world, env.state):
            env.step(action)
            after, key = env.expert_distance(), env.state.key()
            env.restore(snap)
            if after >= before:                       # not one of the (possibly several) optimal actions
                mistakes.append((1 + after - before, key not in expert_path, key != snap[0]))
        out.append(rng.choice(mistakes))
    return out


def test_random_early_mistakes_cost_more_than_their_turn():
    env = envs.make("household", seed=0)
    results = _early_mistakes(env, n_tasks=300, seed=0)
    lost = [r[0] for r in results]
    assert min(lost) >= 1                              # the oracle is optimal: nothing beats it
    assert statistics.mean(lost) > 1.2, statistics.mean(lost)
    assert sum(x >= 2 for x in lost) / len(lost) > 0.2
    assert max(lost) >= 3
    # Most mistakes that change the state land off the expert's trajectory (the rest step back along it).
    changed = [r for r in results if r[2]]
    assert sum(r[1] for r in changed) / len(changed) > 0.6


def test_consecutive_mistakes_each_cost_more_than_a_turn():
    """Four mistakes in a row (each a non-optimal action) cost more than four turns: the detours do not cancel."""
    env = envs.make("household", seed=0)
    rng, lost = random.Random(1), []
    for tid in env.tasks("eval")[:150]:
        env.reset(tid)
        d0 = env.expert_distance()
        for _ in range(4):
            snap, before, mistakes = env.snapshot(), env.expert_distance(), []
            for action in engine.admissible(env.world, env.state):
                env.step(action)
                if env.expert_distance() >= before:
                    mistakes.append(action)
                env.restore(snap)
            env.step(rng.choice(mistakes))
        lost.append(env.expert_distance() + 4 - d0)
    assert statistics.mean(lost) > 4 * 1.03, statistics.mean(lost)
