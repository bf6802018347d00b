"""kernels/tiling.py: vocabulary splits and deterministic chunks cover the vocabulary exactly."""
from __future__ import annotations

import itertools

import pytest
import torch
from gopd_fast.kernels.backward import one_pass_chunks, two_pass_chunks

from gopd_fast.kernels import tiling


@pytest.mark.parametrize("n_tokens,vocab", [(1, 1), (37, 203), (1024, 151936), (16384, 151936), (5, 64)])
def test_vocab_splits_cover_vocab_without_empty_splits(n_tokens, vocab):
    splits, unit = tiling.vocab_splits(n_tokens, vocab, torch.device("cpu"))
    align = tiling.INTERPRETER_CONFIG.block_v if tiling.interpreting() else tiling.SPLIT_ALIGN
    assert splits >= 1 and unit % align == 0
    bounds = [tiling.split_bounds(s, splits, vocab, unit) for s in range(splits)]
    assert bounds[0][0] == 0 and bounds[-1][1] == vocab
    assert all(lo < hi and lo % unit == 0 for lo, hi in bounds)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    lengths = [hi - lo for lo, hi in bounds[:-1]]
    assert not lengths or max(lengths) - min(lengths) <= unit  # balanced
    assert lengths == sorted(lengths, reverse=True)  # the longer splits first: a group's waves stay in step


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
    # Both dz blocks of the block pipeline, plus the 16-bit copy of an fp32 block that one block's GEMMs read.
    dz = rows * columns * ((2 * 4 + operand_bytes) if fp32_dz else 2 * operand_bytes)
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


def test_n_bucket_is_the_next_power_of_two():
    assert [tiling.n_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025, 16384)] == [1, 1, 2, 4, 1024, 1024, 2048,
                                                                                     16384]
    assert "N_BUCKET" in tiling.AUTOTUNE_KEY


def test_gpu_forward_groups_keep_their_hidden_rows_in_l2(monkeypatch):
    """At S* on a 132-SM GPU: short vocabulary splits (programs stay in step), and a group of token tiles whose
    hidden-state rows (both models) fit in FORWARD_L2_SHARE of the L2 while it walks every split."""
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(tiling, "multiprocessor_count", lambda device: 132)
    row_bytes = (4096 + 4096) * 2
    splits, unit = tiling.vocab_splits(16384, 151936, torch.device("cpu"), row_bytes)
    lo, hi = tiling.split_bounds(0, splits, 151936, unit)
    assert hi - lo <= tiling.FORWARD_SPLIT_COLUMNS and unit == tiling.SPLIT_ALIGN
    tokens = tiling.forward_group_tokens(row_bytes)
    group_tiles = tokens // min(c.block_n for c in tiling.FORWARD_CONFIGS)
    assert splits % -(-132 // group_tiles) == 0  # a group's programs fill whole waves
    assert tokens * row_bytes <= tiling.L2_BYTES * tiling.FORWARD_L2_SHARE
    assert tokens >= 16 * max(c.block_n for c in tiling.FORWARD_CONFIGS)  # weight panels shared by >= 16 tiles
    assert tiling.vocab_splits(1024, 151936, torch.device("cpu"))[0] * (1024 // 64) >= 132  # small N fills the GPU


def test_operand_loads_use_pointers_off_hopper():
    """The TMA switch is off under the interpreter and for CPU tensors (one place decides: tiling.use_tma)."""
    t = torch.zeros(16, 16)
    assert tiling.use_tma(t, t) is False
    assert tiling.launch_meta(t)["USE_TMA"] is False


def test_jsd_launches_never_get_kl_only_tiles():
    kl = tiling.candidate_configs(tiling.BACKWARD_CONFIGS, is_jsd=False)
    jsd = tiling.candidate_configs(tiling.BACKWARD_CONFIGS, is_jsd=True)
    assert kl == tiling.BACKWARD_CONFIGS and set(jsd) == set(kl) - set(tiling.KL_ONLY_CONFIGS)
    triton_configs = [c.as_triton() for c in tiling.BACKWARD_CONFIGS]
    assert len(tiling.prune_for_jsd(triton_configs, {}, IS_JSD=True)) == len(jsd)
    assert tiling.prune_for_jsd(triton_configs, {}, IS_JSD=False) == triton_configs
