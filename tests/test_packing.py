"""Whole-episode packing on real household expert episodes tokenised with the real (locally trained) tokenizer."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.config import load_config
from gopd_fast.distributed import DistInfo
from gopd_fast.packing import (
    pack_episodes,
    pack_token_states,
    per_turn_reprefill_tokens,
    plan_rows,
    shard_episodes,
    whole_episode_tokens,
)
from gopd_fast.rollout.episode import Role


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from gopd_fast import envs
    from gopd_fast.models import load_model
    from gopd_fast.rollout.history import ChatFormat
    from gopd_fast.train import ensure_tiny_models, expert_episode

    root = tmp_path_factory.mktemp("tiny")
    cfg = load_config(None, [f"model.student={root}/student", f"model.teacher={root}/teacher"])
    ensure_tiny_models(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    model, tok = load_model(cfg.model.student)
    env = envs.make("household", seed=0, max_turns=12)
    chat = ChatFormat(tok)
    episodes = [expert_episode(env, t, chat, tok.eos_token_id) for t in env.tasks("train")[:5]]
    return model, tok, episodes


def test_plan_rows_first_fit_decreasing():
    rows = plan_rows([5, 9, 3, 7, 12], max_tokens_per_row=12)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    lengths = [5, 9, 3, 7, 12]
    assert all(sum(lengths[i] for i in r) <= 12 for r in rows)
    assert rows[0] == [4] and len(rows) == 3                       # 12 | 9+3 | 7+5
    assert plan_rows([20, 4], max_tokens_per_row=10) == [[0], [1]]  # too long: a row of its own


def test_packed_rows_hold_every_episode_with_shifted_targets(tiny):
    _, tok, episodes = tiny
    batch = pack_episodes(episodes, max_tokens_per_row=1024, pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] < len(episodes)                 # several episodes share a row
    assert batch.num_tokens == sum(len(e.token_ids) for e in episodes)
    assert batch.num_loss_tokens == sum(sum(r != Role.CONTEXT for r in e.roles[1:]) for e in episodes)
    for i, ep in enumerate(episodes):
        r, cols = (batch.episode_index == i).nonzero(as_tuple=True)
        assert r.unique().numel() == 1 and cols.numel() == len(ep.token_ids)
        row, c0 = int(r[0]), int(cols[0])
        n = len(ep.token_ids)
        assert batch.input_ids[row, c0:c0 + n].tolist() == ep.token_ids
        assert batch.position_ids[row, c0:c0 + n].tolist() == list(range(n))
        assert batch.target_ids[row, c0:c0 + n - 1].tolist() == ep.token_ids[1:]
        assert batch.target_roles[row, c0:c0 + n - 1].tolist() == ep.roles[1:]
        assert batch.target_roles[row, c0 + n - 1] == Role.CONTEXT   # the last token predicts nothing
    assert batch.input_ids.shape[1] % 8 == 0
    assert not batch.loss_mask[batch.episode_index < 0].any()        # padding never carries loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_equals_one_forward_per_episode(tiny, attn):
    model, tok, episodes = tiny
    model.config._attn_implementation = attn
    batch = pack_episodes(episodes, max_tokens_per_row=1024, pad_id=tok.pad_token_id)
    with torch.no_grad():
        packed = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                             use_cache=False).last_hidden_state
        for i, ep in enumerate(episodes):
            alone = model.model(input_ids=torch.tensor([ep.token_ids]), use_cache=False).last_hidden_state[0]
            torch.testing.assert_close(packed[batch.episode_index == i], alone, rtol=1e-4, atol=1e-5)


def test_pack_token_states_follows_the_packed_layout(tiny):
    """Per-token vectors of each episode land where ``pack_episodes`` put that episode's tokens (several
    episodes per row, in placement order), zeros on padding; each vector encodes (episode, position)."""
    _, tok, episodes = tiny
    batch = pack_episodes(episodes, max_tokens_per_row=1024, pad_id=tok.pad_token_id)
    assert batch.input_ids.shape[0] < len(episodes)
    states = [torch.stack([torch.full((len(e.token_ids),), float(i + 1)),
                           torch.arange(len(e.token_ids), dtype=torch.float32)], dim=1)
              for i, e in enumerate(episodes)]
    packed = pack_token_states(batch, states)
    assert packed.shape == (*batch.input_ids.shape, 2)
    real = batch.episode_index >= 0
    assert torch.equal(packed[..., 0][real], (batch.episode_index[real] + 1).float())
    assert torch.equal(packed[..., 1][real], batch.position_ids[real].float())
    assert not packed[~real].any()


def test_pack_token_states_bad_input(tiny):
    _, tok, episodes = tiny
    batch = pack_episodes(episodes, max_tokens_per_row=1024, pad_id=tok.pad_token_id)
    good = [torch.zeros(len(e.token_ids), 3) for e in episodes]
    with pytest.raises(ValueError, match="one tensor per packed episode"):
        pack_token_states(batch, good[:-1])
    short = [*good[:2], torch.zeros(len(episodes[2].token_ids) - 1, 3), *good[3:]]
    with pytest.raises(ValueError, match=r"states\[2\] must be a \[\d+, d\] tensor"):
        pack_token_states(batch, short)
    with pytest.raises(ValueError, match=r"states\[1\] must be"):
        pack_token_states(batch, [good[0], [0.0] * len(episodes[1].token_ids), *good[2:]])
    wide = [*good[:3], torch.zeros(len(episodes[3].token_ids), 4), *good[4:]]
    with pytest.raises(ValueError, match="share the width and dtype"):
        pack_token_states(batch, wide)


def test_shard_episodes_partitions_and_balances(tiny):
    _, _, episodes = tiny
    shards = [shard_episodes(episodes, r, 2) for r in range(2)]
    ids = sorted(id(e) for s in shards for e in s)
    assert ids == sorted(id(e) for e in episodes)
    loads = [sum(len(e.token_ids) for e in s) for s in shards]
    assert max(loads) - min(loads) <= max(len(e.token_ids) for e in episodes)


def test_whole_episode_scoring_is_linear_in_turns_reprefill_quadratic(tiny):
    _, _, episodes = tiny
    for ep in episodes:
        assert whole_episode_tokens(ep) == len(ep.token_ids)
        assert per_turn_reprefill_tokens(ep) == sum(end for _, end in ep.turn_spans)
        if len(ep.turn_spans) > 2:
            assert per_turn_reprefill_tokens(ep) > 2 * whole_episode_tokens(ep)


def test_bad_input(tiny):
    tok = tiny[1]
    with pytest.raises(ValueError, match="at least one episode"):
        pack_episodes([], 64, tok.pad_token_id)
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        plan_rows([3], 0)
