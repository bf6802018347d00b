"""`make demo`: tiny teacher -> weak student base -> zero-shot / SFT / OPD / Guided-OPD / constant-beta students,
evaluated on held-out tasks, with a results table (95% CIs), plots and the failure-mode diagnostic.

    python -m gopd_fast.demo                      # the full run (configs/demo.toml), <= 20 min on 2 CPU cores
    python -m gopd_fast.demo --quick              # minutes-scale (configs/demo-quick.toml), used by the tests
    python -m gopd_fast.demo --seeds 0,1,2,3 --out runs/my-demo
    python -m gopd_fast.demo --rebuild-teacher    # re-train the committed teacher (gopd_fast/assets/...)

Phases (each timed against the plan in the config, both printed):
  teacher        load the committed teacher + tokenizer (or build them: tokenizer on the env's text, SFT on oracle
                 episodes); rebuilt automatically into the run folder when the env no longer matches it
  student-base   the weak student every method starts from (``[student]``): by default the teacher's first layer
                 (``source = "truncated"``: the teacher's own weights, minus what its other layers did; it learns
                 from no source better than the teacher), or a fresh smaller Qwen3 briefly SFT-ed on a few expert
                 episodes (``source = "oracle"``; a random-init student would flatter guidance)
  reference      teacher and zero-shot (untrained base) evaluations
  distill        for every seed and method: ``gopd_fast.train.run`` from the same base (the trainer's typed
                 ``Config``: configs/demo-trainer.toml with this config's values), then a held-out evaluation.
                 Live: every ``distill.eval_every`` steps the held-out curve point is printed
                 (``[demo] curve METHOD seed S step K/N: Score M [LOW, HIGH] (E episodes)``) and RUN/curves.png
                 is redrawn (``gopd_fast.demo.progress``)
  diagnostics    the failure-mode diagnostic (``gopd_fast.demo.diagnostics``) on student-only vs teacher-only rollouts
  report         table, plots (``gopd_fast.demo.plots``), results.json / results.md in the run folder, and a
                 pointer to the study (docs/results.md) for the full table

Progress bars (tqdm: phase, method and seed, step k/n or episodes, elapsed / planned seconds of the phase and of the
run) go to stderr; the ``[demo] ...`` lines go to stdout, whole, so ``> log`` keeps them parseable.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from gopd_fast.demo.config import (
    ASSETS_DIR,
    METHODS,
    REPO_DIR,
    DemoConfig,
    beta_schedule,
    env_config,
    load_demo_config,
    trainer_config,
)
from gopd_fast.demo.progress import Bar, LiveCurves, MetricsTail, say
from gopd_fast.typed_config import ConfigError

# The demo is a few seeds and a short budget; the full table (more seeds, steps and held-out tasks) is the study's.
STUDY_POINTER = ("full results: docs/results.md (the study section: every method, >= 3 seeds, paired CIs), "
                 "rerun with `python -m gopd_fast.demo.study`")

# ---------------------------------------------------------------------------------------------------------
# Time plan
# ---------------------------------------------------------------------------------------------------------

class PhaseClock:
    """Planned vs actual seconds per phase, printed as the run goes, and the progress bars that show them."""

    def __init__(self, plan: dict[str, float], budget_s: float) -> None:
        self.plan, self.budget_s = dict(plan), budget_s
        self.actual: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.current: _Phase | None = None

    def status(self) -> str:
        """Elapsed / planned seconds of the current phase and of the whole run (a progress bar's postfix)."""
        run = f"run {self.elapsed():.0f}/{sum(self.plan.values()):.0f} s"
        if self.current is None:
            return run
        name = self.current.name
        return (f"{name} {time.perf_counter() - self.current.t:.0f}/{self.plan.get(name, float('nan')):.0f} s, "
                f"{run}")

    def bar(self, total: int, desc: str, unit: str) -> Bar:
        return Bar(total, desc, unit, self.status)

    def print_plan(self) -> None:
        total = sum(self.plan.values())
        print(f"[demo] time plan (target <= {self.budget_s:.0f} s wall on an idle 2-core CPU):")
        for name, sec in self.plan.items():
            print(f"[demo]   {name:<14} {sec:7.0f} s")
        print(f"[demo]   {'total':<14} {total:7.0f} s")

    def phase(self, name: str) -> _Phase:
        return _Phase(self, name)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def table(self) -> list[dict[str, Any]]:
        names = list(dict.fromkeys([*self.plan, *self.actual]))
        return [{"phase": n, "planned_s": self.plan.get(n), "actual_s": round(self.actual.get(n, 0.0), 1)}
                for n in names]


class _Phase:
    def __init__(self, clock: PhaseClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> _Phase:  # noqa: PYI034
        self.t = time.perf_counter()
        self.clock.current = self
        say(f"[demo] {time.strftime('%H:%M:%S')} phase {self.name} (planned "
            f"{self.clock.plan.get(self.name, float('nan')):.0f} s)")
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t
        self.clock.actual[self.name] = self.clock.actual.get(self.name, 0.0) + dt
        self.clock.current = None
        say(f"[demo] phase {self.name} took {dt:.1f} s (elapsed {self.clock.elapsed():.0f} s)")


# ---------------------------------------------------------------------------------------------------------
# Env, tokenizer and models
# ---------------------------------------------------------------------------------------------------------

class DemoEnvs:
    """The envs of one demo run, started on first use and kept for every evaluation and diagnostic rollout:
    env slots for episodes in flight (at most ``eval.max_in_flight`` when set) and one env for replays. A JVM env
    then starts once per slot for the whole run instead of once per episode of every evaluation."""

    def __init__(self, cfg: DemoConfig) -> None:
        from gopd_fast.rollout.envs import env_slots
        from gopd_fast.train_setup import env_options

        self.cfg = cfg
        cap = cfg.eval.max_in_flight
        env = env_config(cfg)
        self.slots = env_slots(env.name, env_options(env), pool=env.pool, pool_workers=env.pool_workers,
                               step_timeout_s=env.step_timeout_s, threads=min(cap, 8) if cap > 0 else 8)
        self._replay = None

    def max_in_flight(self, n_tasks: int) -> int:
        cap = self.cfg.eval.max_in_flight
        return max(1, min(n_tasks, cap) if cap > 0 else n_tasks)

    @property
    def replay_env(self):
        from gopd_fast.train_setup import make_env

        if self._replay is None:
            self._replay = make_env(env_config(self.cfg))
        return self._replay

    def close(self) -> None:
        self.slots.close()
        if self._replay is not None:
            self._replay.close()
            self._replay = None


@contextlib.contextmanager
def _envs_for(cfg: DemoConfig, envs: DemoEnvs | None) -> Iterator[DemoEnvs]:
    """``envs`` as given (the run's, closed by the run), or fresh ones closed on exit."""
    if envs is not None:
        yield envs
        return
    fresh = DemoEnvs(cfg)
    try:
        yield fresh
    finally:
        fresh.close()


def env_corpus(cfg: DemoConfig, n_tasks: int, noise: float = 0.3, seed: int = 0) -> list[str]:
    """Observations and ``Action: ...`` lines of noisy oracle runs: the tokenizer's training text (noise so the
    tokenizer also sees refusals and off-path rooms)."""
    from gopd_fast.rollout.expert import oracle_text
    from gopd_fast.train_setup import make_env

    env = make_env(env_config(cfg))
    try:
        return oracle_text(env, env.tasks("train")[:n_tasks], noise=noise, seed=seed)
    finally:
        env.close()


def env_fingerprint(cfg: DemoConfig, n_tasks: int = 16) -> str:
    """Hash of the oracle text of a few train tasks: changes whenever the env's worlds or wording change."""
    return hashlib.sha256("\n".join(env_corpus(cfg, n_tasks, noise=0.0)).encode()).hexdigest()[:16]


def chat_format(tokenizer: Any):
    from gopd_fast.rollout.history import ChatFormat

    return ChatFormat(tokenizer)   # the trainer's format: Qwen3-style, thinking off, no system prompt


def _new_model(size: str, num_hidden_layers: int, tokenizer: Any, seed: int):
    """A fresh Qwen3 of a named size for ``tokenizer``; ``num_hidden_layers`` > 0 overrides the size's depth."""
    from gopd_fast.models import build_model, config_for_tokenizer

    depth = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers else {}
    return build_model(config_for_tokenizer(size, tokenizer, **depth), seed=seed)


def build_teacher(cfg: DemoConfig, out_dir: Path, log=print) -> dict[str, Any]:
    """Tokenizer on the env's text + teacher SFT on (noisy) oracle episodes; saved with save_pretrained."""
    import torch

    from gopd_fast.demo.sft import SFTConfig, train_sft
    from gopd_fast.models import save_model, train_tokenizer
    from gopd_fast.rollout.episode import Role
    from gopd_fast.rollout.expert import oracle_episodes
    from gopd_fast.train_setup import make_env

    t = cfg.teacher
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(env_corpus(cfg, t.tokenizer_tasks), t.vocab_size)
    env = make_env(env_config(cfg))
    try:
        episodes = oracle_episodes(env, env.tasks("train")[:t.sft_episodes], chat_format(tokenizer),
                                   noise=t.noise, seed=t.seed)
    finally:
        env.close()
    model = _new_model(t.size, t.num_hidden_layers, tokenizer, t.seed)
    losses = train_sft(model, episodes, SFTConfig(steps=t.sft_steps, batch_size=t.batch_size, lr=t.lr,
                                                  seed=t.seed),
                       pad_id=int(tokenizer.pad_token_id), train_roles=(Role.TEACHER,), log=log, log_every=50)
    model.to(torch.float32)
    save_model(model, tokenizer, out_dir)
    info = {"fingerprint": env_fingerprint(cfg), "teacher": dataclasses.asdict(t), "env": cfg.env,
            "env_options": cfg.env_options, "max_turns": cfg.max_turns, "final_loss": losses[-1],
            "train_seconds": round(time.perf_counter() - t0, 1), "date": time.strftime("%Y-%m-%d"),
            "command": "python -m gopd_fast.demo --rebuild-teacher"}
    (out_dir / "demo_teacher.json").write_text(json.dumps(info, indent=2))
    return info


def truncated_base(teacher_dir: Path | str, num_layers: int, out_dir: Path, key: str) -> dict[str, Any]:
    """The teacher at ``teacher_dir`` with only its first ``num_layers`` decoder layers (``models.keep_layers``;
    embeddings, final norm and lm_head kept), saved to ``out_dir``: a smaller student that starts from the teacher's
    own weights and has lost what the dropped layers did. ``key``: the config key of ``num_layers`` (errors)."""
    from gopd_fast.models import keep_layers, load_model, save_model

    model, tokenizer = load_model(teacher_dir)
    depth = model.config.num_hidden_layers
    if not 1 <= num_layers < depth:
        raise ValueError(f"{key}={num_layers}: a truncated base keeps the teacher's first layers, so it must be in "
                         f"[1, {depth - 1}] for this {depth}-layer teacher ({teacher_dir})")
    keep_layers(model, range(num_layers))
    save_model(model, tokenizer, out_dir)
    return {"source": "truncated", "teacher": str(teacher_dir), "teacher_layers": depth, "layers": num_layers,
            "params": sum(p.numel() for p in model.parameters())}


def build_student_base(cfg: DemoConfig, tokenizer: Any, out_dir: Path, log=print,
                       teacher_dir: Path | None = None) -> dict[str, Any]:
    """The base every method starts from (``[student]``): the teacher's first ``num_hidden_layers`` layers
    (``source = "truncated"``, needs ``teacher_dir``), or a fresh smaller Qwen3 briefly SFT-ed on a few pure
    expert episodes (``source = "oracle"``: weak, but it knows the format; a source better than the teacher)."""
    from gopd_fast.demo.sft import SFTConfig, train_sft
    from gopd_fast.models import save_model
    from gopd_fast.rollout.expert import oracle_episodes
    from gopd_fast.train_setup import make_env

    s = cfg.student
    if s.source == "truncated":
        if teacher_dir is None:
            raise ValueError("student.source = 'truncated' needs the teacher's directory (teacher_dir)")
        return truncated_base(teacher_dir, s.num_hidden_layers, out_dir, "student.num_hidden_layers")
    env = make_env(env_config(cfg))
    try:
        # The tail of the train split: disjoint from the first tasks the distillation runs start with.
        tasks = env.tasks("train")[-s.base_episodes:]
        episodes = oracle_episodes(env, tasks, chat_format(tokenizer), noise=0.0)
    finally:
        env.close()
    model = _new_model(s.size, s.num_hidden_layers, tokenizer, s.seed)
    losses = train_sft(model, episodes, SFTConfig(steps=s.base_steps, batch_size=s.batch_size, lr=s.lr,
                                                  seed=s.seed),
                       pad_id=int(tokenizer.pad_token_id), log=log, log_every=20)
    save_model(model, tokenizer, out_dir)
    return {"episodes": len(episodes), "steps": s.base_steps, "final_loss": losses[-1],
            "params": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def rollout(cfg: DemoConfig, student_dir: Path | str, tasks: Sequence[str], *, seed: int, temperature: float,
            beta: float = 0.0, teacher_dir: Path | str | None = None, envs: DemoEnvs | None = None):
    """Episodes of the model at ``student_dir`` (and the teacher, with ``beta`` > 0) on ``tasks``; on the run's
    ``envs`` when given, else on envs started and closed for this call."""
    import torch

    from gopd_fast.rollout.engines.hf_cached import load_hf_engine
    from gopd_fast.rollout.rollout import RolloutOptions, run_rollout

    # run_rollout passes no per-call sampling seed, so the HF engines sample from the global RNG: seed it per
    # evaluation.
    torch.manual_seed(seed)
    student = load_hf_engine(str(student_dir), kv_reuse=cfg.eval.kv_reuse)
    teacher = load_hf_engine(str(teacher_dir), kv_reuse=cfg.eval.kv_reuse) if teacher_dir is not None else None
    tokenizer = _tokenizer(student_dir)
    with _envs_for(cfg, envs) as run_envs:
        options = RolloutOptions(max_turns=cfg.max_turns, max_new_tokens=cfg.eval.max_new_tokens,
                                 max_prompt_tokens=4096, temperature=temperature,
                                 max_in_flight=run_envs.max_in_flight(len(tasks)), seed=seed)
        return run_rollout(list(tasks), student=student, teacher=teacher, chat=chat_format(tokenizer),
                           envs=run_envs.slots, beta=beta, options=options).episodes


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    key = str(path)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(key)
    return _TOKENIZERS[key]


def evaluate(cfg: DemoConfig, model_dir: Path | str, *, seed: int, tasks: Sequence[str],
             envs: DemoEnvs | None = None) -> list[dict[str, Any]]:
    """Student-only evaluation at the eval temperature; per-episode records incl. score at every turn limit."""
    from gopd_fast.demo.diagnostics import replay, score_at_turn_limits

    with _envs_for(cfg, envs) as run_envs:
        episodes = rollout(cfg, model_dir, tasks, seed=seed, temperature=cfg.eval.temperature, envs=run_envs)
        limits = list(range(1, cfg.max_turns + 1))
        records = []
        for ep in episodes:
            states = replay(run_envs.replay_env, ep)
            records.append({"task_id": ep.task_id, "score": ep.score, "success": bool(ep.success),
                            "rounds": ep.rounds, "actions": ep.actions,
                            "score_at_limit": score_at_turn_limits(states, limits)})
        return records


def summarize(records_by_seed: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Episodes pooled over seeds: mean and 95% CI of Score and Rounds (Student-t) and of the Success Rate in %
    (Wilson), via ``gopd_fast.envs.evaluate``; plus each seed's mean and the seed-to-seed standard deviation."""
    from gopd_fast.envs.evaluate import t_interval, wilson_interval

    pooled = [r for recs in records_by_seed.values() for r in recs]
    if not pooled:
        raise ValueError("summarize: no episodes")
    out: dict[str, Any] = {"episodes": len(pooled), "seeds": sorted(records_by_seed)}
    intervals = {
        "score": t_interval([float(r["score"]) for r in pooled]),
        "success_rate": wilson_interval(sum(bool(r["success"]) for r in pooled), len(pooled)),
        "rounds": t_interval([float(r["rounds"]) for r in pooled]),
    }
    for key, iv in intervals.items():
        scale = 100.0 if key == "success_rate" else 1.0
        get = (lambda r: 100.0 * bool(r["success"])) if key == "success_rate" else (lambda r, k=key: float(r[k]))
        per_seed = [sum(get(r) for r in recs) / len(recs) for recs in records_by_seed.values() if recs]
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else float("nan")
        out[key] = {"mean": iv.mean * scale, "low": iv.low * scale, "high": iv.high * scale, "method": iv.method,
                    "per_seed": per_seed, "seed_sd": sd}
    return out


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table: one row per method, mean [95% CI] over the episodes pooled across seeds."""
    lines = ["| Method | Score | Success Rate (%) | Rounds | Score per seed | Episodes |",
             "|---|---|---|---|---|---|"]
    def cell(s: dict[str, Any], k: str, fmt: str = ".1f") -> str:
        return f"{s[k]['mean']:{fmt}} [{s[k]['low']:{fmt}}, {s[k]['high']:{fmt}}]"

    for name, s in rows.items():
        seeds = " / ".join(f"{x:.1f}" for x in s["score"]["per_seed"])
        lines.append(f"| {name} | {cell(s, 'score')} | {cell(s, 'success_rate')} | {cell(s, 'rounds', '.2f')} | "
                     f"{seeds} | {s['episodes']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Distillation (the trainer does the work, with the Config of demo.config.trainer_config)
# ---------------------------------------------------------------------------------------------------------

def distill(cfg: DemoConfig, method: str, seed: int, student_dir: Path, teacher_dir: Path,
            out_dir: Path, on_record: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One trainer run; ``on_record`` gets each train / eval record of its metrics.jsonl while it trains (from a
    background thread that follows the file)."""
    from gopd_fast.train import run

    t0 = time.perf_counter()
    tcfg = trainer_config(cfg, method, seed, student_dir, teacher_dir, out_dir)
    metrics = Path(tcfg.run.output_dir) / "metrics.jsonl"
    metrics.unlink(missing_ok=True)   # the tail must not replay an earlier run's records (resume is off)
    with MetricsTail(metrics, on_record) if on_record is not None else contextlib.nullcontext():
        result = run(tcfg)
    if result.export_dir is None or not (Path(result.export_dir) / "config.json").is_file():
        raise RuntimeError(f"{method} seed {seed}: the trainer exported no student to {result.export_dir}")
    curve = [(int(e["step"]), float(e["eval/score"])) for e in result.evals]
    return {"export_dir": str(result.export_dir), "seconds": time.perf_counter() - t0, "curve": curve,
            "betas": [float(h["beta"]) for h in result.history],
            "train_scores": [float(h["score"]) for h in result.history],
            "skipped_steps": result.skipped_steps}


# ---------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------

def resolve_teacher(cfg: DemoConfig, run_dir: Path, log=print) -> tuple[Path, dict[str, Any]]:
    """The committed teacher when it matches the env, else a freshly built one (in the run folder)."""
    asset = ASSETS_DIR / cfg.teacher.asset
    meta_path = asset / "demo_teacher.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        fp = env_fingerprint(cfg)
        same = (meta.get("fingerprint") == fp and meta.get("max_turns") == cfg.max_turns
                and meta.get("env") == cfg.env and meta.get("env_options") == cfg.env_options)
        if same:
            log(f"[demo] teacher: committed checkpoint {asset.relative_to(REPO_DIR) if asset.is_relative_to(REPO_DIR) else asset}"
                f" (rebuilt by `{meta.get('command')}` in {meta.get('train_seconds')} s)")
            return asset, meta
        log(f"[demo] the committed teacher was built for another env version (fingerprint {meta.get('fingerprint')} "
            f"!= {fp}); building a fresh one in the run folder")
    else:
        log(f"[demo] no committed teacher at {asset}; building one in the run folder")
    out = run_dir / "models" / "teacher"
    return out, build_teacher(cfg, out, log)


def run_demo(cfg: DemoConfig, run_dir: Path) -> dict[str, Any]:
    import torch

    from gopd_fast.demo import plots
    from gopd_fast.train_setup import make_env

    run_dir.mkdir(parents=True, exist_ok=True)
    clock = PhaseClock(cfg.plan_s, cfg.budget_s)
    clock.print_plan()
    print(f"[demo] run folder: {run_dir}  seeds: {list(cfg.seeds)}  methods: {list(cfg.methods)}  "
          f"torch threads: {torch.get_num_threads()}", flush=True)
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "run_dir": str(run_dir)}

    with clock.phase("teacher"):
        teacher_dir, teacher_meta = resolve_teacher(cfg, run_dir)
        results["teacher"] = {"dir": str(teacher_dir), **teacher_meta}
        tokenizer = _tokenizer(teacher_dir)
    env = make_env(env_config(cfg))
    eval_tasks = env.tasks("eval")[:cfg.eval.tasks]
    env.close()

    with clock.phase("student-base"):
        base_dir = run_dir / "models" / "student-base"
        results["student_base"] = build_student_base(cfg, tokenizer, base_dir, teacher_dir=teacher_dir)

    records: dict[str, dict[int, list[dict[str, Any]]]] = {}
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    envs = DemoEnvs(cfg)  # one set of evaluation envs for the whole run
    try:
        with clock.phase("reference"):
            references = {name: d for name, d in (("teacher", teacher_dir), ("zero-shot", base_dir))
                          if name == "teacher" or name in cfg.methods}
            with clock.bar(len(references) * len(cfg.seeds) * len(eval_tasks), "reference eval", "episodes") as bar:
                for name, model_dir in references.items():
                    records[name] = {}
                    for s in cfg.seeds:
                        records[name][s] = evaluate(cfg, model_dir, seed=s, tasks=eval_tasks, envs=envs)
                        bar.advance(len(records[name][s]))
            for name in records:
                say(f"[demo]   {name}: Score {summarize(records[name])['score']['mean']:.1f}")

        trained = [m for m in cfg.methods if m != "zero-shot"]
        live = LiveCurves(run_dir / "curves.png", cfg.distill.total_steps,
                          reference={m: summarize(records[m])["score"]["mean"] for m in records})
        say(f"[demo] live learning curves (redrawn at every held-out point): {live.out}")
        with clock.phase("distill"):
            jobs = [(seed, method) for seed in cfg.seeds for method in trained]
            for i, (seed, method) in enumerate(jobs, 1):
                out = run_dir / "train" / f"{method}-seed{seed}"
                start = _curve_start(records.get("zero-shot", {}).get(seed, []), cfg.distill.curve_eval_episodes)
                if start is not None:   # step 0 of every curve: the untrained base on the curve's tasks
                    live.add(method, seed, 0, *start, echo=False)
                with clock.bar(cfg.distill.total_steps, f"distill {i}/{len(jobs)} {method} seed {seed}",
                               "steps") as bar:
                    def on_record(rec: dict[str, Any], bar: Bar = bar, method: str = method, seed: int = seed):
                        if rec.get("kind") == "train":
                            bar.advance()
                        elif rec.get("kind") == "eval":
                            live.add_record(method, seed, rec)

                    info = distill(cfg, method, seed, base_dir, teacher_dir, out, on_record=on_record)
                with clock.bar(len(eval_tasks), f"eval {method} seed {seed}", "episodes") as bar:
                    info["eval"] = evaluate(cfg, info["export_dir"], seed=seed, tasks=eval_tasks, envs=envs)
                    bar.advance(len(info["eval"]))
                runs.setdefault(method, {})[seed] = info
                records.setdefault(method, {})[seed] = info["eval"]
                say(f"[demo]   {method} seed {seed}: {info['seconds']:.0f} s train, held-out Score "
                    f"{summarize({seed: info['eval']})['score']['mean']:.1f}")

        with clock.phase("diagnostics"):
            failure = run_diagnostics(cfg, base_dir, teacher_dir, tokenizer, envs=envs)
            (run_dir / "failure_mode.json").write_text(json.dumps(failure, indent=2))
    finally:
        envs.close()

    with clock.phase("report"):
        order = ["teacher", *[m for m in METHODS if m in records]]
        table_rows = {m: summarize(records[m]) for m in order}
        table = format_table(table_rows)
        seed0 = cfg.seeds[0]
        schedules = {m: beta_schedule(trainer_config(cfg, m, seed0, base_dir, teacher_dir,
                                                     run_dir / "train" / f"{m}-seed{seed0}")) for m in trained}
        curves = {}
        k = cfg.distill.curve_eval_episodes
        for method, by_seed in runs.items():
            steps = [0] + [s for s, _ in next(iter(by_seed.values()))["curve"]]
            curves[method] = {"steps": steps}
            for seed, info in by_seed.items():
                zs = records.get("zero-shot", {}).get(seed, [])[:k]
                start = sum(r["score"] for r in zs) / len(zs) if zs else float("nan")
                curves[method][f"seed{seed}"] = [start] + [v for _, v in info["curve"]]
        limits = list(range(1, cfg.max_turns + 1))
        by_limit = {m: {L: sum(r["score_at_limit"][L] for recs in records[m].values() for r in recs)
                        / sum(len(recs) for recs in records[m].values()) for L in limits} for m in order}
        plot_data = {"beta_schedules": schedules, "learning_curves": curves,
                     "reference": {m: table_rows[m]["score"]["mean"] for m in ("teacher", "zero-shot")
                                   if m in table_rows},
                     "score_vs_turn_limit": by_limit,
                     "failure_mode": {k2: v for k2, v in failure.items() if k2 != "states"}}
        (run_dir / "plot_data.json").write_text(json.dumps(plot_data, indent=2))
        pngs = plots.redraw(run_dir)
        results.update(table=table_rows, table_markdown=table, curves=curves, score_vs_turn_limit=by_limit,
                       failure_mode={k2: v for k2, v in failure.items() if k2 != "states"},
                       runs={m: {s: {k2: v for k2, v in i.items() if k2 != "eval"} for s, i in d.items()}
                             for m, d in runs.items()},
                       plots=[str(p) for p in pngs], live_curves=str(live.out))
        with open(run_dir / "episodes.jsonl", "w") as f:
            for m, by_seed in records.items():
                for seed, recs in by_seed.items():
                    f.writelines(json.dumps({"method": m, "seed": seed, **r}) + "\n" for r in recs)

    results["timing"] = clock.table()
    results["wall_seconds"] = round(clock.elapsed(), 1)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (run_dir / "results.md").write_text(
        f"# Demo results ({cfg.env}, seeds {list(cfg.seeds)}, {len(eval_tasks)} held-out tasks per seed)\n\n"
        f"{table}\n\nMean [95% CI] over all held-out episodes pooled across seeds: Student-t for Score and Rounds, "
        f"Wilson for the Success Rate. 'Score per seed' lists each seed's mean Score.\n\n"
        f"Learning curves during training: curves.png (live) and learning_curves.png. The demo is a short run; "
        f"{STUDY_POINTER}.\n\n"
        f"Wall time: {results['wall_seconds']} s\n")
    print("\n" + table + "\n", flush=True)
    print("[demo] time: phase | planned s | actual s")
    for row in results["timing"]:
        print(f"[demo]   {row['phase']:<14} {row['planned_s'] if row['planned_s'] is not None else '-':>8} "
              f"{row['actual_s']:>9}")
    print(f"[demo] total wall {results['wall_seconds']} s (target {cfg.budget_s:.0f} s); "
          f"artefacts in {run_dir}", flush=True)
    print(f"[demo] {STUDY_POINTER}", flush=True)
    return results


def _curve_start(zero_shot: Sequence[dict[str, Any]], k: int) -> tuple[float, float, float, int] | None:
    """Score with its 95% CI of the untrained base on the first ``k`` held-out tasks (the tasks of every
    learning-curve point): the curves' step 0."""
    from gopd_fast.envs.evaluate import t_interval

    scores = [float(r["score"]) for r in zero_shot[:k]]
    if not scores:
        return None
    iv = t_interval(scores)
    return iv.mean, iv.low, iv.high, len(scores)


def run_diagnostics(cfg: DemoConfig, student_dir: Path, teacher_dir: Path, tokenizer: Any,
                    envs: DemoEnvs | None = None) -> dict[str, Any]:
    """Failure-mode diagnostic on the base student: student-only vs teacher-only rollouts on held-out tasks."""
    from gopd_fast.demo.diagnostics import failure_mode
    from gopd_fast.models import load_model
    from gopd_fast.rollout.expert import ACTION_FORMAT

    with _envs_for(cfg, envs) as run_envs:
        env = run_envs.replay_env
        tasks = env.tasks("eval")[-cfg.eval.diagnostic_tasks:]
        rollouts = {
            # beta = 0: the student alone; beta = 1: the teacher writes every turn (the student engine is unused)
            "student": rollout(cfg, student_dir, tasks, seed=7, temperature=1.0, envs=run_envs),
            "teacher": rollout(cfg, student_dir, tasks, seed=7, temperature=1.0, beta=1.0,
                               teacher_dir=teacher_dir, envs=run_envs),
        }
        student, _ = load_model(student_dir)
        teacher, _ = load_model(teacher_dir)
        eos = [int(tokenizer.eos_token_id)]

        def encode_action(action: str) -> list[int]:
            return list(tokenizer(ACTION_FORMAT.format(action=action), add_special_tokens=False)["input_ids"]) + eos

        return failure_mode(student, teacher, env, rollouts, encode_action)


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        if "," in text:
            seeds = tuple(int(s) for s in text.split(",") if s.strip())
        else:
            seeds = tuple(range(int(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a list (0,1,2), got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must give at least one non-negative seed, got {text!r}")
    return seeds


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m gopd_fast.demo", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help="demo TOML (default configs/demo.toml, or demo-quick.toml)")
    p.add_argument("--quick", action="store_true", help="minutes-scale version (configs/demo-quick.toml)")
    p.add_argument("--out", default=None, help="run folder (default runs/demo-<timestamp>)")
    p.add_argument("--seeds", type=parse_seeds, default=None, help="a count (3) or a list (0,1,2)")
    p.add_argument("--rebuild-teacher", action="store_true",
                   help="re-train the committed teacher in gopd_fast/assets/<teacher.asset> and exit")
    args = p.parse_args(argv)
    path = args.config or REPO_DIR / "configs" / ("demo-quick.toml" if args.quick else "demo.toml")
    try:
        cfg = load_demo_config(path)
    except ConfigError as e:   # one clear line and status 2, like the trainer's console script
        print(f"gopd_fast.demo: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, seeds=args.seeds)
    run_dir = Path(args.out) if args.out else REPO_DIR / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()   # "Loading weights" bars for every model load drown the demo's own log
    if args.rebuild_teacher:
        asset = ASSETS_DIR / cfg.teacher.asset
        t0 = time.perf_counter()
        info = build_teacher(cfg, asset)
        print(f"[demo] teacher rebuilt in {asset} in {time.perf_counter() - t0:.0f} s: {json.dumps(info)}")
        return {"teacher": {"dir": str(asset), **info}}
    return run_demo(cfg, run_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
