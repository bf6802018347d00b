"""The training entrypoint and loop: Guided-OPD, vanilla OPD and the SFT baseline, on one or many GPUs (or CPU).

    torchrun --nproc_per_node=N -m gopd_fast.train --config configs/scienceworld.toml [section.key=value ...]
    gopd-fast --config configs/household.toml run.total_steps=4 optim.lr=1e-5        # console script
    python -m gopd_fast.train                                                          # embedded default (CPU)

Multi-node: run the same command on every node with torchrun's rendezvous, e.g.
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 --rdzv_id=run1 \\
             -m gopd_fast.train --config configs/alfworld.toml

Programmatic use (the demo does this): ``result = gopd_fast.train.run(load_config(path, overrides))``.

The trainer in three modules (torchtitan's shape):
    gopd_fast.train_setup   episode sources (expert / rollouts), the environment, models loaded and sharded
    gopd_fast.train_step    ``Trainer``: one optimizer step on given episodes
    gopd_fast.train         this loop: resume, per step rollouts -> ``Trainer.step`` -> weight sync -> log,
                            evaluation, checkpoints (one ``TrainState``, gopd_fast.train_state), export

One optimizer step, top to bottom (``run`` and ``Trainer.step``):
    beta = curriculum(step)                    (OPD: 0, SFT: 1)
    episodes = rollouts of this rank's share of the step's tasks   (teacher writes a turn with probability beta)
    rows = whole episodes packed into rows     (one forward per model per episode, never one per turn)
    h_s = student.model(rows), h_t = teacher.model(rows)            (final hidden states; no [T, V] logits;
                                                                     h_t from the teacher's rollout engine where
                                                                     it keeps them: rollout.reuse_teacher_hidden)
    loss = sum over loss tokens of the role's term / (loss tokens in the GLOBAL batch)
    backward, clip, AdamW, LR schedule;  a non-finite loss or grad norm skips the update (counted)
    weight sync: the new student weights go to the rollout engine

Sharding: the student is FSDP2-sharded per decoder block, then its decoder, then the root, with bf16 compute on
GPU (fp32 on CPU); the frozen teacher likewise (``model.shard_teacher``), forward-only under no_grad.
Gradients are the SUM over ranks (FSDP2 averages, so the local loss is multiplied by the world size; the sharded
lm_head is gathered once per micro-batch with a rank-averaged gradient, see gopd_fast.module): with the loss
divided by the global loss-token count, the update equals one process training on the whole batch
(tests/test_train.py checks two processes against one).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gopd_fast.checkpoint import CheckpointError, CheckpointManager, export_hf, full_state_dict
from gopd_fast.config import Config, ConfigError, config_to_dict, load_config
from gopd_fast.curriculum import BetaSchedule, TaskCursor, beta_at
from gopd_fast.distributed import DistInfo, all_gather_objects, all_reduce_sums, init_distributed, shutdown
from gopd_fast.logging_utils import MetricsLogger
from gopd_fast.packing import per_turn_reprefill_tokens
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.train_setup import (  # noqa: F401  (importable from here)
    EpisodeSource,
    ExpertSource,
    RolloutSource,
    ensure_tiny_models,
    env_options,
    expert_episode,
    load_models,
    make_env,
    make_source,
)
from gopd_fast.train_state import TrainState
from gopd_fast.train_step import Trainer, lr_lambda  # noqa: F401  (importable from here)

__all__ = ["EpisodeSource", "ExpertSource", "RunResult", "Trainer", "cli", "expert_episode", "main", "run"]


@dataclass
class RunResult:
    output_dir: Path
    steps_completed: int
    skipped_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)        # train records of this process's run
    evals: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    export_dir: Path | None = None
    resumed_from: Path | None = None

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def _rollout_seed(cfg: Config, step: int, info: DistInfo) -> int:
    """Distinct per (run seed, step, rank): guidance coins and sampling never repeat across ranks or steps."""
    return ((cfg.run.seed * 100_003 + step) * 1_009 + info.rank) * 2 % (2 ** 62)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _episode_metrics(episodes: Sequence[Episode], info: DistInfo) -> dict[str, float]:
    local = {
        "n": len(episodes),
        "score": sum(e.score for e in episodes),
        "success": sum(float(e.success) for e in episodes),
        "rounds": sum(e.rounds for e in episodes),
        "turns": sum(len(e.turn_roles) for e in episodes),
        "teacher_turns": sum(sum(r == Role.TEACHER for r in e.turn_roles) for e in episodes),
        "reprefill_tokens": sum(per_turn_reprefill_tokens(e) for e in episodes),
        "env_failures": sum(e.env_failures for e in episodes),
    }
    g = all_reduce_sums(local, info.device)
    n = max(g["n"], 1.0)
    return {"score": g["score"] / n, "success_rate": g["success"] / n, "rounds": g["rounds"] / n,
            "teacher_turn_fraction": g["teacher_turns"] / max(g["turns"], 1.0),
            "episodes": g["n"], "reprefill_tokens": g["reprefill_tokens"], "env_failures": g["env_failures"]}


def evaluate_student(cfg: Config, source: EpisodeSource, env: Any, info: DistInfo, step: int) -> dict[str, Any]:
    """Student only (beta = 0) at ``rollout.eval_temperature`` on the eval split; Score / Success Rate / Rounds."""
    tasks = env.tasks(cfg.env.eval_split)
    if cfg.env.eval_episodes:
        tasks = tasks[:cfg.env.eval_episodes]
    mine = tasks[info.rank::info.world_size]
    episodes = source.collect(mine, beta=0.0, temperature=cfg.rollout.eval_temperature,
                              seed=_rollout_seed(cfg, step, info) + 1) if mine else []
    from gopd_fast.envs.evaluate import t_interval, wilson_interval

    per_rank = all_gather_objects([(e.score, bool(e.success), e.rounds) for e in episodes])
    values = [v for part in per_rank for v in part]
    record: dict[str, Any] = {"kind": "eval", "step": step, "eval/episodes": len(values)}
    if values:   # means with 95% intervals: Student's t for Score and Rounds, Wilson for the Success Rate
        score, rounds = t_interval([v[0] for v in values]), t_interval([float(v[2]) for v in values])
        success = wilson_interval(sum(v[1] for v in values), len(values))
        for name, iv in (("score", score), ("success_rate", success), ("rounds", rounds)):
            record.update({f"eval/{name}": iv.mean, f"eval/{name}_low": iv.low, f"eval/{name}_high": iv.high})
    return record


def run(cfg: Config, source: EpisodeSource | None = None) -> RunResult:
    """Train according to ``cfg`` (inside torchrun or a single process); returns a ``RunResult``.

    ``source`` replaces the configured episode source (``rollout.engine``); it must accept ``sync_weights``.
    """
    info = init_distributed()
    try:
        return _run(cfg, info, source)
    finally:
        shutdown()


@dataclass
class _Run:
    """What the loop works with, built once by ``_setup``."""

    cfg: Config
    info: DistInfo
    out_dir: Path
    trainer: Trainer
    tokenizer: Any
    env: Any
    source: EpisodeSource
    state: TrainState
    ckpt: CheckpointManager
    resumed_from: Path | None


def _setup(cfg: Config, info: DistInfo, source: EpisodeSource | None) -> _Run:
    """Models, trainer, environment, episode source; then the resume (the newest checkpoint that verifies, newer
    damaged ones logged and skipped; checkpoints exist but none verifies: ``CheckpointError``, the run stops, and
    ``run.resume=false`` starts at step 1 instead)."""
    if cfg.rollout.episodes_per_step < info.world_size:
        raise ConfigError(f"rollout.episodes_per_step ({cfg.rollout.episodes_per_step}) must be >= the number of "
                          f"ranks ({info.world_size})")
    out_dir = Path(cfg.run.output_dir)
    _seed_everything(cfg.run.seed + info.rank)
    ensure_tiny_models(cfg, info)
    student, teacher, tokenizer = load_models(cfg, info)
    trainer = Trainer(cfg, info, student, teacher, pad_token_id=int(tokenizer.pad_token_id))
    env = make_env(cfg)
    state = TrainState(trainer, BetaSchedule(cfg.curriculum, cfg.run.total_steps),
                       TaskCursor(env.tasks(cfg.env.train_split), seed=cfg.run.seed), config=config_to_dict(cfg))
    source = source or make_source(cfg, env, tokenizer, info)
    if trainer.takes_teacher_hidden and hasattr(source, "check_teacher"):
        source.check_teacher(trainer.teacher)
    ckpt = CheckpointManager(out_dir / "checkpoints", info, keep=cfg.run.keep_checkpoints)
    try:
        resumed_from = ckpt.resume_state(state) if cfg.run.resume else None
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Repair or remove them, or set run.resume=false to start at step 1") from None
    if resumed_from is not None:
        source.sync_weights(full_state_dict(student, cpu_offload=False))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    return _Run(cfg, info, out_dir, trainer, tokenizer, env, source, state, ckpt, resumed_from)


def _train_one_step(r: _Run, step: int) -> dict[str, Any]:
    """Rollouts, update and weight sync of 0-based ``step``; returns its train record."""
    cfg, info, source, student = r.cfg, r.info, r.source, r.trainer.student
    t_step = time.perf_counter()
    beta = beta_at(cfg, r.state.curriculum, step)
    tasks = r.state.cursor.take(cfg.rollout.episodes_per_step)     # the same global list on every rank
    mine = tasks[info.rank::info.world_size]
    t0 = time.perf_counter()
    episodes = source.collect(mine, beta=beta, temperature=cfg.rollout.temperature,
                              seed=_rollout_seed(cfg, step, info))
    time_rollout = time.perf_counter() - t0
    metrics = r.trainer.step(episodes, teacher_hidden=teacher_hidden(r.trainer, source, episodes))
    t0 = time.perf_counter()
    source.sync_weights(full_state_dict(student, cpu_offload=False))
    time_sync = time.perf_counter() - t0
    ep = _episode_metrics(episodes, info)
    time_step = time.perf_counter() - t_step
    record = {"kind": "train", "step": step + 1, "beta": beta, **metrics,
              "score": ep["score"], "success_rate": ep["success_rate"], "rounds": ep["rounds"],
              "teacher_turn_fraction": ep["teacher_turn_fraction"], "episodes": ep["episodes"],
              "reprefill_tokens": ep["reprefill_tokens"], "env_failures": ep["env_failures"],
              "time_rollout": time_rollout, "time_sync": time_sync, "time_step": time_step,
              "tokens_per_s": metrics["tokens_scored"] / max(time_step, 1e-9)}
    stats = source.stats()
    if "cache_hit_rate" in stats:
        record["prefix_cache_hit_rate"] = stats["cache_hit_rate"]
    if "generation_failures" in stats:
        record["generation_failures"] = stats["generation_failures"]
    env_counts = {k: v for k, v in stats.items() if k.startswith("env_")}
    if env_counts:   # env-pool restarts/replays of this step, summed over ranks
        record.update(all_reduce_sums(env_counts, info.device))
    return record


def teacher_hidden(trainer: Trainer, source: EpisodeSource, episodes: Sequence[Episode]) -> list[torch.Tensor] | None:
    """The teacher's hidden states of ``episodes`` from the source's rollout engine where the trainer takes them
    (``Trainer.takes_teacher_hidden``) and the source keeps them; else None (the trainer runs the teacher)."""
    if not trainer.takes_teacher_hidden:
        return None
    fetch = getattr(source, "teacher_hidden", None)
    return fetch(episodes) if fetch is not None else None


def _run(cfg: Config, info: DistInfo, source: EpisodeSource | None) -> RunResult:
    r = _setup(cfg, info, source)
    start = r.state.step
    logger = MetricsLogger(r.out_dir, enabled=info.is_main, total_steps=cfg.run.total_steps, initial_step=start,
                           tensorboard=cfg.run.tensorboard, progress_bar=cfg.run.progress_bar)
    result = RunResult(output_dir=r.out_dir, steps_completed=start, skipped_steps=r.trainer.skipped_steps,
                       resumed_from=r.resumed_from)
    try:
        for step in range(start, cfg.run.total_steps):
            record = _train_one_step(r, step)
            r.state.step = step + 1
            logger.log(record)
            result.history.append(record)
            result.steps_completed = step + 1
            done = step + 1 == cfg.run.total_steps
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and not done:
                _maybe_eval(cfg, r.source, r.env, info, step + 1, logger, result)
            if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or done:
                result.checkpoint = r.ckpt.save_state(step + 1, r.state)
        if cfg.run.eval_at_end and cfg.run.total_steps > start:
            _maybe_eval(cfg, r.source, r.env, info, cfg.run.total_steps, logger, result)
        if cfg.run.export_hf:
            result.export_dir = r.out_dir / "student-hf"
            export_hf(r.trainer.student, r.tokenizer, result.export_dir, info)
    finally:
        logger.close()
        r.source.close()
    result.skipped_steps = r.trainer.skipped_steps
    return result


def _maybe_eval(cfg: Config, source: EpisodeSource, env: Any, info: DistInfo, step: int,
                logger: MetricsLogger, result: RunResult) -> None:
    if cfg.rollout.engine == "expert":
        return   # the oracle cannot evaluate the student
    record = evaluate_student(cfg, source, env, info, step)
    logger.log(record)
    result.evals.append(record)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-fast",
        description="Guided on-policy distillation trainer (run under torchrun for several processes).",
        epilog="Overrides: section.key=value, e.g. optim.lr=1e-5 run.total_steps=10 curriculum.schedule=linear",
    )
    p.add_argument("--config", default=None, help="TOML config (default: the embedded household/tiny config)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


def main(argv: Sequence[str] | None = None) -> RunResult:
    args = _parser().parse_args(argv)
    return run(load_config(args.config, args.overrides))


def cli() -> None:
    """Console script ``gopd-fast``: config errors and unusable checkpoints print one clear line and exit with
    status 2."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"gopd-fast: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except CheckpointError as e:
        print(f"gopd-fast: checkpoint error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()

