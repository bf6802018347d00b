"""Training configuration: frozen dataclasses, loaded from TOML, with ``key=value`` command-line overrides.

    cfg = load_config("configs/household.toml", ["optim.lr=1e-5", "run.total_steps=4"])

A TOML section maps to one dataclass (``[optim]`` -> ``OptimConfig``) and a dotted override key names a field
(``optim.lr``). Override values are parsed as TOML values (``1e-5``, ``true``, ``[0.9, 0.95]``, ``"text"``); a
value that is not valid TOML is taken as a bare string, so ``model.student=/ckpt/qwen3-1.7b`` works.
Every problem raises ``ConfigError`` (a ``ValueError``) naming the key, the expected type or range and the value.

``Config()`` with no file is the embedded default: household environment, tiny local Qwen3 models, CPU.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gopd_fast.typed_config import (
    SEED_RANGE,
    ConfigError,
    Section,
    apply_overrides,
    build,
    load_toml,
    spec,
    to_dict,
)

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
    "config_from_dict",
    "config_to_dict",
    "load_config",
]

STEPS = 10 ** 9                                  # upper bound of step / episode / token counts


@dataclass(frozen=True)
class RunConfig(Section, section="run"):
    name: str = spec("household-gopd", nonempty=True)
    output_dir: str = spec("runs/household-gopd", path=True)
    algorithm: Literal["gopd", "opd", "sft"] = "gopd"   # gopd: curriculum beta; opd: beta=0; sft: beta=1
    total_steps: int = spec(8, ge=1, le=STEPS)
    seed: int = spec(42, **SEED_RANGE)
    eval_every: int = spec(0, ge=0, le=STEPS)      # 0 = never during training (the final eval still runs if eval_at_end)
    eval_at_end: bool = True
    save_every: int = spec(0, ge=0, le=STEPS)      # 0 = only at the end
    keep_checkpoints: int = spec(2, ge=1, le=10_000)
    # true: continue from the newest verified checkpoint in output_dir/checkpoints (none there: start at step 1;
    # some there but none usable: stop with an error). false: start at step 1 (earlier checkpoints are
    # deleted by the first save, metrics.jsonl restarts).
    resume: bool = True
    export_hf: bool = True           # save the final student with save_pretrained (safetensors)
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass(frozen=True)
class ModelConfig(Section, section="model"):
    student: str = spec("runs/tiny-models/student", path=True)
    teacher: str = spec("runs/tiny-models/teacher", path=True)
    # Build tiny local Qwen3 checkpoints (and their tokenizer) at the two paths when they do not exist yet.
    build_tiny_if_missing: bool = True
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"          # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: Literal["auto", "sdpa", "packed_sdpa", "flash_attention_2", "eager"] = "auto"
    activation_checkpointing: bool = False
    shard_teacher: bool = True       # FSDP2-shard the frozen teacher too (world_size > 1)


@dataclass(frozen=True)
class EnvConfig(Section, section="env"):
    name: str = spec("household", nonempty=True)
    max_turns: int = spec(20, ge=1, le=10 ** 6)   # the household env's own default
    seed: int = spec(0, **SEED_RANGE)
    train_split: str = spec("train", nonempty=True)
    eval_split: str = spec("eval", nonempty=True)
    eval_episodes: int = spec(8, ge=0, le=STEPS)   # 0 = the whole eval split
    # Extra keyword options for envs.make (e.g. household: difficulty = "easy"); checked by the environment.
    options: dict[str, Any] = field(default_factory=dict)
    # Model rollouts and evaluation step their envs in worker processes (gopd_fast.envs.EnvPool) that survive env
    # crashes and hangs by restart and replay; false: threads in the trainer's process (an env crash is fatal).
    pool: bool = False
    pool_workers: int = spec(4, ge=1, le=4096)          # worker processes per rank
    step_timeout_s: float = spec(120.0, gt=0, le=86400.0)   # pool: a step unanswered this long is a hang (replayed)


@dataclass(frozen=True)
class RolloutConfig(Section, section="rollout"):
    # hf / vllm: the rollout engines (student and teacher take turns, per the guidance coin).
    # expert: the environment's oracle writes every turn (Role.TEACHER): deterministic demonstrations, for
    # SFT / distillation on expert data and for reproducibility tests; it cannot evaluate the student.
    engine: Literal["hf", "vllm", "expert"] = "hf"
    episodes_per_step: int = spec(8, ge=1, le=10 ** 7)   # global batch: episodes per optimizer step, all ranks
    temperature: float = spec(1.0, ge=0, le=100)         # rollouts (both models); 0 = greedy
    eval_temperature: float = spec(0.4, ge=0, le=100)    # student-only evaluation
    max_new_tokens: int = spec(24, ge=1, le=STEPS)       # per turn (a household action is ~10 tokens)
    max_prompt_tokens: int = spec(2048, ge=16, le=STEPS)  # history cap; an episode that would exceed it ends
    # hf: keep each episode's KV cache across turns (a turn prefills only its new tokens; Qwen3 models);
    # false re-encodes the whole history every turn (the slow reference path, kept for timing side by side)
    kv_reuse: bool = True
    # hf with kv_reuse, one process on CPU in float32: the teacher engine keeps its final hidden states and the
    # trainer takes the teacher's from it (prefilling only the turns written after its last call) instead of a
    # second teacher forward over every episode; false runs that forward (train_setup.teacher_hidden_from_rollout)
    reuse_teacher_hidden: bool = True
    # vLLM on GPU: the fraction of the GPU each engine (student, teacher) may take; they share the GPU with the
    # trainer's sharded models, so the two engines and training must fit together.
    gpu_memory_utilization: float = spec(0.25, gt=0, lt=1)
    # A shared teacher server (docs/training.md, "The paper's setup"): guided turns are written by a vLLM
    # OpenAI-compatible server at this URL (http://host:port) instead of an in-process engine on every rank; the
    # trainer still scores the teacher's log-probs with its own sharded copy. "" = the in-process engine.
    teacher_server: str = ""
    teacher_server_model: str = ""                         # served model name ("" = the server's only model)
    server_timeout_s: float = spec(600.0, gt=0)            # one request (a whole turn's generation)
    server_max_concurrency: int = spec(64, ge=1, le=10 ** 6)   # requests in flight per rank
    server_retry_deadline_s: float = spec(300.0, gt=0)     # retry a failed request (connection error, 5xx)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_prompt_tokens <= self.max_new_tokens:
            raise ConfigError(f"rollout.max_prompt_tokens ({self.max_prompt_tokens}) must exceed "
                              f"rollout.max_new_tokens ({self.max_new_tokens}): a prompt plus one response must fit")
        if self.teacher_server and not self.teacher_server.startswith(("http://", "https://")):
            raise ConfigError(f'rollout.teacher_server: expected "" or an http(s)://host:port URL, got '
                              f"{self.teacher_server!r}")
        if self.teacher_server and self.engine == "expert":
            raise ConfigError('rollout.teacher_server: expected "" with rollout.engine = "expert" (the oracle '
                              f"writes every turn), got {self.teacher_server!r}")


@dataclass(frozen=True)
class CurriculumConfig(Section, section="curriculum"):
    schedule: Literal["cosine", "linear", "exponential", "constant", "step", "none"] = "cosine"
    beta_start: float = spec(1.0, ge=0, le=1)
    beta_end: float = spec(0.0, ge=0, le=1)
    ratio: float = spec(0.8, gt=0, le=1)          # fraction of total_steps at which beta reaches beta_end
    # exponential: decay rate over the window (higher = faster early decay). Bounded so that 1 - exp(-k), the
    # schedule's normalizer, is neither 0 nor rounded: beta stays finite and exact at every step.
    sharpness: float = spec(5.0, ge=1e-3, le=1e3)
    stages: int = spec(4, ge=1, le=10 ** 6)       # step: number of equal drops over the window


@dataclass(frozen=True)
class ObjectiveConfig(Section, section="objective"):
    """Which loss each generated token gets, by who wrote it (see gopd_fast.objectives for the presets)."""

    student_tokens: Literal["reverse_kl", "forward_kl", "sampled_kl", "none"] = "reverse_kl"
    teacher_tokens: Literal["forward_kl", "reverse_kl", "cross_entropy", "none"] = "forward_kl"
    temperature: float = spec(1.0, ge=1e-3, le=100)   # softmax temperature of both models inside the loss

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.student_tokens == "none" and self.teacher_tokens == "none":
            raise ConfigError("objective: student_tokens and teacher_tokens are both 'none'; nothing to train")


@dataclass(frozen=True)
class OptimConfig(Section, section="optim"):
    lr: float = spec(1e-4, gt=0, le=10)
    weight_decay: float = spec(0.0, ge=0, le=1)        # AdamW decoupled decay: w -= lr * weight_decay * w
    betas: tuple[float, float] = spec((0.9, 0.999), ge=0, lt=1)
    eps: float = spec(1e-8, gt=0, le=1)
    grad_clip: float = spec(1.0, ge=0)                 # max global grad norm; 0 disables clipping
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = spec(0, ge=0, le=STEPS)
    min_lr_ratio: float = spec(0.0, ge=0, le=1)        # cosine/linear decay floor, as a fraction of lr


@dataclass(frozen=True)
class PackingConfig(Section, section="packing"):
    # Tokens per packed row. Whole episodes are never split; an episode longer than this gets a row of its own.
    max_tokens_per_row: int = spec(4096, ge=16, le=STEPS)
    # Packed rows per forward/backward (gradient accumulation inside a step); 0 = all of a rank's rows at once.
    rows_per_micro_batch: int = spec(0, ge=0, le=10 ** 7)


@dataclass(frozen=True)
class Config(Section):
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.run.algorithm == "sft" and self.objective.teacher_tokens == "none":
            raise ConfigError("run.algorithm='sft' trains on teacher tokens only, but objective.teacher_tokens "
                              "is 'none'; use 'cross_entropy' (classic SFT) or 'forward_kl'")
        if self.run.algorithm == "opd" and self.objective.student_tokens == "none":
            raise ConfigError("run.algorithm='opd' trains on student tokens only, but "
                              "objective.student_tokens is 'none'")


config_to_dict = to_dict


def config_from_dict(data: dict[str, Any]) -> Config:
    return build(Config, data)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (TOML; None = the embedded default) and apply ``overrides``."""
    data = load_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides))
