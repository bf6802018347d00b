"""Supervised fine-tuning on finished episodes: next-token cross-entropy on the generated tokens only.

The demo uses it twice, before any distillation: to train the teacher on oracle episodes and to give the student
its weak base (a brief SFT on a few expert episodes, the stand-in for a pretrained model); the episodes come from
the library's ``gopd_fast.rollout.expert.oracle_episodes``. Episodes are the rollout contract
(``gopd_fast.rollout.Episode``): token-exact histories whose ``roles`` say which tokens were generated. Prompt and
observation tokens (``Role.CONTEXT``) carry no loss.

The SFT *distillation baseline* (train on teacher-generated rollouts) is the trainer's job (``gopd_fast.train``);
this module is the small in-process loop for data that is already on disk or in memory.
"""
from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gopd_fast.lr_schedule import lr_factor
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.typed_config import SEED_RANGE, Section, spec


@dataclass(frozen=True)
class SFTConfig(Section, section="SFTConfig"):
    steps: int = spec(200, ge=1, le=10 ** 9)
    batch_size: int = spec(16, ge=1, le=10 ** 6)     # episodes per optimizer step
    lr: float = spec(3e-3, gt=0, le=10)
    min_lr_ratio: float = spec(0.1, ge=0, le=1)      # cosine decay to lr * min_lr_ratio
    warmup_steps: int = spec(10, ge=0, le=10 ** 9)
    weight_decay: float = spec(0.0, ge=0, le=1)
    grad_clip: float = spec(1.0, gt=0)
    seed: int = spec(0, **SEED_RANGE)


def _lr_at(step: int, cfg: SFTConfig) -> float:
    return cfg.lr * lr_factor(step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule="cosine",
                              min_lr_ratio=cfg.min_lr_ratio)


def collate(
    episodes: Sequence[Episode], pad_id: int, train_roles: tuple[int, ...] = (Role.STUDENT, Role.TEACHER)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding, context and tokens whose
    role is not in ``train_roles``)."""
    if not episodes:
        raise ValueError("collate needs at least one episode")
    width = max(len(e.token_ids) for e in episodes)
    ids = torch.full((len(episodes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(episodes), width), dtype=torch.long)
    labels = torch.full((len(episodes), width), -100, dtype=torch.long)
    for row, ep in enumerate(episodes):
        n = len(ep.token_ids)
        t = torch.tensor(ep.token_ids, dtype=torch.long)
        ids[row, :n] = t
        mask[row, :n] = 1
        gen = torch.tensor([r in train_roles for r in ep.roles], dtype=torch.bool)
        labels[row, :n] = torch.where(gen, t, torch.full_like(t, -100))
    return ids, mask, labels


def sft_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (label at position i is predicted at i-1)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def train_sft(
    model: torch.nn.Module,
    episodes: Sequence[Episode],
    cfg: SFTConfig,
    *,
    pad_id: int,
    train_roles: tuple[int, ...] = (Role.STUDENT, Role.TEACHER),
    log: Callable[[dict], None] | None = None,
    log_every: int = 20,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> list[float]:
    """Train ``model`` in place on ``episodes``; returns the loss of every step.

    Batches are drawn without replacement (reshuffled each pass) from length-sorted buckets so padding stays
    small. Raises ValueError when no episode has a generated token (nothing to learn from).

    ``checkpoint``: a file that holds the model, optimizer, step, batch order and RNG states, written atomically
    every ``checkpoint_every`` steps (> 0). When the file exists, training resumes from it and continues the same
    batch sequence, so an interrupted run ends with the same weights as an uninterrupted one.
    """
    if checkpoint_every < 0 or (checkpoint_every > 0 and checkpoint is None):
        raise ValueError(f"checkpoint_every must be >= 0 and needs a checkpoint path, got {checkpoint_every!r} "
                         f"with checkpoint={checkpoint!r}")
    usable = [e for e in episodes if any(r in train_roles for r in e.roles)]
    if not usable:
        raise ValueError(f"train_sft: no episode has a token with a role in {train_roles}")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    model.train()
    order: list[int] = []
    losses: list[float] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start, order, losses = state["step"], state["order"], state["losses"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if log is not None:
            log({"sft_resumed_at": start, "checkpoint": str(checkpoint)})
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        if len(order) < cfg.batch_size:
            perm = list(range(len(usable)))
            rng.shuffle(perm)
            # Sort chunks of ~8 batches by length: random batches, little padding.
            chunk = cfg.batch_size * 8
            perm = [i for k in range(0, len(perm), chunk)
                    for i in sorted(perm[k:k + chunk], key=lambda j: len(usable[j].token_ids))]
            order.extend(perm)
        batch = [usable[order.pop()] for _ in range(min(cfg.batch_size, len(order)))]
        ids, mask, labels = collate(batch, pad_id, train_roles)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        loss = sft_loss(model, ids, mask, labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_sft: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == cfg.steps - 1):
            log({"sft_step": step, "loss": losses[-1], "lr": _lr_at(step, cfg),
                 "elapsed_s": round(time.perf_counter() - t0, 2)})
        if checkpoint_every and ((step + 1) % checkpoint_every == 0 or step + 1 == cfg.steps):
            _save_checkpoint(Path(checkpoint), model, opt, step + 1, order, losses, rng)
    model.eval()
    return losses


def _save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, order: list[int],
                     losses: list[float], rng: random.Random) -> None:
    """Write-then-rename, so a crash mid-save leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": step, "order": list(order),
                "losses": list(losses), "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)
