"""Training configuration: frozen dataclasses, loaded from TOML, with ``key=value`` command-line overrides.

    cfg = load_config("configs/household.toml", ["optim.lr=1e-5", "run.total_steps=4"])

A TOML section maps to one dataclass (``[optim]`` -> ``OptimConfig``) and a dotted override key names a field
(``optim.lr``). Override values are parsed as TOML values (``1e-5``, ``true``, ``[0.9, 0.95]``, ``"text"``); a
value that is not valid TOML is taken as a bare string, so ``model.student=/ckpt/qwen3-1.7b`` works.
Every problem raises ``ConfigError`` (a ``ValueError``) naming the key, the expected type or range and the value.

``Config()`` with no file is the embedded default: household environment, tiny local Qwen3 models, CPU.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

__all__ = [
    "Config",
    "ConfigError",
    "CurriculumConfig",
    "EnvConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "OptimConfig",
    "PackingConfig",
    "RolloutConfig",
    "RunConfig",
    "apply_overrides",
    "config_to_dict",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "household-gopd"
    output_dir: str = "runs/household-gopd"
    algorithm: Literal["gopd", "opd", "sft"] = "gopd"   # gopd: curriculum beta; opd: beta=0; sft: beta=1
    total_steps: int = 8
    seed: int = 42
    eval_every: int = 0              # 0 = never during training (the final eval still runs if eval_at_end)
    eval_at_end: bool = True
    save_every: int = 0              # 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = True              # pick up the newest complete checkpoint in output_dir/checkpoints
    export_hf: bool = True           # save the final student with save_pretrained (safetensors)
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check(self.total_steps >= 1, "run.total_steps", "an int >= 1", self.total_steps)
        for k in ("eval_every", "save_every"):
            _check(getattr(self, k) >= 0, f"run.{k}", "an int >= 0 (0 disables)", getattr(self, k))
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "an int >= 1", self.keep_checkpoints)
        _check(bool(self.output_dir), "run.output_dir", "a non-empty path", self.output_dir)


@dataclass(frozen=True)
class ModelConfig:
    student: str = "runs/tiny-models/student"
    teacher: str = "runs/tiny-models/teacher"
    # Build tiny local Qwen3 checkpoints (and their tokenizer) at the two paths when they do not exist yet.
    build_tiny_if_missing: bool = True
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"          # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "packed_sdpa", "flash_attention_2", "eager"] = "auto"
    activation_checkpointing: bool = False
    shard_teacher: bool = True       # FSDP2-shard the frozen teacher too (world_size > 1)


@dataclass(frozen=True)
class EnvConfig:
    name: str = "household"
    max_turns: int = 20               # the household env's own default
    seed: int = 0
    train_split: str = "train"
    eval_split: str = "eval"
    eval_episodes: int = 8           # 0 = the whole eval split
    # Extra keyword options for envs.make (e.g. household: difficulty = "easy"); checked by the environment.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.max_turns >= 1, "env.max_turns", "an int >= 1", self.max_turns)
        _check(self.eval_episodes >= 0, "env.eval_episodes", "an int >= 0 (0 = whole split)", self.eval_episodes)


@dataclass(frozen=True)
class RolloutConfig:
    # hf / vllm: the rollout engines (student and teacher take turns, per the guidance coin).
    # expert: the environment's oracle writes every turn (Role.TEACHER): deterministic demonstrations, for
    # SFT / distillation on expert data and for reproducibility tests; it cannot evaluate the student.
    engine: Literal["hf", "vllm", "expert"] = "hf"
    episodes_per_step: int = 8       # global batch: episodes ("sequences") per optimizer step, over all ranks
    temperature: float = 1.0         # rollouts (both models)
    eval_temperature: float = 0.4    # student-only evaluation
    max_new_tokens: int = 24         # per turn (a household action is ~10 tokens)
    max_prompt_tokens: int = 2048    # history cap; an episode that would exceed it ends (truncated)
    # hf: keep each episode's KV cache across turns (a turn prefills only its new tokens; Qwen3 models);
    # false re-encodes the whole history every turn (the slow reference path, kept for timing side by side)
    kv_reuse: bool = True
    # vLLM on GPU: the fraction of the GPU each engine (student, teacher) may take; they share the GPU with the
    # trainer's sharded models, so the two engines and training must fit together.
    gpu_memory_utilization: float = 0.25

    def __post_init__(self) -> None:
        _check(self.episodes_per_step >= 1, "rollout.episodes_per_step", "an int >= 1", self.episodes_per_step)
        for k in ("temperature", "eval_temperature"):
            v = getattr(self, k)
            _check(v >= 0 and math.isfinite(v), f"rollout.{k}", "a finite float >= 0", v)
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "an int >= 1", self.max_new_tokens)
        _check(self.max_prompt_tokens >= 16, "rollout.max_prompt_tokens", "an int >= 16", self.max_prompt_tokens)
        if self.max_prompt_tokens <= self.max_new_tokens:
            raise ConfigError(f"rollout.max_prompt_tokens ({self.max_prompt_tokens}) must exceed "
                              f"rollout.max_new_tokens ({self.max_new_tokens}): a prompt plus one response must fit")
        _check(0 < self.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "a float in (0, 1)",
               self.gpu_memory_utilization)


@dataclass(frozen=True)
class CurriculumConfig:
    schedule: Literal["cosine", "linear", "exponential", "constant", "step", "none"] = "cosine"
    beta_start: float = 1.0
    beta_end: float = 0.0
    ratio: float = 0.8               # fraction of total_steps at which beta reaches beta_end
    sharpness: float = 5.0           # exponential: decay rate over the window (higher = faster early decay)
    stages: int = 4                  # step: number of equal drops over the window

    def __post_init__(self) -> None:
        for k in ("beta_start", "beta_end"):
            v = getattr(self, k)
            _check(0.0 <= v <= 1.0, f"curriculum.{k}", "a float in [0, 1]", v)
        _check(0.0 < self.ratio <= 1.0, "curriculum.ratio", "a float in (0, 1]", self.ratio)
        _check(self.sharpness > 0, "curriculum.sharpness", "a float > 0", self.sharpness)
        _check(self.stages >= 1, "curriculum.stages", "an int >= 1", self.stages)


@dataclass(frozen=True)
class ObjectiveConfig:
    """Which loss each generated token gets, by who wrote it (see gopd_fast.objectives for the presets)."""

    student_tokens: Literal["reverse_kl", "forward_kl", "sampled_kl", "none"] = "reverse_kl"
    teacher_tokens: Literal["forward_kl", "reverse_kl", "cross_entropy", "none"] = "forward_kl"
    temperature: float = 1.0         # softmax temperature of both models inside the loss

    def __post_init__(self) -> None:
        _check(self.temperature > 0 and math.isfinite(self.temperature), "objective.temperature",
               "a finite float > 0", self.temperature)
        if self.student_tokens == "none" and self.teacher_tokens == "none":
            raise ConfigError("objective: student_tokens and teacher_tokens are both 'none'; nothing to train")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global grad norm; 0 disables clipping
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0        # cosine/linear decay floor, as a fraction of lr

    def __post_init__(self) -> None:
        _check(self.lr > 0 and math.isfinite(self.lr), "optim.lr", "a finite float > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a float >= 0", self.weight_decay)
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas",
               "two floats in [0, 1)", self.betas)
        _check(self.eps > 0, "optim.eps", "a float > 0", self.eps)
        _check(self.grad_clip >= 0, "optim.grad_clip", "a float >= 0 (0 disables)", self.grad_clip)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "a float in [0, 1]", self.min_lr_ratio)


@dataclass(frozen=True)
class PackingConfig:
    # Tokens per packed row. Whole episodes are never split; an episode longer than this gets a row of its own.
    max_tokens_per_row: int = 4096
    # Packed rows per forward/backward (gradient accumulation inside a step); 0 = all of a rank's rows at once.
    rows_per_micro_batch: int = 0

    def __post_init__(self) -> None:
        _check(self.max_tokens_per_row >= 16, "packing.max_tokens_per_row", "an int >= 16",
               self.max_tokens_per_row)
        _check(self.rows_per_micro_batch >= 0, "packing.rows_per_micro_batch", "an int >= 0 (0 = all rows)",
               self.rows_per_micro_batch)


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        if self.run.algorithm == "sft" and self.objective.teacher_tokens == "none":
            raise ConfigError("run.algorithm='sft' trains on teacher tokens only, but objective.teacher_tokens "
                              "is 'none'; use 'cross_entropy' (classic SFT) or 'forward_kl'")
        if self.run.algorithm == "opd" and self.objective.student_tokens == "none":
            raise ConfigError("run.algorithm='opd' trains on student tokens only, but "
                              "objective.student_tokens is 'none'")


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.
# ---------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is dict:
        return "a table (section.key.name = value)"
    if origin is tuple:
        args = typing.get_args(tp)
        inner = _type_name(args[0])
        return f"a list of {inner}" if args[-1] is Ellipsis else f"a list of {len(args)} {inner}s"
    return {int: "an int", float: "a float", str: "a string", bool: "a bool"}.get(tp, str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        args = typing.get_args(tp)
        if args[-1] is not Ellipsis and len(value) != len(args):
            raise bad
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, arg, value)
            except ConfigError:
                pass
        raise bad
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section [{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown key {(prefix + '.' if prefix else '') + unknown[0]!r} in {where}; "
                          f"known keys: {', '.join(sorted(names))}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a table [{key}], got {value!r}")
            kwargs[name] = _build(tp, value, key)
        else:
            kwargs[name] = _coerce(key, tp, value)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for TOML/JSON and for comparing configs."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = config_to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, dict):
            v = dict(v)
        out[f.name] = v
    return out


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text   # a bare string such as a path


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``section.key=value`` overrides applied (checked later by the builder)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value (for example optim.lr=1e-5)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"override {item!r}: the key must be dotted, section.key (for example optim.lr)")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (TOML; None = the embedded default) and apply ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {str(path)!r}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config {str(path)!r}: invalid TOML: {e}") from None
    return config_from_dict(apply_overrides(data, overrides))
