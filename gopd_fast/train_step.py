"""One optimizer step on given episodes: ``Trainer`` holds the student, the teacher, the objective, the optimizer
and the LR schedule; ``Trainer.step(episodes)`` packs, scores, backpropagates and updates.

    rows = whole episodes packed into rows     (one forward per model per episode, never one per turn)
    h_s = student.model(rows), h_t = teacher.model(rows)            (final hidden states; no [T, V] logits;
                                                                     the teacher through Qwen3Decoder.encode
                                                                     where it applies: see _lean_teacher, or
                                                                     h_t given: its rollout engine's states)
    loss = sum over loss tokens of the role's term / (loss tokens in the GLOBAL batch)
    backward, clip, AdamW, LR schedule;  a non-finite loss or grad norm skips the update (counted)

The objective gets each packed micro-batch whole and owns the token filter, the teacher decision and the head
gathering (``gopd_fast.objectives``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from gopd_fast import packed_attention
from gopd_fast.config import Config, OptimConfig
from gopd_fast.distributed import DistInfo, all_reduce_max, all_reduce_sums, reshard
from gopd_fast.lr_schedule import lr_factor
from gopd_fast.objectives import STAT_KEYS, DistillationObjective, LossOutput
from gopd_fast.packing import PackedBatch, pack_episodes, pack_token_states
from gopd_fast.rollout.engines.decoder import Qwen3Decoder
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.train_setup import compute_dtype, teacher_hidden_from_rollout

__all__ = ["Trainer", "lr_lambda"]


def lr_lambda(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The ``LambdaLR`` factor of ``optim.lr_schedule`` (``gopd_fast.lr_schedule.lr_factor``)."""
    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=cfg.warmup_steps, schedule=cfg.lr_schedule,
                         min_lr_ratio=cfg.min_lr_ratio)
    return factor


class Trainer:
    """Student, teacher, objective, optimizer and schedule; ``step(episodes)`` is one update."""

    def __init__(self, cfg: Config, info: DistInfo, student: nn.Module, teacher: nn.Module, pad_token_id: int):
        self.cfg = cfg
        self.info = info
        self.student = student
        self.teacher = teacher
        self.pad_token_id = pad_token_id
        self.compute_dtype = compute_dtype(cfg, info.device)
        # The heads go in as they are: the objective gathers FSDP2 shards once per micro-batch (gradient averaged
        # over ranks like FSDP2's own) and casts them to the compute dtype of the hidden states.
        self.objective = DistillationObjective(cfg.objective, student.lm_head, teacher.lm_head,
                                               algorithm=cfg.run.algorithm)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            [p for p in student.parameters() if p.requires_grad], lr=o.lr, betas=o.betas, eps=o.eps,
            weight_decay=o.weight_decay, foreach=info.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, cfg.run.total_steps))
        self.skipped_steps = 0
        self.teacher_encoder = _lean_teacher(teacher, info, self.compute_dtype)

    @property
    def needs_teacher(self) -> bool:
        """Whether the teacher runs forward (decided by the objective from the configuration)."""
        return self.objective.needs_teacher

    def _hidden(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # attention_mask=None + reset position_ids = per-episode isolation (see gopd_fast.packing).
        # FSDP2's mixed-precision policy casts to bf16 when sharded; a single GPU process autocasts instead.
        autocast = self.compute_dtype is not None and not self.info.distributed
        with torch.autocast(self.info.device.type, dtype=self.compute_dtype) if autocast else nullcontext():
            hidden = model.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        # the fused loss wants hidden states and head weights in one dtype (RMSNorm may promote to fp32)
        return hidden if self.compute_dtype is None else hidden.to(self.compute_dtype)

    @property
    def takes_teacher_hidden(self) -> bool:
        """Whether ``step`` accepts the teacher's hidden states from its rollout (``teacher_hidden``): one CPU
        process in float32, where the teacher forward they replace is ``Qwen3Decoder``'s exact math."""
        return self.needs_teacher and teacher_hidden_from_rollout(self.cfg, self.info)

    def step(self, episodes: Sequence[Episode], teacher_hidden: Sequence[torch.Tensor] | None = None
             ) -> dict[str, float]:
        """Pack this rank's ``episodes``, compute the loss, update. Every rank must call it (collectives).
        ``teacher_hidden``: the teacher's final hidden states of each episode ([tokens, hidden], e.g.
        ``RolloutSource.teacher_hidden``) instead of the teacher forward; only where ``takes_teacher_hidden``."""
        info, cfg = self.info, self.cfg
        if not episodes:
            raise ValueError(f"rank {info.rank} has no episodes this step (every rollout of its share was dropped "
                             "after env failures, or rollout.episodes_per_step < world_size)")
        batch = pack_episodes(episodes, cfg.packing.max_tokens_per_row, self.pad_token_id).to(info.device)
        packed_teacher = None
        if teacher_hidden is not None:
            if not self.takes_teacher_hidden:
                raise ValueError("teacher_hidden: given, but this trainer runs its teacher forward (it takes the "
                                 "rollout's hidden states only with rollout.reuse_teacher_hidden, one CPU process in "
                                 "float32, and an objective that needs the teacher)")
            packed_teacher = pack_token_states(batch, teacher_hidden)
            width = self.teacher.config.hidden_size
            if packed_teacher.shape[-1] != width or packed_teacher.dtype != torch.float32:
                raise ValueError(f"teacher_hidden: expected float32 [tokens, {width}] per episode (the teacher's "
                                 f"hidden size), got {packed_teacher.dtype} [.., {packed_teacher.shape[-1]}]")
        rows = batch.input_ids.shape[0]
        per_micro = cfg.packing.rows_per_micro_batch or rows
        counts = all_reduce_sums({"loss_tokens": batch.num_loss_tokens, "tokens": batch.num_tokens}, info.device)
        # every rank must run the same number of forward/backward passes under FSDP
        n_micro = int(all_reduce_max(float(math.ceil(rows / per_micro)), info.device))
        normalizer = max(counts["loss_tokens"], 1.0)
        sums = dict.fromkeys(STAT_KEYS, 0.0)
        times = {"time_forward": 0.0, "time_loss": 0.0, "time_backward": 0.0}
        self.optimizer.zero_grad(set_to_none=True)
        for m in range(n_micro):
            if info.distributed and hasattr(self.student, "set_requires_gradient_sync"):
                self.student.set_requires_gradient_sync(m == n_micro - 1)
            out = self._micro_step(batch, m * per_micro, min((m + 1) * per_micro, rows), normalizer, times,
                                   packed_teacher)
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

    def _micro_step(self, batch: PackedBatch, lo: int, hi: int, normalizer: float,
                    times: dict[str, float], packed_teacher: torch.Tensor | None = None) -> LossOutput:
        """Forward, loss and backward of rows [lo, hi) (gradients accumulate); adds its timings to ``times``.
        ``packed_teacher``: the teacher's hidden states of the whole batch [R, L, hidden], if given."""
        roles = batch.target_roles[lo:hi]
        if lo >= hi:   # this rank ran out of rows: one padding row with no loss tokens (keeps FSDP in step)
            lo, hi = 0, 1
            roles = torch.full_like(batch.target_roles[lo:hi], int(Role.CONTEXT))
        ids, pos = batch.input_ids[lo:hi], batch.position_ids[lo:hi]
        t0 = time.perf_counter()
        h_s = self._hidden(self.student, ids, pos)
        h_t = None
        if self.needs_teacher and packed_teacher is not None:
            h_t = packed_teacher[lo:hi]
        elif self.needs_teacher:
            with torch.no_grad():
                h_t = self.teacher_encoder.encode(ids, pos) if self.teacher_encoder is not None \
                    else self._hidden(self.teacher, ids, pos)
        t1 = time.perf_counter()
        # The packed rows go in whole: the objective drops the positions without loss (once) and returns a loss
        # connected to every student parameter even when these rows have no loss token.
        out = self.objective(h_s, h_t, batch.target_ids[lo:hi], roles, normalizer)
        t2 = time.perf_counter()
        # FSDP averages gradients over ranks (gloo has no pre-scaled sum), so scale by the world size to get the
        # global sum; the gathered lm_head averages likewise (gopd_fast.module).
        (out.loss * self.info.world_size if self.info.distributed else out.loss).backward()
        t3 = time.perf_counter()
        times["time_forward"] += t1 - t0
        times["time_loss"] += t2 - t1
        times["time_backward"] += t3 - t2
        return out


def _lean_teacher(teacher: nn.Module, info: DistInfo, compute_dtype: torch.dtype | None) -> Qwen3Decoder | None:
    """The frozen teacher's "packed_sdpa" forward without the module stack (``Qwen3Decoder.encode``: folded
    projections, one fused causal attention call per episode, the same math), where it applies: a teacher loaded
    with attn_implementation "packed_sdpa", one process on CPU in float32, a plain Qwen3. On the demo's
    8-episode step it took 0.64-0.67 s where the module forward took 0.89-0.93 s (bench/RESULTS.md,
    trainer-step). Its weights are copies taken here: the teacher is never updated."""
    if info.distributed or info.device.type != "cpu" or compute_dtype is not None \
            or getattr(teacher.config, "_attn_implementation", None) != packed_attention.NAME:
        return None
    try:
        return Qwen3Decoder(teacher, numpy_decode=False)
    except ValueError:      # not a plain Qwen3: the module forward
        return None


def _clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
