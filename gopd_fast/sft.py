"""Supervised fine-tuning on finished episodes: next-token cross-entropy on the generated tokens only.

The demo uses it twice, before any distillation: to train the teacher on oracle episodes and to give the student
its weak base (a brief SFT on a few expert episodes, the stand-in for a pretrained model). Episodes are the
rollout contract (``gopd_fast.rollout.Episode``): token-exact histories whose ``roles`` say which tokens were
generated. Prompt and observation tokens (``Role.CONTEXT``) carry no loss.

The SFT *distillation baseline* (train on teacher-generated rollouts) is the trainer's job (``gopd_fast.train``);
this module is the small in-process loop for data that is already on disk or in memory.
"""
from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from gopd_fast.envs.base import TextEnv
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.rollout.history import ChatFormat, History

# How an action is written as an assistant turn: the ReAct "Action:" line that the rollout's default
# ActionParser (gopd_fast.rollout.guidance.DEFAULT_ACTION_PATTERN) reads back.
ACTION_FORMAT = "Action: {action}"


@dataclass(frozen=True)
class SFTConfig:
    steps: int = 200
    batch_size: int = 16               # episodes per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1          # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SFTConfig.{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"SFTConfig.lr must be a positive finite float, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"SFTConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.warmup_steps < 0 or self.grad_clip <= 0:
            raise ValueError("SFTConfig.warmup_steps must be >= 0 and grad_clip > 0")


def _lr_at(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def oracle_episodes(
    env: TextEnv,
    tasks: Sequence[str],
    chat: ChatFormat,
    *,
    noise: float = 0.0,
    seed: int = 0,
    action_format: str = ACTION_FORMAT,
    eos_token_id: int | None = None,
) -> list[Episode]:
    """Roll the environment's oracle over ``tasks`` and render each episode token-exactly through ``chat``.

    Each expert turn is the tokens of ``action_format`` + the tokenizer's eos (how a model ends its turn), appended
    with the same ``History`` the rollout uses, so training data and rollouts share one token layout.

    ``noise``: probability that a turn takes a random admissible non-expert action instead (DAgger-style data:
    the later expert turns then label the *recovery* from an off-path state). Noise turns are recorded with
    ``Role.STUDENT`` so ``train_sft(..., train_roles=(Role.TEACHER,))`` never imitates them. ``noise=0`` gives
    pure expert-path demonstrations (a teacher that has never seen a mistake). ``eos_token_id`` ends each turn
    (default: the tokenizer's eos).
    """
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"noise must be in [0, 1), got {noise!r}")
    if env.expert_action.__func__ is TextEnv.expert_action:  # type: ignore[attr-defined]
        raise ValueError(f"environment {env.name!r} has no oracle (expert_action)")
    rng = random.Random(seed)

    def choose(expert: str | None, admissible: Sequence[str]) -> tuple[str, int] | None:
        if expert is None:
            return None
        if noise > 0 and admissible and rng.random() < noise:
            others = [a for a in admissible if a != expert and a not in ("look", "inventory")]
            if others:
                return rng.choice(others), Role.STUDENT
        return expert, Role.TEACHER

    return [_play(env, task_id, chat, choose, action_format, eos_token_id, {"source": "oracle", "noise": noise},
                  uses_expert=True) for task_id in tasks]


def random_episodes(
    env: TextEnv,
    tasks: Sequence[str],
    chat: ChatFormat,
    *,
    seed: int = 0,
    action_format: str = ACTION_FORMAT,
    eos_token_id: int | None = None,
) -> list[Episode]:
    """Episodes of a uniformly random admissible action every turn (until the env's turn limit or success).

    Data that teaches the action format and the env's text but no policy better than chance: a student base
    SFT-ed on it has learned nothing from a source better than any teacher. Turns are ``Role.STUDENT``.
    """
    rng = random.Random(seed)

    def choose(expert: str | None, admissible: Sequence[str]) -> tuple[str, int] | None:
        if not admissible:
            raise ValueError(f"environment {env.name!r} gave no admissible actions: random_episodes needs them")
        return rng.choice(list(admissible)), Role.STUDENT

    return [_play(env, task_id, chat, choose, action_format, eos_token_id, {"source": "random"},
                  uses_expert=False) for task_id in tasks]


def _play(env: TextEnv, task_id: str, chat: ChatFormat,
          choose: Callable[[str | None, Sequence[str]], tuple[str, int] | None], action_format: str,
          eos_token_id: int | None, info: dict, *, uses_expert: bool) -> Episode:
    """One episode in which ``choose(expert_action, admissible)`` picks each turn's (action, role); None ends it.
    ``uses_expert=False`` skips the oracle query (passes None). Rendered token-exactly with the rollout's
    ``History``."""
    tok = chat.tokenizer
    eos = [int(tok.eos_token_id if eos_token_id is None else eos_token_id)]
    first = env.reset(task_id)
    history = History(chat.initial_prompt(first.prompt))
    actions: list[str] = []
    admissible = first.admissible_actions
    score, success = 0.0, False
    while True:
        picked = choose(env.expert_action() if uses_expert else None, admissible)
        if picked is None:
            break
        action, role = picked
        response = list(tok(action_format.format(action=action), add_special_tokens=False)["input_ids"]) + eos
        history.add_response(response, [0.0] * len(response), role)
        actions.append(action)
        step = env.step(action)
        score, success, admissible = step.score, step.success, step.admissible_actions
        if step.done:
            break
        history.add_observation(chat.piece_after(response, step.observation))
    return Episode(
        task_id=task_id, token_ids=history.token_ids, roles=history.roles, logprobs=history.logprobs,
        turn_spans=history.turn_spans, turn_roles=history.turn_roles, actions=actions, score=score,
        success=success, rounds=len(actions), beta=1.0, info=dict(info),
    )


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
