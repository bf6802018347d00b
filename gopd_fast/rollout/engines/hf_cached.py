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

from gopd_fast.rollout.engines.base import Generation, SamplingConfig, WeightsLike, check_prompts
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
        keep_hidden: also keep every cached position's final hidden state (``last_hidden_state``; 512 more bytes
            per position for the demo's teacher), so ``final_hidden`` can hand a finished episode's hidden states
            to the trainer computing only the positions this engine never ran (the teacher's rollout replaces
            its second forward; ``rollout.reuse_teacher_hidden``).
    """

    def __init__(self, model: torch.nn.Module, *, max_cached_tokens: int = 1 << 18, keep_hidden: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(keep_hidden, bool):
            raise TypeError(f"keep_hidden must be a bool, got {keep_hidden!r}")
        self.decoder = Qwen3Decoder(self.model)
        self.store = SequenceKVStore(max_cached_tokens)
        self.keep_hidden = keep_hidden

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
        hits, starts, cache = self._cached_prefixes(prompts, length)
        b = len(prompts)
        with_hidden = self.keep_hidden
        new = [p[s:] for p, s in zip(prompts, starts)]
        logits = dec.prefill(new, starts, cache, hidden=with_hidden)
        if with_hidden:
            logits, prefill_hidden = logits
            prefill_hidden = prefill_hidden.split([len(n) for n in new])
        device = dec.device

        stop_ids = set(self._stop_ids(sampling))
        stop = torch.tensor(sorted(stop_ids), device=device)
        steps = sampling.max_tokens
        # Sampled tokens and log-probs go into [rows, steps] buffers (one indexed write per step, read out once
        # at the end); ``rows`` maps each active row to its original row as finished rows are compacted away.
        out_tokens = torch.zeros(b, steps, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(b, steps, dtype=torch.float32, device=device)
        # the final hidden state of each fed-back response token (its position's, as its KV)
        out_hidden = torch.zeros(b, steps, dec.hidden_size, dtype=dec.dtype, device=device) if with_hidden else None
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
            if with_hidden:
                logits, hidden = dec.forward(tok, cur, cache, span=longest + step + 1, hidden=True)
                out_hidden[rows, step] = hidden
            else:
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
            hidden = None
            if with_hidden:
                parts = [prefill_hidden[r], out_hidden[r, :end - 1]]
                hidden = torch.cat(parts if hits[r] is None else [hits[r].hidden[:starts[r]], *parts])
            added.append(CachedSequence(seq, saved[r][:, :, :, :len(seq)].clone(), hidden=hidden))
        self.store.replace([h for h in hits if h is not None], added)
        return gens

    def _cached_prefixes(self, prompts: list[list[int]], length: int
                         ) -> tuple[list[CachedSequence | None], list[int], torch.Tensor]:
        """Each prompt's longest cached prefix (its sequence or None, and how many positions to reuse) and a
        cache for the call, ``length`` positions per row, with those prefixes copied in."""
        found = [self.store.lookup(p) for p in prompts]
        hits, starts = [h for h, _ in found], [m for _, m in found]
        cache = self.decoder.new_cache(len(prompts), length, filled=[len(p) for p in prompts])
        for r, (s, h) in enumerate(zip(starts, hits)):
            if h is not None:
                cache[:, :, r, :, :s] = h.kv[:, :, :, :s]
        return hits, starts, cache

    @torch.no_grad()
    def final_hidden(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """The model's final hidden states (``last_hidden_state``) of each whole token sequence, [len, hidden]
        per sequence: a cached prefix's stored states plus one prefill of the positions after it (for a finished
        episode: the turns written after this engine's last call). Needs ``keep_hidden``. The sequences' cache
        entries are dropped after (a finished episode is not continued)."""
        if not self.keep_hidden:
            raise RuntimeError("final_hidden needs an engine built with keep_hidden=True")
        sequences = check_prompts(sequences, self.vocab_size, name="sequences")
        if not sequences:
            return []
        longest = max(len(q) for q in sequences)
        if longest > self.decoder.max_positions:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's {self.decoder.max_positions} "
                             "positions")
        hits, starts, cache = self._cached_prefixes(sequences, longest)
        new = [q[s:] for q, s in zip(sequences, starts)]
        _, hidden = self.decoder.prefill(new, starts, cache, hidden=True)
        out = [h if hit is None else torch.cat([hit.hidden[:s], h])
               for h, hit, s in zip(hidden.split([len(n) for n in new]), hits, starts)]
        self.store.replace([h for h in hits if h is not None], [])
        return out


def load_hf_engine(path: str, *, kv_reuse: bool, dtype: str = "float32", device: str = "cpu",
                   keep_hidden: bool = False, **kwargs: Any) -> HFEngine:
    """The transformers engine for a saved model: KV reuse across turns (``CachedHFEngine``, optionally keeping
    final hidden states: ``keep_hidden``) or the re-encoding ``HFEngine``; the one switch behind
    ``rollout.kv_reuse``."""
    if not isinstance(kv_reuse, bool):
        raise TypeError(f"kv_reuse must be a bool, got {kv_reuse!r}")
    if keep_hidden and not kv_reuse:
        raise ValueError("keep_hidden=True needs kv_reuse=True (the re-encoding engine keeps no state)")
    if kv_reuse:
        return CachedHFEngine.from_pretrained(path, dtype=dtype, device=device, keep_hidden=keep_hidden, **kwargs)
    return HFEngine.from_pretrained(path, dtype=dtype, device=device, **kwargs)
