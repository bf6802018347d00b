"""How much of the world the agent sees: the household env's ``observe`` option.

``"room"`` (default) shows only the current room, as a text game does. The oracle, however, plans on the true
state, including where hidden items and keys are, so imitating it from room views alone means guessing. That is
fine for a pretrained LLM agent, which explores, but not for a model of a few hundred thousand parameters trained
on a CPU: a 2-layer teacher SFT-ed on 1000 oracle episodes with room views scored 8/100 with 0% success.

``"map"`` appends ``world_map`` to the first observation: the doors, the chutes and every item's starting place.
Everything the oracle knows is then in the history, but it has to be tracked across turns (the 2-layer teacher
still scored 6.9/100).

``"full"`` appends ``status`` to every observation: the goals, the room and its exits, what the agent carries,
where the goal items and the keys still needed are now, which containers are closed and which doors locked, and
for each room that is not a neighbour the exit that leads towards it. The next oracle action is then a function of
the last observation, so a small model can learn it; what stays hard is choosing sub-goals in order (key before
door, open before take, hands free before take) and everything that makes mistakes compound (single-use keys,
one-way chutes, hand capacity, lost credit, the turn limit), which no option changes. The demo
(``configs/demo.toml``) uses ``"full"``.

``"full"`` falls short of that promise in one place: a goal names its target container but not the room it is in.
A closed target shows its room ("closed fridge (bedroom)") until it is opened; a receptacle (always open) never
does, so an agent carrying the goal item to a shelf it has not seen yet can only guess the room the oracle walks
to. The study teacher (``docs/study/README.md``) ended about 45% of its held-out episodes holding the goal item
with two of three sub-goals done, most of them that way. ``"full-target"`` is ``"full"`` with each goal's target
room ("goal mug in shelf (garage)"): every observation then holds what the oracle plans on. ``"full"`` is kept
unchanged because committed teachers, the demo and the first study were built on it.
"""
from __future__ import annotations

from gopd_fast.envs.household.world import COLORS, HAND, World

OBSERVE_MODES = ("room", "map", "full", "full-target")
STATUS_MODES = ("full", "full-target")   # the modes that append ``status`` to every observation


def world_map(world: World) -> str:
    """E.g. "Map: kitchen-hall (red door), hall-cellar; chute cellar->kitchen. Items: mug on bed (garage), red key
    in fridge (bedroom)." Doors, chutes and every item's starting place."""
    doors = []
    for d in world.doors:
        lock = f" ({COLORS[d.color]} door)" if d.color is not None else ""
        doors.append(f"{world.rooms[d.a]}-{world.rooms[d.b]}{lock}")
    chutes = [f"chute {world.rooms[r]}->{world.rooms[t]}" for r, t in enumerate(world.chute) if t is not None]
    items = [f"{world.items[i]} {_place(world, c)}" for i, c in enumerate(world.start_loc)]
    return f"Map: {', '.join(doors)}{'; ' + ', '.join(chutes) if chutes else ''}. Items: {', '.join(items)}."


def _with_room(world: World, c: int) -> str:
    return f"{world.containers[c]} ({world.rooms[world.container_room[c]]})"


def _place(world: World, c: int) -> str:
    return f"{'in' if world.closable[c] else 'on'} {_with_room(world, c)}"


def first_exits(world: World, room: int) -> dict[int, int]:
    """For every other room, the neighbour of ``room`` on the tree path to it (doors only; chutes are shortcuts the
    agent sees in the room's exits)."""
    first: dict[int, int] = {}
    for _, nb in world.exits[room]:
        stack = [(nb, room)]
        while stack:
            r, came_from = stack.pop()
            first[r] = nb
            stack += [(o, r) for _, o in world.exits[r] if o != came_from]
    return first


def status(world: World, room: int, loc: list[int] | tuple[int, ...], opened: list[bool] | tuple[bool, ...],
           locked: list[bool] | tuple[bool, ...], target_rooms: bool = False) -> str:
    """E.g. "Status: goal mug in fridge; at bedroom, exits office; carrying blue key; mug on bed (garage); closed
    fridge (bedroom); locked garage blue door (office); route pantry via office." Everything the oracle plans on,
    kept short (it is in every observation): the goals, the room and its exits, what is carried, where each goal
    item and each key of a still-locked door is, the closed containers, the locked doors, and the first exit towards
    every room that is not a neighbour. Distractors are left out (the room views show them); they only matter when
    the hands are full. ``target_rooms`` (``observe="full-target"``): each goal's target container with its room."""
    goal_items = {i for i, _ in world.goals}
    target = (lambda c: _with_room(world, c)) if target_rooms else (lambda c: world.containers[c])
    parts = ["goal " + " and ".join(f"{world.items[i]} in {target(c)}" for i, c in world.goals)]
    # Where the agent is and its exits, again: after a refused action ("Nothing happens.") the observation has no
    # room view, and a small model should not have to look turns back for it.
    exits = [world.rooms[nb] for _, nb in world.exits[room]]
    if world.chute[room] is not None:
        exits.append("chute")
    parts.append(f"at {world.rooms[room]}, exits {' '.join(exits)}")
    carried = [world.items[i] for i, where in enumerate(loc) if where == HAND]
    parts.append("carrying " + " and ".join(carried) if carried else "carrying nothing")
    for i, where in enumerate(loc):
        needed = i in goal_items or (world.key_door[i] >= 0 and locked[world.key_door[i]])
        if needed and where >= 0:
            parts.append(f"{world.items[i]} {_place(world, where)}")
    for c in range(len(world.containers)):
        if world.closable[c] and not opened[c]:
            parts.append(f"closed {world.containers[c]} ({world.rooms[world.container_room[c]]})")
    for d, door in enumerate(world.doors):
        if locked[d]:
            parts.append(f"locked {world.rooms[door.b]} {COLORS[door.color]} door ({world.rooms[door.a]})")
    neighbours = {nb for _, nb in world.exits[room]}
    for r, nb in first_exits(world, room).items():
        if r not in neighbours:
            parts.append(f"route {world.rooms[r]} via {world.rooms[nb]}")
    return "Status: " + "; ".join(parts) + "."
