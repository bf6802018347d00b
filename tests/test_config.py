"""Config loading: TOML files, dotted overrides, and errors that name the key and the expected value."""
from __future__ import annotations

from pathlib import Path

import pytest

from gopd_fast.config import Config, ConfigError, config_to_dict, load_config

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
    (["optim.lr=fast"], ["optim.lr", "a float", "'fast'"]),
    (["optim.lr=-1e-5"], ["optim.lr", "> 0", "-1e-05"]),
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
