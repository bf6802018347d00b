"""The training entrypoint: Guided-OPD, vanilla OPD and the SFT baseline, on one or many GPUs (or CPU).

    torchrun --nproc_per_node=N -m gopd_fast.train --config configs/scienceworld.toml [section.key=value ...]
    gopd-fast --config configs/household.toml run.total_steps=4 optim.lr=1e-5        # console script
    python -m gopd_fast.train                                                          # embedded default (CPU)

Multi-node: run the same command on every node with torchrun's rendezvous, e.g.
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST0:29500 --rdzv_id=run1 \\
             -m gopd_fast.train --config configs/alfworld.toml

Programmatic use (the demo does this): ``result = gopd_fast.train.run(load_config(path, overrides))``.

One optimizer step, top to bottom (``Trainer.step`` and ``run``):
    beta = curriculum(step)                    (OPD: 0, SFT: 1)
    episodes = rollouts of this rank's share of the step's tasks   (teacher writes a turn with probability beta)
    rows = whole episodes packed into rows     (one forward per model per episode, never one per turn)
    h_s = student.model(rows), h_t = teacher.model(rows)            (final hidden states; no [T, V] logits)
    loss = sum over loss tokens of the role's term / (loss tokens in the GLOBAL batch)
    backward, clip, AdamW, LR schedule;  a non-finite loss or grad norm skips the update (counted)
    weight sync: the new student weights go to the rollout engine

Sharding: the student is FSDP2-sharded per decoder block, then its decoder, then the root, with bf16 compute on
GPU (fp32 on CPU); the frozen teacher likewise (``model.shard_teacher``), forward-only under no_grad.
Gradients are the SUM over ranks (FSDP2 averages, so the local loss is multiplied by the world size; the sharded
lm_head is gathered once per loss call with a rank-averaged gradient, see gopd_fast.module): with the loss divided
by the global loss-token count, the update equals one process training on the whole batch (tests/test_train.py checks two processes against one).
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from gopd_fast.checkpoint import CheckpointManager, export_hf, full_state_dict
from gopd_fast.config import Config, ConfigError, OptimConfig, config_to_dict, load_config
from gopd_fast.curriculum import BetaSchedule, TaskCursor
from gopd_fast.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sums,
    apply_activation_checkpointing,
    barrier,
    init_distributed,
    reshard,
    shard_model,
    shutdown,
)
from gopd_fast.logging_utils import MetricsLogger
from gopd_fast.objectives import STAT_KEYS, DistillationObjective, LossOutput
from gopd_fast.packing import pack_episodes, per_turn_reprefill_tokens
from gopd_fast.rollout.episode import Episode, Role

__all__ = ["EpisodeSource", "ExpertSource", "RunResult", "Trainer", "cli", "expert_episode", "main", "run"]


# ---------------------------------------------------------------------------------------------------------
# Where episodes come from
# ---------------------------------------------------------------------------------------------------------

class EpisodeSource(Protocol):
    """Produces finished episodes for task ids; receives the student's new weights after every update."""

    def collect(self, task_ids: Sequence[str], beta: float, temperature: float, seed: int) -> list[Episode]: ...

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


def expert_episode(env: Any, task_id: str, chat_format: Any, eos_token_id: int) -> Episode:
    """One episode in which the environment's oracle writes every turn as ``Action: <action>`` + end-of-turn,
    built with the rollout's append-only history (token-exact, the same layout as a model rollout)."""
    from gopd_fast.sft import oracle_episodes

    return oracle_episodes(env, [task_id], chat_format, eos_token_id=eos_token_id)[0]


class ExpertSource:
    """``rollout.engine = "expert"``: oracle demonstrations. Deterministic, so runs are exactly reproducible
    across world sizes and resumes; every generated token is a teacher token."""

    def __init__(self, env: Any, tokenizer: Any) -> None:
        from gopd_fast.rollout.history import ChatFormat

        self.env = env
        self.chat_format = ChatFormat(tokenizer)
        self.eos_token_id = int(tokenizer.eos_token_id)
        self._cache: dict[str, Episode] = {}

    def collect(self, task_ids: Sequence[str], beta: float, temperature: float, seed: int) -> list[Episode]:
        out = []
        for t in task_ids:
            if t not in self._cache:
                self._cache[t] = expert_episode(self.env, t, self.chat_format, self.eos_token_id)
            out.append(self._cache[t])
        return out

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        pass   # the oracle has no weights

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        self.env.close()


class RolloutSource:
    """``rollout.engine = "hf" | "vllm"``: guided multi-turn rollouts (``gopd_fast.rollout.run_rollout``) with a
    student engine that receives every update and a frozen teacher engine. Each rank owns its engines."""

    def __init__(self, cfg: Config, env_factory: Any, tokenizer: Any, info: DistInfo) -> None:
        from gopd_fast.rollout.envs import ThreadedEnvs
        from gopd_fast.rollout.history import ChatFormat

        self.cfg = cfg
        self.chat = ChatFormat(tokenizer)
        self.student = self._engine(cfg.model.student, info)
        self.teacher = self._engine(cfg.model.teacher, info)
        self.envs = ThreadedEnvs(env_factory, max_workers=min(cfg.rollout.episodes_per_step, 8))
        self._metrics: dict[str, float] = {}

    def _engine(self, path: str, info: DistInfo) -> Any:
        from gopd_fast.rollout.engines import VLLMEngine
        from gopd_fast.rollout.engines.hf_cached import load_hf_engine

        dtype = "bfloat16" if _dtypes(self.cfg, info.device)[1] is not None else "float32"
        if self.cfg.rollout.engine == "vllm":
            extra = {"gpu_memory_utilization": self.cfg.rollout.gpu_memory_utilization} \
                if info.device.type == "cuda" else {}
            return VLLMEngine(path, dtype=dtype, seed=self.cfg.run.seed + info.rank,
                              max_model_len=self.cfg.rollout.max_prompt_tokens + self.cfg.rollout.max_new_tokens,
                              **extra)
        return load_hf_engine(path, kv_reuse=self.cfg.rollout.kv_reuse, dtype=dtype, device=str(info.device))

    def collect(self, task_ids: Sequence[str], beta: float, temperature: float, seed: int) -> list[Episode]:
        from gopd_fast.rollout.rollout import RolloutOptions, run_rollout

        r = self.cfg.rollout
        options = RolloutOptions(max_turns=self.cfg.env.max_turns, max_new_tokens=r.max_new_tokens,
                                 max_prompt_tokens=r.max_prompt_tokens, temperature=temperature,
                                 max_in_flight=max(len(task_ids), 1), seed=seed)
        result = run_rollout(list(task_ids), student=self.student, teacher=self.teacher, chat=self.chat,
                             envs=self.envs, beta=beta, options=options)
        self._metrics = result.metrics
        return result.episodes

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.student.sync_weights(state_dict)

    def stats(self) -> dict[str, float]:
        m = self._metrics
        return {"cache_hit_rate": m["prefix_cache_hit_rate"]} if "prefix_cache_hit_rate" in m else {}

    def close(self) -> None:
        self.envs.close()
        self.student.close()
        self.teacher.close()


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------

def ensure_tiny_models(cfg: Config, info: DistInfo) -> None:
    """Build the tiny local student/teacher (one tokenizer trained on the environment's text) if missing."""
    paths = [Path(cfg.model.student), Path(cfg.model.teacher)]
    if all((p / "config.json").is_file() for p in paths) or not cfg.model.build_tiny_if_missing:
        return
    if info.is_main:
        from gopd_fast.models import build_model, config_for_tokenizer, save_model, train_tokenizer

        env = make_env(cfg)
        corpus: list[str] = []
        for task in env.tasks(cfg.env.train_split)[:64]:
            first = env.reset(task)
            corpus.append(first.observation)
            done = False
            while not done and (action := env.expert_action()) is not None:
                step = env.step(action)
                corpus += [f"Action: {action}", step.observation]
                done = step.done
        env.close()
        tokenizer = train_tokenizer(corpus, vocab_size=512)
        for path, size, seed in ((paths[0], "student-tiny", 1), (paths[1], "teacher-tiny", 2)):
            save_model(build_model(config_for_tokenizer(size, tokenizer), seed=seed), tokenizer, path)
    barrier()


def _dtypes(cfg: Config, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(teacher weight dtype, student mixed-precision compute dtype or None for full fp32)."""
    choice = cfg.model.dtype
    if choice == "auto":
        choice = "bfloat16" if device.type == "cuda" else "float32"
    if choice == "bfloat16":
        return torch.bfloat16, torch.bfloat16
    return torch.float32, None


def _attn_implementation(cfg: Config, device: torch.device) -> str:
    from gopd_fast import packed_attention

    impl = cfg.model.attn_implementation
    if impl == "auto" and device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    if impl in ("auto", packed_attention.NAME):
        # CPU: per-episode causal attention instead of a dense block-diagonal mask (gopd_fast.packed_attention)
        return packed_attention.register()
    return impl


def load_models(cfg: Config, info: DistInfo) -> tuple[nn.Module, nn.Module, Any]:
    """(student, teacher, tokenizer) through ``gopd_fast.models.load_model`` (``from_pretrained``), sharded."""
    from gopd_fast.models import load_model

    teacher_dtype, compute_dtype = _dtypes(cfg, info.device)
    attn = _attn_implementation(cfg, info.device)
    # Load on CPU: fully_shard moves each rank's shard to its device (a 30B teacher never sits whole on a GPU).
    load_device = "cpu" if info.distributed else info.device
    student, tokenizer = load_model(cfg.model.student, dtype="float32", device=load_device)   # fp32 master
    teacher, teacher_tok = load_model(cfg.model.teacher, dtype=teacher_dtype, device=load_device)
    if teacher_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"student ({cfg.model.student}) and teacher ({cfg.model.teacher}) tokenizers differ; "
                         "token-level distillation needs one shared vocabulary")
    for m in (student, teacher):
        m.config._attn_implementation = attn
        m.config.use_cache = False
    student.train()
    teacher.eval().requires_grad_(False)
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(student)
    shard_model(student, info, param_dtype=compute_dtype)
    if cfg.model.shard_teacher:
        shard_model(teacher, info, param_dtype=None)
    elif info.distributed:
        teacher.to(info.device)
    return student, teacher, tokenizer


def lr_lambda(cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        p = min((step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1), 1.0)
        shape = 0.5 * (1 + math.cos(math.pi * p)) if cfg.lr_schedule == "cosine" else 1.0 - p
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return factor


# ---------------------------------------------------------------------------------------------------------
# One optimizer step on given episodes
# ---------------------------------------------------------------------------------------------------------

class Trainer:
    """Student, teacher, objective, optimizer and schedule; ``step(episodes)`` is one update."""

    def __init__(self, cfg: Config, info: DistInfo, student: nn.Module, teacher: nn.Module, pad_token_id: int):
        self.cfg = cfg
        self.info = info
        self.student = student
        self.teacher = teacher
        self.pad_token_id = pad_token_id
        self.compute_dtype = _dtypes(cfg, info.device)[1]
        # The heads go in as they are: FusedLinearKL / effective_head gather FSDP2 shards once per call (gradient
        # averaged over ranks like FSDP2's own) and cast them to the compute dtype of the hidden states.
        self.objective = DistillationObjective(cfg.objective, student.lm_head, teacher.lm_head)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=o.lr, betas=o.betas, eps=o.eps,
            weight_decay=o.weight_decay, foreach=info.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, cfg.run.total_steps))
        self.skipped_steps = 0
        # Decided from the config, not the batch: the teacher forward is collective under FSDP.
        obj = cfg.objective
        self.needs_teacher = (cfg.run.algorithm != "sft" and obj.student_tokens != "none") or (
            cfg.run.algorithm != "opd" and obj.teacher_tokens in ("forward_kl", "reverse_kl"))

    def _hidden(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # attention_mask=None + reset position_ids = per-episode isolation (see gopd_fast.packing).
        # FSDP2's mixed-precision policy casts to bf16 when sharded; a single GPU process autocasts instead.
        autocast = self.compute_dtype is not None and not self.info.distributed
        with torch.autocast(self.info.device.type, dtype=self.compute_dtype) if autocast else nullcontext():
            hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        # the fused loss wants hidden states and head weights in one dtype (RMSNorm may promote to fp32)
        return hidden if self.compute_dtype is None else hidden.to(self.compute_dtype)

    def step(self, episodes: Sequence[Episode]) -> dict[str, float]:
        """Pack this rank's ``episodes``, compute the loss, update. Every rank must call it (collectives)."""
        info, cfg = self.info, self.cfg
        times = {"time_forward": 0.0, "time_loss": 0.0, "time_backward": 0.0}
        if not episodes:
            raise ValueError(f"rank {info.rank} has no episodes this step (every rollout of its share was dropped "
                             "after env failures, or rollout.episodes_per_step < world_size)")
        batch = pack_episodes(episodes, cfg.packing.max_tokens_per_row, self.pad_token_id).to(info.device)
        rows = batch.input_ids.shape[0]
        per_micro = cfg.packing.rows_per_micro_batch or rows
        counts = all_reduce_sums({"loss_tokens": batch.num_loss_tokens, "tokens": batch.num_tokens}, info.device)
        # every rank must run the same number of forward/backward passes under FSDP
        n_micro = int(all_reduce_max(float(math.ceil(rows / per_micro)), info.device))
        normalizer = max(counts["loss_tokens"], 1.0)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(n_micro):
            lo, hi = m * per_micro, min((m + 1) * per_micro, rows)
            empty = lo >= hi
            if empty:   # this rank ran out of rows: run one padding row with no loss tokens (keeps FSDP in step)
                lo, hi = 0, 1
            sync = m == n_micro - 1
            if info.distributed and hasattr(self.student, "set_requires_gradient_sync"):
                self.student.set_requires_gradient_sync(sync)
            ids, pos = batch.input_ids[lo:hi], batch.position_ids[lo:hi]
            mask = batch.loss_mask[lo:hi] & (not empty)
            t0 = time.perf_counter()
            h_s = self._hidden(self.student, ids, pos)
            h_t = None
            if self.needs_teacher:
                with torch.no_grad():
                    h_t = self._hidden(self.teacher, ids, pos)
            t1 = time.perf_counter()
            out: LossOutput = self.objective(
                h_s[mask], None if h_t is None else h_t[mask], batch.target_ids[lo:hi][mask],
                batch.target_roles[lo:hi][mask], normalizer)
            # keeps the graph connected to every student parameter even when this micro-batch has no loss tokens
            loss = out.loss + 0.0 * h_s.sum()
            t2 = time.perf_counter()
            # FSDP averages gradients over ranks (gloo has no pre-scaled sum), so scale by the world size to get the
            # global sum; the gathered lm_head averages likewise (gopd_fast.module).
            (loss * info.world_size if info.distributed else loss).backward()
            t3 = time.perf_counter()
            times["time_forward"] += t1 - t0
            times["time_loss"] += t2 - t1
            times["time_backward"] += t3 - t2
            for k in STAT_KEYS:
                sums[k] += out.sums[k]
        if cfg.model.shard_teacher:
            reshard(self.teacher)
        t0 = time.perf_counter()
        sums = all_reduce_sums(sums, info.device)
        metrics = LossOutput.metrics(sums)
        grad_norm = _clip_grad_norm(self.student, cfg.optim.grad_clip)
        finite = math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        times["time_optim"] = time.perf_counter() - t0
        metrics.update(times, grad_norm=grad_norm, lr=lr, skipped=0 if finite else 1,
                       skipped_steps=self.skipped_steps, tokens_scored=counts["tokens"])
        return metrics


def _clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------

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


def beta_at(cfg: Config, schedule: BetaSchedule, step: int) -> float:
    if cfg.run.algorithm == "opd":
        return 0.0
    if cfg.run.algorithm == "sft":
        return 1.0
    return schedule(step)


def make_env(cfg: Config) -> Any:
    from gopd_fast import envs

    return envs.make(cfg.env.name, seed=cfg.env.seed, max_turns=cfg.env.max_turns, **cfg.env.options)


def make_source(cfg: Config, env: Any, tokenizer: Any, info: DistInfo) -> EpisodeSource:
    if cfg.rollout.engine == "expert":
        return ExpertSource(env, tokenizer)
    return RolloutSource(cfg, lambda: make_env(cfg), tokenizer, info)


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


def _run(cfg: Config, info: DistInfo, source: EpisodeSource | None) -> RunResult:
    if cfg.rollout.episodes_per_step < info.world_size:
        raise ConfigError(f"rollout.episodes_per_step ({cfg.rollout.episodes_per_step}) must be >= the number of "
                          f"ranks ({info.world_size})")
    out_dir = Path(cfg.run.output_dir)
    _seed_everything(cfg.run.seed + info.rank)
    ensure_tiny_models(cfg, info)
    student, teacher, tokenizer = load_models(cfg, info)
    trainer = Trainer(cfg, info, student, teacher, pad_token_id=int(tokenizer.pad_token_id))
    env = make_env(cfg)
    schedule = BetaSchedule(cfg.curriculum, cfg.run.total_steps)
    cursor = TaskCursor(env.tasks(cfg.env.train_split), seed=cfg.run.seed)
    source = source or make_source(cfg, env, tokenizer, info)
    ckpt = CheckpointManager(out_dir / "checkpoints", info, keep=cfg.run.keep_checkpoints)

    start, resumed_from = 0, None
    if cfg.run.resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, student, trainer.optimizer)
        trainer.scheduler.load_state_dict(state["scheduler"])
        schedule.load_state_dict(state["curriculum"])
        cursor.load_state_dict(state["cursor"])
        trainer.skipped_steps = state["skipped_steps"]
        start, resumed_from = int(state["step"]), latest
        source.sync_weights(full_state_dict(student, cpu_offload=False))
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        import json

        (out_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    logger = MetricsLogger(out_dir, enabled=info.is_main, total_steps=cfg.run.total_steps, initial_step=start,
                           tensorboard=cfg.run.tensorboard, progress_bar=cfg.run.progress_bar)
    result = RunResult(output_dir=out_dir, steps_completed=start, skipped_steps=trainer.skipped_steps,
                       resumed_from=resumed_from)

    def trainer_state(step: int) -> dict[str, Any]:
        return {"scheduler": trainer.scheduler.state_dict(), "curriculum": schedule.state_dict(),
                "cursor": cursor.state_dict(), "skipped_steps": trainer.skipped_steps, "step": step,
                "config": config_to_dict(cfg)}

    try:
        for step in range(start, cfg.run.total_steps):
            t_step = time.perf_counter()
            beta = beta_at(cfg, schedule, step)
            tasks = cursor.take(cfg.rollout.episodes_per_step)     # the same global list on every rank
            mine = tasks[info.rank::info.world_size]
            t0 = time.perf_counter()
            episodes = source.collect(mine, beta=beta, temperature=cfg.rollout.temperature,
                                      seed=_rollout_seed(cfg, step, info))
            time_rollout = time.perf_counter() - t0
            metrics = trainer.step(episodes)
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
            hit = source.stats().get("cache_hit_rate")
            if hit is not None:
                record["prefix_cache_hit_rate"] = hit
            logger.log(record)
            result.history.append(record)
            result.steps_completed = step + 1
            done = step + 1 == cfg.run.total_steps
            if cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0 and not done:
                _maybe_eval(cfg, source, env, info, step + 1, logger, result)
            if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or done:
                result.checkpoint = ckpt.save(step + 1, student, trainer.optimizer, trainer_state(step + 1))
        if cfg.run.eval_at_end and cfg.run.total_steps > start:
            _maybe_eval(cfg, source, env, info, cfg.run.total_steps, logger, result)
        if cfg.run.export_hf:
            result.export_dir = out_dir / "student-hf"
            export_hf(student, tokenizer, result.export_dir, info)
    finally:
        logger.close()
        source.close()
    result.skipped_steps = trainer.skipped_steps
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
    """Console script ``gopd-fast``: config errors print one clear line and exit with status 2."""
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"gopd-fast: config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli()
