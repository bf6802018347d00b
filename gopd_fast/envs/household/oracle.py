"""The oracle: a shortest plan from ANY state, by breadth-first search over the true state.

Not a replay of a stored path: after a mistake it plans the recovery from wherever the agent is. The search prunes
actions that can never shorten a plan, which keeps it exact:
  * look / inventory / close change nothing useful; taking an item no goal or locked door needs never helps;
  * opening a container is only useful if it holds something needed or is an unfinished goal's target;
  * putting something down is only useful when the hands are full (and every room has an always-open
    receptacle, so "put it down here" costs the same one step anywhere, at any later time): only then is one
    canonical drop (the room's first open container) generated.
The tests check the pruned search against an unpruned BFS over all admissible actions.
"""
from __future__ import annotations

from collections import deque

from gopd_fast.envs.household.engine import CHUTE, GO, OPEN, PUT, TAKE, UNLOCK, Op
from gopd_fast.envs.household.world import HAND, USED, World

Key = tuple  # State.key(): (room, loc, opened, locked)


def _successors(world: World, key: Key) -> list[tuple[Op, Key]]:
    room, loc, opened, locked = key
    goal_target = dict(world.goals)
    out: list[tuple[Op, Key]] = []

    def needed(i: int) -> bool:
        if i in goal_target:
            return loc[i] != goal_target[i]
        d = world.key_door[i]
        return d >= 0 and locked[d]

    for d, other in world.exits[room]:
        if not locked[d]:
            out.append(((GO, other), (other, loc, opened, locked)))
    if world.chute[room] is not None:
        out.append(((CHUTE, world.chute[room]), (world.chute[room], loc, opened, locked)))

    here = world.room_containers[room]
    held = [i for i, where in enumerate(loc) if where == HAND]
    full = len(held) >= world.hand_capacity
    for c in here:
        if not opened[c]:
            if any(where == c and needed(i) for i, where in enumerate(loc)) or any(
                t == c and loc[i] != t for i, t in world.goals
            ):
                new_opened = opened[:c] + (True,) + opened[c + 1:]
                out.append(((OPEN, c), (room, loc, new_opened, locked)))
        elif not full:
            for i, where in enumerate(loc):
                if where == c and needed(i):
                    out.append(((TAKE, i, c), (room, loc[:i] + (HAND,) + loc[i + 1:], opened, locked)))
    drop = next((c for c in here if opened[c]), None)
    for i in held:
        t = goal_target.get(i)
        if t is not None and world.container_room[t] == room and opened[t]:
            out.append(((PUT, i, t), (room, loc[:i] + (t,) + loc[i + 1:], opened, locked)))
        elif full and drop is not None:
            out.append(((PUT, i, drop), (room, loc[:i] + (drop,) + loc[i + 1:], opened, locked)))
        d = world.key_door[i]
        if d >= 0 and locked[d] and room in (world.doors[d].a, world.doors[d].b):
            new_locked = locked[:d] + (False,) + locked[d + 1:]
            out.append(((UNLOCK, d, i), (room, loc[:i] + (USED,) + loc[i + 1:], opened, new_locked)))
    return out


def is_goal(world: World, key: Key) -> bool:
    loc = key[1]
    return all(loc[i] == c for i, c in world.goals)


def shortest_plan(world: World, start: Key, max_states: int = 200_000) -> list[tuple[Op, Key]] | None:
    """The operations of one shortest plan from ``start`` with the state after each, or None if the goal is
    unreachable (cannot happen for generated worlds) or the search exceeds ``max_states``."""
    if is_goal(world, start):
        return []
    parent: dict[Key, tuple[Key, Op] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        key = frontier.popleft()
        for op, nxt in _successors(world, key):
            if nxt in parent:
                continue
            parent[nxt] = (key, op)
            if is_goal(world, nxt):
                plan = []
                node = nxt
                while parent[node] is not None:
                    prev, prev_op = parent[node]
                    plan.append((prev_op, node))
                    node = prev
                return plan[::-1]
            if len(parent) > max_states:
                return None
            frontier.append(nxt)
    return None


class Oracle:
    """Shortest-plan oracle for one world, caching the plan suffix: following the oracle costs one search."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._next: dict[Key, tuple[Op | None, int]] = {}   # state -> (next op, distance to goal)

    def query(self, key: Key) -> tuple[Op | None, int | None]:
        """(next operation, number of steps to solve) from state ``key``; (None, 0) when solved."""
        hit = self._next.get(key)
        if hit is not None:
            return hit
        plan = shortest_plan(self.world, key)
        if plan is None:
            return None, None
        node, n = key, len(plan)
        for k, (op, after) in enumerate(plan):
            self._next[node] = (op, n - k)
            node = after
        self._next[node] = (None, 0)
        return self._next[key]
