"""cProfile of one guided rollout on the demo's workload (bench/conftest.py), KV reuse on or off: where the time
goes, by function (tottime). The numbers in bench/RESULTS.md's rollout section came from this script.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_rollout.py --in-flight 8 --kv-reuse 1
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch

from gopd_fast import envs as gym
from gopd_fast import models
from gopd_fast.rollout import ChatFormat, RolloutOptions, run_rollout
from gopd_fast.rollout.engines.hf_cached import load_hf_engine

TEACHER = Path(__file__).resolve().parent.parent / "gopd_fast" / "assets" / "household-full-teacher"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-flight", type=int, default=8)
    ap.add_argument("--kv-reuse", type=int, choices=(0, 1), default=1)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, tokenizer = models.load_model(TEACHER)
    student = models.build_model(models.config_for_tokenizer("teacher-tiny", tokenizer, num_hidden_layers=2), seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = models.save_model(student, tokenizer, Path(tmp) / "student")
        engines = [load_hf_engine(str(p), kv_reuse=bool(args.kv_reuse)) for p in (student_dir, TEACHER)]
    factory = lambda: gym.make("household", seed=0, observe="full", max_turns=15)
    env = factory()
    tasks = env.tasks("train")[:args.in_flight]
    env.close()
    opts = RolloutOptions(max_turns=15, max_new_tokens=24, max_prompt_tokens=2048, temperature=1.0,
                          max_in_flight=args.in_flight, seed=0)
    run = lambda t, o: run_rollout(t, student=engines[0], teacher=engines[1], chat=ChatFormat(tokenizer),
                                   envs=factory, beta=0.5, options=o)
    run(tasks[:2], RolloutOptions(max_turns=2, max_new_tokens=24, seed=1))    # warm-up
    for e in engines:
        e.reset_prefix_cache()
    torch.manual_seed(0)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    result = prof.runcall(run, tasks, opts)
    wall = time.perf_counter() - t0
    m = result.metrics
    print(f"wall {wall:.2f} s (profiled), generate {m['generate_seconds']:.2f} s, env wait "
          f"{m['env_wait_seconds']:.2f} s, turns {m['turns']:.0f}, prompt tokens {m['prompt_tokens']:.0f}, "
          f"cached {m['cached_prompt_tokens']:.0f}, generated {m['generated_tokens']:.0f}")
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
