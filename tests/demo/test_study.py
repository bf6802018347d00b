"""The study (``python -m gopd_fast.demo.study``): a tiny config end to end, resumption of an interrupted cell, and the
aggregation on synthetic cell files whose paired differences are known."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from gopd_fast.demo.study import aggregate as agg
from gopd_fast.demo.study.cells import Cell, read_metrics
from gopd_fast.demo.study.config import ABLATIONS, load_study_config, study_trainer_config

TINY = """
env = "household"
max_turns = 3
validation_range = [5000, 5004]
seeds = [0]
methods = ["zero-shot", "opd", "guided-opd"]
diagnostic_methods = ["opd"]
cells_dir = "{root}/study/cells"
run_dir = "{root}/runs"
save_every = 2

[env_options]
seed = 0
observe = "full"
num_train = 5000

[sizes.tiny]
size = "student-tiny"
num_hidden_layers = 0
task_range = [0, 4]
steps = 2
batch_size = 2

[teacher]
asset = "household-full-teacher"

[select_lr]
grid = [1e-4, 1e-3]
total_steps = 1
val_tasks = 2

[distill]
total_steps = 4
episodes_per_step = 2
eval_every = 2
curve_eval_episodes = 2
extra_overrides = ["rollout.max_prompt_tokens=4096", "packing.max_tokens_per_row=4096"]

[eval]
tasks = 2
diagnostic_tasks = 1
"""


def _write_config(root: Path) -> Path:
    path = root / "study.toml"
    path.write_text(TINY.format(root=root))
    return path


def _main(config: Path, *flags: str) -> None:
    from gopd_fast.demo.study.__main__ import main

    main(["--config", str(config), *flags])


# ----------------------------------------------------------------------------------------------------- config
def test_config_rejects_bad_input(tmp_path):
    good = _write_config(tmp_path)
    cfg = load_study_config(good)
    assert list(cfg.sizes) == ["tiny"] and cfg.distill.total_steps == 4
    for old, new, match in (('methods = ["zero-shot"', 'methods = ["nope"', "unknown"),
                            ("validation_range = [5000, 5004]", "validation_range = [10, 20]", "overlaps"),
                            ("save_every = 2", "save_every = 2\nbogus = 1", "bogus")):
        bad = tmp_path / "bad.toml"
        bad.write_text(good.read_text().replace(old, new))
        with pytest.raises(ValueError, match=match):
            load_study_config(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_study_config(tmp_path / "missing.toml")


def test_config_errors_name_the_key(tmp_path):
    from gopd_fast.typed_config import ConfigError

    good = _write_config(tmp_path)
    for old, new, match in (("steps = 2\nbatch_size = 2", "steps = 0\nbatch_size = 2", "sizes.tiny.steps"),
                            ("task_range = [0, 4]", "task_range = [0, 4, 8]", "sizes.tiny.task_range"),
                            ("total_steps = 1", "total_steps = \"1\"", "select_lr.total_steps"),
                            ('asset = "household-full-teacher"', 'asset = "x"\nnoise = 1.0', "teacher.noise"),
                            ("[sizes.tiny]", "[sizes.tiny]\nwidth = 3", "sizes.tiny.width"),
                            ("[sizes.tiny]", "[sizes.tiny]\nsource = \"oracle\"", "sizes.tiny.source"),
                            ("[sizes.tiny]", "[sizes.tiny]\ntemperature = 0.0", "sizes.tiny.temperature")):
        bad = tmp_path / "bad.toml"
        bad.write_text(good.read_text().replace(old, new, 1))
        with pytest.raises(ConfigError, match=match):
            load_study_config(bad)


def test_a_teacher_base_learns_from_the_teachers_own_episodes(tmp_path):
    """source = "teacher": the base's SFT data is the study teacher's sampled episodes of the base's task range (so the
    base is never taught by a source better than the teacher); source = "random": random admissible actions."""
    import dataclasses

    from gopd_fast.demo.config import ASSETS_DIR
    from gopd_fast.demo.run import _tokenizer, rollout
    from gopd_fast.demo.study.teacher import base_episodes

    cfg = load_study_config(_write_config(tmp_path))
    spec = dataclasses.replace(cfg.sizes["tiny"], source="teacher", temperature=0.7, task_range=(1, 4))
    cfg = dataclasses.replace(cfg, sizes={"tiny": spec})
    teacher = ASSETS_DIR / cfg.teacher.asset
    tok = _tokenizer(teacher)
    episodes = base_episodes(cfg, "tiny", tok)
    direct = rollout(cfg.demo_config("tiny"), teacher, [e.task_id for e in episodes], seed=spec.seed,
                     temperature=0.7)
    assert [e.task_id for e in episodes] == ["household/train/1", "household/train/2", "household/train/3"]
    assert [e.token_ids for e in episodes] == [e.token_ids for e in direct]   # the teacher wrote every turn
    random_cfg = dataclasses.replace(cfg, sizes={"tiny": dataclasses.replace(spec, source="random")})
    assert [e.token_ids for e in base_episodes(random_cfg, "tiny", tok)] != [e.token_ids for e in episodes]
    bad = dataclasses.replace(cfg, sizes={"tiny": dataclasses.replace(spec, task_range=(4990, 5010))})
    with pytest.raises(ValueError, match="sizes.tiny.task_range"):
        base_episodes(bad, "tiny", tok)


def test_a_truncated_base_is_the_teachers_first_layers(tmp_path):
    import dataclasses

    import torch

    from gopd_fast.demo.config import ASSETS_DIR
    from gopd_fast.demo.study.teacher import build_student_base
    from gopd_fast.models import load_model
    from gopd_fast.typed_config import ConfigError

    cfg = load_study_config(_write_config(tmp_path))
    spec = dataclasses.replace(cfg.sizes["tiny"], source="truncated", num_hidden_layers=1)
    cfg = dataclasses.replace(cfg, sizes={"tiny": spec})
    teacher, tok = load_model(ASSETS_DIR / cfg.teacher.asset)
    info = build_student_base(cfg, "tiny", tok, tmp_path / "base")
    base, _ = load_model(tmp_path / "base")
    assert base.config.num_hidden_layers == 1 and info["teacher_layers"] == teacher.config.num_hidden_layers
    kept = {k: v for k, v in teacher.state_dict().items() if ".layers." not in k or ".layers.0." in k}
    assert base.state_dict().keys() == kept.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in kept.items())   # the teacher's own weights
    too_deep = dataclasses.replace(cfg, sizes={"tiny": dataclasses.replace(spec, num_hidden_layers=4)})
    with pytest.raises(ValueError, match=r"sizes.tiny.num_hidden_layers=4: .* \[1, 3\]"):
        build_student_base(too_deep, "tiny", tok, tmp_path / "deep")
    bad = tmp_path / "bad.toml"
    bad.write_text(_write_config(tmp_path).read_text().replace(
        "[sizes.tiny]", '[sizes.tiny]\nsource = "truncated"'))   # TINY's num_hidden_layers is 0
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        load_study_config(bad)


def test_an_ablation_is_guided_opd_with_its_objective(tmp_path):
    import dataclasses

    demo = load_study_config(_write_config(tmp_path)).demo_config()
    over, gopd = (study_trainer_config(demo, m, 0, tmp_path, tmp_path, tmp_path) for m in ("gopd-swapped", "guided-opd"))
    assert dataclasses.replace(over, objective=gopd.objective) == gopd
    assert over.objective == dataclasses.replace(gopd.objective, **ABLATIONS["gopd-swapped"]["objective"])
    assert over.objective != gopd.objective
    with pytest.raises(ValueError, match="zero-shot"):
        study_trainer_config(demo, "zero-shot", 0, tmp_path, tmp_path, tmp_path)


def test_an_ablation_cell_trains_guided_opd_with_its_objective(tmp_path):
    from gopd_fast.demo.study.cells import Study

    cfg = load_study_config(_write_config(tmp_path))
    study = Study(cfg)
    study.base_dir = lambda size: tmp_path / "base"     # no base is built: only the Config is inspected
    try:
        trainer = study.trainer_config(Cell("tiny", "gopd-swapped", 0), 1e-3, tmp_path / "out")
    finally:
        study.close()
    assert trainer.run.algorithm == "gopd" and trainer.run.resume and trainer.run.save_every == cfg.save_every
    assert (trainer.objective.student_tokens, trainer.objective.teacher_tokens) == ("forward_kl", "reverse_kl")
    assert trainer.curriculum.schedule == "cosine" and trainer.optim.lr == 1e-3


def test_seeds_flag_replaces_the_configs_seeds(tmp_path, monkeypatch, capsys):
    from gopd_fast.demo.study import runner

    seen = {}
    monkeypatch.setattr(runner, "run_cells", lambda study, lr, only: seen.update(seeds=study.cfg.seeds, only=only))
    monkeypatch.setattr(runner, "aggregate", lambda study: None)
    _main(_write_config(tmp_path), "--seeds", "3,5", "--only", "zero-shot")
    assert seen == {"seeds": (3, 5), "only": "zero-shot"}
    with pytest.raises(SystemExit):
        _main(_write_config(tmp_path), "--seeds", "-1")
    assert "--seeds" in capsys.readouterr().err


def test_a_trained_cell_needs_a_learning_rate(tmp_path):
    from gopd_fast.demo.study.cells import Study, all_cells

    cfg = load_study_config(_write_config(tmp_path))
    assert [c.name for c in all_cells(cfg)] == ["teacher__teacher__seed0", "tiny__zero-shot__seed0",
                                                "tiny__opd__seed0", "tiny__guided-opd__seed0"]
    study = Study(cfg)
    with pytest.raises(FileNotFoundError, match="--select-lr"):
        study.run_cell(Cell("tiny", "opd", 0), lr=None)
    study.close()


# ------------------------------------------------------------------------------------------------ aggregation
def _synthetic_cell(cells: Path, size: str, method: str, seed: int, scores: list[float]) -> None:
    evals = [{"task_id": f"household/eval/{i}", "score": s, "success": s == 100.0, "rounds": 5,
              "score_at_limit": {"1": s / 2, "2": s}} for i, s in enumerate(scores)]
    data = {"cell": {"size": size, "method": method, "seed": seed}, "eval": evals}
    if method not in ("zero-shot", "teacher"):
        data["train"] = {"curve": [[2, scores[0]], [4, scores[1]]], "seconds_per_step": 1.0}
    (cells / f"{size}__{method}__seed{seed}.json").write_text(json.dumps(data))


def test_aggregate_paired_differences_are_exact(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    base = [10.0, 20.0, 30.0, 40.0]
    # opd = base + 5 on every task for seed 0, + 7 for seed 1; guided-opd = opd + (1, -1, 3, -3) per task.
    for seed, shift in ((0, 5.0), (1, 7.0)):
        _synthetic_cell(cells, "s", "zero-shot", seed, base)
        opd = [b + shift for b in base]
        _synthetic_cell(cells, "s", "opd", seed, opd)
        _synthetic_cell(cells, "s", "guided-opd", seed, [o + d for o, d in zip(opd, (1, -1, 3, -3))])
        _synthetic_cell(cells, "teacher", "teacher", seed, [100.0] * 4)
    summary = agg.aggregate(cells, tmp_path, curve_tasks=2, draw=False)
    diffs = summary["sizes"]["s"]["paired_differences"]
    d = diffs["opd - zero-shot"]
    assert d["mean"] == pytest.approx(6.0) and d["pairs"]["n"] == 8 and d["per_seed"] == [5.0, 7.0]
    # 8 pairs: four 5s and four 7s -> sd = sqrt(8/7); t(0.975, 7) = 2.3646
    half = 2.364624 * math.sqrt(8 / 7) / math.sqrt(8)
    assert d["pairs"]["low"] == pytest.approx(6.0 - half, abs=1e-4)
    assert d["pairs"]["high"] == pytest.approx(6.0 + half, abs=1e-4)
    # over 2 seeds: mean 6, sd sqrt(2), t(0.975, 1) = 12.706
    assert d["seeds"]["high"] - 6.0 == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2), abs=1e-3)
    g = diffs["guided-opd - opd"]
    assert g["mean"] == pytest.approx(0.0) and g["per_seed"] == [0.0, 0.0]
    assert g["pairs"]["low"] < 0 < g["pairs"]["high"]
    assert diffs["teacher - zero-shot"]["mean"] == pytest.approx(75.0)
    table = summary["sizes"]["s"]["table"]
    assert table["opd"]["score"]["mean"] == pytest.approx(31.0) and table["teacher"]["episodes"] == 8
    # learning curves start at the base's score on the curve's first 2 tasks (15), then the cell's curve points
    assert summary["sizes"]["s"]["learning_curves"]["opd"] == {"steps": [0, 2, 4], "seed0": [15.0, 15.0, 25.0],
                                                               "seed1": [15.0, 17.0, 27.0]}
    assert summary["sizes"]["s"]["score_vs_turn_limit"]["zero-shot"] == {1: 12.5, 2: 25.0}
    text = (tmp_path / "tables.md").read_text()
    assert "| opd - zero-shot | +6.00 |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["sizes"]["s"]["paired_differences"]


def test_failure_mode_table_reads_the_right_turn_and_buckets():
    row = lambda **kw: {"teacher_maxprob": 0.9, "teacher_entropy": 0.1, **kw}
    fm = {"by_turn": {"student": [row(turn=t, states=4, off_path_fraction=t / 10, kl_student_teacher=0.0,
                                      teacher_p_oracle_action=0.5) for t in range(8)],
                      "teacher": [row(turn=t, states=4, off_path_fraction=t / 20, kl_student_teacher=0.0,
                                      teacher_p_oracle_action=0.5) for t in range(3)]},
          "by_distance": [row(distance=d, open_ended=d == 2, states=10 + d, kl_student_teacher=0.1 * (d + 1),
                              teacher_oracle_agreement=0.9 - 0.3 * d) for d in range(3)]}
    table = agg.format_failure_modes({"opd-seed0": fm}, turn=5)
    # student-only off-path at turn 5: 0.50; the teacher's rollouts ended before turn 5: "-"
    assert "| opd-seed0 | 0.50 / - | 0.90 / 0.30 (>= 2) | 0.100 / 0.300 | 12 of 33 |" in table
    assert "after turn 5" in table


def test_paired_difference_matches_tasks_not_positions():
    a = {0: [{"task_id": "t1", "score": 10.0}, {"task_id": "t0", "score": 0.0}]}
    b = {0: [{"task_id": "t0", "score": 5.0}, {"task_id": "t1", "score": 5.0}, {"task_id": "t2", "score": 9.0}]}
    d = agg.paired_difference(a, b)
    assert d["pairs"]["n"] == 2 and d["mean"] == pytest.approx(0.0) and "seeds" not in d


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
    rows = [{"kind": "train", "step": 1, "v": 1}, {"kind": "train", "step": 2, "v": 2},
            {"kind": "train", "step": 2, "v": 3}, {"kind": "eval", "step": 2, "v": 4}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = read_metrics(tmp_path)
    assert [(r["kind"], r["step"], r["v"]) for r in got] == [("train", 1, 1), ("eval", 2, 4), ("train", 2, 3)]


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path, monkeypatch):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gopd_fast.train as train_mod

    config = _write_config(tmp_path)
    cfg = load_study_config(config)
    _main(config, "--select-lr")
    lr_info = json.loads((tmp_path / "study" / "lr.json").read_text())
    assert lr_info["lr"] in (1e-4, 1e-3) and lr_info["validation_tasks"][0] == "household/train/5000"
    best = max(lr_info["results"][f"{x:g}"]["score"] for x in (1e-4, 1e-3))
    assert lr_info["results"][f"{lr_info['lr']:g}"]["score"] == best

    # Interrupt the guided-opd cell after its step-2 checkpoint: the first run fails in that cell.
    real_step = train_mod.Trainer.step
    calls = {"n": 0}

    def failing_step(self, episodes, **kwargs):
        if self.cfg.run.algorithm == "gopd":
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("simulated interruption")
        return real_step(self, episodes, **kwargs)

    monkeypatch.setattr(train_mod.Trainer, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        _main(config)
    cells = tmp_path / "study" / "cells"
    done = {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json")}
    assert set(done) == {"teacher__teacher__seed0.json", "tiny__zero-shot__seed0.json", "tiny__opd__seed0.json"}
    gopd_dir = tmp_path / "runs" / "train" / Cell("tiny", "guided-opd", 0).name
    assert (gopd_dir / "checkpoints" / "step-00000002").is_dir()

    monkeypatch.setattr(train_mod.Trainer, "step", real_step)
    _main(config)
    assert {p.name: p.stat().st_mtime_ns for p in cells.glob("*.json") if p.name in done} == done  # skipped
    gopd = json.loads((cells / "tiny__guided-opd__seed0.json").read_text())
    assert gopd["train"]["resumed_from"].endswith("step-00000002")
    from gopd_fast.demo.study.runner import beta_schedules

    assert gopd["train"]["betas"] == pytest.approx(beta_schedules(cfg)["guided-opd"])   # steps 1-2 and 3-4 logged
    assert [s for s, _ in gopd["train"]["curve"]] == [2, 4]
    assert len(gopd["eval"]) == cfg.eval.tasks and all(0 <= r["score"] <= 100 for r in gopd["eval"])
    assert {"diagnostic__tiny__base.json", "diagnostic__tiny__opd-seed0.json"} <= {p.name for p in cells.glob("*")}

    changed = tmp_path / "changed.toml"                 # a finished cell made under other settings is refused
    changed.write_text(config.read_text().replace("[eval]\n", "[eval]\ntemperature = 0.7\n"))
    with pytest.raises(ValueError, match="other settings"):
        _main(changed)

    summary = json.loads((tmp_path / "study" / "summary.json").read_text())
    s = summary["sizes"]["tiny"]
    assert set(s["table"]) == {"teacher", "zero-shot", "opd", "guided-opd"}
    assert "guided-opd - opd" in s["paired_differences"] and "opd - zero-shot" in s["paired_differences"]
    assert set(s["failure_mode"]) == {"base", "opd-seed0"}
    for png in ("beta_schedule.png", "learning_curves-tiny.png", "score_vs_turn_limit-tiny.png",
                "failure_mode-tiny-base.png"):
        assert (tmp_path / "study" / "img" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[2] / "configs").glob("study*.toml")),
                         ids=lambda p: Path(p).name)
def test_committed_study_configs_load_and_name_their_assets(path):
    """Every committed study config passes the typed loader, its env options build the env, and the teacher it
    evaluates (and the asset a rebuild starts from) is committed with the env mode it was trained on."""
    from gopd_fast.demo.config import ASSETS_DIR
    from gopd_fast.train_setup import make_env

    cfg = load_study_config(path)
    make_env(cfg.env_config()).close()
    for asset in (cfg.teacher.asset, cfg.teacher.init_from):
        assert (ASSETS_DIR / asset / "config.json").is_file(), f"{path}: asset {asset} is not committed"
    record = ASSETS_DIR / cfg.teacher.asset / "study_teacher.json"
    if record.is_file():   # built by --build-teacher: on this config's observation mode
        assert json.loads(record.read_text())["env_options"]["observe"] == cfg.env_options["observe"]
