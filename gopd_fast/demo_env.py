"""``household-mapped``: the household env with a map of the world in the first observation (the demo's env).

Why: the household oracle plans on the *true* state, including where hidden items and keys are. Without that
information in the observations, its actions ("go to cellar" because the key is in the cellar's cabinet) cannot be
inferred from what the agent has seen, so a tiny model imitating it learns only the marginal action distribution:
a 2-layer teacher SFT-ed on 1000 oracle episodes scored 8/100 with 0% success on held-out tasks. A map makes the
task fully observable at the start, so oracle demonstrations become learnable, while every compounding-error
mechanism (single-use keys, one-way chutes, hand capacity, lost credit, the turn limit) stays as it is.

Everything else (tasks, splits, scores, oracle, ``expert_distance``) is ``HouseholdEnv``'s, unchanged.
"""
from __future__ import annotations

from gopd_fast.envs.base import Reset, register
from gopd_fast.envs.household import HouseholdEnv, World

_COLORS = ("red", "blue", "green", "gold")   # gopd_fast.envs.household.world.COLORS


def world_map(world: World) -> str:
    """E.g. "Map: kitchen-hall (red door), hall-cellar; chute cellar->kitchen. Items: mug on bed (garage), red key
    in fridge (bedroom)." Doors, chutes and every item's starting place."""
    doors = []
    for d in world.doors:
        lock = f" ({_COLORS[d.color]} door)" if d.color is not None else ""
        doors.append(f"{world.rooms[d.a]}-{world.rooms[d.b]}{lock}")
    chutes = [f"chute {world.rooms[r]}->{world.rooms[t]}" for r, t in enumerate(world.chute) if t is not None]
    items = []
    for i, c in enumerate(world.start_loc):
        prep = "in" if world.closable[c] else "on"
        items.append(f"{world.items[i]} {prep} {world.containers[c]} ({world.rooms[world.container_room[c]]})")
    return f"Map: {', '.join(doors)}{'; ' + ', '.join(chutes) if chutes else ''}. Items: {', '.join(items)}."


@register("household-mapped")
class MappedHouseholdEnv(HouseholdEnv):
    """``HouseholdEnv`` whose first observation ends with ``world_map(world)``; same options."""

    name = "household-mapped"

    def reset(self, task_id: str) -> Reset:
        first = super().reset(task_id)
        return Reset(f"{first.observation} {world_map(self.world)}", first.task, first.admissible_actions,
                     first.info)
