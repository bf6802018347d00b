"""DCP checkpoints: round trip, atomicity under a crash mid-save, pruning, checksums with fault injection (each
kind of file truncated, altered, deleted; the marker missing or damaged), resume falling back to the previous good
checkpoint, and the Hugging Face export."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from gopd_fast.checkpoint import COMPLETE, CheckpointError, CheckpointManager, export_hf
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
    with pytest.raises(CheckpointError, match=f"step-00000009: no {COMPLETE} marker"):
        mgr.load(tmp_path / "step-00000009", model, opt)


def _flip_bit(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * offset_fraction)] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _shard(ckpt):
    return max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)


# (what is damaged, how, a fragment of the reported problem)
FAULTS = {
    "shard-truncated": (_shard, _truncate, "truncated"),
    "shard-bit-flip": (_shard, _flip_bit, "sha256"),
    "shard-deleted": (_shard, lambda p: p.unlink(), "missing"),
    "metadata-bit-flip": (lambda c: c / ".metadata", _flip_bit, "sha256"),
    "metadata-deleted": (lambda c: c / ".metadata", lambda p: p.unlink(), "missing"),
    "trainer-truncated": (lambda c: c / "trainer.pt", _truncate, "truncated"),
    "trainer-bit-flip": (lambda c: c / "trainer.pt", _flip_bit, "sha256"),
    "rng-deleted": (lambda c: c / "rng-rank0.pt", lambda p: p.unlink(), "missing"),
    "rng-bit-flip": (lambda c: c / "rng-rank0.pt", lambda p: _flip_bit(p, 0.9), "sha256"),
    "marker-deleted": (lambda c: c / COMPLETE, lambda p: p.unlink(), f"no {COMPLETE} marker"),
    "marker-garbage": (lambda c: c / COMPLETE, lambda p: p.write_bytes(b"\xff{not json"), "unreadable"),
    "marker-without-checksums": (lambda c: c / COMPLETE, lambda p: p.write_text('{"step": 2, "world_size": 1}'),
                                 "no valid manifest"),
    "marker-wrong-step": (lambda c: c / COMPLETE,
                          lambda p: p.write_text(p.read_text().replace('"step": 2', '"step": 7')), "says step 7"),
}


@pytest.fixture()
def two_checkpoints(tmp_path, tokenizer):
    """Checkpoints at steps 1 and 2 of a short training run, and the parameters each one holds."""
    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(tmp_path, INFO, keep=2)
    saved = {}
    for step in (1, 2):
        _train_a_bit(model, opt, seed=step)
        mgr.save(step, model, opt, {"tag": step})
        saved[step] = _state(model, opt)[0]
    return mgr, saved


def test_the_manifest_lists_every_file_with_its_checksum(two_checkpoints):
    import hashlib
    import json

    mgr, _ = two_checkpoints
    ckpt = mgr.latest()
    manifest = json.loads((ckpt / COMPLETE).read_text())
    files = {p.name for p in ckpt.iterdir()} - {COMPLETE}
    assert set(manifest["files"]) == files and {"trainer.pt", "rng-rank0.pt", ".metadata"} <= files
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert mgr.verify(ckpt) == []


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_is_used(fault, two_checkpoints, tokenizer,
                                                                              caplog):
    mgr, saved = two_checkpoints
    newest = mgr.root / "step-00000002"
    target, damage, problem = FAULTS[fault]
    damage(target(newest))

    problems = mgr.verify(newest)
    assert problems and all(str(newest) in p for p in problems) and problem in " ".join(problems)
    fresh = _model(tokenizer, 5)
    opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError, match="step-00000002"):
        mgr.load(newest, fresh, opt)

    with caplog.at_level("WARNING", logger="gopd_fast.checkpoint"):
        path, state = mgr.resume(fresh, opt)
    assert path.name == "step-00000001" and state["tag"] == 1 and state["step"] == 1
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, saved[1][k], rtol=0, atol=0)
    log = caplog.text
    assert str(newest) in log and problem in log and f"resuming from {path}" in log


def test_no_usable_checkpoint_is_an_error_naming_each_one(two_checkpoints, tokenizer):
    mgr, _ = two_checkpoints
    _flip_bit(_shard(mgr.root / "step-00000002"))
    (mgr.root / "step-00000001" / "trainer.pt").unlink()
    fresh = _model(tokenizer, 5)
    with pytest.raises(CheckpointError) as e:
        mgr.resume(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    msg = str(e.value)
    assert "no usable checkpoint" in msg and "2 found" in msg
    assert str(mgr.root / "step-00000002") in msg and str(mgr.root / "step-00000001" / "trainer.pt") in msg


def test_nothing_to_resume_is_not_an_error(tmp_path, tokenizer):
    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert CheckpointManager(tmp_path / "absent", INFO).resume(model, opt) is None
    (tmp_path / "step-00000003.tmp").mkdir()           # an interrupted first save is not a checkpoint
    assert CheckpointManager(tmp_path, INFO).resume(model, opt) is None


def test_a_save_removes_newer_checkpoints_of_an_abandoned_run(two_checkpoints, tokenizer):
    """After a fresh start (or a resume past a damaged checkpoint) the first save makes the run's own checkpoint
    the newest: every newer folder, damaged or not, and every older one beyond ``keep`` goes."""
    mgr, _ = two_checkpoints
    (mgr.root / "step-00000002" / COMPLETE).unlink()
    model = _model(tokenizer, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr.keep = 1
    mgr.save(1, model, opt, {"tag": "new"})
    assert [p.name for p in mgr.step_dirs()] == ["step-00000001"]
    assert mgr.load(mgr.latest(), model, opt)["tag"] == "new"


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


class _Counted:
    """A Checkpointable: a model, its optimizer and a counter, saved and restored as one object."""

    def __init__(self, model, opt, position=0):
        from gopd_fast.checkpoint import ModelOptimizerState

        self.inner = ModelOptimizerState(model, opt)
        self.position = position

    def state_dict(self):
        return {**self.inner.state_dict(), "trainer": {"position": self.position}}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
        self.position = state["trainer"]["position"]


def test_one_checkpointable_object_is_saved_and_resumed_whole(tmp_path, tokenizer):
    from gopd_fast.checkpoint import Checkpointable

    model = _model(tokenizer, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_a_bit(model, opt)
    state = _Counted(model, opt, position=7)
    assert isinstance(state, Checkpointable)
    mgr = CheckpointManager(tmp_path, INFO)
    path = mgr.save_state(3, state)
    params, moments = _state(model, opt)

    fresh = _model(tokenizer, 1)
    restored = _Counted(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-3))
    assert mgr.resume_state(restored) == path and restored.position == 7
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    got = _state(fresh, restored.inner.optimizer)[1]
    for a, b in zip(got.values(), moments.values()):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=0)
    # the same layout as save(model, optimizer, dict): either API reads the other's checkpoints
    other = _model(tokenizer, 2)
    assert mgr.load(path, other, torch.optim.AdamW(other.parameters(), lr=1e-3)) == {"position": 7, "step": 3}


def test_save_state_rejects_what_is_not_checkpointable(tmp_path):
    mgr = CheckpointManager(tmp_path, INFO)
    with pytest.raises(TypeError, match="state must be a Checkpointable"):
        mgr.save_state(1, {"model": {}})
    with pytest.raises(TypeError, match="state must be a Checkpointable"):
        mgr.resume_state(object())
