"""How the rollout reaches environments: futures for ``reset``/``step`` on numbered slots.

The rollout holds one env slot per episode in flight and never calls an env directly, so stepping runs in the
background while the next generation batch is computed. ``ThreadedEnvs`` is the in-process implementation
(one ``TextEnv`` per slot, stepped on a thread pool; JVM-backed envs release the GIL while they wait on py4j).
``gopd_fast.envs.EnvPool`` (worker processes that survive crashes and hangs) has the same four methods.
``env_slots`` is the one place that picks between them (the trainer's and the demo's ``env.pool`` setting).

Failure contract: an env that crashes or hangs raises ``gopd_fast.envs.EnvError`` from the future (a hang is a
``TimeoutError`` turned into ``EnvError`` by ``ThreadedEnvs``); the rollout then calls ``restart(slot)`` and
starts the episode over. Any other exception is a bug and propagates.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv

logger = logging.getLogger(__name__)


class EnvSlots(Protocol):
    def reset(self, slot: int, task_id: str) -> Future[Reset]: ...
    def step(self, slot: int, action: str) -> Future[StepResult]: ...
    def restart(self, slot: int) -> None: ...
    def close(self) -> None: ...


class ThreadedEnvs:
    """One env per slot, created lazily by ``env_factory()``, stepped on a small thread pool.

    ``busy_seconds`` accumulates the time spent inside env calls (the env's own cost, whether or not it
    overlapped with generation).
    """

    def __init__(self, env_factory: Callable[[], TextEnv], max_workers: int = 4) -> None:
        if not callable(env_factory):
            raise TypeError("env_factory must be a callable returning a TextEnv")
        if not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive int, got {max_workers!r}")
        self._factory = env_factory
        self._envs: dict[int, TextEnv] = {}
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="gopd-env")
        self._lock = threading.Lock()
        self.busy_seconds = 0.0

    def _env(self, slot: int) -> TextEnv:
        with self._lock:
            if slot not in self._envs:
                self._envs[slot] = self._factory()
            return self._envs[slot]

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy_seconds += time.perf_counter() - t0

    def reset(self, slot: int, task_id: str) -> Future[Reset]:
        return self._pool.submit(lambda: self._timed(self._env(slot).reset, task_id))

    def step(self, slot: int, action: str) -> Future[StepResult]:
        return self._pool.submit(lambda: self._timed(self._env(slot).step, action))

    def restart(self, slot: int) -> None:
        with self._lock:
            env = self._envs.pop(slot, None)
        if env is not None:
            try:
                env.close()
            except Exception as e:  # noqa: BLE001 - a crashed env may fail to close; its replacement matters
                logger.warning("closing failed env of slot %d raised %r; replacing it anyway", slot, e)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            envs, self._envs = list(self._envs.values()), {}
        for env in envs:
            env.close()


def env_slots(env_name: str, env_options: Mapping[str, Any], *, pool: bool, pool_workers: int,
              step_timeout_s: float, threads: int) -> EnvSlots:
    """The env slots of a run: ``EnvPool(env_name, env_options)`` with ``pool_workers`` processes and a per-step
    hang limit of ``step_timeout_s`` when ``pool``, else ``ThreadedEnvs`` with ``threads`` threads over
    ``envs.make(env_name, **env_options)``."""
    if pool:
        from gopd_fast.envs.pool import EnvPool

        # A reset may start a JVM in a fresh worker: allow it well beyond one step.
        return EnvPool(env_name, env_options, num_workers=pool_workers, step_timeout_s=step_timeout_s,
                       reset_timeout_s=max(step_timeout_s, 300.0))
    from gopd_fast import envs

    options = dict(env_options)
    return ThreadedEnvs(lambda: envs.make(env_name, **options), max_workers=threads)


def pool_counts(slots: EnvSlots) -> dict[str, float]:
    """Cumulative failure counts of an ``EnvPool`` (``env_restarts``, ``env_crashes``, ``env_hangs``,
    ``env_replays``, ``env_episodes_failed``); {} for other slots."""
    from gopd_fast.envs.pool import EnvPool

    if not isinstance(slots, EnvPool):
        return {}
    s = slots.stats()
    return {"env_restarts": float(s.worker_restarts), "env_crashes": float(s.crashes), "env_hangs": float(s.hangs),
            "env_replays": float(s.replays), "env_episodes_failed": float(s.episodes_failed)}


def wait_env(future: Future, timeout: float | None):
    """Result of an env future; a hang past ``timeout`` seconds is reported as ``EnvError``."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError as e:
        future.cancel()
        raise EnvError(f"environment call did not answer within {timeout} s") from e
