"""kernels/tiling.py: vocabulary splits and deterministic chunks cover the vocabulary exactly."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels import tiling
from gopd_fast.kernels.backward import deterministic_chunk


@pytest.mark.parametrize("n_tokens,vocab", [(1, 1), (37, 203), (1024, 151936), (16384, 151936), (5, 64)])
def test_vocab_splits_cover_vocab_without_empty_splits(n_tokens, vocab):
    splits, per_split = tiling.vocab_splits(n_tokens, vocab, torch.device("cpu"))
    align = tiling.INTERPRETER_CONFIG.block_v if tiling.interpreting() else tiling.SPLIT_ALIGN
    assert splits >= 1 and per_split % align == 0
    assert (splits - 1) * per_split < vocab <= splits * per_split


def test_deterministic_chunk_respects_budget(monkeypatch):
    monkeypatch.setattr(tiling, "DETERMINISTIC_CHUNK_BYTES", 37 * 6 * 70)
    align = tiling.INTERPRETER_CONFIG.block_v if tiling.interpreting() else tiling.SPLIT_ALIGN
    chunk = deterministic_chunk(37, 10_000)
    assert chunk % align == 0 and chunk >= align
    assert chunk == align * max(1, 70 // align)
    assert deterministic_chunk(37, 5) == 5


def test_dot_precision_keeps_fp32_exact():
    assert tiling.dot_precision(torch.float32) == "ieee"
    assert tiling.dot_precision(torch.bfloat16) == "tf32"
