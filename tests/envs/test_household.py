"""household: protocol, determinism, grammar, score, and the oracle checked against an unpruned search."""
from __future__ import annotations

import itertools
import random
import re
from collections import deque

import pytest

from gopd_fast import envs
from gopd_fast.envs.household import engine
from gopd_fast.envs.household.oracle import shortest_plan


@pytest.fixture
def env():
    return envs.make("household", seed=0)


def _bfs_distance(world, state) -> int:
    """Reference: plain BFS over EVERY admissible action (no pruning), on State objects through the engine."""
    start = state.key()
    if engine.solved(world, state.loc):
        return 0
    seen, frontier = {start}, deque([(start, 0)])
    while frontier:
        key, dist = frontier.popleft()
        for op in engine.admissible(world, engine.State.from_key(key)).values():
            s = engine.State.from_key(key)
            engine.apply(world, s, op)
            if engine.solved(world, s.loc):
                return dist + 1
            nxt = s.key()
            if nxt not in seen:
                seen.add(nxt)
                frontier.append((nxt, dist + 1))
    raise AssertionError("unsolvable world")


def test_splits_are_deterministic_and_disjoint():
    a, b = envs.make("household", seed=3), envs.make("household", seed=3)
    assert a.tasks("train") == [f"household/train/{i}" for i in range(1000)]
    assert len(a.tasks("eval")) == 200
    for tid in a.tasks("train")[:20] + a.tasks("eval")[:20]:
        assert a.reset(tid) == b.reset(tid)
    train = {a.reset(t).observation for t in a.tasks("train")[:200]}
    evals = {a.reset(t).observation for t in a.tasks("eval")[:200]}
    assert len(train) > 150 and len(evals) > 150       # varied worlds
    other = envs.make("household", seed=4)
    assert sum(a.reset(t) != other.reset(t) for t in a.tasks("train")[:50]) > 45  # the seed matters


def test_reset_and_step_protocol(env):
    first = env.reset("household/train/5")
    assert isinstance(first, envs.Reset) and first.task.startswith("Put the ")
    assert first.task in first.observation and "look" in first.admissible_actions
    step = env.step("look")
    assert isinstance(step, envs.StepResult) and step.observation.startswith("You are in the ")
    assert not step.done and env.turns == 1 and 0 <= step.score < 100
    assert set(step.admissible_actions) == set(engine.admissible(env.world, env.state))


def test_oracle_solves_every_task_optimally(env):
    """On the initial states and on states after random detours, the oracle's plan length equals an unpruned BFS
    and following expert_action() solves the task in exactly expert_distance() steps with score 100."""
    rng = random.Random(1)
    for tid in env.tasks("eval")[:25]:
        env.reset(tid)
        for _ in range(rng.randrange(4)):                  # drift off the expert's path first
            env.step(rng.choice(env.step("look").admissible_actions))
        dist = env.expert_distance()
        assert dist == _bfs_distance(env.world, env.state), tid
        turns0, last = env.turns, None
        while env.expert_action() is not None:
            last = env.step(env.expert_action())
            assert env.expert_distance() == dist - (env.turns - turns0)
        assert env.turns - turns0 == dist and last.success and last.score == 100.0 and last.done


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_difficulties_solvable_within_turn_limit(difficulty):
    env = envs.make("household", seed=0, difficulty=difficulty, max_turns=30)
    for tid in env.tasks("train")[:15]:
        env.reset(tid)
        d = env.expert_distance()
        assert 1 <= d <= 25
        assert d == len(shortest_plan(env.world, env.state.key()))


def test_partial_score_counts_subgoals():
    env = envs.make("household", seed=0, locked_doors=1, goals=1)
    env.reset("household/train/0")   # a world with one locked door: 3 sub-goals (unlock, pick, deliver)
    goal_item = env.world.items[env.world.goals[0][0]]
    changes, score = [], 0.0
    while env.expert_action() is not None:
        action = env.expert_action()
        result = env.step(action)
        if result.score != score:
            changes.append((action.split()[0], action.split()[1], result.score))
            score = result.score
    assert changes == [("unlock", "blue", 33.33), ("take", goal_item, 66.67), ("put", goal_item, 100.0)]


def test_invalid_actions_observe_never_raise(env):
    env.reset("household/train/0")
    before = env.state.key()
    for bad in ["", "   ", "dance", "go to moon", "take sun from sky", "put mug in", "open", "x" * 500, "\n\t"]:
        result = env.step(bad)
        assert result.info.get("invalid_action") and result.observation in {
            "Nothing happens.", "Your hands are full."} or result.observation.endswith("is locked.")
        if result.done:
            break
    assert env.state.key() == before
    env.reset("household/train/0")
    assert env.step("  LOOK. ").observation == env.step("look").observation   # case/space/period-insensitive
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(None)


def test_locked_door_refusal():
    env = envs.make("household", seed=0)
    env.reset("household/train/0")          # bedroom -> office; office has a locked blue door to the garage
    env.step("go to office")
    assert env.step("go to garage").observation == "The blue door is locked."


def test_turn_limit_and_step_after_done():
    env = envs.make("household", seed=0, max_turns=3)
    env.reset("household/train/1")
    results = [env.step("look") for _ in range(3)]
    assert [r.done for r in results] == [False, False, True]
    assert results[-1].info["truncated"] and not results[-1].success
    with pytest.raises(RuntimeError, match="after the episode"):
        env.step("look")


def test_bad_task_ids_and_options():
    env = envs.make("household")
    with pytest.raises(RuntimeError, match="before reset"):
        env.step("look")
    for bad in ["household/train/1000", "household/test/0", "alfworld/train/0", "household/train/-1",
                "household/eval/²", "household/eval/٣", "household/eval/03", "household/eval/ 3", "household/eval/",
                "household/eval/1/2", "household/eval/1.0"]:
        with pytest.raises(ValueError, match="unknown household task id"):
            env.reset(bad)
    with pytest.raises(TypeError, match="task_id must be a str"):
        env.reset(7)
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("dev")
    with pytest.raises(ValueError, match="unknown environment"):
        envs.make("no-such-env")
    with pytest.raises(TypeError, match="unknown household option"):
        envs.make("household", room=3)
    with pytest.raises(ValueError, match=r"option rooms must be an int in \[2, \d+\]"):
        envs.make("household", rooms=1)
    with pytest.raises(ValueError, match="locked_doors"):
        envs.make("household", rooms=3, locked_doors=3)
    with pytest.raises(ValueError, match="difficulty"):
        envs.make("household", difficulty="insane")
    with pytest.raises(ValueError, match="max_turns"):
        envs.make("household", max_turns=0)


def test_observations_are_short_with_a_small_closed_vocabulary(env):
    rng, vocab, longest = random.Random(0), set(), 0
    for tid in env.tasks("train")[:100]:
        result = env.reset(tid)
        texts, done = [result.observation], False
        while not done:
            result = env.step(rng.choice(result.admissible_actions))
            texts.append(result.observation)
            done = result.done
        for text in texts:
            words = re.findall(r"[a-z]+", text.lower())
            longest = max(longest, len(words))
            vocab.update(words)
    assert longest <= 60, longest
    assert len(vocab) <= 130, sorted(vocab)


def test_snapshot_restore_branches_exactly(env):
    env.reset("household/train/2")
    env.step(env.expert_action())
    snap, obs = env.snapshot(), env.step("look").observation
    env.step("inventory")
    for action in env.step("look").admissible_actions[2:]:
        env.step(action)
        env.restore(snap)
    assert env.step("look").observation == obs and env.turns == 2


@pytest.mark.parametrize("options", [{"difficulty": "hard"}, {"locked_doors": 2, "goals": 1}])
def test_score_reaches_100_exactly_at_success(options):
    """Along the oracle's path the score never decreases, rises only at sub-goals, and every required door, pick
    and delivery is worth the same share."""
    env = envs.make("household", seed=0, max_turns=40, **options)
    for tid in env.tasks("eval")[:10]:
        env.reset(tid)
        scores = [0.0]
        while env.expert_action() is not None:
            scores.append(env.step(env.expert_action()).score)
        steps = sorted(set(scores))
        n_subgoals = len(env._required_doors) + 2 * len(env.world.goals)
        assert scores == sorted(scores) and scores[-1] == 100.0 and scores[-2] < 100.0
        assert len(steps) == n_subgoals + 1
        assert all(abs(b - a - 100.0 / n_subgoals) < 0.02 for a, b in itertools.pairwise(steps))


def test_required_doors_match_search():
    """The structural rule (something needed lies behind the door) equals the definition: with the door's key
    made useless, no plan exists."""
    from dataclasses import replace

    from gopd_fast.envs.household.env import required_doors

    for options in ({"difficulty": "hard"}, {"rooms": 6, "locked_doors": 3, "goals": 1, "distractors": 1}):
        env = envs.make("household", seed=0, **options)
        for tid in env.tasks("train")[:12]:
            world = env.world_of(tid)
            start = engine.State.initial(world).key()
            by_search = {
                d for d, door in enumerate(world.doors) if door.color is not None and shortest_plan(
                    replace(world, key_door=tuple(-1 if k == d else k for k in world.key_door)), start) is None
            }
            assert required_doors(world) == by_search, tid


def test_expert_distance_reported_in_info():
    env = envs.make("household", seed=0, report_distance=True)
    first = env.reset("household/eval/3")
    assert first.info["expert_distance"] == env.expert_distance() >= 1
    result = env.step("look")
    assert result.info["expert_distance"] == first.info["expert_distance"]
    plain = envs.make("household", seed=0)
    plain.reset("household/eval/3")
    assert "expert_distance" not in plain.step("look").info
