"""kernels/logit_tiles.py: the grouped launch order and the vocabulary split bounds (Triton device functions vs
their Python twins in tiling)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from gopd_fast.kernels.logit_tiles import grouped_tile, logit_tile, split_bounds

from gopd_fast.kernels import tiling


@triton.jit
def _grouped_tile_probe(out_ptr, num_n, num_v, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    pid_n, pid_v = grouped_tile(pid, num_n, num_v, GROUP)
    tl.store(out_ptr + 2 * pid, pid_n)
    tl.store(out_ptr + 2 * pid + 1, pid_v)


@pytest.mark.parametrize("num_n,num_v,group", [(5, 7, 2), (16, 3, 16), (3, 4, 8), (1, 1, 4), (37, 5, 16)])
def test_grouped_order_matches_python_twin_and_covers_every_tile_once(num_n, num_v, group):
    out = torch.full((num_n * num_v * 2,), -1, dtype=torch.int32,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    _grouped_tile_probe[(num_n * num_v,)](out, num_n, num_v, GROUP=group)
    got = [tuple(pair) for pair in out.view(-1, 2).tolist()]
    want = [tiling.grouped_tile(pid, num_n, num_v, group) for pid in range(num_n * num_v)]
    assert got == want
    assert sorted(want) == [(i, j) for i in range(num_n) for j in range(num_v)]
    # Within a full group, consecutive programs walk the group's token tiles before the next vocabulary tile.
    if num_n >= group:
        assert [t[0] for t in want[:group]] == list(range(group)) and {t[1] for t in want[:group]} == {0}


@triton.jit
def _split_bounds_probe(out_ptr, V, split_unit):
    split = tl.program_id(0)
    start, end = split_bounds(split, tl.num_programs(0), V, split_unit)
    tl.store(out_ptr + 2 * split, start)
    tl.store(out_ptr + 2 * split + 1, end)


@pytest.mark.parametrize("num_splits,vocab,unit", [(3, 203, 32), (1, 5, 32), (7, 151936, 128), (5, 640, 128)])
def test_split_bounds_match_python_twin(num_splits, vocab, unit):
    """The kernels' split columns (forward and logit_block) are the ones tiling.split_bounds reports."""
    out = torch.full((2 * num_splits,), -1, dtype=torch.int32, device="cuda" if torch.cuda.is_available() else "cpu")
    _split_bounds_probe[(num_splits,)](out, vocab, unit)
    got = [tuple(pair) for pair in out.view(-1, 2).tolist()]
    assert got == [tiling.split_bounds(s, num_splits, vocab, unit) for s in range(num_splits)]


@triton.jit
def _single_tile_probe(h_ptr, w_ptr, b_ptr, out_ptr, N, V, D, inv_temp,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_V)
    z = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, rows < N, cols < V, D, D, D, inv_temp, True, BLOCK_N,
                   BLOCK_V, BLOCK_D, "ieee")
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], z, mask=(rows < N)[:, None] & (cols < V)[None, :])


def test_single_model_tile_matches_float64():
    """logit_tile (one head, pointer loads) on a tile with masked rows, columns and a ragged hidden dimension."""
    g = torch.Generator().manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, b = (torch.randn(*s, generator=g).to(device) for s in ((13, 40), (29, 40), (29,)))
    out = torch.empty(13, 29, device=device)
    _single_tile_probe[(1,)](h, w, b, out, 13, 29, 40, 0.5, BLOCK_N=16, BLOCK_V=32, BLOCK_D=16)
    want = (h.double() @ w.double().T + b.double()) * 0.5
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-5)
