"""A generation engine reached over HTTP: a vLLM OpenAI-compatible server shared by every training rank.

The paper's teacher (Qwen3-30B-A3B, ~61 GB in bf16) does not fit beside training on an 80 GB GPU, so it runs as
its own server on its own GPUs (``vllm serve MODEL --tensor-parallel-size K --enable-prefix-caching
--enable-prompt-tokens-details``) and writes the guided turns of every rank. Token ids go in and come out
(``prompt`` as a list of ids, ``return_token_ids``), so histories stay token-exact and no text is re-tokenized;
multi-turn histories are append-only, so the server's prefix cache serves every earlier turn.

Reliability: requests of one batch go out concurrently (at most ``max_concurrency`` in flight); a connection
error, a timeout, HTTP 429 or a 5xx is retried with exponential backoff until ``retry_deadline_s`` has passed
since the request's first attempt. A request that still fails raises ``GenerationFailed`` carrying the
generations that did succeed, so the rollout can re-queue just the failed episodes (never train on half a turn).
The frozen teacher only generates: ``sync_weights`` is refused (the trainer scores with its own sharded copy).
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gopd_fast.rollout.engines.base import (
    Generation,
    GenerationEngine,
    SamplingConfig,
    WeightsLike,
    check_prompts,
)

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class GenerationFailed(RuntimeError):
    """Some prompts of a batch got no answer after every retry.

    ``generations[i]`` is None exactly for ``i in failed``; the other entries are valid generations.
    """

    def __init__(self, message: str, generations: list[Generation | None], failed: Sequence[int]) -> None:
        super().__init__(message)
        self.generations = generations
        self.failed = tuple(failed)


class ServerUnreachable(ConnectionError):
    """The server did not answer at start-up (the message names the URL)."""


@dataclass(frozen=True)
class RemoteOptions:
    """How to talk to the server. Times are seconds."""

    model: str = ""                    # served model name; "" = the server's only model
    request_timeout_s: float = 600.0   # one HTTP request (a whole generation)
    connect_timeout_s: float = 10.0
    max_concurrency: int = 64          # requests in flight per engine
    retry_deadline_s: float = 120.0    # keep retrying a request until this long after its first attempt
    backoff_s: float = 0.5             # first backoff; doubles up to max_backoff_s
    max_backoff_s: float = 8.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a str (served model name), got {type(self.model).__name__}")
        for name in ("request_timeout_s", "connect_timeout_s", "backoff_s", "max_backoff_s"):
            _check_positive(name, getattr(self, name))
        _check_positive("retry_deadline_s", self.retry_deadline_s, allow_zero=True)
        if isinstance(self.max_concurrency, bool) or not isinstance(self.max_concurrency, int) \
                or self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be an int >= 1, got {self.max_concurrency!r}")


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_server_url(url: object) -> str:
    """``http(s)://host:port`` without a trailing slash or path (the engine appends /v1/...)."""
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"server url must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/").removesuffix("/v1")


class RemoteEngine(GenerationEngine):
    """Token-in, token-out generation on a vLLM OpenAI-compatible server.

    Args:
        url: the server's base URL, e.g. ``http://10.0.0.5:8000``.
        options: model name, timeouts, concurrency, retry policy (``RemoteOptions``).

    Raises ``ServerUnreachable`` naming the URL if the server does not answer ``GET /v1/models`` at start, and
    ``ValueError`` if it does not serve the requested model.
    """

    def __init__(self, url: str, options: RemoteOptions = RemoteOptions()) -> None:
        super().__init__()
        import httpx

        if not isinstance(options, RemoteOptions):
            raise TypeError(f"options must be a RemoteOptions, got {type(options).__name__}")
        self.url = check_server_url(url)
        self.options = options
        self._stats.extra.update(retries=0, failed_requests=0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="gopd-remote-engine", daemon=True)
        self._thread.start()
        timeout = httpx.Timeout(options.request_timeout_s, connect=options.connect_timeout_s)
        limits = httpx.Limits(max_connections=options.max_concurrency,
                              max_keepalive_connections=options.max_concurrency)
        self._client = self._call(self._make_client(timeout, limits))
        try:
            self.model, self._max_model_len, self.served_root = self._call(self._discover())
        except BaseException:
            self.close()
            raise

    # -- the event loop owned by this engine -------------------------------------------------------------
    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @staticmethod
    async def _make_client(timeout, limits):
        import httpx

        return httpx.AsyncClient(timeout=timeout, limits=limits)

    async def _discover(self) -> tuple[str, int, str]:
        import httpx

        try:
            resp = await self._client.get(f"{self.url}/v1/models", timeout=self.options.connect_timeout_s)
            resp.raise_for_status()
        except httpx.HTTPError as e:
            raise ServerUnreachable(
                f"the generation server at {self.url} did not answer GET /v1/models ({type(e).__name__}: {e}); "
                f"start it first, e.g. `vllm serve MODEL --host 0.0.0.0 --port PORT --enable-prefix-caching "
                f"--enable-prompt-tokens-details`") from e
        served = {m["id"]: m for m in resp.json().get("data", [])}
        name = self.options.model
        if not name:
            if len(served) != 1:
                raise ValueError(f"the server at {self.url} serves {sorted(served)}: set the model name")
            name = next(iter(served))
        if name not in served:
            raise ValueError(f"the server at {self.url} does not serve model {name!r}; it serves {sorted(served)}")
        return name, int(served[name].get("max_model_len") or (1 << 30)), str(served[name].get("root") or name)

    # -- GenerationEngine ----------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        prompts = check_prompts(prompts)
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        for i, p in enumerate(prompts):
            if len(p) + 1 > self._max_model_len:
                raise ValueError(f"prompts[{i}] has {len(p)} tokens; the server's max_model_len is "
                                 f"{self._max_model_len}")
        t0 = time.perf_counter()
        results = self._call(self._generate_all(prompts, sampling))
        gens: list[Generation | None] = [r if isinstance(r, Generation) else None for r in results]
        failed = [i for i, g in enumerate(gens) if g is None]
        done = [g for g in gens if g is not None]
        stats = self._stats
        stats.requests += len(prompts)
        stats.prompt_tokens += sum(len(prompts[i]) for i, g in enumerate(gens) if g is not None)
        stats.cached_prompt_tokens += sum(g.num_cached_tokens for g in done)
        stats.generated_tokens += sum(len(g.token_ids) for g in done)
        stats.generate_seconds += time.perf_counter() - t0
        if failed:
            stats.extra["failed_requests"] += len(failed)
            first = results[failed[0]]
            raise GenerationFailed(
                f"{len(failed)} of {len(prompts)} requests to {self.url} failed after retrying for "
                f"{self.options.retry_deadline_s:g} s (first: {type(first).__name__}: {first})", gens, failed)
        return done

    async def _generate_all(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Any]:
        bound = asyncio.Semaphore(self.options.max_concurrency)

        async def one(i: int, prompt: list[int]) -> Any:
            async with bound:
                try:
                    return await self._request(self._payload(prompt, sampling, i), len(prompt))
                except _GiveUp as e:
                    return e.cause

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    def _payload(self, prompt: list[int], sampling: SamplingConfig, index: int) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model, "prompt": prompt, "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
        }
        if sampling.stop_token_ids:
            payload["stop_token_ids"] = list(sampling.stop_token_ids)
        if sampling.seed is not None:
            payload["seed"] = sampling.seed + index   # per prompt, as the in-process engines do
        return payload

    async def _request(self, payload: dict[str, Any], prompt_len: int) -> Generation:
        import httpx

        opt = self.options
        start = time.monotonic()
        backoff = opt.backoff_s
        while True:
            try:
                resp = await self._client.post(f"{self.url}/v1/completions", json=payload)
                if resp.status_code not in _RETRYABLE_STATUS:
                    if resp.status_code >= 400:   # the request itself is wrong: retrying cannot help
                        raise ValueError(f"{self.url}/v1/completions answered {resp.status_code}: "
                                         f"{resp.text[:500]}")
                    return _parse_completion(resp.json(), prompt_len)
                error: Exception = RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
            except httpx.TransportError as e:
                error = e
            if time.monotonic() - start + backoff > opt.retry_deadline_s:
                raise _GiveUp(error)
            self._stats.extra["retries"] += 1
            logger.warning("request to %s failed (%s: %s); retrying in %.1f s", self.url, type(error).__name__,
                           error, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, opt.max_backoff_s)

    def server_metrics(self) -> dict[str, float]:
        """The server's own Prometheus counters (summed over labels) for prefix caching and requests."""
        text = self._call(self._get_text(f"{self.url}/metrics"))
        wanted = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                  "vllm:prompt_tokens_cached_total", "vllm:request_success_total", "vllm:prompt_tokens_total")
        out = dict.fromkeys(wanted, 0.0)
        for line in text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in out:
                out[name] += float(line.rsplit(" ", 1)[1])
        return out

    async def _get_text(self, url: str) -> str:
        resp = await self._client.get(url)
        resp.raise_for_status()
        return resp.text

    def sync_weights(self, weights: WeightsLike) -> float:
        raise NotImplementedError(
            f"RemoteEngine ({self.url}) serves a frozen model: its weights are the server's. Serve the student "
            f"in-process (rollout.engine = hf or vllm) to sync weights each step.")

    def reset_prefix_cache(self) -> None:
        """No-op: the served weights never change, so cached prefixes stay valid."""

    def close(self) -> None:
        loop = self.__dict__.get("_loop")
        if loop is None or loop.is_closed():
            return
        client = self.__dict__.pop("_client", None)
        if client is not None:
            self._call(client.aclose())
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout=10)
        loop.close()


class _GiveUp(Exception):
    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _parse_completion(body: dict[str, Any], prompt_len: int) -> Generation:
    """One ``/v1/completions`` choice -> Generation (token ids, their raw log-probs, cached prompt tokens)."""
    choice = body["choices"][0]
    ids = choice.get("token_ids") or []
    if not all(type(t) is int and t >= 0 for t in ids):
        raise RuntimeError(f"the server returned token ids that are not non-negative integers: {ids[:8]!r}")
    lps = [float(x) for x in (choice.get("logprobs") or {}).get("token_logprobs") or []]
    if len(lps) != len(ids):
        raise RuntimeError(f"the server returned {len(lps)} log-probs for {len(ids)} tokens (needs vLLM with "
                           f"return_token_ids and logprobs)")
    details = (body.get("usage") or {}).get("prompt_tokens_details") or {}
    cached = min(int(details.get("cached_tokens") or 0), prompt_len)
    return Generation(ids, lps, "stop" if choice.get("finish_reason") == "stop" else "length", cached)
