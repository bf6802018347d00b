"""envs/options.py: option checks that never coerce, ASCII-digit task-id parsing, and action_text; and every
in-process env family (household, webshop, alfworld: JVM families are in their own files) rejecting bad options
and answering any str action with its own observation."""
from __future__ import annotations

import math

import pytest

from gopd_fast import envs
from gopd_fast.envs.options import (
    MAX_ACTION_CHARS,
    action_text,
    check_bool,
    check_int,
    check_seconds,
    parse_index,
)


@pytest.mark.parametrize(("value", "error"), [(True, TypeError), ("0", TypeError), (1.5, TypeError),
                                              (1.0, TypeError), (None, TypeError), (-1, ValueError),
                                              (11, ValueError)])
def test_check_int_rejects_without_coercing(value, error):
    with pytest.raises(error, match=r"option seed must be an int in \[0, 10\], got"):
        check_int("seed", value, low=0, high=10)
    assert check_int("seed", 3, low=0, high=10) == 3
    assert check_int("seed", None, optional=True) is None


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None, "True"])
def test_check_bool_takes_only_bools(value):
    with pytest.raises(TypeError, match="option report_distance must be True or False"):
        check_bool("report_distance", value)
    assert check_bool("report_distance", False) is False


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                              (math.nan, ValueError), ("5", TypeError), (True, TypeError)])
def test_check_seconds(value, error):
    with pytest.raises(error, match="option step_timeout_s must be a"):
        check_seconds("step_timeout_s", value)
    assert check_seconds("step_timeout_s", 2) == 2.0


@pytest.mark.parametrize("text", ["²", "٣", "-1", "+1", " 1", "1 ", "03", "", "1.0", "1e3", "0x1", "½", "１"])
def test_parse_index_takes_ascii_digits_only(text):
    with pytest.raises(ValueError, match=r"unknown fam task id 'fam/.*': .* expected 'fam/<n>'"):
        parse_index(text, f"fam/{text}", "fam", "'fam/<n>'")
    assert parse_index("0", "fam/0", "fam", "") == 0 and parse_index("120", "fam/120", "fam", "") == 120


def test_action_text_is_encodable_printable_and_bounded(malformed_actions):
    for action in malformed_actions:
        text = action_text(action)
        text.encode("utf-8")                      # no lone surrogate is left
        assert all(c.isprintable() or c == " " for c in text)
        assert len(text) <= MAX_ACTION_CHARS
    assert action_text("look \udcff") == "look \ufffd"
    assert action_text("\ud83d\ude00") == "\U0001f600"      # a pair written as two code points is one character
    assert action_text("look\x00around\n") == "look around "
    assert action_text("open the fridge") == "open the fridge"   # ordinary text is untouched
    for bad in (None, b"look", 3, ["look"]):
        with pytest.raises(TypeError, match="action must be a str"):
            action_text(bad)


# ------------------------------------------------------------------------------------------- household
@pytest.mark.parametrize(("options", "error", "name"), [
    ({"max_turns": True}, TypeError, "max_turns"), ({"max_turns": 0}, ValueError, "max_turns"),
    ({"seed": "0"}, TypeError, "seed"), ({"seed": 1.5}, TypeError, "seed"), ({"seed": True}, TypeError, "seed"),
    ({"report_distance": "no"}, TypeError, "report_distance"), ({"report_distance": 1}, TypeError, "report_distance"),
    ({"num_train": 2.0}, TypeError, "num_train"), ({"num_eval": 0}, ValueError, "num_eval"),
    ({"max_solution": False}, TypeError, "max_solution"), ({"observe": "all"}, ValueError, "observe"),
    ({"difficulty": ["easy"]}, ValueError, "difficulty"), ({"rooms": "4"}, TypeError, "rooms"),
    ({"hand_capacity": True}, TypeError, "hand_capacity"), ({"colour": 3}, TypeError, "colour"),
])
def test_household_options_are_checked_not_coerced(options, error, name):
    with pytest.raises(error, match=name):
        envs.make("household", **options)


def test_household_answers_any_str_action(malformed_action):
    env = envs.make("household", seed=0)
    env.reset("household/train/0")
    step = env.step(malformed_action)
    assert step.info.get("invalid_action") and not step.done
    step.observation.encode("utf-8")              # the observation is text a tokenizer can take
    assert len(step.observation) < 2 * MAX_ACTION_CHARS
    assert env.step(env.expert_action()).observation   # the episode goes on


def test_household_non_str_action_is_a_type_error():
    env = envs.make("household", seed=0)
    env.reset("household/train/0")
    for bad in (None, 3, b"look", ["look"]):
        with pytest.raises(TypeError, match="action must be a str"):
            env.step(bad)
