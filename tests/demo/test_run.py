"""`make demo` at minutes scale (``--quick``): the whole pipeline runs, writes its artefacts, and its numbers are sane.

The quick run uses the committed teacher (gopd_fast/assets/household-full-teacher) and tiny budgets, so it checks the
plumbing and the invariants, not the paper's claim (that is docs/results.md, from the full run).
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
from pathlib import Path

import pytest

from gopd_fast.demo import plots
from gopd_fast.demo import run as demo
from gopd_fast.train_setup import make_env

CURVE_LINE = re.compile(r"\[demo\] curve (\S+) seed (\d+) step (\d+)/(\d+): Score (\S+) \[(\S+), (\S+)\] "
                        r"\((\d+) episodes\)")


@pytest.fixture(scope="module")
def quick_run_logged(tmp_path_factory):
    """The quick demo with stdout and stderr captured, and every redraw of the live curves recorded (whether the
    report phase had started, whether the PNG was on disk right after)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path_factory.mktemp("demo-quick")
    stdout, stderr = io.StringIO(), io.StringIO()
    redraws: list[dict[str, bool]] = []
    real = plots.plot_live_curves

    def spy(points, path, **kwargs):
        written = real(points, path, **kwargs)
        redraws.append({"before_report": "phase report" not in stdout.getvalue(), "on_disk": written.is_file()})
        return written

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        mp.setattr(plots, "plot_live_curves", spy)
        results = demo.main(["--quick", "--out", str(out)])
    return out, results, stdout.getvalue(), stderr.getvalue(), redraws


@pytest.fixture(scope="module")
def quick_run(quick_run_logged):
    out, results, *_ = quick_run_logged
    return out, results


def test_live_curve_lines_match_the_trainer_evals(quick_run_logged):
    """Every held-out curve point of every (method, seed) is printed as one parseable line while it trains, with the
    numbers the trainer's eval records (the final curves) hold."""
    _, results, stdout, _, _ = quick_run_logged
    cfg = demo.load_demo_config(demo.REPO_DIR / "configs" / "demo-quick.toml")
    n, every = cfg.distill.total_steps, cfg.distill.eval_every
    eval_steps = sorted({*range(every, n + 1, every), n}) if every else [n]
    lines = [m for m in map(CURVE_LINE.fullmatch, stdout.splitlines()) if m]
    trained = [m for m in cfg.methods if m != "zero-shot"]
    assert {(m[1], int(m[2])) for m in lines} == {(m, s) for m in trained for s in cfg.seeds}
    for method in trained:
        for seed in cfg.seeds:
            mine = [m for m in lines if m[1] == method and int(m[2]) == seed]
            assert [int(m[3]) for m in mine] == eval_steps and all(int(m[4]) == n for m in mine)
            final = results["curves"][method][f"seed{seed}"][1:]   # the trainer's eval/score at each eval step
            assert [float(m[5]) for m in mine] == pytest.approx(final, abs=0.051)
            for m in mine:
                score, low, high = float(m[5]), float(m[6]), float(m[7])
                assert low <= score <= high and 0.0 <= score <= 100.0
                assert int(m[8]) == cfg.distill.curve_eval_episodes


def test_live_curves_are_drawn_during_the_run(quick_run_logged):
    out, _, stdout, _, redraws = quick_run_logged
    n_points = sum(1 for line in stdout.splitlines() if CURVE_LINE.fullmatch(line))
    # one redraw per printed point plus the silent step-0 point of each run, all before the report phase
    assert len(redraws) >= n_points > 0
    assert all(r["before_report"] and r["on_disk"] for r in redraws)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "curves.png" in stdout and "docs/results.md" in stdout   # where to look now, and for the full table


def test_progress_bars_go_to_stderr(quick_run_logged):
    _, _, stdout, stderr, _ = quick_run_logged
    cfg = demo.load_demo_config(demo.REPO_DIR / "configs" / "demo-quick.toml")
    n = cfg.distill.total_steps
    plan = sum(cfg.plan_s.values())
    # the bars: phase, method, seed, step k/n, episodes, and elapsed / planned seconds of the phase and of the run
    assert "distill 1/" in stderr and f"{n}/{n} steps" in stderr
    assert re.search(rf"distill \d+/{cfg.plan_s['distill']:.0f} s, run \d+/{plan:.0f} s", stderr)
    assert re.search(rf"eval \S+ seed \d+: {cfg.eval.tasks}/{cfg.eval.tasks} episodes", stderr)
    assert "reference eval" in stderr
    # stdout keeps whole lines: no carriage returns, no bar glyphs, every phase line intact
    assert "\r" not in stdout and "\u2588" not in stdout and "steps |" not in stdout
    for phase in ("teacher", "student-base", "reference", "distill", "diagnostics", "report"):
        assert re.search(rf"^\[demo\] \d\d:\d\d:\d\d phase {phase} \(planned \d+ s\)$", stdout, re.MULTILINE), phase
        assert re.search(rf"^\[demo\] phase {phase} took [\d.]+ s \(elapsed \d+ s\)$", stdout, re.MULTILINE), phase


def test_artefacts_exist(quick_run):
    out, _ = quick_run
    for name in ("results.json", "results.md", "plot_data.json", "episodes.jsonl", "failure_mode.json",
                 "beta_schedule.png", "learning_curves.png", "score_vs_turn_limit.png", "failure_mode.png"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"missing artefact {name}"
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{png.name} is not a PNG"


def test_table_numbers_are_sane(quick_run):
    _, results = quick_run
    table = results["table"]
    cfg = demo.load_demo_config(demo.REPO_DIR / "configs" / "demo-quick.toml")
    assert set(table) == {"teacher", *cfg.methods}
    for method, row in table.items():
        assert row["episodes"] == cfg.eval.tasks * len(cfg.seeds), method
        for key, hi in (("score", 100.0), ("success_rate", 100.0), ("rounds", float(cfg.max_turns))):
            m = row[key]["mean"]
            assert math.isfinite(m) and 0.0 <= m <= hi, (method, key, m)
            assert len(row[key]["per_seed"]) == len(cfg.seeds)
        assert row["rounds"]["mean"] >= 1.0
    # The teacher is the distillation target: it must beat the untrained (zero-shot) student.
    assert table["teacher"]["score"]["mean"] > table["zero-shot"]["score"]["mean"]


def test_episode_log_matches_table(quick_run):
    out, results = quick_run
    rows = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    for method, row in results["table"].items():
        mine = [r for r in rows if r["method"] == method]
        assert len(mine) == row["episodes"]
        assert math.isclose(sum(r["score"] for r in mine) / len(mine), row["score"]["mean"], rel_tol=1e-9)
        for r in mine:
            limits = {int(k): v for k, v in r["score_at_limit"].items()}
            # the score at the largest turn limit is the episode's final score; it never exceeds 100
            assert math.isclose(limits[max(limits)], r["score"], abs_tol=1e-6)
            assert all(0.0 <= v <= 100.0 for v in limits.values())


def test_schedules_and_diagnostic(quick_run):
    out, _ = quick_run
    data = json.loads((out / "plot_data.json").read_text())
    betas = data["beta_schedules"]
    assert all(b == 0.0 for b in betas["opd"]) and all(b == 1.0 for b in betas["sft"])
    assert all(b == 0.5 for b in betas["constant-0.5"])
    g = betas["guided-opd"]
    assert g[0] == 1.0 and g[-1] == 0.0 and all(a >= b for a, b in itertools.pairwise(g))
    diag = data["failure_mode"]
    for source in ("student", "teacher"):
        rows = diag["by_turn"][source]
        assert rows and rows[0]["turn"] == 0
        for r in rows:
            assert 0.0 <= r["teacher_maxprob"] <= 1.0 and r["kl_student_teacher"] >= -1e-6
            assert 0.0 <= r["off_path_fraction"] <= 1.0
    # a state on the very first turn is always on the expert path
    assert diag["by_turn"]["teacher"][0]["off_path_fraction"] == 0.0


def test_timing_is_reported(quick_run):
    _, results = quick_run
    phases = {row["phase"]: row for row in results["timing"]}
    assert {"teacher", "student-base", "reference", "distill", "diagnostics", "report"} <= set(phases)
    assert all(row["actual_s"] >= 0 for row in phases.values())
    assert results["wall_seconds"] >= sum(row["actual_s"] for row in phases.values()) - 1.0


def test_bad_config_is_a_clear_error(tmp_path: Path):
    bad = tmp_path / "bad.toml"
    bad.write_text('env = "household"\nmethods = ["opd", "magic"]\n')
    with pytest.raises(ValueError, match="magic"):
        demo.load_demo_config(bad)
    bad.write_text('env = "household"\n[distill]\nstepz = 3\n')
    with pytest.raises(ValueError, match="stepz"):
        demo.load_demo_config(bad)
    bad.write_text('env = "household"\n[eval]\nmax_in_flight = -1\n')
    with pytest.raises(ValueError, match=r"eval.max_in_flight: expected an int in \[0, "):
        demo.load_demo_config(bad)
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "x,y"])


@pytest.mark.parametrize("toml,key", [
    ('budget_s = "fast"', "budget_s"),
    ("budget_s = inf", "budget_s"),
    ("[eval]\ntasks = -8", "eval.tasks"),
    ("[distill]\ntotal_steps = 0", "distill.total_steps"),
    ("[distill]\nlr = nan", "distill.lr"),
    ('[distill]\ntrainer_config = ""', "distill.trainer_config"),
    ("[teacher]\nnoise = 1.5", "teacher.noise"),
    ("[student]\nseed = -1", "student.seed"),
    ("seeds = []", "seeds"),
    ("seeds = [0, true]", "seeds[1]"),
    ("max_turns = 1.5", "max_turns"),
    ('methods = ["opd", "magic"]', "methods[1]"),
    ("[plan]\ndistill = -5", "plan_s.distill"),
    ("[eval]\ndiagnostic_tasks = 0", "eval.diagnostic_tasks"),
    ("[teacher]\nsft_steps = " + "9" * 400, "teacher.sft_steps"),
])
def test_demo_config_uses_the_typed_loader(tmp_path: Path, toml: str, key: str):
    from gopd_fast.config import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text(f'env = "household"\n{toml}\n')
    with pytest.raises(ConfigError) as e:
        demo.load_demo_config(bad)
    assert str(e.value).startswith(f"{key}:"), str(e.value)


def test_demo_cli_config_errors_exit_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'env = "household"\n[eval]\ntasks = -8\n')
    with pytest.raises(SystemExit) as e:
        demo.main(["--config", str(bad)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("gopd_fast.demo: config error: eval.tasks")
    bad.write_bytes(b'env = "caf\xe9"\n')
    with pytest.raises(SystemExit) as e:
        demo.main(["--config", str(bad)])
    assert e.value.code == 2 and "not UTF-8" in capsys.readouterr().err


def test_run_envs_are_reused_and_capped(monkeypatch):
    """One DemoEnvs serves several evaluations: at most eval.max_in_flight env slots plus one replay env are ever
    started, and the records equal those of an evaluation on fresh envs (reuse changes nothing)."""
    cfg = demo.load_demo_config(demo.REPO_DIR / "configs" / "demo-quick.toml")
    cfg = demo.dataclasses.replace(cfg, eval=demo.dataclasses.replace(cfg.eval, max_in_flight=2))
    teacher = demo.ASSETS_DIR / cfg.teacher.asset
    from gopd_fast import envs as gym

    tasks = make_env(demo.env_config(cfg)).tasks("eval")[:5]
    started = []
    make = gym.make

    def counting_make(*args, **kwargs):   # every env (slots and replay) is built by envs.make
        started.append(1)
        return make(*args, **kwargs)

    monkeypatch.setattr(gym, "make", counting_make)
    fresh = demo.evaluate(cfg, teacher, seed=3, tasks=tasks)
    assert len(started) == 3  # 2 slots + 1 replay env, closed after the call
    envs = demo.DemoEnvs(cfg)
    try:
        first = demo.evaluate(cfg, teacher, seed=3, tasks=tasks, envs=envs)
        second = demo.evaluate(cfg, teacher, seed=3, tasks=tasks[::-1], envs=envs)
    finally:
        envs.close()
    assert len(started) == 6  # the shared envs started once for both evaluations
    assert first == fresh
    assert sorted(r["task_id"] for r in second) == sorted(tasks)
    assert envs.max_in_flight(5) == 2 and envs.max_in_flight(1) == 1


def test_a_truncated_student_base_is_the_teachers_first_layers(tmp_path: Path):
    """student.source = "truncated": the base is the teacher's own first layers (no SFT, no oracle data)."""
    import dataclasses

    import torch

    from gopd_fast.demo.config import ASSETS_DIR, load_demo_config
    from gopd_fast.models import load_model

    cfg = load_demo_config(demo.REPO_DIR / "configs" / "demo-quick.toml")
    cfg = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, source="truncated", num_hidden_layers=2))
    teacher_dir = ASSETS_DIR / cfg.teacher.asset
    info = demo.build_student_base(cfg, None, tmp_path / "base", teacher_dir=teacher_dir)
    teacher, _ = load_model(teacher_dir)
    base, _ = load_model(tmp_path / "base")
    assert info["layers"] == base.config.num_hidden_layers == 2 and info["teacher_layers"] == 4
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, teacher.state_dict()[name]), name
    for layers in (0, 4):
        bad = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, num_hidden_layers=layers))
        with pytest.raises(ValueError, match=rf"student.num_hidden_layers={layers}: .*\[1, 3\]"):
            demo.build_student_base(bad, None, tmp_path / f"bad{layers}", teacher_dir=teacher_dir)
    with pytest.raises(ValueError, match="teacher_dir"):
        demo.build_student_base(cfg, None, tmp_path / "none")
