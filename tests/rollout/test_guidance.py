"""Per-turn guidance coin and action parsing (gopd_fast.rollout.guidance)."""
from __future__ import annotations

import itertools
import math

import pytest

from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.guidance import ActionParser, GuidanceCoin, ParsedAction


def _draws(beta: float, episodes: int, turns: int, seed: int = 0) -> list[list[Role]]:
    return [[c.draw() for _ in range(turns)] for c in (GuidanceCoin(beta, seed, i) for i in range(episodes))]


def test_beta_zero_and_one_are_deterministic():
    assert all(r == Role.STUDENT for ep in _draws(0.0, 50, 30) for r in ep)
    assert all(r == Role.TEACHER for ep in _draws(1.0, 50, 30) for r in ep)


@pytest.mark.parametrize("beta", [0.1, 0.37, 0.5, 0.9])
def test_teacher_fraction_matches_beta(beta):
    """Binomial bound: with n independent draws the fraction is within 5 standard deviations of beta
    (false-failure probability < 1e-6)."""
    draws = [r for ep in _draws(beta, 200, 30, seed=7) for r in ep]
    n = len(draws)
    frac = sum(r == Role.TEACHER for r in draws) / n
    assert abs(frac - beta) <= 5 * math.sqrt(beta * (1 - beta) / n)


def test_coins_are_independent_across_turns_and_episodes():
    """Lag-1 agreement between consecutive turns and between paired episodes matches independence (p^2 + q^2)."""
    beta, eps = 0.5, _draws(0.5, 300, 20, seed=3)
    n_turn = sum(len(e) - 1 for e in eps)
    same_turn = sum(a == b for e in eps for a, b in itertools.pairwise(e)) / n_turn
    same_ep = sum(a == b for e1, e2 in itertools.pairwise(eps) for a, b in zip(e1, e2)) / (len(eps[0]) * (len(eps) - 1))
    expected = beta**2 + (1 - beta) ** 2
    for value, n in ((same_turn, n_turn), (same_ep, len(eps[0]) * (len(eps) - 1))):
        assert abs(value - expected) <= 5 * math.sqrt(expected * (1 - expected) / n)


def test_coin_is_reproducible_and_aligned_across_betas():
    assert _draws(0.4, 5, 10, seed=1) == _draws(0.4, 5, 10, seed=1)
    assert _draws(0.4, 5, 10, seed=1) != _draws(0.4, 5, 10, seed=2)
    # Same uniforms for every beta: raising beta only ever turns student turns into teacher turns.
    low, high = _draws(0.2, 20, 10), _draws(0.6, 20, 10)
    assert all(not (lo == Role.TEACHER and hi == Role.STUDENT) for a, b in zip(low, high) for lo, hi in zip(a, b))


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        GuidanceCoin(beta, 0)


def test_parse_react_action():
    parse = ActionParser()
    assert parse("Thought: mug is there.\nAction: take mug from counter\n").action == "take mug from counter"
    assert parse("Action: look\nObservation: x\nAction:  open fridge ").action == "open fridge"   # last wins
    assert parse("<think>Action: wrong</think>\nAction: go to kitchen") == ParsedAction("go to kitchen", True)
    assert parse("<think>Action: only in thought</think>\ngo north").action == "go north"


def test_unparsable_goes_to_env_raw():
    out = ActionParser()("  I will open the fridge  ")
    assert out.action == "I will open the fridge" and out.parsed is False
    assert ActionParser()("Action:   ").parsed is False


def test_configurable_pattern():
    parse = ActionParser(r"<action>(.*?)</action>")
    assert parse("blah <action>open fridge</action> blah").action == "open fridge"
    assert ActionParser(r"\bgo to \w+")("I should go to kitchen now").action == "go to kitchen"
    with pytest.raises(ValueError, match="valid regex"):
        ActionParser("(")
    with pytest.raises(ValueError, match="capturing group"):
        ActionParser(r"(a)(b)")
    with pytest.raises(TypeError):
        ActionParser()(None)
