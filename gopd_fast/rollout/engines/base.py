"""One interface for every generation backend (vLLM, transformers).

An engine turns token-id prompts into sampled continuations with the log-prob of every sampled token, can take
new weights from the trainer in place (``sync_weights``) and keeps counters the rollout reports (prompt tokens,
prompt tokens served from the prefix cache, generated tokens, time).

Log-probs are the model's *raw* distribution at the sampled position (``log_softmax(logits)``, before temperature
or top-p), which is what vLLM returns by default (``logprobs_mode="raw_logprobs"``). At temperature 1 with no
top-p/top-k this is exactly the sampling distribution.
"""
from __future__ import annotations

import abc
import math
import operator
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from typing_extensions import Self

WeightsLike = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | str | os.PathLike


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling of one batch. ``temperature=0`` is greedy. ``seed`` makes sampling reproducible per call."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                          # 0 = off
    stop_token_ids: tuple[int, ...] = ()     # extra stop ids beside the model's eos
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {self.top_k!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")


@dataclass
class Generation:
    token_ids: list[int]          # sampled tokens, including the stop token when it ended the turn
    logprobs: list[float]         # log-prob of each sampled token under the engine's model (raw distribution)
    finish_reason: str            # "stop" (eos / stop token) or "length" (max_tokens)
    num_cached_tokens: int = 0    # prompt tokens served from the prefix cache


@dataclass
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    weight_syncs: int = 0
    sync_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def cache_hit_rate(self) -> float:
        """Fraction of prompt tokens served from the prefix cache."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.generate_seconds if self.generate_seconds else 0.0

    def as_dict(self) -> dict:
        return {
            "requests": self.requests, "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens, "cache_hit_rate": self.cache_hit_rate,
            "generated_tokens": self.generated_tokens, "generate_seconds": self.generate_seconds,
            "tokens_per_second": self.tokens_per_second, "weight_syncs": self.weight_syncs,
            "sync_seconds": self.sync_seconds, **self.extra,
        }


def check_prompts(prompts: object, vocab_size: int | None = None, name: str = "prompts") -> list[list[int]]:
    """Validate ``list[list[int]]`` token sequences (non-empty, integer ids in range) and return them as lists of
    ints; ``name`` is the argument the errors name."""
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"{name} must be a list of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or not hasattr(p, "__len__") or len(p) == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty list of token ids")
        # integers only (int, numpy or 0-d torch integers): int() would turn 2.7 into the valid id 2
        ids = list(p) if all(type(t) is int for t in p) else [_token_id(t, name, i) for t in p]
        if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
            raise ValueError(f"{name}[{i}] has token ids outside [0, {vocab_size})")
        out.append(ids)
    return out


def _token_id(t: object, name: str, i: int) -> int:
    if not isinstance(t, bool):
        try:
            return operator.index(t)
        except TypeError:
            pass
    raise TypeError(f"{name}[{i}] must hold integer token ids, got {t!r} ({type(t).__name__})")


def iter_weights(weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]):
    """(name, detached CPU-or-device tensor) pairs from a state dict or an iterable of pairs."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    for name, tensor in items:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError("weights must map parameter names (str) to tensors")
        yield name, tensor.detach()


class GenerationEngine(abc.ABC):
    """Backend interface. Implementations: ``VLLMEngine`` (engines/vllm.py), ``HFEngine`` (engines/hf.py)."""

    def __init__(self) -> None:
        self._stats = EngineStats()

    @abc.abstractmethod
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        """One continuation per prompt, in order."""

    @abc.abstractmethod
    def sync_weights(self, weights: WeightsLike) -> float:
        """Load new weights in place (a state dict, an iterable of (name, tensor), or a directory of
        safetensors); invalidates the prefix cache. Returns the seconds it took."""

    def reset_prefix_cache(self) -> None:
        """Drop cached KV so nothing computed with old weights is reused. No-op for cacheless engines."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + response the engine accepts."""

    def stats(self) -> EngineStats:
        return self._stats

    def reset_stats(self) -> None:
        self._stats = EngineStats()

    def close(self) -> None:
        """Release the engine's resources. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
