"""Trainer benchmarks on CPU: one optimizer step's time by phase, and whole-episode scoring vs per-turn re-prefill.

Data: household expert episodes (oracle turns, tokenised with the locally trained tokenizer through the rollout's
append-only history), tiny local Qwen3 student and teacher built on first use.

1. ``test_train_step``: ``Trainer.step`` on 8 episodes (pack -> student + teacher forward -> fused KL -> backward
   -> AdamW). ``extra_info`` holds the mean seconds per phase (forward, loss, backward, optim).
2. ``test_episode_scoring``: scoring one batch of episodes with both models, as ONE forward per episode (packed)
   vs one forward per turn with the whole history re-prefilled. ``extra_info`` holds the positions each model
   scores per step for both; positions grow O(turns) vs O(turns^2).

3. ``test_distillation_step``: one whole Guided-OPD step on the demo's workload (bench/conftest.py:
   demo_workload): rollout of 8 or 32 episodes at beta = 0.5 -> pack -> student + teacher forward -> loss ->
   backward -> AdamW -> weight sync into the rollout engine, first as before issue #13 part A (``before``:
   rollout.kv_reuse = false, model.attn_implementation = "sdpa", i.e. re-encoding rollouts and a dense
   block-diagonal mask over packed rows), then with configs/demo-trainer.toml as it is (``after``: KV reuse,
   "packed_sdpa", the teacher's hidden states taken from its rollout engine: rollout.reuse_teacher_hidden).
   The ``after`` case asserts the >= 3x step-time ratio of the same run; ``extra_info`` holds the seconds per
   phase.

    .venv/bin/python -m pytest bench/test_bench_train.py --benchmark-enable -s
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from gopd_fast.config import load_config
from gopd_fast.distributed import DistInfo
from gopd_fast.packing import pack_episodes, per_turn_reprefill_tokens, whole_episode_tokens

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from gopd_fast.rollout.history import ChatFormat
    from gopd_fast.train import Trainer, ensure_tiny_models, expert_episode, load_models, make_env

    root = tmp_path_factory.mktemp("bench-train")
    cfg = load_config(None, [f"model.student={root}/student", f"model.teacher={root}/teacher", "env.max_turns=12",
                             "packing.max_tokens_per_row=1024"])
    ensure_tiny_models(cfg, CPU)
    student, teacher, tok = load_models(cfg, CPU)
    env = make_env(cfg)
    episodes = [expert_episode(env, t, ChatFormat(tok), tok.eos_token_id) for t in env.tasks("train")[:8]]
    return Trainer(cfg, CPU, student, teacher, pad_token_id=tok.pad_token_id), episodes, tok


def test_train_step(benchmark, setup):
    trainer, episodes, _ = setup
    records = []
    benchmark.pedantic(lambda: records.append(trainer.step(episodes)), rounds=3, iterations=1, warmup_rounds=1)
    phases = ("time_forward", "time_loss", "time_backward", "time_optim")
    mean = {k: sum(r[k] for r in records) / len(records) for k in phases}
    benchmark.extra_info.update(mean, tokens_scored=records[-1]["tokens_scored"],
                                loss_tokens=records[-1]["loss_tokens"], episodes=len(episodes))
    print("\ntrain step phases (s):", {k: round(v, 4) for k, v in mean.items()},
          "tokens scored:", records[-1]["tokens_scored"])


@pytest.mark.parametrize("mode", ["whole_episode", "per_turn_reprefill"])
def test_episode_scoring(benchmark, setup, mode):
    trainer, episodes, tok = setup
    models = (trainer.student.model, trainer.teacher.model)

    @torch.no_grad()
    def whole():
        batch = pack_episodes(episodes, 1024, tok.pad_token_id)
        for m in models:
            m(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)

    @torch.no_grad()
    def per_turn():
        for ep in episodes:
            for _, end in ep.turn_spans:
                ids = torch.tensor([ep.token_ids[:end]])
                for m in models:
                    m(input_ids=ids, use_cache=False)

    benchmark.pedantic(whole if mode == "whole_episode" else per_turn, rounds=3, iterations=1, warmup_rounds=1)
    scored = sum(whole_episode_tokens(e) if mode == "whole_episode" else per_turn_reprefill_tokens(e)
                 for e in episodes)
    turns = sum(len(e.turn_spans) for e in episodes)
    benchmark.extra_info.update(positions_per_model=scored, episodes=len(episodes), turns=turns)
    print(f"\n{mode}: {scored} positions per model for {len(episodes)} episodes / {turns} turns")


STEP_SECONDS: dict[int, float] = {}


@pytest.mark.slow
@pytest.mark.parametrize("episodes,after", [(8, False), (8, True), (32, False), (32, True)],
                         ids=["8-before", "8-after", "32-before", "32-after"])
def test_distillation_step(benchmark, demo_workload, tmp_path, episodes, after):
    from gopd_fast.train import RolloutSource, Trainer, load_models, teacher_hidden

    torch.set_num_threads(1)
    w = demo_workload
    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "demo-trainer.toml", [
        f"model.student={w['student']}", f"model.teacher={w['teacher']}", f"run.output_dir={tmp_path}",
        f"rollout.episodes_per_step={episodes}",
        *([] if after else ["rollout.kv_reuse=false", "model.attn_implementation=sdpa"])])
    student, teacher, tok = load_models(cfg, CPU)
    trainer = Trainer(cfg, CPU, student, teacher, pad_token_id=tok.pad_token_id)
    source = RolloutSource(cfg, tok, CPU)     # household, observe="full", 15 turns: the env of the config
    tasks = w["tasks"][:episodes]
    phases: dict[str, float] = {}

    def step(task_ids, seed):
        t0 = time.perf_counter()
        eps = source.collect(task_ids, beta=0.5, temperature=cfg.rollout.temperature, seed=seed)
        t1 = time.perf_counter()
        metrics = trainer.step(eps, teacher_hidden=teacher_hidden(trainer, source, eps))   # as gopd_fast.train
        t2 = time.perf_counter()
        source.sync_weights(trainer.student.state_dict())
        t3 = time.perf_counter()
        phases.update(time_rollout=t1 - t0, time_train=t2 - t1, time_sync=t3 - t2, step_seconds=t3 - t0,
                      **{k: metrics[k] for k in ("time_forward", "time_loss", "time_backward", "time_optim",
                                                 "tokens_scored")})

    try:
        step(tasks[:2], seed=1)    # warm-up: first-call costs (allocator, kernels' first runs)
        torch.manual_seed(0)
        benchmark.pedantic(lambda: step(tasks, seed=0), rounds=1, iterations=1)
    finally:
        source.close()
    phases.update(episodes=episodes, kv_reuse=cfg.rollout.kv_reuse, attn=cfg.model.attn_implementation)
    if after and episodes in STEP_SECONDS:
        phases["speedup_vs_before"] = STEP_SECONDS[episodes] / phases["step_seconds"]
    elif not after:
        STEP_SECONDS[episodes] = phases["step_seconds"]
    benchmark.extra_info.update(phases)
    print(f"\n{benchmark.name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in sorted(phases.items())))
    if "speedup_vs_before" in phases:
        assert phases["speedup_vs_before"] >= 3, f"the step is only {phases['speedup_vs_before']:.2f}x faster"
