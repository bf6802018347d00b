"""The study's teacher and student bases (built once; the teacher is committed under gopd_fast/assets/)."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from gopd_fast.demo.config import ASSETS_DIR
from gopd_fast.demo.run import _new_model, chat_format
from gopd_fast.demo.study.config import StudyConfig
from gopd_fast.train_setup import make_env

TEACHER_COMMAND = "python -m gopd_fast.demo.study --config {config} --build-teacher"


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_teacher(cfg: StudyConfig, work_dir: Path, log=print, config: str = "configs/study.toml") -> dict[str, Any]:
    """``teacher.init_from`` trained ``teacher.steps`` more SFT steps on (noisy) oracle episodes of the train tasks
    in ``teacher.task_range``; resumes from ``work_dir/teacher-sft.pt``; saved to gopd_fast/assets/<asset>.
    ``config``: the study config's path, as the rebuild command recorded with the asset names it."""
    import torch

    from gopd_fast.demo.sft import SFTConfig, train_sft
    from gopd_fast.models import load_model, save_model
    from gopd_fast.rollout.episode import Role
    from gopd_fast.rollout.expert import oracle_episodes

    t = cfg.teacher
    t0 = time.perf_counter()
    load_before = _load_avg()
    model, tokenizer = load_model(ASSETS_DIR / t.init_from)
    env = make_env(cfg.env_config())
    try:
        tasks = env.tasks("train")[t.task_range[0]:t.task_range[1]]
        if len(tasks) < t.task_range[1] - t.task_range[0]:
            raise ValueError(f"teacher.task_range {t.task_range} exceeds the train split ({len(env.tasks('train'))} "
                             f"tasks): raise env_options.num_train")
        episodes = oracle_episodes(env, tasks, chat_format(tokenizer), noise=t.noise, seed=t.seed)
    finally:
        env.close()
    log(f"[study] teacher: {len(episodes)} oracle episodes in {time.perf_counter() - t0:.0f} s; "
        f"{t.steps} SFT steps from {t.init_from}")
    losses = train_sft(model, episodes, SFTConfig(steps=t.steps, batch_size=t.batch_size, lr=t.lr,
                                                  warmup_steps=t.warmup_steps, seed=t.seed),
                       pad_id=int(tokenizer.pad_token_id), train_roles=(Role.TEACHER,),
                       log=lambda d: log(f"[study] teacher {json.dumps(d)}"), log_every=10,
                       checkpoint=work_dir / "teacher-sft.pt", checkpoint_every=t.checkpoint_every)
    model.to(torch.float32)
    out = ASSETS_DIR / t.asset
    save_model(model, tokenizer, out)
    info = {"teacher": dataclasses.asdict(t), "env": cfg.env, "env_options": cfg.env_options,
            "max_turns": cfg.max_turns, "final_loss": losses[-1],
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds_this_process": round(time.perf_counter() - t0, 1),
            "load_avg_before": load_before, "load_avg_after": _load_avg(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "command": TEACHER_COMMAND.format(config=config)}
    (out / "study_teacher.json").write_text(json.dumps(info, indent=2))
    return info


def build_student_base(cfg: StudyConfig, size: str, tokenizer: Any, out_dir: Path, log=print) -> dict[str, Any]:
    """The ``sizes.<size>`` student base (``BaseSpec``): the teacher's first layers, or a fresh Qwen3 SFT-ed on
    random-action or teacher episodes. None is taught by a source better than the teacher."""
    from gopd_fast.demo.run import truncated_base
    from gopd_fast.models import save_model

    b = cfg.sizes[size]
    t0 = time.perf_counter()
    info: dict[str, Any] = {"size": size, "spec": dataclasses.asdict(b)}
    if b.source == "truncated":
        info.update(truncated_base(ASSETS_DIR / cfg.teacher.asset, b.num_hidden_layers, out_dir,
                                   f"sizes.{size}.num_hidden_layers"))
    else:
        from gopd_fast.demo.sft import SFTConfig, train_sft

        episodes = base_episodes(cfg, size, tokenizer)
        model = _new_model(b.size, b.num_hidden_layers, tokenizer, b.seed)
        losses = train_sft(model, episodes, SFTConfig(steps=b.steps, batch_size=b.batch_size, lr=b.lr, seed=b.seed,
                                                      min_lr_ratio=b.min_lr_ratio),
                           pad_id=int(tokenizer.pad_token_id),
                           log=lambda d: log(f"[study] base {size} {json.dumps(d)}"), log_every=20)
        save_model(model, tokenizer, out_dir)
        info.update(episodes=len(episodes), episode_score=sum(e.score for e in episodes) / len(episodes),
                    final_loss=losses[-1], params=sum(p.numel() for p in model.parameters()))
    info.update(seconds=round(time.perf_counter() - t0, 1),
                load_avg_after=_load_avg(), date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    (out_dir / "student_base.json").write_text(json.dumps(info, indent=2))
    return info


def base_episodes(cfg: StudyConfig, size: str, tokenizer: Any) -> list:
    """The SFT data of the ``size`` base: one episode per train task of ``task_range``, written by its ``source``."""
    from gopd_fast.demo.run import DemoEnvs, rollout
    from gopd_fast.rollout.expert import random_episodes

    b = cfg.sizes[size]
    env = make_env(cfg.env_config(size))
    try:
        tasks = env.tasks("train")[b.task_range[0]:b.task_range[1]]
        if len(tasks) < b.task_range[1] - b.task_range[0]:
            raise ValueError(f"sizes.{size}.task_range {b.task_range} exceeds the train split "
                             f"({len(env.tasks('train'))} tasks): raise env_options.num_train")
        if b.source == "random":
            return random_episodes(env, tasks, chat_format(tokenizer), seed=b.seed)
    finally:
        env.close()
    demo = cfg.demo_config(size)
    envs = DemoEnvs(demo)
    try:   # the teacher alone (student engine slot), sampled at the base's temperature
        return rollout(demo, ASSETS_DIR / cfg.teacher.asset, tasks, seed=b.seed, temperature=b.temperature,
                       envs=envs)
    finally:
        envs.close()
