"""Env test corpus shared by every env family's tests: actions a policy can emit that no env may choke on."""
from __future__ import annotations

import pytest

MALFORMED_ACTIONS = [
    "look \udcff",                    # a lone low surrogate (killed the JVM through py4j)
    "\ud83d",                         # a lone high surrogate
    "\ud83d\ude00 open door",         # a surrogate pair written as two code points
    "look\x00around",                 # NUL
    "\x1b[31mgo north\x1b[0m",        # terminal escapes
    "open\r\ndoor\tnow\x0b\x0c",      # line breaks and other control characters
    "\u2028\u2029\u200b\ufeff",       # Unicode line/paragraph separators, zero-width space, BOM
    "x" * 1_000_000,                  # very long
    "go " + "to " * 5000 + "kitchen",  # long and parser-shaped
    "\U0001f600 look \U00010348",     # non-BMP characters
    "",                               # empty
    "   ",                            # blank
    "[]()[[[",                        # brackets only
]


@pytest.fixture(params=range(len(MALFORMED_ACTIONS)), ids=lambda i: f"malformed{i}")
def malformed_action(request) -> str:
    return MALFORMED_ACTIONS[request.param]


@pytest.fixture
def malformed_actions() -> list[str]:
    return list(MALFORMED_ACTIONS)
