"""Qwen3Decoder (gopd_fast.rollout.engines.decoder): the lean forward against the transformers module forward."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.models import load_model
from gopd_fast.rollout.engines.decoder import Qwen3Decoder

TEACHER = "gopd_fast/assets/household-full-teacher"


@pytest.fixture(scope="module")
def model():
    return load_model(TEACHER)[0]


def _reference_logits(model, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0].float()


@pytest.mark.parametrize("numpy_decode", [True, False], ids=["numpy-decode", "torch-decode"])
def test_ragged_prefill_then_decode_matches_the_module_forward(model, numpy_decode):
    """Rows with and without cached history, of different lengths, prefilled in one call and then decoded
    together: every row's logits are the module's at that position (the folded norms, the q-scale in the qk-norm
    weights, the fused attention and NumPy's BLAS change only the float rounding)."""
    dec = Qwen3Decoder(model, numpy_decode=numpy_decode)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in (61, 90, 37)]
    cache = dec.new_cache(3, 100)
    # call 1: rows 0 and 1 get 20 and 50 tokens of history; row 2 none (its whole prompt comes in call 2)
    dec.prefill([seqs[0][:20], seqs[1][:50], seqs[2][:1]], [0, 0, 0], cache)
    starts = [20, 50, 0]
    ends = [len(s) - 3 for s in seqs]
    logits = dec.prefill([s[a:e] for s, a, e in zip(seqs, starts, ends)], starts, cache)
    refs = [_reference_logits(model, s) for s in seqs]
    for r in range(3):
        torch.testing.assert_close(logits[r], refs[r][ends[r] - 1], atol=1e-4, rtol=0)
    positions = torch.tensor(ends)
    for step in range(3):
        ids = torch.tensor([s[e + step] for s, e in zip(seqs, ends)])
        logits = dec.forward(ids, positions + step, cache, span=max(ends) + step + 1)
        for r in range(3):
            torch.testing.assert_close(logits[r], refs[r][ends[r] + step], atol=1e-4, rtol=0)


def test_refresh_reads_new_weights(model):
    """The folded projections are copies: after new weights are loaded into the model, ``refresh`` makes the
    decoder compute with them."""
    import copy

    m = copy.deepcopy(model)
    dec = Qwen3Decoder(m)
    seq = list(range(5, 45))
    before = dec.prefill([seq], [0], dec.new_cache(1, 64))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    dec.refresh()
    after = dec.prefill([seq], [0], dec.new_cache(1, 64))
    torch.testing.assert_close(after[0], _reference_logits(m, seq)[-1], atol=1e-4, rtol=0)
    assert not torch.allclose(after, before, atol=1e-3)


def test_numpy_decode_needs_a_float32_cpu_model(model):
    assert Qwen3Decoder(model).numpy_decode     # the default for float32 on CPU
    with pytest.raises(ValueError, match="numpy_decode"):
        Qwen3Decoder(model, numpy_decode="yes")
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    assert not Qwen3Decoder(half).numpy_decode
    with pytest.raises(ValueError, match="float32 model on CPU"):
        Qwen3Decoder(half, numpy_decode=True)


def test_reused_cache_zeroes_the_unfilled_tails(model):
    """``new_cache(filled=...)`` reuses one buffer: whatever an earlier call left there, every position from a
    row's ``filled`` length on reads as zero (attention adds -inf masks to it, so it must be finite), and a
    row-count / length mismatch is refused."""
    dec = Qwen3Decoder(model)
    first = dec.new_cache(3, 50, filled=[0, 0, 0])
    first.fill_(float("nan"))
    again = dec.new_cache(2, 60, filled=[10, 60])
    assert again.data_ptr() == first.data_ptr()          # the same memory, not a fresh allocation
    assert (again[:, :, 0, :, 10:] == 0).all() and again[:, :, 0, :, :10].isnan().all()
    assert torch.equal(dec.new_cache(2, 4), torch.zeros_like(dec.new_cache(2, 4)))   # no filled: all zeros
    with pytest.raises(ValueError, match="filled"):
        dec.new_cache(2, 10, filled=[3])
    with pytest.raises(ValueError, match="filled"):
        dec.new_cache(1, 10, filled=[11])


def test_encode_matches_the_module_forward_on_packed_rows(model):
    """``encode`` on packed rows (two episodes in one row, one in another, padding tails restarting the positions
    as ``gopd_fast.packing`` writes them) gives the module's ``last_hidden_state`` at every position."""
    g = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(3, model.config.vocab_size, (n,), generator=g)
    ids = torch.stack([torch.cat([tok(40), tok(25), torch.zeros(7, dtype=torch.long)]), tok(72)])
    pos = torch.stack([torch.cat([torch.arange(40), torch.arange(25), torch.arange(7)]), torch.arange(72)])
    with torch.no_grad():
        ref = model.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
    # the module forward without a mask attends across episodes of a row; compare episode by episode instead
    with torch.no_grad():
        first = model.model(input_ids=ids[:1, :40], use_cache=False).last_hidden_state
        second = model.model(input_ids=ids[:1, 40:65], use_cache=False).last_hidden_state
    h = Qwen3Decoder(model).encode(ids, pos)
    assert h.shape == (2, 72, model.config.hidden_size)
    torch.testing.assert_close(h[:1, :40], first, atol=1e-4, rtol=0)
    torch.testing.assert_close(h[:1, 40:65], second, atol=1e-4, rtol=0)
    torch.testing.assert_close(h[1], ref[1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="rows, length"):
        Qwen3Decoder(model).encode(ids, pos[:, :5])


def test_numpy_decode_runs_openblas_single_threaded(model):
    """A decode step limits numpy's bundled OpenBLAS to one thread for the calling thread (two threads made a
    step ~4x slower on a busy 2-core box); skipped where numpy uses another BLAS."""
    from gopd_fast.rollout.engines.numpy_step import _openblas_thread_limit

    limit = _openblas_thread_limit()
    if limit is None:
        pytest.skip("numpy is not linked to its bundled OpenBLAS here")
    dec = Qwen3Decoder(model)
    cache = dec.new_cache(1, 8)
    dec.prefill([[5, 6, 7]], [0], cache)
    previous = limit(2)
    try:
        dec.forward(torch.tensor([8]), torch.tensor([3]), cache, span=4)
        assert limit(2) == 1          # the step set this thread's limit to 1
    finally:
        limit(previous)
