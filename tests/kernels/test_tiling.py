"""kernels/tiling.py: vocabulary splits and deterministic chunks cover the vocabulary exactly."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels import tiling
from gopd_fast.kernels.backward import one_pass_chunks, two_pass_chunks


@pytest.mark.parametrize("n_tokens,vocab", [(1, 1), (37, 203), (1024, 151936), (16384, 151936), (5, 64)])
def test_vocab_splits_cover_vocab_without_empty_splits(n_tokens, vocab):
    splits, per_split = tiling.vocab_splits(n_tokens, vocab, torch.device("cpu"))
    align = tiling.INTERPRETER_CONFIG.block_v if tiling.interpreting() else tiling.SPLIT_ALIGN
    assert splits >= 1 and per_split % align == 0
    assert (splits - 1) * per_split < vocab <= splits * per_split


def test_two_pass_chunks_respect_budget(monkeypatch):
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 2**20)
    cfg = tiling.INTERPRETER_CONFIG if tiling.interpreting() else None
    align_n = cfg.block_n if cfg else max(c.block_n for c in tiling.BACKWARD_CONFIGS)
    align_v = cfg.block_v if cfg else tiling.SPLIT_ALIGN
    rows, columns = two_pass_chunks(n_tokens=1_000, vocab=3000, operand_bytes=2, fp32_columns=True)
    assert rows % align_n == 0 and rows * 3000 * 2 <= 2**20
    assert columns % align_v == 0 and 1_000 * columns * 6 <= 2**20
    _, more_columns = two_pass_chunks(n_tokens=1_000, vocab=3000, operand_bytes=2, fp32_columns=False)
    assert more_columns % align_v == 0 and more_columns > columns and 1_000 * more_columns * 2 <= 2**20
    assert two_pass_chunks(n_tokens=5, vocab=7, operand_bytes=4, fp32_columns=True) == (5, 7)  # capped


def test_dot_precision_keeps_fp32_exact():
    assert tiling.dot_precision(torch.float32) == "ieee"
    assert tiling.dot_precision(torch.bfloat16) == "tf32"


@pytest.mark.parametrize("fp32_dz,partial_bytes", [(False, 0), (True, 2)])
def test_one_pass_chunks_respect_budget(monkeypatch, fp32_dz, partial_bytes):
    budget = 2**20
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", budget)
    cfg = tiling.INTERPRETER_CONFIG if tiling.interpreting() else None
    align_n = cfg.block_n if cfg else max(c.block_n for c in tiling.BACKWARD_CONFIGS)
    align_v = cfg.block_v if cfg else tiling.SPLIT_ALIGN
    ds, operand_bytes = 256, 2
    rows, columns = one_pass_chunks(n_tokens=5_000, vocab=30_000, ds=ds, operand_bytes=operand_bytes,
                                    fp32_dz=fp32_dz, partial_bytes=partial_bytes)
    accumulator = rows * ds * (4 + partial_bytes)
    dz = rows * columns * ((4 + operand_bytes) if fp32_dz else operand_bytes)
    assert rows % align_n == 0 and columns % align_v == 0
    assert accumulator <= budget // 2 and accumulator + dz <= budget
    assert one_pass_chunks(n_tokens=5, vocab=7, ds=8, operand_bytes=4, fp32_dz=True, partial_bytes=0) == (5, 7)


def test_buffer_budget_env_var(monkeypatch):
    monkeypatch.delenv("GOPD_BACKWARD_BUFFER_MIB", raising=False)
    assert tiling.backward_buffer_bytes() == tiling.BACKWARD_BUFFER_BYTES
    monkeypatch.setenv("GOPD_BACKWARD_BUFFER_MIB", "256")
    assert tiling.backward_buffer_bytes() == 256 * 2**20
    small = one_pass_chunks(n_tokens=16384, vocab=151936, ds=4096, operand_bytes=2, fp32_dz=False, partial_bytes=0)
    monkeypatch.setenv("GOPD_BACKWARD_BUFFER_MIB", "1024")
    large = one_pass_chunks(n_tokens=16384, vocab=151936, ds=4096, operand_bytes=2, fp32_dz=False, partial_bytes=0)
    assert large[0] > small[0]  # taller token blocks: fewer roundings of a 16-bit grad_W
    for bad in ("0", "-3", "lots", "inf", "nan"):
        monkeypatch.setenv("GOPD_BACKWARD_BUFFER_MIB", bad)
        with pytest.raises(ValueError, match="GOPD_BACKWARD_BUFFER_MIB must be a positive number of MiB"):
            tiling.backward_buffer_bytes()
