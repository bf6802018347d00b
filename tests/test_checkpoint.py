"""DCP checkpoints: round trip, atomicity under a crash mid-save, pruning, and the Hugging Face export."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gopd_fast.checkpoint import CheckpointManager, export_hf
from gopd_fast.distributed import DistInfo

INFO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def tokenizer():
    from gopd_fast.models import train_tokenizer

    return train_tokenizer(["Action: go to kitchen", "You are in the hall. You see a mug."] * 20, vocab_size=300)


def _model(tokenizer, seed):
    from gopd_fast.models import build_model, config_for_tokenizer

    return build_model(config_for_tokenizer("student-tiny", tokenizer), seed=seed).train()


def _train_a_bit(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _state(model, opt):
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = {k: {n: t.clone() for n, t in s.items() if torch.is_tensor(t)} for k, s in opt.state.items()}
    return params, moments


def test_round_trip_restores_model_optimizer_rng_and_trainer_state(tmp_path, tokenizer):
    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_a_bit(model, opt)
    mgr = CheckpointManager(tmp_path, INFO, keep=2)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = mgr.save(2, model, opt, {"cursor": {"position": 7}})
    expected_rng = (random.random(), float(np.random.rand()), float(torch.rand(())))
    params, moments = _state(model, opt)

    other = _model(tokenizer, 1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    random.seed(99), torch.manual_seed(99)
    state = mgr.load(path, other, other_opt)
    assert state["step"] == 2 and state["cursor"] == {"position": 7}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected_rng
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    got = _state(other, other_opt)[1]
    assert [sorted(s) for s in got.values()] == [sorted(s) for s in moments.values()]
    for a, b in zip(got.values(), moments.values()):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # training continues identically from the restored state
    _train_a_bit(model, opt, 1, seed=3)
    _train_a_bit(other, other_opt, 1, seed=3)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_crash_mid_save_leaves_the_previous_checkpoint_usable(tmp_path, tokenizer, monkeypatch):
    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(tmp_path, INFO, keep=2)
    _train_a_bit(model, opt)
    good = mgr.save(1, model, opt, {"tag": "good"})
    params, _ = _state(model, opt)
    _train_a_bit(model, opt)

    import gopd_fast.checkpoint as ckpt_module

    def crash_after_shards():   # the DCP shards are on disk, the RNG/trainer files and the marker are not
        raise OSError("simulated crash (disk full / node lost) in the middle of a save")

    monkeypatch.setattr(ckpt_module, "rng_state", crash_after_shards)
    with pytest.raises(OSError, match="simulated crash"):
        mgr.save(2, model, opt, {"tag": "bad"})
    monkeypatch.undo()
    assert (tmp_path / "step-00000002.tmp").is_dir() and any((tmp_path / "step-00000002.tmp").iterdir())
    assert mgr.latest() == good and not (tmp_path / "step-00000002").exists()

    fresh = _model(tokenizer, 1)
    state = mgr.load(mgr.latest(), fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert state["tag"] == "good"
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    mgr.save(3, model, opt, {"tag": "next"})                    # the next save clears the stale .tmp
    assert not (tmp_path / "step-00000002.tmp").exists()
    assert [p.name for p in mgr.complete_checkpoints()] == ["step-00000001", "step-00000003"]


def test_keep_prunes_old_checkpoints_and_incomplete_dirs_are_ignored(tmp_path, tokenizer):
    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(tmp_path, INFO, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model, opt, {})
    assert [p.name for p in mgr.complete_checkpoints()] == ["step-00000002", "step-00000003"]
    (tmp_path / "step-00000009").mkdir()                        # no COMPLETE marker
    assert mgr.latest().name == "step-00000003"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        mgr.load(tmp_path / "step-00000009", model, opt)


def test_export_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _model(tokenizer, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_a_bit(model, opt)
    out = export_hf(model, tokenizer, tmp_path / "student-hf", INFO)
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tokenizer.get_vocab()
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
