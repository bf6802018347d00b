"""kernels/forward.py: per-token statistics of the online forward pass vs float64 materialised logits."""
from __future__ import annotations

import math

import pytest
import torch
from gopd_fast.kernels.forward import NUM_PARTIALS, combine_partials, kl_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,temperature,jsd_beta", [(True, 0.7, 0.3), (False, 1.0, None)])
def test_stats_match_float64(problem, ref, rel_err, dtype, bias, temperature, jsd_beta):
    p = problem(dtype=dtype, bias=bias)
    stats = kl_forward(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], p["targets"], temperature, jsd_beta)
    _, expected = ref(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], p["rw"], p["fw"],
                      jsd_beta=None, temperature=temperature, target_ids=p["targets"])
    for name, value in expected.items():
        assert stats[name].dtype == torch.float32 and stats[name].shape == (37,)
        assert (stats[name].double() - value).abs().max().item() < 2e-5, name
    zs = (p["hs"].double() @ p["ws"].double().T + (p["bs"].double() if bias else 0)) / temperature
    assert rel_err(stats["lse_s"], zs.logsumexp(-1)) < 1e-6
    if jsd_beta is not None:
        jsd_ref, _ = ref(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], torch.ones(37), p["fw"],
                         jsd_beta=jsd_beta, temperature=temperature)
        assert (stats["jsd"].double() - jsd_ref).abs().max().item() < 2e-5
    else:
        assert "jsd" not in stats


def test_target_logprobs_on_tile_edges(problem, ref):
    """Targets on the first/last column of the vocabulary and of a vocabulary tile are found exactly once."""
    p = problem(n=5, vocab=97, ds=24, dt=20)
    targets = torch.tensor([0, 96, 31, 32, 63], device=p["hs"].device)
    stats = kl_forward(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], targets, 1.0, None)
    _, expected = ref(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], p["rw"], p["fw"],
                      jsd_beta=None, temperature=1.0, target_ids=targets)
    for name in ("student_logprob", "teacher_logprob"):
        assert (stats[name].double() - expected[name]).abs().max().item() < 1e-5


def test_combine_partials_ignores_empty_splits():
    """A split that saw no vocabulary (m = -inf, sums 0) must not change the merged statistics."""
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(3, 10, generator=g) * 3, torch.randn(3, 10, generator=g) * 3
    part = torch.zeros(NUM_PARTIALS, 3, 3)
    for split, cols in enumerate((slice(0, 4), slice(4, 10))):
        s, t = z_s[:, cols], z_t[:, cols]
        m_s, m_t = s.amax(1), t.amax(1)
        e_s, e_t = (s - m_s[:, None]).exp(), (t - m_t[:, None]).exp()
        part[:, split] = torch.stack([m_s, e_s.sum(1), m_t, e_t.sum(1), (e_s * (s - t)).sum(1),
                                      (e_t * (t - s)).sum(1), (e_s * s).sum(1), torch.zeros(3), torch.zeros(3)])
    part[0, 2] = part[2, 2] = -math.inf  # the empty split
    merged = combine_partials(part)
    logp_s, logp_t = z_s.log_softmax(-1), z_t.log_softmax(-1)
    assert torch.allclose(merged["lse_s"], z_s.logsumexp(-1), atol=1e-5)
    assert torch.allclose(merged["reverse_kl"], (logp_s.exp() * (logp_s - logp_t)).sum(-1), atol=1e-5)
    assert torch.allclose(merged["forward_kl"], (logp_t.exp() * (logp_t - logp_s)).sum(-1), atol=1e-5)
    assert torch.allclose(merged["student_entropy"], -(logp_s.exp() * logp_s).sum(-1), atol=1e-5)
