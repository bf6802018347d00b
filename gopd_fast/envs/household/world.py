"""The static layout of one household task, generated from a seed.

A world is a random tree of rooms joined by doors (some locked, each opened by the key of its colour), plus an
optional one-way chute, containers in every room (receptacles that are always open, and closable ones that start
closed), items in the containers (goal items, keys, distractors) and one or more goals "put <item> in <container>".

Generation guarantees solvability by construction: the key of a locked door is always placed in a room reachable
before that door is opened, and a chute always lands in the start region (reachable without any key), so no
sequence of actions can ever lock the agent out of the goal (there are no dead ends, only detours).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from gopd_fast.envs.options import check_int

# The closed vocabulary. Container names are unique within a world, so "open fridge" is never ambiguous.
ROOMS = ("kitchen", "hall", "bedroom", "bathroom", "office", "garage", "pantry", "cellar", "attic", "study")
RECEPTACLES = ("table", "shelf", "counter", "sink", "desk", "bed", "bench", "tub", "stand", "rack")  # always open
CLOSABLES = ("fridge", "cabinet", "drawer", "box", "chest", "closet", "safe", "basket", "oven", "crate")
OBJECTS = ("mug", "apple", "book", "towel", "plate", "cup", "pen", "sock", "lamp", "spoon", "soap", "ball")
COLORS = ("red", "blue", "green", "gold")

HAND = -1   # item location: carried by the agent
USED = -2   # item location: a key left in the lock it opened (keys are single-use)


@dataclass(frozen=True)
class WorldConfig:
    """Difficulty knobs. The defaults ("medium") give oracle solutions of roughly 5-12 steps."""

    rooms: int = 4
    locked_doors: int = 1
    goals: int = 1
    distractors: int = 2
    closables: int = 2          # closable containers in the world (fridge, drawer, ...), on top of one receptacle
    chutes: int = 1             # one-way chutes (at most one per room)
    hand_capacity: int = 2

    def __post_init__(self) -> None:
        checks = {
            "rooms": (2, len(ROOMS)), "locked_doors": (0, len(COLORS)), "goals": (1, 3),
            "distractors": (0, 6), "closables": (0, len(CLOSABLES)), "chutes": (0, len(ROOMS)), "hand_capacity": (1, 4),
        }
        for name, (lo, hi) in checks.items():
            check_int(name, getattr(self, name), low=lo, high=hi)
        if self.locked_doors > self.rooms - 1:
            raise ValueError(
                f"household option locked_doors ({self.locked_doors}) must be < rooms ({self.rooms}): "
                "only doors of the room tree can be locked"
            )
        if self.closables > self.rooms * 2:
            raise ValueError(f"household option closables ({self.closables}) must be <= 2 * rooms ({self.rooms})")


PRESETS = {
    "easy": WorldConfig(rooms=3, locked_doors=0, goals=1, distractors=1, closables=1, chutes=0),
    "medium": WorldConfig(),
    "hard": WorldConfig(rooms=6, locked_doors=2, goals=2, distractors=4, closables=4, chutes=2),
}


@dataclass(frozen=True)
class Door:
    a: int
    b: int
    color: int | None   # None: an ordinary door, never locked


@dataclass(frozen=True)
class World:
    rooms: tuple[str, ...]
    doors: tuple[Door, ...]
    exits: tuple[tuple[tuple[int, int], ...], ...]   # per room: (door index, neighbour room), in a fixed order
    chute: tuple[int | None, ...]                      # per room: the room a one-way chute drops you into
    containers: tuple[str, ...]
    container_room: tuple[int, ...]
    closable: tuple[bool, ...]
    room_containers: tuple[tuple[int, ...], ...]
    items: tuple[str, ...]
    key_door: tuple[int, ...]                          # per item: the door it unlocks, -1 for non-keys
    start_room: int
    start_loc: tuple[int, ...]                         # per item: initial container
    goals: tuple[tuple[int, int], ...]                 # (item, container) pairs to achieve
    hand_capacity: int

    @property
    def task_text(self) -> str:
        parts = [f"the {self.items[i]} in the {self.containers[c]}" for i, c in self.goals]
        return "Put " + " and ".join(parts) + "."


def generate(seed: int, config: WorldConfig) -> World:
    """A random world for ``seed``; the same (seed, config) always gives the same world."""
    rng = random.Random(seed)
    n = config.rooms
    rooms = tuple(rng.sample(ROOMS, n))

    # A random tree over the rooms, rooted at the start room 0.
    parent = [-1] + [rng.randrange(i) for i in range(1, n)]
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parent[i]] + 1
    # Lock doors deepest-first candidates are random tree edges; colours are distinct.
    lock_children = rng.sample(range(1, n), config.locked_doors)
    colors = rng.sample(range(len(COLORS)), config.locked_doors)
    door_list: list[Door] = []
    child_door: dict[int, int] = {}
    for child in range(1, n):
        color = colors[lock_children.index(child)] if child in lock_children else None
        child_door[child] = len(door_list)
        door_list.append(Door(parent[child], child, color))

    def behind_locks(room: int) -> list[int]:
        """Locked doors on the tree path from the start to ``room``, outermost first."""
        path = []
        while room != 0:
            d = door_list[child_door[room]]
            if d.color is not None:
                path.append(child_door[room])
            room = parent[room]
        return path[::-1]

    locks_of_room = [behind_locks(r) for r in range(n)]
    start_region = [r for r in range(n) if not locks_of_room[r]]

    # Containers: one receptacle per room (so an item can always be put down), closables spread at random.
    containers: list[str] = []
    container_room: list[int] = []
    closable: list[bool] = []
    for r, name in enumerate(rng.sample(RECEPTACLES, n)):
        containers.append(name)
        container_room.append(r)
        closable.append(False)
    closable_rooms = rng.sample([r for r in range(n) for _ in range(2)], config.closables)
    for r, name in zip(closable_rooms, rng.sample(CLOSABLES, config.closables)):
        containers.append(name)
        container_room.append(r)
        closable.append(True)
    room_containers = tuple(tuple(c for c in range(len(containers)) if container_room[c] == r) for r in range(n))

    def containers_in(rooms_ok: list[int]) -> list[int]:
        return [c for c in range(len(containers)) if container_room[c] in rooms_ok]

    # Items: goal objects, then keys, then distractors (the order is the item index order).
    n_objects = config.goals + config.distractors
    objects = rng.sample(OBJECTS, n_objects)
    items = list(objects)
    key_door = [-1] * n_objects
    start_loc: list[int] = []
    all_containers = list(range(len(containers)))
    locked_ids = [d for d, door in enumerate(door_list) if door.color is not None]

    def behind(d: int) -> list[int]:
        return [r for r in range(n) if d in locks_of_room[r]]

    for g in range(config.goals):
        # Goal object g sits behind locked door g, so every locked door (with enough goals) must be opened.
        pool = containers_in(behind(locked_ids[g])) if g < len(locked_ids) else all_containers
        start_loc.append(rng.choice(pool))
    for _ in range(config.distractors):
        start_loc.append(rng.choice(all_containers))
    for d in locked_ids:
        # The key of door d lies where the agent can get before opening d: start region or behind outer locks.
        outer = set(locks_of_room[door_list[d].b]) - {d}
        allowed = [r for r in range(n) if set(locks_of_room[r]) <= outer]
        items.append(f"{COLORS[door_list[d].color]} key")
        key_door.append(d)
        start_loc.append(rng.choice(containers_in(allowed)))

    goals = []
    for g in range(config.goals):
        # Doors beyond the number of goals guard a goal's target instead.
        extra = [d for k, d in enumerate(locked_ids) if k >= config.goals and (k - config.goals) % config.goals == g]
        pool = containers_in(behind(extra[0])) if extra else all_containers
        target = rng.choice([c for c in pool if c != start_loc[g]] or [c for c in all_containers if c != start_loc[g]])
        goals.append((g, target))

    chute: list[int | None] = [None] * n
    # One-way chutes, each from a random room into the start-region room farthest from it (a shortcut when that is
    # where the agent wants to go, a long detour when entered by mistake). Never into a neighbour.
    for src in rng.sample(range(n), min(config.chutes, n)):
        landing = [r for r in start_region if r != src and parent[src] != r and parent[r] != src]
        if landing:
            far = max(_tree_distance(parent, depth, src, r) for r in landing)
            chute[src] = rng.choice([r for r in landing if _tree_distance(parent, depth, src, r) == far])

    exits = []
    for r in range(n):
        ex = [(d, door.b if door.a == r else door.a) for d, door in enumerate(door_list) if r in (door.a, door.b)]
        exits.append(tuple(sorted(ex, key=lambda e: rooms[e[1]])))

    return World(
        rooms=rooms, doors=tuple(door_list), exits=tuple(exits), chute=tuple(chute),
        containers=tuple(containers), container_room=tuple(container_room), closable=tuple(closable),
        room_containers=room_containers, items=tuple(items), key_door=tuple(key_door), start_room=0,
        start_loc=tuple(start_loc), goals=tuple(goals), hand_capacity=config.hand_capacity,
    )


def _tree_distance(parent: list[int], depth: list[int], a: int, b: int) -> int:
    steps = 0
    while a != b:
        if depth[a] >= depth[b]:
            a = parent[a]
        else:
            b = parent[b]
        steps += 1
    return steps
