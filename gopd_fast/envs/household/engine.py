"""The rules of the household world: the mutable state, the action grammar, transitions and observation text.

Action grammar (lower case, one line; "the" is ignored, "on" works like "in"):
    look | inventory | go to <room> | enter chute | open <container> | close <container>
    take <item> from <container> | put <item> in <container> | unlock <colour> door with <colour> key
Anything else, or a well-formed action that is impossible now, changes nothing and gets a short refusal
("Nothing happens.", "The red door is locked.", "Your hands are full.").
"""
from __future__ import annotations

from dataclasses import dataclass

from gopd_fast.envs.household.world import COLORS, HAND, USED, World

# Operations: tuples whose first field names the kind; the rest are indices into the world.
Op = tuple

LOOK, INVENTORY, GO, CHUTE, OPEN, CLOSE, TAKE, PUT, UNLOCK = range(9)


@dataclass
class State:
    room: int
    loc: list[int]          # per item: container index, HAND or USED
    opened: list[bool]      # per container (receptacles are always open)
    locked: list[bool]      # per door

    @classmethod
    def initial(cls, world: World) -> State:
        return cls(
            room=world.start_room,
            loc=list(world.start_loc),
            opened=[not c for c in world.closable],
            locked=[d.color is not None for d in world.doors],
        )

    def key(self) -> tuple:
        """A hashable snapshot; equal keys mean equal states."""
        return (self.room, tuple(self.loc), tuple(self.opened), tuple(self.locked))

    @classmethod
    def from_key(cls, key: tuple) -> State:
        room, loc, opened, locked = key
        return cls(room, list(loc), list(opened), list(locked))

    def held(self) -> list[int]:
        return [i for i, where in enumerate(self.loc) if where == HAND]


def solved(world: World, loc: list[int] | tuple[int, ...]) -> bool:
    return all(loc[i] == c for i, c in world.goals)


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(words: list[str]) -> str:
    if len(words) <= 2:
        return " and ".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _door_name(world: World, d: int) -> str:
    return f"{COLORS[world.doors[d].color]} door"


def describe_room(world: World, s: State) -> str:
    """E.g. "You are in the hall. You see a closed fridge, a table with a mug. Exits: kitchen, office (locked red
    door), chute to cellar." Tens of tokens by design."""
    things = []
    for c in world.room_containers[s.room]:
        name = world.containers[c]
        if not s.opened[c]:
            things.append(f"a closed {name}")
            continue
        inside = [_article(world.items[i]) for i, where in enumerate(s.loc) if where == c]
        prefix = f"an open {name}" if world.closable[c] else _article(name)
        things.append(f"{prefix} with {_join(inside)}" if inside else prefix)
    exits = []
    for d, other in world.exits[s.room]:
        exits.append(f"{world.rooms[other]} (locked {_door_name(world, d)})" if s.locked[d] else world.rooms[other])
    if world.chute[s.room] is not None:
        exits.append(f"chute to {world.rooms[world.chute[s.room]]}")
    return f"You are in the {world.rooms[s.room]}. You see {', '.join(things)}. Exits: {', '.join(exits)}."


def admissible(world: World, s: State) -> dict[str, Op]:
    """Every action that does something now, text -> operation, in a fixed order."""
    acts: dict[str, Op] = {"look": (LOOK,), "inventory": (INVENTORY,)}
    for d, other in world.exits[s.room]:
        if not s.locked[d]:
            acts[f"go to {world.rooms[other]}"] = (GO, other)
    if world.chute[s.room] is not None:
        acts["enter chute"] = (CHUTE, world.chute[s.room])
    here = world.room_containers[s.room]
    for c in here:
        if world.closable[c]:
            if s.opened[c]:
                acts[f"close {world.containers[c]}"] = (CLOSE, c)
            else:
                acts[f"open {world.containers[c]}"] = (OPEN, c)
    loc = s.loc
    held = [i for i, where in enumerate(loc) if where == HAND]
    if len(held) < world.hand_capacity:
        for c in here:
            if s.opened[c]:
                for i, where in enumerate(loc):
                    if where == c:
                        acts[f"take {world.items[i]} from {world.containers[c]}"] = (TAKE, i, c)
    for i in held:
        for c in here:
            if s.opened[c]:
                acts[f"put {world.items[i]} in {world.containers[c]}"] = (PUT, i, c)
    for d, _ in world.exits[s.room]:
        if s.locked[d]:
            for i in held:
                if world.key_door[i] == d:
                    acts[f"unlock {_door_name(world, d)} with {world.items[i]}"] = (UNLOCK, d, i)
    return acts


def apply(world: World, s: State, op: Op) -> str:
    """Execute an admissible operation in place and return the observation text."""
    kind = op[0]
    if kind == GO:
        s.room = op[1]
        return describe_room(world, s)
    if kind == TAKE:
        s.loc[op[1]] = HAND
        return f"You take the {world.items[op[1]]}."
    if kind == PUT:
        s.loc[op[1]] = op[2]
        return f"You put the {world.items[op[1]]} in the {world.containers[op[2]]}."
    if kind == OPEN:
        s.opened[op[1]] = True
        inside = [_article(world.items[i]) for i, where in enumerate(s.loc) if where == op[1]]
        holds = f"It holds {_join(inside)}." if inside else "It is empty."
        return f"You open the {world.containers[op[1]]}. {holds}"
    if kind == CLOSE:
        s.opened[op[1]] = False
        return f"You close the {world.containers[op[1]]}."
    if kind == UNLOCK:
        s.locked[op[1]] = False
        s.loc[op[2]] = USED
        return f"You unlock the {_door_name(world, op[1])}. The key stays in the lock."
    if kind == CHUTE:
        s.room = op[1]
        return "You slide down the chute. " + describe_room(world, s)
    if kind == LOOK:
        return describe_room(world, s)
    held = s.held()
    return f"You carry {_join([_article(world.items[i]) for i in held])}." if held else "You carry nothing."


def normalize(action: str) -> str:
    """Case, spacing, a trailing period, "the" and "on" (as in "put mug on table") do not matter."""
    words = action.strip().lower().rstrip(".!").split()
    return " ".join("in" if w == "on" else w for w in words if w != "the")


def refusal(world: World, s: State, text: str) -> str:
    """Why a non-admissible action failed, in a few words (the env's "invalid action" observation)."""
    if text.startswith("go to "):
        for d, other in world.exits[s.room]:
            if world.rooms[other] == text[6:] and s.locked[d]:
                return f"The {_door_name(world, d)} is locked."
    elif text.startswith("take ") and len(s.held()) >= world.hand_capacity:
        return "Your hands are full."
    return "Nothing happens."


def op_text(world: World, op: Op) -> str:
    """The action text of an operation (the inverse of the admissible mapping)."""
    kind = op[0]
    if kind == GO:
        return f"go to {world.rooms[op[1]]}"
    if kind == TAKE:
        return f"take {world.items[op[1]]} from {world.containers[op[2]]}"
    if kind == PUT:
        return f"put {world.items[op[1]]} in {world.containers[op[2]]}"
    if kind == OPEN:
        return f"open {world.containers[op[1]]}"
    if kind == CLOSE:
        return f"close {world.containers[op[1]]}"
    if kind == UNLOCK:
        return f"unlock {_door_name(world, op[1])} with {world.items[op[2]]}"
    if kind == CHUTE:
        return "enter chute"
    return "look" if kind == LOOK else "inventory"
