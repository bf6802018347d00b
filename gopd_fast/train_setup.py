"""Setting up a run: where episodes come from (expert demonstrations or guided rollouts), the environment, and
the student/teacher models loaded and sharded for training.

``gopd_fast.train`` (the loop) calls these once per run; ``gopd_fast.train_step`` holds the update itself.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from gopd_fast.config import Config, EnvConfig
from gopd_fast.distributed import DistInfo, apply_activation_checkpointing, barrier, shard_model
from gopd_fast.rollout.episode import Episode

__all__ = ["EpisodeSource", "ExpertSource", "RolloutSource", "compute_dtype", "ensure_tiny_models", "env_options",
           "expert_episode", "load_models", "make_env", "make_source"]


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
    from gopd_fast.rollout.expert import oracle_episodes

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
    student engine that receives every update and a frozen teacher engine. Each rank owns its engines and its
    env slots (an ``EnvPool`` when ``env.pool``, used by training and evaluation rollouts alike)."""

    def __init__(self, cfg: Config, tokenizer: Any, info: DistInfo) -> None:
        from gopd_fast.rollout.envs import env_slots
        from gopd_fast.rollout.history import ChatFormat

        self.cfg = cfg
        self.chat = ChatFormat(tokenizer)
        self.keeps_teacher_hidden = teacher_hidden_from_rollout(cfg, info)
        self.student = self._engine(cfg.model.student, info)
        self.teacher = self._teacher_engine(info)
        self.envs = env_slots(cfg.env.name, env_options(cfg), pool=cfg.env.pool, pool_workers=cfg.env.pool_workers,
                              step_timeout_s=cfg.env.step_timeout_s, threads=min(cfg.rollout.episodes_per_step, 8))
        self._metrics: dict[str, float] = {}
        self._env_counts: dict[str, float] = {}

    def _engine(self, path: str, info: DistInfo, keep_hidden: bool = False) -> Any:
        from gopd_fast.rollout.engines import VLLMEngine
        from gopd_fast.rollout.engines.hf_cached import load_hf_engine

        dtype = "bfloat16" if _dtypes(self.cfg, info.device)[1] is not None else "float32"
        if self.cfg.rollout.engine == "vllm":
            extra = {"gpu_memory_utilization": self.cfg.rollout.gpu_memory_utilization} \
                if info.device.type == "cuda" else {}
            return VLLMEngine(path, dtype=dtype, seed=self.cfg.run.seed + info.rank,
                              max_model_len=self.cfg.rollout.max_prompt_tokens + self.cfg.rollout.max_new_tokens,
                              **extra)
        return load_hf_engine(path, kv_reuse=self.cfg.rollout.kv_reuse, dtype=dtype, device=str(info.device),
                              keep_hidden=keep_hidden)

    def _teacher_engine(self, info: DistInfo) -> Any:
        """The teacher's generation engine: the shared server when ``rollout.teacher_server`` is set (every rank
        sends its guided turns there), else an in-process engine like the student's."""
        r = self.cfg.rollout
        if not r.teacher_server:
            return self._engine(self.cfg.model.teacher, info, keep_hidden=self.keeps_teacher_hidden)
        from gopd_fast.rollout.engines.remote import RemoteEngine, RemoteOptions

        engine = RemoteEngine(r.teacher_server, RemoteOptions(
            model=r.teacher_server_model, request_timeout_s=r.server_timeout_s,
            max_concurrency=r.server_max_concurrency, retry_deadline_s=r.server_retry_deadline_s))
        if engine.served_root not in (self.cfg.model.teacher, str(Path(self.cfg.model.teacher).resolve())):
            logging.getLogger("gopd_fast.train").warning(
                "the teacher server at %s serves %r but model.teacher is %r: guided turns and teacher scores "
                "come from different checkpoints unless they hold the same weights", engine.url,
                engine.served_root, self.cfg.model.teacher)
        return engine

    def collect(self, task_ids: Sequence[str], beta: float, temperature: float, seed: int) -> list[Episode]:
        from gopd_fast.rollout.envs import pool_counts
        from gopd_fast.rollout.rollout import RolloutOptions, run_rollout

        before = pool_counts(self.envs)
        r = self.cfg.rollout
        options = RolloutOptions(max_turns=self.cfg.env.max_turns, max_new_tokens=r.max_new_tokens,
                                 max_prompt_tokens=r.max_prompt_tokens, temperature=temperature,
                                 max_in_flight=max(len(task_ids), 1), seed=seed)
        result = run_rollout(list(task_ids), student=self.student, teacher=self.teacher, chat=self.chat,
                             envs=self.envs, beta=beta, options=options)
        self._metrics = result.metrics
        # This collect's env failures: pool restarts and replays, and episodes the rollout had to drop.
        after = pool_counts(self.envs)
        self._env_counts = {k: after[k] - before[k] for k in after}
        self._env_counts["env_episodes_dropped"] = result.metrics.get("episodes_dropped", 0.0)
        return result.episodes

    def teacher_hidden(self, episodes: Sequence[Episode]) -> list[torch.Tensor] | None:
        """The teacher's final hidden states of each episode from its rollout engine ([tokens, hidden] each; it
        prefills only what it never ran), or None when this source does not keep them
        (``teacher_hidden_from_rollout``)."""
        if not self.keeps_teacher_hidden:
            return None
        return self.teacher.final_hidden([list(ep.token_ids) for ep in episodes])

    def check_teacher(self, teacher: nn.Module) -> None:
        """Raise unless the teacher engine holds ``teacher``'s weights (the trainer's teacher), when its hidden
        states replace that teacher's forward: both are loaded from ``model.teacher``, and this makes sure."""
        if not self.keeps_teacher_hidden:
            return
        mine, theirs = self.teacher.model.state_dict(), teacher.state_dict()
        differ = sorted(k for k in theirs if k not in mine or mine[k].shape != theirs[k].shape
                        or not torch.equal(mine[k], theirs[k]))
        if differ:
            raise ValueError(f"rollout.reuse_teacher_hidden: the teacher engine's weights differ from the trainer's "
                             f"teacher ({self.cfg.model.teacher}) in {', '.join(differ[:5])}; the loss would score "
                             "another model (set rollout.reuse_teacher_hidden=false)")

    def sync_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.student.sync_weights(state_dict)

    def stats(self) -> dict[str, float]:
        m = self._metrics
        out = dict(self._env_counts)
        keys = {"cache_hit_rate": "prefix_cache_hit_rate", "generation_failures": "generation_failures"}
        out.update({name: m[key] for name, key in keys.items() if key in m})
        return out

    def close(self) -> None:
        self.envs.close()
        self.student.close()
        self.teacher.close()


def _env_section(cfg: Config | EnvConfig) -> EnvConfig:
    return cfg.env if isinstance(cfg, Config) else cfg


def env_options(cfg: Config | EnvConfig) -> dict[str, Any]:
    """Keyword options of ``envs.make(cfg.env.name, ...)``: the same for the in-process env and pool workers.
    ``cfg``: a whole trainer config or its ``[env]`` section (what the demo builds)."""
    env = _env_section(cfg)
    return {"seed": env.seed, "max_turns": env.max_turns, **env.options}


def make_env(cfg: Config | EnvConfig) -> Any:
    """The environment of ``cfg`` (a trainer config or its ``[env]`` section): the one place runs build an env."""
    from gopd_fast import envs

    return envs.make(_env_section(cfg).name, **env_options(cfg))


def make_source(cfg: Config, env: Any, tokenizer: Any, info: DistInfo) -> EpisodeSource:
    if cfg.rollout.engine == "expert":
        return ExpertSource(env, tokenizer)
    return RolloutSource(cfg, tokenizer, info)



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
        from gopd_fast.rollout.expert import oracle_text

        env = make_env(cfg)
        try:
            corpus = oracle_text(env, env.tasks(cfg.env.train_split)[:64])
        finally:
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


def teacher_hidden_from_rollout(cfg: Config, info: DistInfo) -> bool:
    """Whether the trainer takes the teacher's final hidden states from the teacher's rollout engine
    (``rollout.reuse_teacher_hidden``) instead of running the teacher forward over each episode again: where the
    engine is the in-process KV-cached one and its states are what that forward computes, i.e. one process on
    CPU in float32 (the same condition as the trainer's lean teacher forward). Rollout and trainer both ask here."""
    r = cfg.rollout
    return (r.reuse_teacher_hidden and r.engine == "hf" and r.kv_reuse and not r.teacher_server
            and not info.distributed and info.device.type == "cpu" and compute_dtype(cfg, info.device) is None)


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The student's mixed-precision compute dtype (the dtype of the hidden states the loss sees); None: fp32."""
    return _dtypes(cfg, device)[1]


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


