"""Config loading: TOML files, dotted overrides, and errors that name the key and the expected value.

The bad-value corpus is parametrized over every field of every config (trainer, demo, SFT): each field gets the
values its type must refuse (wrong types, bools for numbers, NaN and infinities, 400-digit integers, values just
outside its documented range, blank paths) and must name its key; values on the range's edges are accepted.
"""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from gopd_fast.config import Config, ConfigError, config_to_dict, load_config
from gopd_fast.typed_config import FieldSpec, build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_household_toml_is_the_embedded_default_with_cpu_rows():
    from_file = config_to_dict(load_config(CONFIGS / "household.toml"))
    default = config_to_dict(Config())
    assert from_file["packing"]["max_tokens_per_row"] == 1024
    from_file["packing"]["max_tokens_per_row"] = default["packing"]["max_tokens_per_row"]
    assert from_file == default


@pytest.mark.parametrize("name,turns", [("scienceworld", 30), ("alfworld", 30), ("webshop", 15)])
def test_paper_configs_carry_the_paper_settings(name, turns):
    c = load_config(CONFIGS / f"{name}.toml")
    assert (c.model.student, c.model.teacher) == ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-30B-A3B")
    assert (c.optim.lr, c.optim.grad_clip, c.run.total_steps, c.run.seed) == (1e-6, 1.0, 250, 42)
    assert c.rollout.episodes_per_step == 64
    assert (c.rollout.temperature, c.rollout.eval_temperature) == (1.0, 0.4)
    assert (c.rollout.max_prompt_tokens, c.rollout.max_new_tokens) == (10240, 512)
    assert (c.curriculum.schedule, c.curriculum.beta_start, c.curriculum.beta_end, c.curriculum.ratio) == (
        "cosine", 1.0, 0.0, 0.8)
    assert (c.env.name, c.env.max_turns, c.model.dtype) == (name, turns, "bfloat16")
    # the 30B teacher writes guided turns on a shared server (docs/training.md, "The paper's setup")
    assert c.rollout.teacher_server.startswith("http://") and c.model.shard_teacher


def test_overrides_parse_toml_values_and_bare_strings():
    c = load_config(None, ["optim.lr=1e-5", "optim.betas=[0.9, 0.95]", "run.eval_at_end=false",
                           "model.student=/ckpt/my student", "env.options.difficulty=hard", "run.total_steps=3"])
    assert c.optim.lr == 1e-5 and c.optim.betas == (0.9, 0.95) and c.run.eval_at_end is False
    assert c.model.student == "/ckpt/my student" and c.env.options == {"difficulty": "hard"}
    assert c.run.total_steps == 3
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)   # an int is a valid float


@pytest.mark.parametrize("override,fragments", [
    (["optim.lrr=1e-5"], ["optim.lrr", "known keys", "lr"]),
    (["optimizer.lr=1e-5"], ["optimizer", "known keys", "optim"]),
    (["optim.lr=fast"], ["optim.lr", "float", "'fast'"]),
    (["optim.lr=-1e-5"], ["optim.lr", "(0, 10]", "-1e-05"]),
    (["run.total_steps=2.5"], ["run.total_steps", "an int"]),
    (["run.total_steps=true"], ["run.total_steps", "an int"]),
    (["curriculum.schedule=sigmoid"], ["curriculum.schedule", "'cosine'", "'sigmoid'"]),
    (["curriculum.beta_start=1.5"], ["curriculum.beta_start", "[0, 1]"]),
    (["optim.betas=[0.9]"], ["optim.betas"]),
    (["objective.student_tokens=none", "objective.teacher_tokens=none"], ["nothing to train"]),
    (["run.algorithm=sft", "objective.teacher_tokens=none"], ["run.algorithm='sft'", "teacher_tokens"]),
    (["rollout.max_new_tokens=4096"], ["rollout.max_prompt_tokens", "must exceed", "rollout.max_new_tokens"]),
    (["lr=1e-5"], ["dotted", "section.key"]),
    (["optim.lr"], ["section.key=value"]),
])
def test_bad_values_raise_errors_naming_the_key(override, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    for f in fragments:
        assert f in str(e.value), (f, str(e.value))


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[optim]\nlearning_rate = 1e-5\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(unknown)


def test_config_is_frozen():
    c = Config()
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        c.optim.lr = 1.0  # type: ignore[misc]


def test_cli_prints_config_errors_and_exits_2(monkeypatch, capsys):
    from gopd_fast import train

    monkeypatch.setattr("sys.argv", ["gopd-fast", "optim.lr=abc"])
    with pytest.raises(SystemExit) as e:
        train.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config error" in err and "optim.lr" in err


# ---------------------------------------------------------------------------------------------------------
# The corpus: every field of every config
# ---------------------------------------------------------------------------------------------------------

def _config_roots() -> dict[str, tuple[type, str]]:
    from gopd_fast.demo.config import DemoConfig
    from gopd_fast.demo.sft import SFTConfig

    return {"trainer": (Config, ""), "demo": (DemoConfig, ""), "sft": (SFTConfig, "SFTConfig")}


def _leaf_fields() -> list[tuple[str, str, tuple[str, ...], Any, FieldSpec]]:
    """(root, key, path in the data dict, type, spec) of every non-section field."""
    out = []
    for root, (cls, prefix) in _config_roots().items():
        todo = [(cls, ())]
        while todo:
            c, path = todo.pop()
            hints = typing.get_type_hints(c)
            for f in dataclasses.fields(c):
                tp = hints[f.name]
                if dataclasses.is_dataclass(tp):
                    todo.append((tp, (*path, f.name)))
                    continue
                key = ".".join((prefix, *path, f.name) if prefix else (*path, f.name))
                out.append((root, key, (*path, f.name), tp, f.metadata.get("spec", FieldSpec())))
    return sorted(out, key=lambda t: (t[0], t[1]))


LEAVES = _leaf_fields()
HUGE = 10 ** 400


def _below(bound: float, tp: Any) -> float:
    return bound - 1 if tp is int else bound - max(abs(bound) * 1e-6, 1e-9)


def _above(bound: float, tp: Any) -> float:
    return bound + 1 if tp is int else bound + max(abs(bound) * 1e-6, 1e-9)


def _bad_scalars(tp: Any, fs: FieldSpec) -> list[Any]:
    if typing.get_origin(tp) is Literal:
        return ["no-such-choice", "", 1, True, None, 1.5]
    if tp is bool:
        return [1, 0, "true", "yes", 1.0, None]
    if tp is str:
        return [1, 1.5, True, None, ["a"], "lone surrogate \udcff"] + (["", "   "] if fs.path or fs.nonempty else [])
    if tp in (int, float):
        bad = [True, False, "1", "fast", None, [1], math.nan, -math.nan, HUGE, -HUGE]
        bad += [math.inf, -math.inf] if not fs.allow_inf else []
        bad += [1.5] if tp is int else []
        bad += [_below(fs.ge, tp)] if fs.ge is not None else []
        bad += [fs.gt] if fs.gt is not None else []
        bad += [_above(fs.le, tp)] if fs.le is not None else []
        bad += [fs.lt] if fs.lt is not None else []
        return bad
    return []


def _bad_values(tp: Any, fs: FieldSpec) -> list[Any]:
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        good = _good_scalar(args[0], fs)
        bad: list[Any] = ["x", 1, {"a": 1}, [[good]]]
        bad += [[good] * (len(args) + 1), [good] * (len(args) - 1)] if args[-1] is not Ellipsis else []
        bad += [[]] if fs.nonempty else []
        n = len(args) if args[-1] is not Ellipsis else 1
        bad += [[v] * n for v in _bad_scalars(args[0], dataclasses.replace(fs, nonempty=False))]
        return bad
    if origin is dict:
        bad = ["x", [1], 3]
        value_type = typing.get_args(tp)[1]
        if value_type is not Any:
            bad += [{"k": v} for v in _bad_scalars(value_type, fs)]
        return bad
    return _bad_scalars(tp, fs)


def _good_scalar(tp: Any, fs: FieldSpec) -> Any:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)[0]
    if tp is str:
        return "x"
    lo = fs.ge if fs.ge is not None else fs.gt
    return tp(lo if fs.ge is not None else (lo + 1 if lo is not None else 0))


def _data(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data: dict[str, Any] = {path[-1]: value}
    for p in reversed(path[:-1]):
        data = {p: data}
    return data


def _build_root(root: str, data: dict[str, Any]) -> Any:
    cls, _ = _config_roots()[root]
    return build(cls, data)


BAD_CASES = [pytest.param(root, key, path, v, id=f"{root}:{key}={v!r:.40}")
             for root, key, path, tp, fs in LEAVES for v in _bad_values(tp, fs)]


def test_the_corpus_covers_every_field_of_every_config():
    keys = {(root, key) for root, key, *_ in LEAVES}
    assert {("trainer", "optim.weight_decay"), ("trainer", "curriculum.sharpness"), ("trainer", "model.student"),
            ("demo", "budget_s"), ("demo", "eval.tasks"), ("demo", "distill.total_steps"),
            ("sft", "SFTConfig.lr")} <= keys
    covered = {(c.values[0], c.values[1]) for c in BAD_CASES}
    no_bad_value = sorted(keys - covered)
    # only free-form tables (envs.make options) accept any value
    assert no_bad_value == [] or all(k.endswith("options") for _, k in no_bad_value), no_bad_value
    assert len(BAD_CASES) > 800


@pytest.mark.parametrize("root,key,path,value", BAD_CASES)
def test_every_field_rejects_bad_values_naming_its_key(root, key, path, value):
    with pytest.raises(ConfigError) as e:
        _build_root(root, _data(path, value))
    assert str(e.value).startswith(f"{key}"), str(e.value)
    assert len(str(e.value)) < 400, "a huge value is quoted in full"


@pytest.mark.parametrize("root,key,path,tp,fs", [pytest.param(*leaf, id=f"{leaf[0]}:{leaf[1]}") for leaf in LEAVES])
def test_every_numeric_field_has_a_documented_range_and_accepts_its_edges(root, key, path, tp, fs):
    scalar = typing.get_args(tp)[0] if typing.get_origin(tp) in (tuple, dict) else tp
    if typing.get_origin(tp) is dict:
        scalar = typing.get_args(tp)[1]
    if scalar not in (int, float):
        return
    assert fs.ge is not None or fs.gt is not None, f"{key}: no lower bound"
    edges = [v for v in (fs.ge, fs.le) if v is not None]
    for edge in edges:
        value = scalar(edge)
        if typing.get_origin(tp) is tuple:
            args = typing.get_args(tp)
            value = [value] * (len(args) if args[-1] is not Ellipsis else 1)
        elif typing.get_origin(tp) is dict:
            value = {"phase": value}
        try:
            _build_root(root, _data(path, value))
        except ConfigError as e:   # only a cross-field rule may object, and never about this key's own range
            assert not str(e).startswith(f"{key}:"), str(e)


def test_direct_construction_is_checked_too():
    from gopd_fast.config import CurriculumConfig, OptimConfig

    with pytest.raises(ConfigError, match="optim.eps"):
        OptimConfig(eps=math.inf)
    with pytest.raises(ConfigError, match=r"curriculum.sharpness"):
        CurriculumConfig(sharpness=1e-17)
    assert isinstance(OptimConfig(lr=1).lr, float) and OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match="optim.weight_decay"):
        dataclasses.replace(OptimConfig(), weight_decay=math.inf)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "exponential", "step", "constant", "none"])
@pytest.mark.parametrize("sharpness", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("total,ratio", [(1, 1e-9), (1, 1.0), (7, 0.5), (1000, 1.0)])
def test_any_accepted_curriculum_gives_a_finite_beta_in_0_1(schedule, sharpness, total, ratio):
    from gopd_fast.config import CurriculumConfig
    from gopd_fast.curriculum import BetaSchedule

    c = CurriculumConfig(schedule=schedule, sharpness=sharpness, ratio=ratio, stages=1_000_000)
    betas = [BetaSchedule(c, total)(s) for s in range(total + 1)]
    assert all(math.isfinite(b) and 0.0 <= b <= 1.0 for b in betas), betas[:5]


# ---------------------------------------------------------------------------------------------------------
# Files, overrides and the command line
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("optim.eps=inf", "optim.eps"),
    ("curriculum.sharpness=inf", "curriculum.sharpness"),
    ("curriculum.sharpness=1e-17", "curriculum.sharpness"),
    ("curriculum.sharpness=nan", "curriculum.sharpness"),
    ("optim.lr=1e400", "optim.lr"),
    ("model.student=", "model.student"),
    ("model.teacher=   ", "model.teacher"),
    ("run.output_dir=\"\"", "run.output_dir"),
    ("run.total_steps=" + "9" * 400, "run.total_steps"),
    ("optim.lr=" + "9" * 400, "optim.lr"),
    ("run.seed=" + "9" * 5000, "run.seed"),           # beyond Python's int-parsing digit limit
    ("optim.betas=[0.9, inf]", "optim.betas[1]"),
    ("rollout.temperature=-0.0001", "rollout.temperature"),
    ("env.max_turns=0", "env.max_turns"),
    ("run.resume=1", "run.resume"),
    ("objective.temperature=1e-30", "objective.temperature"),
    ("rollout.teacher_server=localhost:8000", "rollout.teacher_server"),
])
def test_issue_examples_are_config_errors(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(key), str(e.value)


@pytest.mark.parametrize("override", ["optim..lr=1", ".lr=1", "optim.=1", "=1", "optim. lr=1", "optim.lr",
                                      ""])
def test_malformed_overrides_are_config_errors(override):
    with pytest.raises(ConfigError, match="override"):
        load_config(None, [override])
    with pytest.raises(ConfigError, match="run.name: expected a non-empty string"):
        load_config(None, ["run.name.x=1"])
    with pytest.raises(ConfigError, match="override 'run.name.x=1': 'run.name' is not a section"):
        load_config(None, ["run.name=a", "run.name.x=1"])


@pytest.mark.parametrize("content,fragment", [
    (b"[optim]\nlr = 1e-5\n# caf\xe9\n", "not UTF-8"),
    (b"\xff\xfe[\x00o\x00", "not UTF-8"),
    (b"[optim]\nlr = " + b"9" * 5000 + b"\n", "invalid TOML"),
    (b"[optim]\nlr = " + b"9" * 400 + b"\n", "optim.lr"),
    (b"x = " + b"[" * 100_000 + b"]" * 100_000 + b"\n", "invalid TOML"),
    (b"[optim]\nlr = nan\n", "optim.lr"),
    (b"[optim]\nlearning_rate = 1\n", "optim.learning_rate"),
    (b"optim = 3\n", "optim"),
])
def test_bad_files_are_config_errors(tmp_path, content, fragment):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read|no such file"):
        load_config(tmp_path)   # a directory


@pytest.mark.parametrize("args", [
    ["optim.weight_decay=inf"],
    ["model.student="],
    ["run.total_steps=" + "9" * 400],
    ["optim.lr"],
    ["--config", "NONUTF8"],
])
def test_the_console_script_exits_2_with_one_line(tmp_path, monkeypatch, capsys, args):
    from gopd_fast import train

    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[run]\nname = \"caf\xe9\"\n")
    monkeypatch.setattr("sys.argv", ["gopd-fast", *[str(bad) if a == "NONUTF8" else a for a in args]])
    with pytest.raises(SystemExit) as e:
        train.cli()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gopd-fast: config error:") and err.count("\n") == 1, err


def test_the_console_script_process_prints_no_traceback(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b"[run]\nname = \"caf\xe9\"\n")
    proc = subprocess.run([sys.executable, "-m", "gopd_fast.train", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "not UTF-8" in proc.stderr, proc.stderr
