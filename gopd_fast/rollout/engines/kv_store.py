"""Per-sequence KV caches kept across ``generate`` calls, found again by token prefix.

Multi-turn histories are append-only, so turn k's prompt starts with turn k-1's prompt and response: the engine
stores each sequence's keys/values after a call, and the next call's prompt that extends it prefills only the
appended tokens. Matching by tokens (not by an episode id) keeps the engine interface unchanged and is always
safe: a prompt reuses exactly the positions whose tokens it shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(eq=False)
class CachedSequence:
    tokens: list[int]        # the tokens whose keys/values ``kv`` holds, in order
    kv: torch.Tensor         # [layers, 2, kv_heads, len(tokens), head_dim]
    last_used: int = 0
    hidden: torch.Tensor | None = None   # [len(tokens), hidden]: final hidden states, when the engine keeps them


class SequenceKVStore:
    """Cached sequences under a token budget, least recently used evicted first.

    Args:
        max_tokens: the most cached positions kept over all sequences (memory: this times the model's KV bytes
            per token). Finished episodes' sequences are never looked up again and age out.
    """

    def __init__(self, max_tokens: int) -> None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self._entries: list[CachedSequence] = []
        self._tokens = 0
        self._clock = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def cached_tokens(self) -> int:
        return self._tokens

    def lookup(self, prompt: list[int]) -> tuple[CachedSequence | None, int]:
        """The cached sequence sharing the longest prefix with ``prompt`` among those that contain a whole
        cached sequence or are contained in it, and how many of its positions to reuse (at most
        ``len(prompt) - 1``: the last prompt token is always run, its logits start the response)."""
        best, best_len = None, 0
        n = len(prompt)
        for e in self._entries:
            m = min(len(e.tokens), n - 1)
            if m > best_len and prompt[m - 1] == e.tokens[m - 1] and prompt[:m] == e.tokens[:m]:
                best, best_len = e, m
        if best is not None:
            self._clock += 1
            best.last_used = self._clock
        return best, best_len

    def replace(self, consumed: list[CachedSequence], added: list[CachedSequence]) -> None:
        """Drop ``consumed`` (extended by this call: their successors supersede them), add ``added``, evict."""
        gone = {id(e) for e in consumed}
        self._entries = [e for e in self._entries if id(e) not in gone]
        self._clock += 1
        for e in added:
            e.last_used = self._clock
        self._entries.extend(added)
        self._tokens = sum(len(e.tokens) for e in self._entries)
        if self._tokens > self.max_tokens:
            self._entries.sort(key=lambda e: e.last_used)
            while self._entries and self._tokens > self.max_tokens:
                self._tokens -= len(self._entries.pop(0).tokens)

    def clear(self) -> None:
        self._entries, self._tokens = [], 0
