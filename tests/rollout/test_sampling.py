"""next_tokens (gopd_fast.rollout.engines.sampling) applies transformers' warpers in their order."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gopd_fast.rollout.engines.base import SamplingConfig
from gopd_fast.rollout.engines.sampling import next_tokens


def _hf_support(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    x = TemperatureLogitsWarper(s.temperature)(None, logits.clone())
    if s.top_k:
        x = TopKLogitsWarper(s.top_k)(None, x)
    if s.top_p < 1:
        x = TopPLogitsWarper(s.top_p)(None, x)
    return torch.isfinite(x)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(next_tokens(logits, SamplingConfig(temperature=0.0)), logits.argmax(-1))


def test_draws_stay_in_the_warped_support_of_transformers():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g) * 3
    for s in (SamplingConfig(temperature=0.7, top_p=0.8), SamplingConfig(temperature=1.3, top_k=5),
              SamplingConfig(temperature=0.5, top_k=10, top_p=0.5)):
        support = _hf_support(logits, s)
        assert (support.sum(-1) < 64).all(), "the warpers must cut something for this test to mean anything"
        torch.manual_seed(2)
        draws = torch.stack([next_tokens(logits, s) for _ in range(300)], dim=1)      # [4, 300]
        assert support.gather(1, draws).all()
        # ... and every token of a small support is reachable
        for row in range(4):
            if int(support[row].sum()) <= 3:
                assert set(draws[row].tolist()) == set(support[row].nonzero().squeeze(-1).tolist())


def test_draws_follow_the_softmax():
    """The inverse-CDF draw has the distribution of ``torch.multinomial`` on the softmax: empirical frequencies
    of 20000 draws per row within a total-variation bound (> 3x the expected sampling error) of the exact
    probabilities, and a token with probability 0 (top-k) is never drawn."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 12, generator=g) * 2
    torch.manual_seed(4)
    s = SamplingConfig(temperature=1.0)
    draws = torch.stack([next_tokens(logits, s) for _ in range(20000)], dim=1)
    for row in range(3):
        freq = torch.bincount(draws[row], minlength=12).double() / draws.shape[1]
        assert 0.5 * float((freq - logits[row].double().softmax(-1)).abs().sum()) < 0.02
    top2 = torch.stack([next_tokens(logits, SamplingConfig(temperature=1.0, top_k=2)) for _ in range(2000)], 1)
    allowed = logits.topk(2, dim=-1).indices
    assert all(set(top2[r].tolist()) == set(allowed[r].tolist()) for r in range(3))
