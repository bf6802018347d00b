"""Next-token choice from raw logits, as ``transformers``' ``generate`` does it (one owner for both HF engines'
rule): greedy at temperature 0; else temperature, then top-k, then top-p (nucleus) filtering, then one
multinomial draw from the global (or the caller's forked) torch RNG."""
from __future__ import annotations

import torch

from gopd_fast.rollout.engines.base import SamplingConfig


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """One token id per row of ``logits`` ([rows, vocab], raw); returns a long tensor [rows]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float()
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # HF's TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, always keep the top token
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - sampling.top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(-1)
