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


class _Rules:
    """Per-world lookups the search uses at every node, computed once."""

    def __init__(self, world: World) -> None:
        self.exits = world.exits
        self.chute = world.chute
        self.room_containers = world.room_containers
        self.capacity = world.hand_capacity
        self.goals = world.goals
        self.target = tuple(dict(world.goals).get(i, -1) for i in range(len(world.items)))
        self.key_door = world.key_door
        self.door_rooms = tuple((d.a, d.b) for d in world.doors)
        self.items = range(len(world.items))


def _successors(rules: _Rules, key: Key) -> list[tuple[Op, Key]]:
    room, loc, opened, locked = key
    target, key_door = rules.target, rules.key_door
    out: list[tuple[Op, Key]] = []
    for d, other in rules.exits[room]:
        if not locked[d]:
            out.append(((GO, other), (other, loc, opened, locked)))
    landing = rules.chute[room]
    if landing is not None:
        out.append(((CHUTE, landing), (landing, loc, opened, locked)))

    held: list[int] = []
    needed_at: set[int] = set()       # containers holding an item a goal or a locked door still needs
    for i in rules.items:
        where = loc[i]
        if where == HAND:
            held.append(i)
        elif where >= 0:
            t = target[i]
            if (t != where) if t >= 0 else (key_door[i] >= 0 and locked[key_door[i]]):
                needed_at.add(where)
    full = len(held) >= rules.capacity
    here = rules.room_containers[room]
    drop = -1
    for c in here:
        if not opened[c]:
            if c in needed_at or any(t == c and loc[i] != t for i, t in rules.goals):
                out.append(((OPEN, c), (room, loc, opened[:c] + (True,) + opened[c + 1:], locked)))
            continue
        if drop < 0:
            drop = c
        if not full and c in needed_at:
            for i in rules.items:
                if loc[i] == c:
                    t = target[i]
                    if (t != c) if t >= 0 else (key_door[i] >= 0 and locked[key_door[i]]):
                        out.append(((TAKE, i, c), (room, loc[:i] + (HAND,) + loc[i + 1:], opened, locked)))
    for i in held:
        t = target[i]
        if t >= 0 and t in here and opened[t]:
            out.append(((PUT, i, t), (room, loc[:i] + (t,) + loc[i + 1:], opened, locked)))
        elif full and drop >= 0:
            out.append(((PUT, i, drop), (room, loc[:i] + (drop,) + loc[i + 1:], opened, locked)))
        d = key_door[i]
        if d >= 0 and locked[d] and room in rules.door_rooms[d]:
            new_locked = locked[:d] + (False,) + locked[d + 1:]
            out.append(((UNLOCK, d, i), (room, loc[:i] + (USED,) + loc[i + 1:], opened, new_locked)))
    return out


def is_goal(world: World, key: Key) -> bool:
    loc = key[1]
    return all(loc[i] == c for i, c in world.goals)


def shortest_plan(world: World, start: Key, max_states: int = 500_000) -> list[tuple[Op, Key]] | None:
    """The operations of one shortest plan from ``start`` with the state after each, or None if the goal is
    unreachable or the search exceeds ``max_states``."""
    goals = world.goals
    if all(start[1][i] == c for i, c in goals):
        return []
    rules = _Rules(world)
    parent: dict[Key, tuple[Key, Op] | None] = {start: None}
    frontier = deque([start])
    while frontier:
        key = frontier.popleft()
        for op, nxt in _successors(rules, key):
            if nxt in parent:
                continue
            parent[nxt] = (key, op)
            loc = nxt[1]
            if all(loc[i] == c for i, c in goals):
                plan = []
                node = nxt
                while (link := parent[node]) is not None:
                    plan.append((link[1], node))
                    node = link[0]
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
