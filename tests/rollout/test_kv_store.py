"""SequenceKVStore (gopd_fast.rollout.engines.kv_store): prefix lookup and the LRU token budget."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.rollout.engines.kv_store import CachedSequence, SequenceKVStore


def _seq(tokens: list[int]) -> CachedSequence:
    return CachedSequence(tokens, torch.zeros(1, 2, 1, len(tokens), 2))


def test_lookup_takes_the_longest_shared_prefix_and_leaves_one_token_to_run():
    store = SequenceKVStore(max_tokens=100)
    short, long, other = _seq([1, 2, 3]), _seq([1, 2, 3, 4, 5]), _seq([1, 9, 9, 9, 9, 9])
    store.replace([], [short, long, other])
    assert store.lookup([1, 2, 3, 4, 5, 6, 7]) == (long, 5)       # extends the longest one
    assert store.lookup([1, 2, 3, 4, 5]) == (long, 4)             # equal to it: all but the last token
    assert store.lookup([1, 2, 3, 7, 7]) == (short, 3)            # diverges from `long` after 3 tokens
    assert store.lookup([5, 6, 7]) == (None, 0)
    assert store.lookup([1]) == (None, 0)                         # nothing to reuse: the one token must run


def test_replace_drops_consumed_and_evicts_least_recently_used():
    store = SequenceKVStore(max_tokens=10)
    a, b = _seq([1, 2, 3, 4]), _seq([5, 6, 7, 8])
    store.replace([], [a, b])
    assert store.cached_tokens == 8
    store.lookup([1, 2, 3, 4, 9])                                 # `a` is now more recent than `b`
    c = _seq([7, 7, 7])
    store.replace([], [c])                                        # 11 > 10: the LRU one (`b`) goes
    assert store.lookup([5, 6, 7, 8, 9]) == (None, 0)
    assert store.lookup([1, 2, 3, 4, 9])[0] is a and store.cached_tokens == 7
    a2 = _seq([1, 2, 3, 4, 9, 10])
    store.replace([a], [a2])                                      # `a` was extended: its successor replaces it
    assert len(store) == 2 and store.lookup([1, 2, 3, 4, 9, 10, 11]) == (a2, 6)
    store.clear()
    assert len(store) == 0 and store.cached_tokens == 0
    with pytest.raises(ValueError, match="max_tokens"):
        SequenceKVStore(0)
