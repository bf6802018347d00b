"""household: the embedded default environment (pure Python, no dependencies).

Procedurally generated multi-room household tasks such as "Put the mug in the sink.": a random tree of rooms with
doors (some locked: "unlock red door with red key"), containers (always-open receptacles such as a table or sink;
closed ones such as a fridge that must be opened), goal items, keys and distractor items. Observations are a few
tens of tokens over a small closed vocabulary, e.g.

    You are in the hall. You see a closed fridge, a table with a mug. Exits: kitchen, office (locked red door),
    chute to cellar.

Task ids look like "household/train/17"; ``tasks(split)`` lists them in index order. A task's world is generated
from a stable hash of (seed, split, index), so splits are deterministic for a seed and train and eval worlds are
distinct draws. Score: 0-100, equal credit per sub-goal (each locked door that every solution must open, each goal
item picked up, each goal item delivered); success when every goal item is in its target, and the score is 100
exactly then. ``max_turns`` defaults to 20; the worlds never depend on it. Difficulty presets ("easy", "medium" =
default, "hard") and every knob of ``WorldConfig`` (rooms, locked_doors, goals, distractors, closables, chutes,
hand_capacity) are options of ``envs.make("household", ...)``; generation places goal item k behind locked door k.

Observability (``observe``): "room" (default) shows the current room only; "map" adds a map of the world to the
first observation; "full" adds the complete state the oracle plans on to every observation, so that a model of a
few hundred thousand parameters can learn the oracle (the demo's setting; ``household/observe.py``); "full-target"
also gives each goal's target room, which "full" leaves out (the study's strong-teacher arm).

Oracle: ``expert_action()`` is the next step of a shortest plan found by search over the true state from the
CURRENT state, so it labels recovery actions after any mistake; ``expert_distance()`` is that plan's length.

Compounding errors by design. A mistake costs more than the turn it takes, and the states it leads to are off the
expert's path, because:
  * keys are single-use and lie somewhere reachable before their door, often rooms away from it: a key carried
    along the wrong branch, or put down in the wrong room, has to be fetched back;
  * a one-way chute drops whoever enters it into the start region: entered by mistake it costs the whole walk back;
  * the hands hold ``hand_capacity`` (default 2) things: a picked-up distractor can block the item that matters
    until it is put down again;
  * a delivered item taken out again loses its credit, and the turn limit makes every wasted turn permanent.
There are no dead ends (generation places every key before its door and lands the chute in the start region), so
the oracle can always recover. tests/envs/test_household_compounding.py measures it on the default preset: one
random non-optimal action after 0-2 expert steps costs 1.29 turns on average ("turns lost" = 1 + distance after -
distance before, so 1 = only its own turn), 28% of such mistakes cost 2 or more (at most 3 here), 72% of the
state-changing ones land in states the expert's trajectory never visits, and four mistakes in a row cost 4.4 turns.
"""
from gopd_fast.envs.household.env import HouseholdEnv
from gopd_fast.envs.household.world import PRESETS, World, WorldConfig, generate

__all__ = ["PRESETS", "HouseholdEnv", "World", "WorldConfig", "generate"]
