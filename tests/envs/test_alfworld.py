"""ALFWorld adapter on small games written in ALFWorld's own data format (the real data cannot be downloaded).

Each game is a folder ``json_2.1.1/<split>/<task>/<trial>/`` with ``traj_data.json``, ``initial_state.pddl`` and
``game.tw-pddl`` (JSON: the ALFRED PDDL domain, the TWL2 grammar with the goal text filled in, the problem, and the
``solvable`` flag written by ``alfworld-generate``), exactly what ``AlfredTWEnv`` and textworld's PddlEnv read.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="the alfworld package is not installed")
pytest.importorskip("fast_downward", reason="ALFWorld's text engine needs fast_downward (textworld[pddl])")

from gopd_fast.envs import make


def _mangle(name: str) -> str:  # ALFWorld's object-id encoding (PlannedGameState.fix_pddl_str_chars)
    for a, b in {"-": "_minus_", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}.items():
        name = name.replace(a, b)
    return name


def write_game(root: Path, split: str, task_type: str, obj: str, recep: str, trial: str, *,
               extra_receps: tuple[str, ...] = (), solvable: bool = True, goal_text: str) -> Path:
    """One ALFWorld game: ``obj`` starts on a countertop, the goal is of ``task_type`` with target ``recep``."""
    import alfworld.gen.goal_library as glib
    from alfworld import info

    game_dir = root / "json_2.1.1" / split / f"{task_type}-{obj}-None-{recep}-1" / trial
    game_dir.mkdir(parents=True)
    o = _mangle(f"{obj}|-01.00|+00.90|-01.00")
    receps = {r: _mangle(f"{r}|-0{i + 2}.00|+00.00|-01.00") for i, r in enumerate((recep, *extra_receps))}
    counter = _mangle("CounterTop|-01.00|+00.95|-01.00")
    locs = {r: f"loc_bar__minus_{4 * (i + 2)}_bar__minus_4_bar_2_bar_30" for i, r in enumerate(receps)}
    counter_loc, start_loc = "loc_bar__minus_4_bar__minus_4_bar_3_bar_60", "loc_bar_0_bar_0_bar_0_bar_30"
    objects = ["agent1 - agent", f"{obj}Type - otype", "CounterTopType - rtype", f"{o} - object",
               f"{counter} - receptacle", f"{counter_loc} - location", f"{start_loc} - location"]
    objects += [f"{r}Type - rtype" for r in receps] + [f"{rid} - receptacle" for rid in receps.values()]
    objects += [f"{loc} - location" for loc in locs.values()]
    init = [f"(receptacleType {counter} CounterTopType)", f"(objectType {o} {obj}Type)",
            f"(atLocation agent1 {start_loc})", f"(pickupable {o})", f"(heatable {o})", f"(coolable {o})",
            f"(cleanable {o})", f"(canContain CounterTopType {obj}Type)", f"(inReceptacle {o} {counter})",
            f"(objectAtLocation {o} {counter_loc})", f"(receptacleAtLocation {counter} {counter_loc})"]
    for r, rid in receps.items():
        init += [f"(receptacleType {rid} {r}Type)", f"(canContain {r}Type {obj}Type)",
                 f"(receptacleAtLocation {rid} {locs[r]})"]
        if r in ("Fridge", "Microwave"):
            init.append(f"(openable {rid})")
    goal = glib.gdict[task_type]["pddl"].format(obj=obj, recep=recep, toggle="", mrecep="").replace("#", "-")
    newline = "\n"
    problem = (f"(define (problem plan_{trial})\n(:domain alfred)\n(:objects\n{newline.join(objects)}\n)\n"
               f"(:init\n{newline.join(init)}\n)\n{goal}")
    (game_dir / "initial_state.pddl").write_text(problem)
    traj = {"task_type": task_type, "pddl_params": {"object_target": obj, "parent_target": recep,
            "toggle_target": "", "mrecep_target": "", "object_sliced": False},
            "turk_annotations": {"anns": [{"task_desc": goal_text}]}}
    (game_dir / "traj_data.json").write_text(json.dumps(traj))
    grammar = Path(info.ALFRED_TWL2_PATH).read_text().replace("UNKNOWN GOAL", goal_text)
    game = {"pddl_domain": Path(info.ALFRED_PDDL_PATH).read_text(), "grammar": grammar, "pddl_problem": problem,
            "solvable": solvable, "walkthrough": None}
    (game_dir / "game.tw-pddl").write_text(json.dumps(game))
    return game_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("alfworld_data")
    write_game(root, "valid_unseen", "pick_and_place_simple", "Apple", "Fridge", "trial_T2",
               extra_receps=("Microwave",), goal_text="put a apple in fridge")
    write_game(root, "valid_unseen", "pick_heat_then_place_in_recep", "Egg", "Fridge", "trial_T1",
               extra_receps=("Microwave",), goal_text="heat some egg and put it in fridge")
    write_game(root, "valid_unseen", "pick_and_place_simple", "Mug", "Fridge", "trial_T3",
               solvable=False, goal_text="put a mug in fridge")             # alfworld-generate found no plan
    write_game(root, "valid_unseen", "pick_and_place_simple", "Pan", "Fridge", "trial_movable_T4",
               goal_text="put a pan in fridge")                             # movable receptacles: unsupported
    write_game(root, "train", "pick_cool_then_place_in_recep", "Apple", "CounterTop", "trial_T5",
               extra_receps=("Fridge",), goal_text="cool some apple and put it in countertop")
    return root


@pytest.fixture(scope="module")
def env(data_dir):
    e = make("alfworld", data_dir=data_dir, max_turns=30)
    yield e
    e.close()


def test_splits_follow_alfworlds_own_game_selection(env):
    ood = env.tasks("eval_out_of_distribution")
    assert ood == [
        "json_2.1.1/valid_unseen/pick_and_place_simple-Apple-None-Fridge-1/trial_T2",
        "json_2.1.1/valid_unseen/pick_heat_then_place_in_recep-Egg-None-Fridge-1/trial_T1",
    ]  # sorted; the unsolvable and the movable games are dropped as AlfredTWEnv drops them
    assert env.tasks("eval") == ood
    assert env.tasks("train") == ["json_2.1.1/train/pick_cool_then_place_in_recep-Apple-None-CounterTop-1/trial_T5"]
    assert env.tasks("eval_in_distribution") == []
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("test")


def test_task_type_filter(data_dir):
    e = make("alfworld", data_dir=data_dir, task_types=[4])
    assert [t.split("/")[2].split("-")[0] for t in e.tasks("eval")] == ["pick_heat_then_place_in_recep"]
    with pytest.raises(ValueError, match="task_types"):
        make("alfworld", data_dir=data_dir, task_types=[7])


@pytest.mark.parametrize("which", [0, 1])
def test_planner_expert_solves_from_the_start_and_after_detours(env, which):
    task_id = env.tasks("eval")[which]
    first = env.reset(task_id)
    assert first.observation.startswith("-= Welcome to TextWorld, ALFRED! =-")
    assert first.task in ("put a apple in fridge", "heat some egg and put it in fridge")
    assert "go to countertop 1" in first.admissible_actions
    # A detour the plan did not contain: the planner replans from the new state (an oracle from any state).
    detour = env.step("go to microwave 1")
    assert detour.observation.startswith("You arrive at microwave 1") and detour.score == 0
    step = detour
    while not step.done:
        action = env.expert_action()
        assert action in step.admissible_actions
        step = env.step(action)
    assert step.success and step.score == 100.0 and env.turns <= 8
    assert env.expert_action() is None


def test_handcoded_expert_solves(data_dir):
    e = make("alfworld", data_dir=data_dir, expert="handcoded")
    first = e.reset(e.tasks("eval")[0])
    step, admissible = None, first.admissible_actions
    for _ in range(30):
        action = e.expert_action()
        assert action in admissible
        step = e.step(action)
        admissible = step.admissible_actions
        if step.done:
            break
    assert step.success and step.score == 100


def test_inadmissible_action_nothing_happens_and_turn_limit(env):
    env.reset(env.tasks("eval")[0])
    env.max_turns = 2
    try:
        step = env.step("eat the fridge")
        assert step.observation == "Nothing happens." and step.info["invalid_action"] and not step.done
        step = env.step("look")
        assert step.done and step.info["truncated"] and not step.success and step.score == 0
        with pytest.raises(RuntimeError, match="after the episode is done"):
            env.step("look")
    finally:
        env.max_turns = 30


def test_bad_input(env, data_dir, tmp_path, monkeypatch):
    for bad in ["json_2.1.1/valid_unseen/nope", "../../etc", "json_2.1.1"]:
        with pytest.raises(ValueError, match="unknown ALFWorld task"):
            env.reset(bad)
    with pytest.raises(TypeError):
        env.reset(3)
    with pytest.raises(TypeError):
        env.step(["look"])
    with pytest.raises(ValueError, match="expert"):
        make("alfworld", data_dir=data_dir, expert="oracle")
    fresh = make("alfworld", data_dir=data_dir)
    with pytest.raises(RuntimeError, match="before reset"):
        fresh.step("look")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="alfworld-download"):
        make("alfworld", data_dir=tmp_path / "nowhere")
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))  # the default comes from $ALFWORLD_DATA
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        make("alfworld")


@pytest.mark.parametrize(("options", "error", "name"), [
    ({"max_turns": True}, TypeError, "max_turns"), ({"max_turns": "30"}, TypeError, "max_turns"),
    ({"task_types": [True]}, TypeError, "task_types"), ({"task_types": "12"}, TypeError, "task_types"),
    ({"task_types": [1.0]}, TypeError, "task_types"), ({"expert": None}, ValueError, "expert"),
    ({"data_dir": 3}, TypeError, "data_dir"), ({"colour": 1}, TypeError, "colour"),
])
def test_options_are_checked_not_coerced(data_dir, options, error, name):
    with pytest.raises(error, match=name):
        make("alfworld", **{"data_dir": data_dir, **options})


def test_odd_task_ids_are_unknown_tasks(env):
    for bad in ["", "json_2.1.1/\udcff", "json_2.1.1/\x00", "\n"]:
        with pytest.raises(ValueError, match="unknown ALFWorld task"):
            env.reset(bad)


def test_any_str_action_gets_the_envs_own_observation(env, malformed_actions):
    env.reset(env.tasks("eval")[0])
    for action in malformed_actions:
        step = env.step(action)
        assert step.observation == "Nothing happens." and step.info["invalid_action"] and not step.done
        env.turns = 0   # stay under the turn limit: this checks the answers, not the limit
    assert env.expert_action() is not None
