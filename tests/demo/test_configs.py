"""The demo configs for the Java envs (ScienceWorld, TextWorldExpress) load, and every method's trainer settings
build a valid trainer config whose env is the demo's. No env is started (no JVM): this only checks the plumbing
between configs/demo-*.toml, gopd_fast.demo and gopd_fast.config."""
from __future__ import annotations

from pathlib import Path

import pytest

from gopd_fast.demo import run as demo
from gopd_fast.train_setup import make_env

JVM_DEMO_CONFIGS = {
    "demo-textworld-express.toml": "textworld-express",
    "demo-scienceworld.toml": "scienceworld",
}


def _config_path(name: str) -> Path:
    return demo.REPO_DIR / "configs" / name


@pytest.mark.parametrize("name", sorted(JVM_DEMO_CONFIGS))
def test_demo_config_loads(name: str) -> None:
    cfg = demo.load_demo_config(_config_path(name))
    assert cfg.env == JVM_DEMO_CONFIGS[name]
    assert set(cfg.methods) == set(demo.METHODS)      # the same table as the embedded-env demo
    assert len(cfg.seeds) >= 3
    # Phases the pipeline times: every one of them is planned.
    assert set(cfg.plan_s) == {"teacher", "student-base", "reference", "distill", "diagnostics", "report"}
    assert cfg.teacher.noise == 0.0                   # a gold path is open-loop: no recovery labels exist


@pytest.mark.parametrize("name", sorted(JVM_DEMO_CONFIGS))
@pytest.mark.parametrize("method", [m for m in demo.METHODS if m != "zero-shot"])
def test_trainer_config_builds_the_demo_env(name: str, method: str, tmp_path: Path) -> None:
    cfg = demo.load_demo_config(_config_path(name))
    trainer = demo.trainer_config(cfg, method, seed=2, student_dir=tmp_path / "student",
                                  teacher_dir=tmp_path / "teacher", out_dir=tmp_path / "out")
    assert trainer.env.name == cfg.env
    assert trainer.env.max_turns == cfg.max_turns
    # env.seed is its own field; every other demo env option reaches envs.make through env.options, unchanged.
    assert trainer.env.seed == cfg.env_options.get("seed", 0)
    assert dict(trainer.env.options) == {k: v for k, v in cfg.env_options.items() if k != "seed"}
    assert trainer.run.seed == 2
    assert trainer.run.total_steps == cfg.distill.total_steps
    assert trainer.rollout.episodes_per_step == cfg.distill.episodes_per_step
    assert trainer.env.eval_episodes == cfg.distill.curve_eval_episodes
    assert (trainer.env.pool, trainer.env.pool_workers, trainer.env.step_timeout_s) == \
        (cfg.env_pool, cfg.env_pool_workers, cfg.env_step_timeout_s)
    assert trainer.model.student == str(tmp_path / "student")
    assert trainer.model.teacher == str(tmp_path / "teacher")
    expected_algorithm = {"sft": "sft", "opd": "opd", "guided-opd": "gopd", "constant-0.5": "gopd"}[method]
    assert trainer.run.algorithm == expected_algorithm


@pytest.mark.parametrize("name", sorted(JVM_DEMO_CONFIGS))
def test_env_accepts_the_options_without_starting(name: str) -> None:
    """envs.make validates the options (task names, games, simplification) before any JVM starts."""
    from gopd_fast import envs

    cfg = demo.load_demo_config(_config_path(name))
    env = envs.make(cfg.env, max_turns=cfg.max_turns, **cfg.env_options)
    try:
        assert env.max_turns == cfg.max_turns
        assert env._sim.pid is None, "constructing the env must not start its JVM"
    finally:
        env.close()


@pytest.mark.parametrize("bad", [{"env_pool": "yes"}, {"env_pool": 1}, {"env_pool_workers": 0},
                                 {"env_pool_workers": True}, {"env_step_timeout_s": float("inf")},
                                 {"env_step_timeout_s": 0}, {"env_step_timeout_s": "5"}])
def test_env_pool_keys_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        demo.DemoConfig(**bad)


def test_demo_envs_use_the_pool_when_set() -> None:
    from gopd_fast.envs.pool import EnvPool

    envs = demo.DemoEnvs(demo.DemoConfig(env_pool=True, env_pool_workers=1, env_step_timeout_s=60.0))
    try:
        assert isinstance(envs.slots, EnvPool) and envs.slots.num_workers == 1
        first = envs.slots.reset(0, "household/eval/0").result(timeout=120)
        assert first.observation == make_env(demo.env_config(envs.cfg)).reset("household/eval/0").observation
    finally:
        envs.close()
