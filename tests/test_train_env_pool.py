"""env.pool in a real training run (CPU, tiny models): rollouts and evaluation step their envs in an EnvPool, a
worker SIGKILLed mid-step is restarted and its episodes replayed, and the run trains exactly the episodes (and
losses) of an undisturbed run, with the failure counted in the step metrics."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from gopd_fast.config import load_config
from gopd_fast.envs.pool import EnvPool


def _pool_run(tiny_models, out: Path):
    from gopd_fast.train import run

    overrides = tiny_models + [f"run.output_dir={out}", "run.total_steps=2", "rollout.episodes_per_step=4",
                               "env.max_turns=3", "rollout.max_new_tokens=8", "env.eval_episodes=2",
                               "run.progress_bar=false", "run.tensorboard=false", "run.export_hf=false",
                               "env.pool=true", "env.pool_workers=2", "env.step_timeout_s=60"]
    return run(load_config(None, overrides))


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_worker_killed_mid_step_loses_no_episode(tiny_models, tmp_path, monkeypatch):
    clean = _pool_run(tiny_models, tmp_path / "clean")

    submitted = {"steps": 0, "killed": None}
    original_step = EnvPool.step

    def step_then_kill(self, slot, action):
        future = original_step(self, slot, action)
        submitted["steps"] += 1
        if submitted["steps"] == 3:          # a step of the first training rollout is in flight: kill its worker
            pid = self.worker_pids()[self.worker_of(slot)]
            os.kill(pid, signal.SIGKILL)
            submitted["killed"] = pid
        return future

    monkeypatch.setattr(EnvPool, "step", step_then_kill)
    faulty = _pool_run(tiny_models, tmp_path / "faulty")
    assert submitted["killed"] is not None

    clean_rec, faulty_rec = _train_records(tmp_path / "clean"), _train_records(tmp_path / "faulty")
    assert faulty.steps_completed == clean.steps_completed == 2
    assert [r["episodes"] for r in faulty_rec] == [r["episodes"] for r in clean_rec] == [4, 4]
    assert sum(r["env_crashes"] for r in faulty_rec) == 1 and sum(r["env_restarts"] for r in faulty_rec) == 1
    assert sum(r["env_replays"] for r in faulty_rec) >= 1
    assert sum(r["env_episodes_dropped"] + r["env_episodes_failed"] for r in faulty_rec) == 0
    assert all(r["env_crashes"] == r["env_restarts"] == 0 for r in clean_rec)
    # The replayed env is in the same state, so the episodes, and what was trained on them, are the same.
    assert [r["loss"] for r in faulty_rec] == [r["loss"] for r in clean_rec]
    assert [e["eval/episodes"] for e in faulty.evals] == [e["eval/episodes"] for e in clean.evals] == [2]
