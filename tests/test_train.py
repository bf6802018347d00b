"""The trainer end to end on CPU: tiny local models, the household environment, gloo for two processes.

Runs are shared across assertions (each torchrun start costs seconds): one two-process and one single-process
run of the same deterministic (expert-episode) config give the DP-equivalence check and the checkpoint that the
resume test restarts from; short engine-backed runs cover Guided-OPD, vanilla OPD and SFT.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gopd_fast.config import load_config
from gopd_fast.distributed import DistInfo

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _records(out: Path, kind: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _expert_overrides(tiny_models, out):
    return tiny_models + [f"run.output_dir={out}", "rollout.engine=expert", "run.total_steps=3",
                          "run.save_every=2", "rollout.episodes_per_step=4", "env.max_turns=6",
                          "packing.max_tokens_per_row=512", "optim.lr=1e-3", "run.progress_bar=false",
                          "run.tensorboard=false", "run.export_hf=false"]


@pytest.fixture(scope="module")
def expert_runs(tiny_models, tmp_path_factory):
    """The same deterministic 3-step run with 2 processes (torchrun, FSDP2, gloo) and with 1 process."""
    from gopd_fast.train import run

    root = tmp_path_factory.mktemp("expert")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # The two-process run also takes the micro-batch path (one packed row per forward/backward, ranks padded to
    # the same count) and activation checkpointing: neither may change the result.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gopd_fast.train", *_expert_overrides(tiny_models, root / "dp2"),
           "packing.rows_per_micro_batch=1", "model.activation_checkpointing=true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run(load_config(None, _expert_overrides(tiny_models, root / "dp1")))
    return root, _records(root / "dp2"), single


def test_two_processes_equal_one_process(expert_runs):
    _, dp2, single = expert_runs
    dp1 = single.history
    assert [r["step"] for r in dp2] == [r["step"] for r in dp1] == [1, 2, 3]
    for a, b in zip(dp2, dp1):
        assert a["loss_tokens"] == b["loss_tokens"] and a["tokens_scored"] == b["tokens_scored"]
    # step 1: same weights, same batch -> same loss and same global gradient (FSDP shards, summed normalizer)
    assert dp2[0]["loss"] == pytest.approx(dp1[0]["loss"], rel=1e-5)
    assert dp2[0]["grad_norm"] == pytest.approx(dp1[0]["grad_norm"], rel=1e-4)
    # later steps: Adam turns tiny reduction-order differences into ~lr-sized ones; still close
    for a, b in zip(dp2[1:], dp1[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3)
    assert dp1[0]["loss"] > dp1[-1]["loss"]


def test_kill_and_resume_reproduces_the_uninterrupted_run(expert_runs, tiny_models, tmp_path):
    """SIGKILL a training process once its first checkpoint exists (possibly mid-step or mid-save), restart it
    with the same command: it resumes from the newest complete checkpoint and its next losses equal the
    uninterrupted run's."""
    import signal
    import time

    from gopd_fast.train import run

    _, _, single = expert_runs
    out = tmp_path / "killed"
    overrides = [*_expert_overrides(tiny_models, out)[:-1], "run.save_every=1", "run.export_hf=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "gopd_fast.train", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step-00000001" / "COMPLETE").exists():
            assert proc.poll() is None, "the training process ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    resumed = run(load_config(None, overrides))
    start = int(resumed.resumed_from.name.split("-")[1])
    assert start in (1, 2), "killed after its last step: nothing left to compare"
    assert [r["step"] for r in resumed.history] == list(range(start + 1, 4))
    for got, want in zip(resumed.history, single.history[start:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)


def _flip_a_bit_in_a_shard(ckpt: Path) -> None:
    shard = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))


def test_kill_then_a_damaged_newest_checkpoint_resumes_from_the_previous_one(expert_runs, tiny_models,
                                                                               tmp_path, caplog):
    """SIGKILL a run once it has two checkpoints, flip one bit in the newest one's largest shard: the restart
    reports that checkpoint (path and problem), resumes from the one before, reproduces the uninterrupted run's
    losses, and metrics.jsonl ends with every step exactly once."""
    import signal
    import time

    from gopd_fast.checkpoint import CheckpointManager
    from gopd_fast.train import run

    _, _, single = expert_runs
    out = tmp_path / "damaged"
    overrides = [*_expert_overrides(tiny_models, out), "run.save_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "gopd_fast.train", *overrides], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoints" / "step-00000002" / "COMPLETE").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no second checkpoint within 180 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    newest = CheckpointManager(out / "checkpoints", CPU).latest()
    step = int(newest.name.split("-")[1])
    assert step >= 2
    _flip_a_bit_in_a_shard(newest)

    with caplog.at_level("WARNING", logger="gopd_fast.checkpoint"):
        resumed = run(load_config(None, overrides))
    assert resumed.resumed_from.name == f"step-{step - 1:08d}"
    assert str(newest) in caplog.text and "sha256" in caplog.text
    assert [r["step"] for r in resumed.history] == list(range(step, 4))
    for got, want in zip(resumed.history, single.history[step - 1:]):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    mgr = CheckpointManager(out / "checkpoints", CPU)
    assert [p.name for p in mgr.step_dirs()] == ["step-00000002", "step-00000003"]
    assert all(mgr.verify(p) == [] for p in mgr.step_dirs())     # the damaged one was replaced


def test_no_usable_checkpoint_stops_the_run_unless_told_to_start_fresh(expert_runs, tiny_models, tmp_path,
                                                                        monkeypatch, capsys):
    """Every checkpoint damaged (a flipped bit, a missing RNG file): the console script names them and exits 2
    without training; run.resume=false starts at step 1, and its metrics.jsonl and checkpoints replace the old."""
    import shutil

    from gopd_fast import train
    from gopd_fast.checkpoint import CheckpointManager

    root, _, single = expert_runs
    out = tmp_path / "unusable"
    shutil.copytree(root / "dp1", out)
    _flip_a_bit_in_a_shard(out / "checkpoints" / "step-00000003")
    (out / "checkpoints" / "step-00000002" / "rng-rank0.pt").unlink()
    before = (out / "metrics.jsonl").read_bytes()

    monkeypatch.setattr("sys.argv", ["gopd-fast", *_expert_overrides(tiny_models, out)])
    with pytest.raises(SystemExit) as e:
        train.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]     # (after transformers' weight-loading bars)
    assert err.startswith("gopd-fast: checkpoint error: no usable checkpoint"), err
    assert str(out / "checkpoints" / "step-00000002" / "rng-rank0.pt") in err and "run.resume=false" in err
    assert (out / "metrics.jsonl").read_bytes() == before       # nothing was trained or rewritten

    fresh = train.run(load_config(None, [*_expert_overrides(tiny_models, out), "run.resume=false"]))
    assert fresh.resumed_from is None and [r["step"] for r in fresh.history] == [1, 2, 3]
    assert [r["loss"] for r in fresh.history] == pytest.approx([r["loss"] for r in single.history], rel=1e-6)
    assert [r["step"] for r in _records(out)] == [1, 2, 3]
    mgr = CheckpointManager(out / "checkpoints", CPU)
    assert [p.name for p in mgr.step_dirs()] == ["step-00000002", "step-00000003"]
    assert all(mgr.verify(p) == [] for p in mgr.step_dirs())


def test_resume_on_a_different_number_of_processes(expert_runs, tiny_models, tmp_path):
    """The two-process run's step-2 checkpoint (FSDP2 shards) resumed by one process (DCP reshards on load)."""
    import shutil

    from gopd_fast.train import run

    root, dp2, _ = expert_runs
    out = tmp_path / "resharded"
    shutil.copytree(root / "dp2" / "checkpoints" / "step-00000002", out / "checkpoints" / "step-00000002")
    resumed = run(load_config(None, _expert_overrides(tiny_models, out)))
    assert [r["step"] for r in resumed.history] == [3]
    assert resumed.history[0]["loss"] == pytest.approx(dp2[2]["loss"], rel=1e-5)
    assert resumed.history[0]["grad_norm"] == pytest.approx(dp2[2]["grad_norm"], rel=1e-4)


def _engine_run(tiny_models, out, *extra):
    from gopd_fast.train import run

    overrides = tiny_models + [f"run.output_dir={out}", "run.total_steps=2", "rollout.episodes_per_step=2",
                               "env.max_turns=2", "rollout.max_new_tokens=8", "env.eval_episodes=2",
                               "run.progress_bar=false", *extra]
    return run(load_config(None, overrides))


def test_guided_opd_two_processes_end_to_end_with_eval_logging_and_export(tiny_models, tmp_path):
    """Guided-OPD under torchrun: per-rank rollout engines, weight sync after each FSDP2 update (every rank
    needs the full weights), evaluation gathered over ranks, checkpoint and export."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gopd"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    overrides = tiny_models + [f"run.output_dir={out}", "run.total_steps=2", "rollout.episodes_per_step=4",
                               "env.max_turns=2", "rollout.max_new_tokens=8", "env.eval_episodes=3",
                               "run.eval_every=1", "run.progress_bar=false"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "gopd_fast.train", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    train, evals = _records(out), _records(out, "eval")
    assert [r["beta"] for r in train] == [1.0, 0.0]      # cosine window int(2 * 0.8) = 1 step
    assert train[0]["teacher_turn_fraction"] == 1.0 and train[1]["teacher_turn_fraction"] == 0.0
    assert [r["episodes"] for r in train] == [4, 4]       # both ranks' episodes are counted
    for key in ("loss", "loss_student", "loss_teacher", "reverse_kl", "forward_kl", "grad_norm", "lr",
                "tokens_per_s", "time_rollout", "time_forward", "time_loss", "time_backward", "time_sync",
                "prefix_cache_hit_rate", "score", "success_rate", "rounds"):
        assert key in train[1], key
    assert train[1]["loss_teacher"] is None and train[1]["loss_student"] > 0
    assert [e["step"] for e in evals] == [1, 2]
    assert {"eval/score", "eval/success_rate", "eval/rounds", "eval/score_low", "eval/success_rate_high",
            "eval/rounds_high"} <= set(evals[0])
    assert evals[0]["eval/episodes"] == 3                 # 2 on rank 0, 1 on rank 1
    assert any((out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    assert AutoModelForCausalLM.from_pretrained(out / "student-hf").config.vocab_size > 0


def test_vanilla_opd_and_sft_baselines(tiny_models, tmp_path):
    _engine_run(tiny_models, tmp_path / "opd", "run.algorithm=opd", "run.eval_at_end=false",
                "run.export_hf=false")
    opd = _records(tmp_path / "opd")
    assert all(r["beta"] == 0.0 and r["teacher_turn_fraction"] == 0.0 for r in opd)
    assert all(r["loss_teacher"] is None and r["loss_student"] > 0 for r in opd)
    _engine_run(tiny_models, tmp_path / "sft", "run.algorithm=sft", "objective.teacher_tokens=cross_entropy",
                "run.eval_at_end=false", "run.export_hf=false")
    sft = _records(tmp_path / "sft")
    assert all(r["beta"] == 1.0 and r["teacher_turn_fraction"] == 1.0 for r in sft)
    assert all(r["loss_student"] is None and r["loss_teacher"] > 0 for r in sft)
    assert all(r["reverse_kl"] is None for r in sft)       # no KL term computed: the teacher is not even run


@pytest.fixture(scope="module")
def trainer_and_batch(tiny_models):
    from gopd_fast.rollout.history import ChatFormat
    from gopd_fast.train import Trainer, expert_episode, load_models, make_env

    cfg = load_config(None, tiny_models + ["optim.lr=3e-3", "env.max_turns=4"])
    student, teacher, tok = load_models(cfg, CPU)
    env = make_env(cfg)
    episodes = [expert_episode(env, t, ChatFormat(tok), tok.eos_token_id) for t in env.tasks("train")[:2]]
    return Trainer(cfg, CPU, student, teacher, pad_token_id=tok.pad_token_id), episodes


def test_loss_on_a_fixed_batch_decreases(trainer_and_batch):
    trainer, episodes = trainer_and_batch
    losses = [trainer.step(episodes)["loss"] for _ in range(5)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(b < a for a, b in itertools.pairwise(losses)), losses


def test_non_finite_loss_skips_the_update_and_is_counted(trainer_and_batch):
    trainer, episodes = trainer_and_batch
    weight = trainer.student.model.norm.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[0] = float("nan")
    before = {k: v.detach().clone() for k, v in trainer.student.named_parameters()}
    skipped = trainer.skipped_steps
    metrics = trainer.step(episodes)
    assert metrics["skipped"] == 1 and trainer.skipped_steps == skipped + 1
    for k, v in trainer.student.named_parameters():
        torch.testing.assert_close(v, before[k], equal_nan=True, rtol=0, atol=0)
    with torch.no_grad():
        weight.copy_(saved)
    assert trainer.step(episodes)["skipped"] == 0


def test_train_state_saves_and_restores_the_whole_trainer_as_one_object(trainer_and_batch, tmp_path):
    """TrainState -> CheckpointManager.save_state; a later update, cursor move and counter change are all undone
    by resume_state (weights, optimizer moments, LR scheduler, task cursor, skipped steps, step)."""
    from gopd_fast.checkpoint import Checkpointable, CheckpointManager
    from gopd_fast.curriculum import BetaSchedule, TaskCursor
    from gopd_fast.train_state import TrainState

    trainer, episodes = trainer_and_batch
    cfg = trainer.cfg
    state = TrainState(trainer, BetaSchedule(cfg.curriculum, cfg.run.total_steps),
                       TaskCursor([f"task-{i}" for i in range(7)], seed=3), step=4)
    assert isinstance(state, Checkpointable)
    trainer.step(episodes)          # optimizer moments and a scheduler position to restore
    state.cursor.take(3)
    mgr = CheckpointManager(tmp_path, CPU)
    path = mgr.save_state(4, state)
    params = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
    moments = {k: v["exp_avg"].clone() for k, v in trainer.optimizer.state_dict()["state"].items()}
    epoch, skipped, next_tasks = trainer.scheduler.last_epoch, trainer.skipped_steps, state.cursor.take(2)

    trainer.step(episodes)
    state.cursor.take(5)
    state.step, trainer.skipped_steps = 9, skipped + 3
    assert mgr.resume_state(state) == path
    for k, v in trainer.student.state_dict().items():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
    for k, v in trainer.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(v["exp_avg"], moments[k], rtol=0, atol=0)
    assert (trainer.scheduler.last_epoch, trainer.skipped_steps, state.step) == (epoch, skipped, 4)
    assert state.cursor.take(2) == next_tasks
