"""Step and reset speed of the real environments (run ``pytest bench/test_bench_envs_real.py --benchmark-enable``).

Cases (each records ms_per_step / steps_per_s in benchmark.extra_info):
    textworld_express_step   gold-path steps of coin + cookingworld test games (timed: steps only)
    textworld_express_reset  reset with gold-path generation
    scienceworld_step        gold-path steps of find-animal test variations, "easy" preset (steps only)
    scienceworld_reset       reset (task load + gold path) of the same variations
    webshop_step             an oracle episode (search, paging, options, buy) on a generated 5,000-product
                             catalogue: BM25 search dominates
"""
from __future__ import annotations

import json
import random
import shutil

import pytest

from gopd_fast import envs

java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime")


def _gold_episode(env) -> int:
    steps = 0
    while (action := env.expert_action()) is not None:
        steps += 1
        if env.step(action).done:
            break
    return steps


def _bench_steps(benchmark, env, task_ids):
    it = iter(task_ids * 100)
    counts: list[int] = []

    def setup():
        env.reset(next(it))

    def run():
        counts.append(_gold_episode(env))

    benchmark.pedantic(run, setup=setup, rounds=len(task_ids), iterations=1)
    steps = sum(counts) / len(counts)
    benchmark.extra_info.update(steps_per_episode=steps)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = 1000 * benchmark.stats.stats.mean / steps
        benchmark.extra_info["steps_per_s"] = steps / benchmark.stats.stats.mean


@java
def test_textworld_express_step(benchmark):
    env = envs.make("textworld-express", games=["coin", "cookingworld"], max_seeds_per_game=5)
    ids = env.tasks("test")
    env.reset(ids[0])  # JVM start and seed lists outside the timing
    _bench_steps(benchmark, env, ids)
    env.close()


@java
def test_textworld_express_reset(benchmark):
    env = envs.make("textworld-express", games=["coin", "cookingworld"], max_seeds_per_game=5)
    ids = env.tasks("test")
    env.reset(ids[0])
    it = iter(ids * 100)
    benchmark.pedantic(lambda: env.reset(next(it)), rounds=len(ids), iterations=1)
    env.close()


@java
def test_scienceworld_step(benchmark):
    env = envs.make("scienceworld", task_names=["find-animal"], simplification="easy", max_variations_per_task=4)
    ids = env.tasks("test")
    env.reset(ids[0])
    _bench_steps(benchmark, env, ids)
    env.close()


@java
def test_scienceworld_reset(benchmark):
    env = envs.make("scienceworld", task_names=["find-animal"], simplification="easy", max_variations_per_task=4)
    ids = env.tasks("test")
    env.reset(ids[0])
    it = iter(ids * 100)
    benchmark.pedantic(lambda: env.reset(next(it)), rounds=len(ids), iterations=1)
    env.close()


def _catalogue(root, n_products: int = 5000):
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    items, attrs, human = [], {}, {}
    for i in range(n_products):
        asin = f"B{i:09d}"
        title = " ".join(rng.choices(words, k=8))
        items.append({"asin": asin, "name": title, "full_description": " ".join(rng.choices(words, k=60)),
                      "small_description": [" ".join(rng.choices(words, k=10))], "pricing": f"${rng.randint(5, 90)}.99",
                      "customization_options": {"size": [{"value": s, "image": None} for s in ("small", "large")]},
                      "images": [""], "category": "c", "query": title.split()[0], "product_category": "a › b › c"})
        attrs[asin] = {"attributes": [rng.choice(words)]}
        if i % 10 == 0:
            human[asin] = [{"instruction": f"i want {title}", "instruction_attributes": attrs[asin]["attributes"],
                            "instruction_options": ["large"]}]
    for name, obj in [("items_shuffle.json", items), ("items_ins_v2.json", attrs), ("items_human_ins.json", human)]:
        (root / name).write_text(json.dumps(obj))
    return root


def test_webshop_step(benchmark, tmp_path):
    env = envs.make("webshop", data_dir=_catalogue(tmp_path))
    _bench_steps(benchmark, env, env.tasks("test")[:20])
