"""evaluate: confidence intervals against closed forms and published values, the oracle's report against the env's
own expert distances, sequential == pooled, logs, bad input, and env failures counted as errors."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import pytest

from gopd_fast import envs
from gopd_fast.envs.evaluate import (
    ORACLE,
    EpisodeLog,
    PolicyInput,
    evaluate,
    summarize,
    t_cdf,
    t_interval,
    t_quantile,
    wilson_interval,
)
from gopd_fast.envs.pool import EnvPool

POOL_TEST_FILE = str(Path(__file__).with_name("test_pool.py").resolve())   # registers "test-flaky"


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)   # Cauchy
    a = 2 * p - 1
    assert t_quantile(p, 2) == pytest.approx(a * math.sqrt(2 / (1 - a * a)), rel=1e-9)
    assert t_quantile(1 - p, 7) == pytest.approx(-t_quantile(p, 7), rel=1e-12)


def test_t_quantile_published_values():
    # Student's t table, two-sided 95%.
    table = {5: 2.570582, 10: 2.228139, 30: 2.042272, 100: 1.983972, 10**6: 1.959966}
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=2e-6)


def test_t_interval_covers_the_mean_95_percent():
    rng, hits, reps = random.Random(0), 0, 2000
    for _ in range(reps):
        ci = t_interval([rng.gauss(5.0, 2.0) for _ in range(8)])
        hits += ci.low <= 5.0 <= ci.high
    assert 0.935 <= hits / reps <= 0.965
    single = t_interval([3.0])
    assert single.mean == 3.0 and math.isnan(single.low) and math.isnan(single.high)
    flat = t_interval([2.0, 2.0, 2.0])
    assert (flat.low, flat.high) == (2.0, 2.0)


def test_wilson_interval_published_values():
    ci = wilson_interval(8, 10)
    assert (ci.mean, round(ci.low, 4), round(ci.high, 4)) == (0.8, 0.4902, 0.9433)
    zero = wilson_interval(0, 10)
    assert zero.low == 0.0 and round(zero.high, 4) == 0.2775
    assert round(wilson_interval(20, 20).low, 4) == 0.8389
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_t_cdf_inverts_t_quantile_and_rejects_bad_input():
    for df in (1, 2.5, 7, 30, 1000):
        for p in (0.01, 0.3, 0.5, 0.9, 0.999):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)
    for p, df in ((0.0, 5), (1.0, 5), (0.5, 0), (0.5, -1), (math.nan, 5)):
        with pytest.raises(ValueError, match="t_quantile"):
            t_quantile(p, df)


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_interval_matches_the_score_formula(confidence):
    # Wilson (1927): (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z the normal quantile.
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    for n in (1, 2, 7, 48, 144, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            p = k / n
            centre, denom = p + z * z / (2 * n), 1 + z * z / n
            half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
            ci = wilson_interval(k, n, confidence)
            assert ci.mean == p and ci.method == "wilson"
            assert ci.low == pytest.approx(max(0.0, (centre - half) / denom), abs=1e-12)
            assert ci.high == pytest.approx(min(1.0, (centre + half) / denom), abs=1e-12)
            assert 0.0 <= ci.low <= p <= ci.high <= 1.0


def test_evaluate_imports_scipy_lazily():
    """scipy is imported by the interval functions, not by importing the harness (env-pool workers stay light)."""
    code = ("import sys, gopd_fast.envs, gopd_fast.envs.evaluate; assert 'scipy' not in sys.modules, 'scipy'; "
            "from gopd_fast.envs.evaluate import wilson_interval; wilson_interval(1, 2); "
            "assert 'scipy.stats' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_oracle_report_matches_expert_distances(tmp_path):
    env = envs.make("household", seed=0)
    tasks = env.tasks("eval")[:20]
    distances = []
    for t in tasks:
        env.reset(t)
        distances.append(env.expert_distance())
    log = tmp_path / "logs" / "oracle.jsonl"
    report = evaluate("household", ORACLE, split="eval", limit=20, env_options={"seed": 0}, log_path=log)
    assert report.n == 20 and report.errors == 0
    assert report.score.mean == 100.0 and report.success_rate.mean == 1.0
    assert report.rounds.mean == pytest.approx(sum(distances) / 20)
    assert report.rounds.low < report.rounds.mean < report.rounds.high
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["task_id"] for line in lines] == tasks
    assert [line["rounds"] for line in lines] == distances
    assert all(len(x["observations"]) == len(x["actions"]) + 1 and x["success"] for x in lines)
    assert "Score 100.0" in str(report) and report.summary()["success_rate"]["method"] == "wilson"


def _seeded_random_policy(state: PolicyInput) -> str:
    """Deterministic in the history only, so sequential and pooled runs must agree action for action."""
    rng = random.Random(f"{state.task_id}/{len(state.actions)}")
    return rng.choice(list(state.admissible_actions) + ["dance"])


def test_sequential_equals_pooled_and_batched_policy():
    seq = evaluate("household", _seeded_random_policy, limit=12, env_options={"seed": 1})
    batch_sizes = []

    def batched(states: list[PolicyInput]) -> list[str]:
        batch_sizes.append(len(states))
        if len(batch_sizes) <= 3:
            # A model call takes time; meanwhile the other in-flight env steps finish and must be batched together
            # into the next call. (Without a pause, on a loaded box each step can finish alone.)
            time.sleep(0.3)
        return [_seeded_random_policy(s) for s in states]

    batched.batched = True
    with EnvPool("household", {"seed": 1}, num_workers=2, reset_timeout_s=120) as pool:
        pooled = evaluate("household", batched, limit=12, pool=pool)
        oracle = evaluate("household", ORACLE, limit=12, pool=pool)
    assert [vars(e) for e in pooled.episodes] == [vars(e) for e in seq.episodes]
    assert pooled.score == seq.score and pooled.rounds == seq.rounds
    assert max(batch_sizes) > 1                       # many episodes in flight, one policy call per batch
    assert oracle.success_rate.mean == 1.0
    assert seq.success_rate.mean < 1.0 and seq.score.mean > 0   # random play: partial credit, rarely solved


def test_turn_limit_and_bad_input():
    report = evaluate("household", lambda s: "look", limit=3, max_turns=4)
    assert [e.rounds for e in report.episodes] == [4, 4, 4]
    assert all(e.truncated and not e.success and e.score == 0.0 for e in report.episodes)
    with pytest.raises(TypeError, match="must return a str"):
        evaluate("household", lambda s: None, limit=1)
    with pytest.raises(TypeError, match="policy must be a callable"):
        evaluate("household", "random", limit=1)
    with pytest.raises(ValueError, match="limit"):
        evaluate("household", ORACLE, limit=0)
    with pytest.raises(ValueError, match="unknown split"):
        evaluate("household", ORACLE, split="test")
    with pytest.raises(ValueError, match="unknown environment"):
        evaluate("nope", ORACLE)
    with pytest.raises(ValueError, match="max_turns"):
        evaluate("household", ORACLE, limit=1, max_turns=0)
    with pytest.raises(ValueError, match="no episodes"):
        summarize([])


def test_env_failures_become_logged_errors(tmp_path):
    opts = {"fail_at": 2, "mode": "crash", "always": True}
    with EnvPool("test-flaky", opts, num_workers=1, max_failures=0, preload=[POOL_TEST_FILE],
                 reset_timeout_s=120) as pool:
        report = evaluate("test-flaky", lambda s: "go", task_ids=["count/0", "count/1"], pool=pool, retries=1,
                          log_path=tmp_path / "e.jsonl")
    assert report.errors == 2 and report.success_rate.mean == 0.0
    assert all(isinstance(e, EpisodeLog) and "failed" in e.error and e.env_failures == 2 for e in report.episodes)


def test_cli_baselines(tmp_path, capsys):
    from gopd_fast.envs.evaluate import main

    oracle = main(["--limit", "5", "--option", "difficulty=easy", "--log", str(tmp_path / "o.jsonl")])
    rand = main(["--policy", "random", "--limit", "5", "--option", "difficulty=easy", "--option", "seed=2"])
    assert oracle.success_rate.mean == 1.0 and rand.rounds.mean > oracle.rounds.mean
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 5
    assert "household eval oracle: Score 100.0" in capsys.readouterr().out
