"""Episode (gopd_fast.rollout.episode): what a source hands the trainer is checked where it is built."""
from __future__ import annotations

import pytest

from gopd_fast.rollout.episode import Episode, Role


def _episode(**changes) -> Episode:
    fields = {"task_id": "t", "token_ids": [3, 4, 5, 6], "roles": [0, 0, Role.STUDENT, Role.TEACHER],
              "logprobs": [0.0, 0.0, -0.5, -0.2], "turn_spans": [(2, 4)], "turn_roles": [Role.STUDENT],
              "actions": ["look"], "score": 0.0, "success": False, "rounds": 1, "beta": 0.5}
    return Episode(**{**fields, **changes})


def test_a_valid_episode():
    ep = _episode()
    assert ep.num_loss_tokens == 2 and ep.teacher_turn_fraction == 0.0


@pytest.mark.parametrize("token_ids", [[3, 4.0, 5, 6], [3, 4, -1, 6], [3, True, 5, 6], [3, "4", 5, 6]])
def test_token_ids_must_be_non_negative_ints(token_ids):
    """The trainer packs ids into a long tensor: 4.7 would silently become the valid id 4."""
    with pytest.raises(ValueError, match="token_ids must be non-negative ints"):
        _episode(token_ids=token_ids)


@pytest.mark.parametrize("roles", [[0, 0, 3, 2], [0, 0, 1.0, 2], [0, 0, -1, 2]])
def test_roles_must_be_role_values(roles):
    with pytest.raises(ValueError, match=r"roles must be Role values \[0, 1, 2\]"):
        _episode(roles=roles)


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="one entry per token"):
        _episode(roles=[0, 0, 1])
    with pytest.raises(ValueError, match="one entry per turn"):
        _episode(turn_roles=[])
