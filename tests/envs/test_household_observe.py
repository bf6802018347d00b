"""household's ``observe`` option: "map", "full" and "full-target" add information, never change the game."""
from __future__ import annotations

import random
import re

import pytest

from gopd_fast import envs
from gopd_fast.envs.household.observe import STATUS_MODES, first_exits
from gopd_fast.envs.household.world import HAND


def _steps(env, rng: random.Random, first, noise: float = 0.3):
    """Steps of a noisy oracle run: a random admissible action in a fraction ``noise`` of the turns."""
    done, admissible = False, first.admissible_actions
    while not done:
        action = env.expert_action()
        if rng.random() < noise or action is None:
            action = rng.choice(list(admissible))
        step = env.step(action)
        yield step
        done, admissible = step.done, step.admissible_actions


@pytest.mark.parametrize("mode", ["map", "full", "full-target"])
def test_observations_extend_the_room_view_and_dynamics_are_unchanged(mode):
    plain = envs.make("household", seed=2, max_turns=15)
    seen = envs.make("household", seed=2, max_turns=15, observe=mode)
    rng = random.Random(0)
    for task in seen.tasks("train")[:15]:
        a, b = plain.reset(task), seen.reset(task)
        assert b.observation.startswith(a.observation + " ")
        assert (b.task, b.admissible_actions) == (a.task, a.admissible_actions)
        assert seen.expert_distance() == plain.expert_distance()
        done = False
        while not done:
            assert seen.expert_action() == plain.expert_action()
            action = plain.expert_action()
            if rng.random() < 0.3:          # off the expert's path too
                action = rng.choice(list(a.admissible_actions))
            r1, r2 = plain.step(action), seen.step(action)
            assert (r1.score, r1.done, r1.success, r1.admissible_actions) == (r2.score, r2.done, r2.success,
                                                                             r2.admissible_actions)
            if mode in STATUS_MODES:
                assert r2.observation.startswith(r1.observation + " Status: ")
            else:
                assert r2.observation == r1.observation     # the map is only in the first observation
            a, done = r1, r2.done


def test_map_lists_every_door_and_item():
    env = envs.make("household", seed=2, observe="map")
    for task in env.tasks("eval")[:20]:
        obs = env.reset(task).observation
        world = env.world
        for item in world.items:
            assert f"{item} " in obs.split("Items:")[1]
        for door in world.doors:
            assert f"{world.rooms[door.a]}-{world.rooms[door.b]}" in obs


def test_full_status_describes_the_current_state():
    env = envs.make("household", seed=3, observe="full", max_turns=20)
    rng = random.Random(1)
    checked = 0
    for task in env.tasks("train")[:30]:
        first = env.reset(task)
        for step in _steps(env, rng, first):
            world, s = env.world, env.state
            status = step.observation.split("Status: ")[1]
            exits = " ".join(world.rooms[nb] for _, nb in world.exits[s.room])
            assert f"at {world.rooms[s.room]}, exits {exits}" in status
            carried = [world.items[i] for i, w in enumerate(s.loc) if w == HAND]
            assert ("carrying " + " and ".join(carried) if carried else "carrying nothing") in status
            for i, c in world.goals:
                if s.loc[i] >= 0:
                    room = world.rooms[world.container_room[s.loc[i]]]
                    assert re.search(rf"{world.items[i]} (in|on) {world.containers[s.loc[i]]} \({room}\)", status)
            for c, closable in enumerate(world.closable):
                shown = f"closed {world.containers[c]} (" in status
                assert shown == (closable and not s.opened[c])
            for d, door in enumerate(world.doors):
                assert (f"locked {world.rooms[door.b]} " in status) == s.locked[d]
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("difficulty", ["medium", "hard"])
def test_full_target_is_full_with_each_goal_target_room(difficulty):
    """Step for step the same status as "full", except that the goal part names each target's room; "full" never
    does (an open receptacle's room is nowhere in its status: what "full-target" exists for)."""
    full = envs.make("household", seed=5, observe="full", difficulty=difficulty)
    target = envs.make("household", seed=5, observe="full-target", difficulty=difficulty)
    rng = random.Random(2)
    for task in full.tasks("train")[:20]:
        a, b = full.reset(task), target.reset(task)
        world = target.world
        plain = " and ".join(f"{world.items[i]} in {world.containers[c]}" for i, c in world.goals)
        placed = " and ".join(f"{world.items[i]} in {world.containers[c]} ({world.rooms[world.container_room[c]]})"
                              for i, c in world.goals)
        done, admissible = False, a.admissible_actions
        while True:
            assert a.observation.count(f"Status: goal {plain};") == 1
            assert b.observation == a.observation.replace(f"Status: goal {plain};", f"Status: goal {placed};")
            if done:
                break
            action = full.expert_action()
            if rng.random() < 0.3 or action is None:
                action = rng.choice(list(admissible))
            a, b = full.step(action), target.step(action)
            done, admissible = a.done, a.admissible_actions


def test_routes_lead_to_their_room():
    """Following "route R via X" from room to room reaches R, along the tree path (never longer)."""
    env = envs.make("household", seed=4, observe="full", difficulty="hard")
    for task in env.tasks("train")[:20]:
        env.reset(task)
        world = env.world
        n = len(world.rooms)
        for start in range(n):
            for goal in range(n):
                if goal == start:
                    continue
                room, hops = start, 0
                while room != goal:
                    room = first_exits(world, room)[goal]
                    hops += 1
                    assert hops < n
                # a neighbour is its own route; routes are only printed for non-neighbours
                neighbours = {nb for _, nb in world.exits[start]}
                assert (hops == 1) == (goal in neighbours)


def test_bad_observe_names_the_option():
    with pytest.raises(ValueError, match="observe must be one of"):
        envs.make("household", observe="everything")
