"""The study's typed config (configs/study.toml): the experiment (teacher, student bases), the cells
(size x method x seed), the learning-rate selection and the evaluation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gopd_fast.config import Config
from gopd_fast.demo.config import (
    METHOD_SETTINGS,
    DemoConfig,
    DistillSpec,
    EvalSpec,
    StudentSpec,
    TeacherSpec,
    env_config,
    trainer_config,
)
from gopd_fast.typed_config import SEED_RANGE, ConfigError, Section, build, load_toml, spec

# The paper's role-loss ablation on Guided-OPD: which divergence each role's tokens get (objective fields replaced
# in Guided-OPD's trainer Config, by study_trainer_config).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "gopd-reverse-both": {"objective": {"student_tokens": "reverse_kl", "teacher_tokens": "reverse_kl"}},
    "gopd-swapped": {"objective": {"student_tokens": "forward_kl", "teacher_tokens": "reverse_kl"}},
}
STUDY_METHODS = ("zero-shot", "sft", "opd", "guided-opd", "constant-0.5", *ABLATIONS)


def study_trainer_config(demo: DemoConfig, method: str, seed: int, student_dir: Path, teacher_dir: Path,
                         out_dir: Path) -> Config:
    """The trainer ``Config`` of one trained study method: the demo's (``trainer_config``, ``METHOD_SETTINGS``),
    and an ablation as Guided-OPD with its objective replaced."""
    if method not in METHOD_SETTINGS and method not in ABLATIONS:
        raise ValueError(f"method {method!r} is not trained; trained methods: {[*METHOD_SETTINGS, *ABLATIONS]}")
    trainer = trainer_config(demo, "guided-opd" if method in ABLATIONS else method, seed, student_dir, teacher_dir,
                             out_dir)
    # One replace for all sections: Config's cross-section rules (run.algorithm vs objective) see the final values.
    return dataclasses.replace(trainer, **{name: dataclasses.replace(getattr(trainer, name), **fields)
                                           for name, fields in ABLATIONS.get(method, {}).items()})


@dataclass(frozen=True)
class StudyTeacherSpec(Section, section="teacher"):
    """The study's teacher: the committed demo teacher (``init_from``) trained longer on oracle episodes of
    train tasks it has never seen (``task_range``), so it generalises to held-out worlds."""
    asset: str = spec("household-full-teacher-v2", path=True)   # gopd_fast/assets/<asset>: by --build-teacher
    init_from: str = spec("household-full-teacher", path=True)  # committed asset it starts from (tokenizer kept)
    task_range: tuple[int, int] = spec((1000, 5000), ge=0)  # train-split indices of its oracle episodes
    noise: float = spec(0.1, ge=0, lt=1)   # random non-expert turns (not trained on): it sees recoveries
    steps: int = spec(150, ge=1, le=10 ** 9)
    batch_size: int = spec(16, ge=1, le=10 ** 6)
    lr: float = spec(1e-3, gt=0, le=10)
    warmup_steps: int = spec(10, ge=0, le=10 ** 9)
    seed: int = spec(0, **SEED_RANGE)
    checkpoint_every: int = spec(10, ge=0, le=10 ** 9)

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.task_range
        if not 0 <= lo < hi:
            raise ValueError(f"teacher.task_range must be [lo, hi) with 0 <= lo < hi, got {self.task_range!r}")


@dataclass(frozen=True)
class BaseSpec(Section, section="sizes.<name>"):
    """A student base, by ``source``:

    - ``truncated``: the study's teacher with only its first ``num_hidden_layers`` decoder layers (embeddings,
      final norm and lm_head kept; ``gopd_fast.models.keep_layers``), not trained further: a smaller model that
      starts from the teacher's own weights and has lost what the dropped layers did (the layer-dropped
      initialisation of DistilBERT and Minitron);
    - ``random``: a fresh ``size`` Qwen3 SFT-ed on episodes of uniformly random admissible actions of its train
      tasks (the action format and the env's text, no policy);
    - ``teacher``: a fresh ``size`` Qwen3 SFT-ed on the study teacher's episodes sampled at ``temperature``.

    None learns from a source better than the teacher. ``size``, ``task_range`` and the SFT fields (``steps``,
    ``batch_size``, ``lr``, ``min_lr_ratio``: the cosine floor) apply to the SFT sources only, and ``temperature``
    to ``teacher`` only; ``seed`` seeds the fresh model and the SFT."""
    source: Literal["truncated", "random", "teacher"] = "random"
    size: str = spec("teacher-tiny", nonempty=True)
    num_hidden_layers: int = spec(2, ge=0, le=1000)
    temperature: float = spec(1.0, gt=0, le=10)
    task_range: tuple[int, int] = spec((0, 256), ge=0)
    steps: int = spec(60, ge=1, le=10 ** 9)
    batch_size: int = spec(16, ge=1, le=10 ** 6)
    lr: float = spec(3e-3, gt=0, le=10)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)
    seed: int = spec(1, **SEED_RANGE)

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.task_range
        if not lo < hi:
            raise ConfigError(f"sizes.<name>.task_range must be [lo, hi) with lo < hi, got {self.task_range!r}")
        if self.source == "truncated" and self.num_hidden_layers < 1:
            raise ConfigError(f"sizes.<name>.num_hidden_layers: a truncated base keeps the teacher's first "
                              f"num_hidden_layers layers, so it must be >= 1, got {self.num_hidden_layers}")


@dataclass(frozen=True)
class SelectLRSpec(Section, section="select_lr"):
    """``--select-lr``: OPD runs at each ``grid`` lr on the smallest size, scored on the validation split."""
    grid: tuple[float, ...] = spec((1e-4, 3e-4, 1e-3), nonempty=True, gt=0, le=10)
    method: str = spec("opd", nonempty=True)
    seed: int = spec(100, **SEED_RANGE)  # not one of the study's seeds
    total_steps: int = spec(40, ge=1, le=10 ** 9)
    val_tasks: int = spec(48, ge=1, le=10 ** 6)


@dataclass(frozen=True)
class StudyConfig(Section):
    env: str = spec("household", nonempty=True)
    env_options: dict[str, Any] = field(default_factory=lambda: {"seed": 0, "observe": "full", "num_train": 5000})
    max_turns: int = spec(20, ge=1, le=10 ** 6)
    validation_range: tuple[int, int] = spec((5000, 5200), ge=0)   # train-split indices: the validation split
    seeds: tuple[int, ...] = spec((0, 1, 2), nonempty=True, **SEED_RANGE)
    methods: tuple[str, ...] = spec(STUDY_METHODS, nonempty=True)
    # size name -> BaseSpec ([sizes.<name>] tables; built by load_study_config, checked in __post_init__)
    sizes: dict[str, Any] = field(default_factory=lambda: {"small": BaseSpec()})
    cells_dir: str = spec("docs/study/cells", path=True)  # committed: one results JSON per finished cell
    run_dir: str = spec("runs/study", path=True)          # git-ignored: models, trainer checkpoints, logs
    lr: float = spec(0.0, ge=0, le=10)   # 0: read <cells_dir>/../lr.json (written by --select-lr)
    save_every: int = spec(10, ge=0, le=10 ** 9)  # trainer checkpoint cadence: an interrupted cell resumes here
    diagnostic_methods: tuple[str, ...] = ("opd", "guided-opd")   # trained students diagnosed (every seed)
    teacher: StudyTeacherSpec = field(default_factory=StudyTeacherSpec)
    select_lr: SelectLRSpec = field(default_factory=SelectLRSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [k for k, v in self.sizes.items() if not isinstance(v, BaseSpec)]
        if bad:
            raise ConfigError(f"sizes.{bad[0]}: expected a [sizes.{bad[0]}] table (a BaseSpec), "
                              f"got {type(self.sizes[bad[0]]).__name__}")
        unknown = [m for m in self.methods if m not in STUDY_METHODS]
        if unknown:
            raise ValueError(f"methods: unknown {unknown}; known: {list(STUDY_METHODS)}")
        if not self.seeds or not all(isinstance(s, int) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty list of non-negative ints, got {self.seeds!r}")
        if not self.sizes:
            raise ValueError("sizes: at least one [sizes.<name>] table is needed")
        lo, hi = self.validation_range
        if not 0 <= lo < hi:
            raise ValueError(f"validation_range must be [lo, hi) with 0 <= lo < hi, got {self.validation_range!r}")
        if lo < int(self.env_options.get("num_train", 1000)):
            raise ValueError(f"validation_range {self.validation_range} overlaps the train split (env_options."
                             f"num_train={self.env_options.get('num_train', 1000)}): it must start at or after it")
        if self.lr < 0 or self.save_every < 0:
            raise ValueError(f"lr and save_every must be >= 0, got {self.lr!r} and {self.save_every!r}")
        missing = [m for m in self.diagnostic_methods if m not in self.methods]
        if missing:
            raise ValueError(f"diagnostic_methods {missing} are not among methods {list(self.methods)}")

    def demo_config(self, size: str | None = None, lr: float | None = None, validation: bool = False) -> DemoConfig:
        """The demo's config for the shared builder/evaluation functions (``gopd_fast.demo``). ``validation``:
        envs whose train split reaches the validation tasks (the trainer's never does)."""
        base = self.sizes[size] if size is not None else next(iter(self.sizes.values()))
        distill = dataclasses.replace(self.distill, lr=lr) if lr is not None else self.distill
        options = dict(self.env_options)
        if validation:
            options["num_train"] = self.validation_range[1]
        return DemoConfig(
            env=self.env, env_options=options, max_turns=self.max_turns, seeds=self.seeds,
            teacher=TeacherSpec(asset=self.teacher.asset),
            student=StudentSpec(size=base.size, num_hidden_layers=base.num_hidden_layers),
            distill=distill, eval=self.eval)

    def env_config(self, size: str | None = None, validation: bool = False):
        """The trainer's ``[env]`` section of the study's envs (built by ``gopd_fast.train_setup.make_env``)."""
        return env_config(self.demo_config(size, validation=validation))


def load_study_config(path: str | Path) -> StudyConfig:
    """The study TOML at ``path`` through the typed loader (``gopd_fast.typed_config``): every problem is a
    ``ConfigError`` naming the key. ``[sizes.<name>]`` tables are each a ``BaseSpec``."""
    if not Path(path).is_file():   # as the study branch: a missing file is a FileNotFoundError
        raise FileNotFoundError(f"study config {str(path)!r} does not exist")
    data = load_toml(path, what="study config")
    sizes = data.pop("sizes", None)
    if sizes is not None:
        if not isinstance(sizes, dict) or not sizes or not all(isinstance(v, dict) for v in sizes.values()):
            raise ConfigError(f"sizes: expected one or more [sizes.<name>] tables, got {sizes!r}")
        sizes = {k: build(BaseSpec, v, f"sizes.{k}") for k, v in sizes.items()}
    cfg = build(StudyConfig, data)
    return dataclasses.replace(cfg, sizes=sizes) if sizes is not None else cfg
