"""The transformers engine with KV reuse across turns (``rollout.kv_reuse = true``, the default).

Each sequence's keys/values stay cached after a call (``SequenceKVStore``); a prompt that extends a cached
sequence (the next turn of the same episode: its history is append-only and token-exact) prefills only the
tokens appended since, i.e. the last sampled token, the observation and the chat-template pieces. All the
call's sequences then decode together, one batched step per token, through a lean forward over the model's
weights (``Qwen3Decoder``: folded projections, one fused attention call per row in prefill, decode steps in
NumPy for float32 on CPU) instead of ``generate``'s module stack. A weight sync drops every cache.

Outputs follow ``HFEngine`` (the re-encoding path, ``rollout.kv_reuse = false``): the same tokens at
temperature 0 up to float rounding, the same sampling rule (``sampling.next_tokens``) and raw log-probs.
"""
from __future__ import annotations

from typing import Any

import torch

from gopd_fast.rollout.engines.base import Generation, SamplingConfig, WeightsLike
from gopd_fast.rollout.engines.decoder import Qwen3Decoder
from gopd_fast.rollout.engines.hf import HFEngine
from gopd_fast.rollout.engines.kv_store import CachedSequence, SequenceKVStore
from gopd_fast.rollout.engines.sampling import next_tokens


class CachedHFEngine(HFEngine):
    """``HFEngine`` with per-sequence KV caches kept across calls and a lean batched decode loop.

    Args:
        model, pad_token_id, eos_token_ids, max_batch_size: as ``HFEngine``; the model must be a plain Qwen3.
        max_cached_tokens: cached positions kept over all sequences, least recently used evicted first
            (the demo's 4-layer teacher holds 2 KiB per position in float32).
    """

    def __init__(self, model: torch.nn.Module, *, max_cached_tokens: int = 1 << 18, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.decoder = Qwen3Decoder(self.model)
        self.store = SequenceKVStore(max_cached_tokens)

    def reset_prefix_cache(self) -> None:
        self.store.clear()

    def sync_weights(self, weights: WeightsLike) -> float:
        self.store.clear()      # first: nothing computed with the old weights survives, even if loading fails
        seconds = super().sync_weights(weights)
        self.decoder.refresh()
        return seconds

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        dec = self.decoder
        longest = max(len(p) for p in prompts)
        length = longest + sampling.max_tokens          # every position this call writes or reads
        if length > dec.max_positions:
            raise ValueError(f"a prompt of {longest} tokens plus max_tokens={sampling.max_tokens} exceeds the "
                             f"model's {dec.max_positions} positions")
        found = [self.store.lookup(p) for p in prompts]
        hits, starts = [h for h, _ in found], [m for _, m in found]
        b = len(prompts)
        cache = dec.new_cache(b, length, filled=[len(p) for p in prompts])   # prompts: copied in or prefilled
        for r, (s, h) in enumerate(zip(starts, hits)):
            if h is not None:
                cache[:, :, r, :, :s] = h.kv[:, :, :, :s]
        logits = dec.prefill([p[s:] for p, s in zip(prompts, starts)], starts, cache)
        device = dec.device

        stop_ids = set(self._stop_ids(sampling))
        stop = torch.tensor(sorted(stop_ids), device=device)
        steps = sampling.max_tokens
        # Sampled tokens and log-probs go into [rows, steps] buffers (one indexed write per step, read out once
        # at the end); ``rows`` maps each active row to its original row as finished rows are compacted away.
        out_tokens = torch.zeros(b, steps, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(b, steps, dtype=torch.float32, device=device)
        rows = torch.arange(b, device=device)
        cur = torch.tensor([len(p) for p in prompts], device=device)   # next position of each active row
        done = torch.zeros(b, dtype=torch.bool, device=device)
        saved: dict[int, torch.Tensor] = {}     # KV rows of finished sequences taken out by compaction
        for step in range(steps):
            tok = next_tokens(logits, sampling)
            out_tokens[rows, step] = tok
            out_logprobs[rows, step] = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            done |= torch.isin(tok, stop)
            if step == steps - 1:
                break
            finished = int(done.sum())
            if finished == len(done):
                break
            if finished * 2 >= len(done):
                # Half the rows are done: decode the others only (the finished rows' KV kept as views of the old
                # cache, which nothing writes any more).
                keep = (~done).nonzero().squeeze(-1)
                for i in done.nonzero().squeeze(-1).tolist():
                    saved[int(rows[i])] = cache[:, :, i]
                cache, rows, cur, tok, done = cache[:, :, keep], rows[keep], cur[keep], tok[keep], done[keep]
            logits = dec.forward(tok, cur, cache, span=longest + step + 1)
            cur += 1

        for i, r in enumerate(rows.tolist()):
            saved[r] = cache[:, :, i]
        gens, added = [], []
        for r, (p, ids_r, lps_r) in enumerate(zip(prompts, out_tokens.tolist(), out_logprobs.tolist())):
            hit = next((k for k, t in enumerate(ids_r) if t in stop_ids), None)
            end = hit + 1 if hit is not None else len(ids_r)
            gens.append(Generation(ids_r[:end], lps_r[:end], "stop" if hit is not None else "length",
                                   num_cached_tokens=starts[r]))
            # KV exists for the prompt and every response token but the last (never fed back in). A copy, so the
            # store's token budget is its memory (a view would keep this call's whole cache alive).
            seq = p + ids_r[:end - 1]
            added.append(CachedSequence(seq, saved[r][:, :, :, :len(seq)].clone()))
        self.store.replace([h for h in hits if h is not None], added)
        return gens


def load_hf_engine(path: str, *, kv_reuse: bool, dtype: str = "float32", device: str = "cpu",
                   **kwargs: Any) -> HFEngine:
    """The transformers engine for a saved model: KV reuse across turns (``CachedHFEngine``) or the
    re-encoding ``HFEngine``; the one switch behind ``rollout.kv_reuse``."""
    if not isinstance(kv_reuse, bool):
        raise TypeError(f"kv_reuse must be a bool, got {kv_reuse!r}")
    cls = CachedHFEngine if kv_reuse else HFEngine
    return cls.from_pretrained(path, dtype=dtype, device=device, **kwargs)
