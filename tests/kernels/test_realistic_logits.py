"""bench/realistic_logits.py: the realistic benchmark inputs and the statistics that describe them."""
from __future__ import annotations

import pytest
import realistic_logits as rl  # bench/ is on pytest's pythonpath (pyproject.toml)
import torch


def test_quiet_tiles_counted_exactly():
    """Logits with one loud token per row: a (token tile x vocabulary tile) is quiet only if no row of the tile
    puts mass on its columns under either model."""
    n, vocab = 6, 10
    zs = torch.full((n, vocab), -50.0)
    zt = zs.clone()
    zs[torch.arange(3), 0] = 0.0   # rows 0-2 (token tile 0): column 0 (vocabulary tile 0)
    zs[torch.arange(3, 6), 9] = 0.0  # rows 3-5 (token tile 1): column 9 (vocabulary tile 2)
    zt[torch.arange(3), 4] = 0.0   # teacher of token tile 0: column 4 (vocabulary tile 1)
    zt[torch.arange(3, 6), 9] = 0.0
    stats = rl.logit_statistics(zs, zt, tile=3, negligible=1e-3)
    # 2 token tiles x 4 vocabulary tiles (10 columns); loud: (0, 0), (0, 1), (1, 3): 5 of 8 quiet
    assert stats["quiet_tile_fraction"] == pytest.approx(5 / 8)
    assert stats["top1_agreement"] == pytest.approx(0.5)
    assert stats["top1_student_median"] == pytest.approx(1.0, abs=1e-12)
    assert stats["entropy_student_mean"] == pytest.approx(0.0, abs=1e-15)


def test_generator_is_peaked_and_agreeing_unlike_flat_inputs():
    real = rl.generator_statistics(256, 4096, 64, 96)
    flat = rl.flat_statistics(256, 4096, 64, 96)
    assert real["top1_student_median"] > 0.3 and real["top1_teacher_median"] > 0.3
    assert flat["top1_student_median"] < 0.05
    assert 0.5 < real["top1_agreement"] < 0.95  # agreeing most of the time, not always
    assert real["entropy_student_mean"] < flat["entropy_student_mean"] - 3
    assert flat["quiet_tile_fraction"] == 0.0
    p = rl.realistic_inputs(64, 4096, 64, 96, dtype=torch.float64)
    small_tiles = rl.logit_statistics(p["hs"] @ p["ws"].T, p["ht"] @ p["wt"].T, tile=16)
    assert small_tiles["quiet_tile_fraction"] > 0.1  # the Zipf tail: rare columns are quiet for whole tiles


def test_generator_shapes_dtypes_and_errors():
    p = rl.realistic_inputs(5, 70, 8, 12, dtype=torch.float16, seed=3)
    assert {k: tuple(v.shape) for k, v in p.items()} == {"hs": (5, 8), "ws": (70, 8), "ht": (5, 12), "wt": (70, 12)}
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in p.values())
    again = rl.realistic_inputs(5, 70, 8, 12, dtype=torch.float16, seed=3)
    assert all(torch.equal(p[k], again[k]) for k in p)
    with pytest.raises(ValueError, match="ds, dt >= 2"):
        rl.realistic_inputs(5, 70, 1, 12)
    with pytest.raises(ValueError, match="one shape"):
        rl.logit_statistics(torch.zeros(2, 3), torch.zeros(2, 4))
