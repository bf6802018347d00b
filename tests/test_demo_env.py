"""household-mapped: the household env with a map in the first observation (gopd_fast.demo_env)."""
from __future__ import annotations

import gopd_fast.demo_env  # noqa: F401  (registers the env)
from gopd_fast import envs


def test_first_observation_is_households_plus_a_complete_map():
    plain = envs.make("household", seed=2, max_turns=15)
    mapped = envs.make("household-mapped", seed=2, max_turns=15)
    for task in mapped.tasks("eval")[:20]:
        a, b = plain.reset(task), mapped.reset(task)
        assert b.observation.startswith(a.observation + " Map: ")
        assert b.admissible_actions == a.admissible_actions and b.task == a.task
        world = mapped.world
        for item in world.items:
            assert f"{item} " in b.observation.split("Items:")[1]
        for door in world.doors:
            assert f"{world.rooms[door.a]}-{world.rooms[door.b]}" in b.observation


def test_dynamics_and_oracle_are_unchanged():
    plain = envs.make("household", seed=2, max_turns=15)
    mapped = envs.make("household-mapped", seed=2, max_turns=15)
    for task in mapped.tasks("train")[:10]:
        plain.reset(task)
        mapped.reset(task)
        assert mapped.expert_distance() == plain.expert_distance()
        done = False
        while not done:
            action = mapped.expert_action()
            assert action == plain.expert_action()
            r1, r2 = plain.step(action), mapped.step(action)
            assert (r1.observation, r1.score, r1.done) == (r2.observation, r2.score, r2.done)
            done = r2.done
        assert r2.success
