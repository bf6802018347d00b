"""gopd_fast.packed_attention: per-episode causal attention over packed rows."""
from __future__ import annotations

import copy

import pytest
import torch

from gopd_fast import models, packed_attention
from gopd_fast.packing import pack_episodes
from gopd_fast.rollout.episode import Episode, Role

CORPUS = ["You are in the kitchen. Action: open fridge", "Task: put the mug in the fridge."] * 20


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tok = models.train_tokenizer(CORPUS, vocab_size=300)
    m = models.build_model(models.config_for_tokenizer("student-tiny", tok), seed=0)
    return m.float().train()


def _episode(ids: list[int]) -> Episode:
    n = len(ids)
    roles = [int(Role.CONTEXT)] * 3 + [int(Role.STUDENT)] * (n - 3)
    return Episode(task_id="t", token_ids=ids, roles=roles, logprobs=[0.0] * n, turn_spans=[(3, n)],
                   turn_roles=[int(Role.STUDENT)], actions=["a"], score=0.0, success=False, rounds=1, beta=0.0)


def test_segments_follow_position_resets():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert packed_attention.segments(pos) == [[(0, 3), (3, 5), (5, 9)], [(0, 9)]]
    with pytest.raises(ValueError, match="position_ids must be"):
        packed_attention.segments(pos[0])


def test_packed_rows_match_separate_forwards_and_dense_mask(model):
    """Hidden states and gradients of packed rows equal one forward per episode (no cross-episode leak)."""
    g = torch.Generator().manual_seed(1)
    episodes = [_episode(torch.randint(3, 300, (n,), generator=g).tolist()) for n in (37, 20, 51, 9)]
    batch = pack_episodes(episodes, 64, pad_id=0)
    assert batch.input_ids.shape[0] < len(episodes), "the batch must pack several episodes into a row"
    name = packed_attention.register()
    outs = {}
    for impl in (name, "sdpa"):
        m = copy.deepcopy(model)
        m.config._attn_implementation = impl
        h = m.model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
        real = batch.episode_index >= 0
        (h[real] ** 2).mean().backward()
        outs[impl] = (h.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None})
        if impl == name:
            for i, ep in enumerate(episodes):   # each episode alone, unpacked
                r, c = (batch.episode_index == i).nonzero()[0].tolist()
                alone = model.model(input_ids=torch.tensor([ep.token_ids]), use_cache=False).last_hidden_state[0]
                torch.testing.assert_close(h[r, c:c + len(ep.token_ids)].detach(), alone.detach(),
                                           atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs[name][0], outs["sdpa"][0], atol=1e-5, rtol=1e-4)
    assert outs[name][1].keys() == outs["sdpa"][1].keys() and len(outs[name][1]) > 10
    for k, grad in outs[name][1].items():
        torch.testing.assert_close(grad, outs["sdpa"][1][k], atol=1e-5, rtol=1e-4, msg=k)


def test_rejects_masks_and_caches(model):
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="needs position_ids"):
        packed_attention.packed_sdpa_attention(model, q, q, q, None)
    with pytest.raises(ValueError, match="needs position_ids"):
        packed_attention.packed_sdpa_attention(model, q, q, q, torch.ones(1, 1, 4, 4),
                                               position_ids=torch.arange(4)[None])
