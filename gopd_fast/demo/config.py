"""The demo's configuration: the typed ``DemoConfig`` (configs/demo*.toml, through the trainer's loader) and the
trainer ``Config`` of each distillation run, built by value from it (no override strings)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gopd_fast.config import Config, EnvConfig, config_from_dict, config_to_dict, load_config
from gopd_fast.typed_config import SEED_RANGE, ConfigError, Section, apply_overrides, build, load_toml, spec

PACKAGE_DIR = Path(__file__).resolve().parents[1]   # gopd_fast/
REPO_DIR = PACKAGE_DIR.parent
ASSETS_DIR = PACKAGE_DIR / "assets"
METHODS = ("zero-shot", "sft", "opd", "guided-opd", "constant-0.5")

# The trainer settings (section -> field -> value) that turn the shared trainer config into each method.
METHOD_SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "sft": {"run": {"algorithm": "sft"}, "objective": {"teacher_tokens": "cross_entropy"}},  # teacher-only rollouts
    "opd": {"run": {"algorithm": "opd"}, "curriculum": {"schedule": "none"}},   # vanilla on-policy distillation
    "guided-opd": {"run": {"algorithm": "gopd"},
                   "curriculum": {"schedule": "cosine", "beta_start": 1.0, "beta_end": 0.0, "ratio": 0.8}},
    "constant-0.5": {"run": {"algorithm": "gopd"}, "curriculum": {"schedule": "constant", "beta_start": 0.5}},
}


@dataclass(frozen=True)
class TeacherSpec(Section, section="teacher"):
    asset: str = spec("household-full-teacher", path=True)   # gopd_fast/assets/<asset>: committed checkpoint
    size: str = spec("teacher-tiny", nonempty=True)
    num_hidden_layers: int = spec(0, ge=0, le=1000)   # 0: the size's default depth; else override it
    vocab_size: int = spec(512, ge=64, le=10 ** 7)
    tokenizer_tasks: int = spec(400, ge=1, le=10 ** 7)  # train tasks whose (noisy) oracle text trains the tokenizer
    sft_episodes: int = spec(1000, ge=1, le=10 ** 7)    # oracle episodes the teacher is trained on (<= train split)
    noise: float = spec(0.1, ge=0, le=1)   # fraction of random (non-expert) turns in its data: it sees some recovery
    sft_steps: int = spec(250, ge=1, le=10 ** 7)
    batch_size: int = spec(16, ge=1, le=10 ** 6)
    lr: float = spec(3e-3, gt=0, le=10)
    seed: int = spec(0, **SEED_RANGE)


@dataclass(frozen=True)
class StudentSpec(Section, section="student"):
    # "oracle": a fresh ``size`` model SFT-ed on base_episodes expert episodes for base_steps; "truncated": the
    # teacher's first num_hidden_layers layers (gopd_fast.demo.run.truncated_base; the other keys are unused).
    source: Literal["oracle", "truncated"] = "oracle"
    size: str = spec("student-tiny", nonempty=True)
    num_hidden_layers: int = spec(0, ge=0, le=1000)   # 0: the size's default depth; else override it
    base_episodes: int = spec(32, ge=1, le=10 ** 7)   # expert episodes of the brief base SFT
    base_steps: int = spec(40, ge=1, le=10 ** 7)
    batch_size: int = spec(16, ge=1, le=10 ** 6)
    lr: float = spec(3e-3, gt=0, le=10)
    seed: int = spec(1, **SEED_RANGE)


@dataclass(frozen=True)
class DistillSpec(Section, section="distill"):
    trainer_config: str = spec("configs/demo-trainer.toml", path=True)
    total_steps: int = spec(8, ge=1, le=10 ** 7)
    episodes_per_step: int = spec(8, ge=1, le=10 ** 6)
    lr: float = spec(1e-3, gt=0, le=10)
    eval_every: int = spec(4, ge=0, le=10 ** 7)             # learning-curve points (0: only at the end)
    curve_eval_episodes: int = spec(16, ge=1, le=10 ** 6)   # held-out tasks per learning-curve point
    extra_overrides: tuple[str, ...] = ()   # more trainer section.key=value overrides


@dataclass(frozen=True)
class EvalSpec(Section, section="eval"):
    tasks: int = spec(48, ge=1, le=10 ** 6)              # held-out (eval split) tasks per evaluation
    temperature: float = spec(0.4, ge=0, le=100)
    max_new_tokens: int = spec(24, ge=1, le=10 ** 6)
    diagnostic_tasks: int = spec(12, ge=1, le=10 ** 6)
    # Episodes generated together (0: all tasks at once). Each in-flight episode holds an env: set a cap for
    # envs that are expensive to start or hold (ScienceWorld / TextWorldExpress start a JVM per env).
    max_in_flight: int = spec(0, ge=0, le=10 ** 6)
    kv_reuse: bool = True                # the engine of evaluations, as the trainer's rollout.kv_reuse


@dataclass(frozen=True)
class DemoConfig(Section):
    env: str = spec("household", nonempty=True)
    # observe="full": the state the oracle plans on is in every observation, so a CPU-sized teacher can learn the
    # oracle (gopd_fast/envs/household/observe.py); the compounding-error mechanisms are unchanged.
    env_options: dict[str, Any] = field(default_factory=lambda: {"seed": 0, "observe": "full"})
    max_turns: int = spec(15, ge=1, le=10 ** 6)
    # Evaluation and training rollouts step their envs in an EnvPool (worker processes surviving crashes and
    # hangs) instead of threads; passed to the trainer as env.pool / env.pool_workers / env.step_timeout_s.
    env_pool: bool = False
    env_pool_workers: int = spec(2, ge=1, le=4096)
    env_step_timeout_s: float = spec(120.0, gt=0, le=86400.0)
    seeds: tuple[int, ...] = spec((0, 1, 2), nonempty=True, **SEED_RANGE)
    methods: tuple[Literal[METHODS], ...] = spec(METHODS, nonempty=True)
    budget_s: float = spec(1200.0, gt=0)             # the wall-time target the plan is checked against
    plan_s: dict[str, float] = spec(factory=dict, ge=0)  # noqa: RUF009 (a field(default_factory=dict)); phase -> planned s ([plan])
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    student: StudentSpec = field(default_factory=StudentSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)


def load_demo_config(path: str | Path) -> DemoConfig:
    """The demo TOML at ``path``, through the trainer's typed loader: every problem is a ``ConfigError``."""
    data = load_toml(path, what="demo config")
    if "plan" in data:
        if "plan_s" in data:
            raise ConfigError("demo config: give the phase plan once, as the [plan] table (not also plan_s)")
        data["plan_s"] = data.pop("plan")
    return build(DemoConfig, data)


def _env_fields(cfg: DemoConfig) -> dict[str, Any]:
    # env_options.seed is the trainer's env.seed; the other options reach envs.make through env.options, unchanged.
    return {"name": cfg.env, "max_turns": cfg.max_turns, "seed": int(cfg.env_options.get("seed", 0)),
            "options": {k: v for k, v in cfg.env_options.items() if k != "seed"}, "pool": cfg.env_pool,
            "pool_workers": cfg.env_pool_workers, "step_timeout_s": cfg.env_step_timeout_s}


def env_config(cfg: DemoConfig) -> EnvConfig:
    """The demo's env as the trainer's ``[env]`` section: every env of the demo and of its distillation runs is
    built from it by the library (``gopd_fast.train_setup.make_env``)."""
    return EnvConfig(**_env_fields(cfg))


def trainer_config(cfg: DemoConfig, method: str, seed: int, student_dir: Path, teacher_dir: Path,
                   out_dir: Path) -> Config:
    """The trainer's typed ``Config`` of one distillation run: ``distill.trainer_config`` with this demo's run,
    model, env, rollout and optimizer values and ``method``'s settings (``METHOD_SETTINGS``); then any
    ``distill.extra_overrides`` (``section.key=value`` strings, applied last, as on the trainer's command line)."""
    if method not in METHOD_SETTINGS:
        raise ValueError(f"method must be one of {', '.join(METHOD_SETTINGS)}, got {method!r}")
    d = cfg.distill
    base = load_config(_repo_path(d.trainer_config))
    values: dict[str, dict[str, Any]] = {
        "run": {"output_dir": str(out_dir), "seed": seed, "total_steps": d.total_steps, "eval_every": d.eval_every,
                "eval_at_end": True, "resume": False, "export_hf": True, "tensorboard": False,
                "progress_bar": False, "save_every": 0, "keep_checkpoints": 1},
        "model": {"student": str(student_dir), "teacher": str(teacher_dir), "build_tiny_if_missing": False},
        "env": {**_env_fields(cfg), "eval_episodes": d.curve_eval_episodes},
        "rollout": {"episodes_per_step": d.episodes_per_step, "eval_temperature": cfg.eval.temperature,
                    "max_new_tokens": cfg.eval.max_new_tokens},
        "optim": {"lr": d.lr},
    }
    for section, fields in METHOD_SETTINGS[method].items():
        values[section] = {**values.get(section, {}), **fields}
    # One replace for all sections: Config's cross-section rules (run.algorithm vs objective) see the final values.
    trainer = dataclasses.replace(base, **{name: dataclasses.replace(getattr(base, name), **fields)
                                          for name, fields in values.items()})
    if d.extra_overrides:
        trainer = config_from_dict(apply_overrides(config_to_dict(trainer), d.extra_overrides))
    return trainer


def beta_schedule(trainer: Config) -> list[float]:
    """The guidance probability of each step of a run of ``trainer``, as the trainer computes it."""
    from gopd_fast.curriculum import BetaSchedule, beta_at

    schedule = BetaSchedule(trainer.curriculum, trainer.run.total_steps)
    return [beta_at(trainer, schedule, k) for k in range(trainer.run.total_steps)]


def _repo_path(path: str) -> Path:
    """A config path as written: absolute, or relative to the repository."""
    return Path(path) if Path(path).is_absolute() else REPO_DIR / path
