"""The study's typed config (configs/study.toml): the experiment (teacher, student bases), the cells
(size x method x seed), the learning-rate selection and the evaluation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from gopd_fast.demo import METHOD_OVERRIDES, DemoConfig, DistillSpec, EvalSpec, StudentSpec, TeacherSpec

# The paper's role-loss ablation on Guided-OPD: which divergence each role's tokens get.
ABLATIONS: dict[str, list[str]] = {
    "gopd-reverse-both": ["objective.student_tokens=\"reverse_kl\"", "objective.teacher_tokens=\"reverse_kl\""],
    "gopd-swapped": ["objective.student_tokens=\"forward_kl\"", "objective.teacher_tokens=\"reverse_kl\""],
}
STUDY_METHODS = ("zero-shot", "sft", "opd", "guided-opd", "constant-0.5", *ABLATIONS)


def method_overrides(method: str) -> list[str]:
    """Trainer overrides of one trained method (the demo's methods, and the ablations on top of Guided-OPD)."""
    if method in ABLATIONS:
        return [*METHOD_OVERRIDES["guided-opd"], *ABLATIONS[method]]
    if method not in METHOD_OVERRIDES:
        raise ValueError(f"method {method!r} is not trained; trained methods: "
                         f"{[*METHOD_OVERRIDES, *ABLATIONS]}")
    return list(METHOD_OVERRIDES[method])


@dataclass(frozen=True)
class StudyTeacherSpec:
    """The study's teacher: the committed demo teacher (``init_from``) trained longer on oracle episodes of
    train tasks it has never seen (``task_range``), so it generalises to held-out worlds."""
    asset: str = "household-full-teacher-v2"   # gopd_fast/assets/<asset>: written by --build-teacher
    init_from: str = "household-full-teacher"  # committed asset it starts from (its tokenizer is kept)
    task_range: tuple[int, int] = (1000, 5000)  # train-split indices of its oracle episodes
    noise: float = 0.1                   # random non-expert turns (not trained on): it sees recoveries
    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    seed: int = 0
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        lo, hi = self.task_range
        if not 0 <= lo < hi:
            raise ValueError(f"teacher.task_range must be [lo, hi) with 0 <= lo < hi, got {self.task_range!r}")


@dataclass(frozen=True)
class BaseSpec:
    """A student base: a fresh Qwen3 SFT-ed on episodes of random admissible actions (it learns the action format
    and the env's text, no policy better than chance)."""
    size: str = "teacher-tiny"
    num_hidden_layers: int = 2
    task_range: tuple[int, int] = (0, 256)
    steps: int = 60
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 1


@dataclass(frozen=True)
class SelectLRSpec:
    """``--select-lr``: OPD runs at each ``grid`` lr on the smallest size, scored on the validation split."""
    grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    method: str = "opd"
    seed: int = 100                      # not one of the study's seeds
    total_steps: int = 40
    val_tasks: int = 48


@dataclass(frozen=True)
class StudyConfig:
    env: str = "household"
    env_options: dict[str, Any] = field(default_factory=lambda: {"seed": 0, "observe": "full", "num_train": 5000})
    max_turns: int = 20
    validation_range: tuple[int, int] = (5000, 5200)   # train-split indices: the validation split
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = STUDY_METHODS
    sizes: dict[str, BaseSpec] = field(default_factory=lambda: {"small": BaseSpec()})
    cells_dir: str = "docs/study/cells"  # committed: one results JSON per finished cell
    run_dir: str = "runs/study"          # git-ignored: models, trainer checkpoints, logs
    lr: float = 0.0                      # 0: read <cells_dir>/../lr.json (written by --select-lr)
    save_every: int = 10                 # trainer checkpoint cadence: an interrupted cell resumes from here
    diagnostic_methods: tuple[str, ...] = ("opd", "guided-opd")   # trained students diagnosed (seed = seeds[0])
    teacher: StudyTeacherSpec = field(default_factory=StudyTeacherSpec)
    select_lr: SelectLRSpec = field(default_factory=SelectLRSpec)
    distill: DistillSpec = field(default_factory=DistillSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)

    def __post_init__(self) -> None:
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


_TABLES = {"teacher": StudyTeacherSpec, "select_lr": SelectLRSpec, "distill": DistillSpec, "eval": EvalSpec}


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if cls is StudyConfig and name in _TABLES:
            if not isinstance(value, dict):
                raise ValueError(f"{where}: [{name}] must be a table")
            value = _build(_TABLES[name], value, f"{where} [{name}]")
        elif cls is StudyConfig and name == "sizes":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ValueError(f"{where}: [sizes.<name>] must be tables")
            value = {k: _build(BaseSpec, v, f"{where} [sizes.{k}]") for k, v in value.items()}
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def load_study_config(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {str(path)!r} does not exist")
    return _build(StudyConfig, tomllib.loads(path.read_text()), str(path))
