"""EnvPool: many environments stepped concurrently in worker processes, surviving crashes and hangs.

Episodes live in numbered *slots*; slot ``s`` is served by worker ``s % num_workers``, which keeps one env per
slot (created on the slot's first request and reused by its later episodes; for a JVM env that is one JVM per slot,
so use about as many slots as episodes in flight). Many episodes are in flight at once, the workers step them in
parallel, and env steps overlap with whatever the caller does meanwhile (generation). A worker serves its requests
in order; requests for one slot are therefore answered in the order they were made. Every call returns a ``concurrent.futures.Future`` at once; ``reset_many`` / ``step_many`` are the
blocking batched forms. The slot API (``reset``, ``step``, ``restart``, ``close``) is the rollout's ``EnvSlots``.

    with EnvPool("household", {"seed": 0}, num_workers=2) as pool:
        first = pool.reset(0, "household/train/3").result()
        step = pool.step(0, "look").result()

Failures. A worker that dies (segfault, OOM kill, a crashed JVM, an ``EnvError`` from the env) or does not answer a
request within its timeout is killed together with its process group (each worker is a session leader, so JVMs
and other children it started die with it) and restarted. Every episode that lived in it is then re-queued from
its start: the new worker resets the task and replays the episode's actions so far, the replayed observation is
checked against the one recorded, and the pending requests are sent again, so the caller only sees a slower
future. Each replay counts one failure for the episode (``info["env_failures"]`` in its later results, and
``episode_failures(slot)``) and in ``stats()``. An episode that fails more than ``max_failures`` times, or whose
replay diverges (a non-deterministic env), gets ``EnvError`` from its futures; the caller then calls
``restart(slot)`` and starts a new episode there. A finished episode is not replayed (nor charged). A request
outside any episode's replay (``expert_action``, ``call``) that kills its worker is sent again to the replacement,
up to ``max_failures`` times. A worker is restarted whatever it held (nothing, busy, mid-reset), as often as it
fails; it is given up on only when its replacements cannot start: ``max_failures + 2`` processes in a row that die
or hang before they report ready. Errors raised by the env for bad input (an unknown task id, stepping after
done) are passed to the caller's future as they are and never restart anything.

Shutdown: ``close()`` (also on ``with`` exit, at interpreter exit, and on garbage collection) asks the workers to
close their envs, then kills what is left of their process groups. No worker, JVM or thread outlives the pool.
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from gopd_fast.envs.base import EnvError, Reset, StepResult
from gopd_fast.envs.options import check_int, check_seconds

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

_RESET, _STEP, _EXPERT, _CALL, _REPLAY, _DROP = "reset", "step", "expert", "call", "replay", "drop"
_KINDS = frozenset((_RESET, _STEP, _EXPERT, _CALL, _REPLAY, _DROP))

# The protocol. Every message is a tuple whose first item names it, so no payload (an empty batch, a None
# answer) can be mistaken for another message:
#   pool -> worker: (_MSG_REQUESTS, [(req_id, slot, kind, payload), ...])   never sent empty
#                   (_MSG_SHUTDOWN,)
#   worker -> pool: (_MSG_READY, pid)                                         once, when it can serve requests
#                   (_MSG_ANSWER, req_id, status, value)                      status: "ok", "error", "env_error"
_MSG_REQUESTS, _MSG_SHUTDOWN, _MSG_READY, _MSG_ANSWER = "requests", "shutdown", "ready", "answer"


# --------------------------------------------------------------------------------------------- worker side
def _load_preload(preload: Sequence[str]) -> None:
    """Import modules (dotted names or .py paths) that register extra envs, before the first ``make``."""
    for i, item in enumerate(preload):
        if item.endswith(".py"):
            spec = importlib.util.spec_from_file_location(f"_gopd_pool_preload_{i}", item)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load preload file {item!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            importlib.import_module(item)


def _serve(envs: dict[int, Any], env_of: Any, slot: int, kind: str, payload: Any) -> tuple[str, Any]:
    """Run one request on ``slot``'s env: ("ok", value), ("error", exception) or ("env_error", text)."""
    try:
        if kind == _RESET:
            return "ok", env_of(slot).reset(payload)
        if kind == _STEP:
            return "ok", env_of(slot).step(payload)
        if kind == _EXPERT:
            return "ok", env_of(slot).expert_action()
        if kind == _CALL:
            name, args = payload
            attr = getattr(env_of(slot), name)
            return "ok", attr(*args) if callable(attr) else attr
        if kind == _REPLAY:
            task_id, actions = payload
            env = env_of(slot)
            last = env.reset(task_id)
            for action in actions:
                last = env.step(action)
            return "ok", last.observation
        if kind == _DROP:
            env = envs.pop(slot, None)
            if env is not None:
                env.close()
            return "ok", None
        return "error", ValueError(f"unknown EnvPool request kind {kind!r}; known: {sorted(_KINDS)}")
    except EnvError as e:  # the env itself says it is broken: the pool restarts this worker
        return "env_error", f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - bad input etc.: hand the exception to the caller's future
        try:
            pickle.dumps(e)
            return "error", e
        except Exception:  # noqa: BLE001 - unpicklable exception: send its text instead
            return "error", RuntimeError(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")


def _worker_main(conn: Connection, env_name: str, env_options: dict, preload: Sequence[str]) -> None:
    """Serve requests in order. Each message is a list of (req_id, slot, kind, payload); each request is answered
    by its own message (req_id, status, value) as soon as it is done, so the pool times every request exactly."""
    os.setsid()  # own process group: the pool kills the worker and everything it started (JVMs) in one call
    from gopd_fast.envs.base import make

    try:
        _load_preload(preload)
        startup_error = None
    except Exception as e:  # noqa: BLE001 - answered to every request below, so the caller sees why
        startup_error = ImportError(f"EnvPool worker could not import preload {list(preload)}: {e!r}")
    envs: dict[int, Any] = {}

    def env_of(slot: int):
        if startup_error is not None:
            raise startup_error
        if slot not in envs:
            envs[slot] = make(env_name, **env_options)
        return envs[slot]

    try:
        conn.send((_MSG_READY, os.getpid()))  # a restart has succeeded once this arrives
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the pool (or its process) is gone
                break
            if message[0] == _MSG_SHUTDOWN:
                break
            if message[0] != _MSG_REQUESTS:  # a protocol bug: die loudly, the pool sees a crash
                raise RuntimeError(f"EnvPool worker got an unknown message {message[0]!r}")
            for req_id, slot, kind, payload in message[1]:
                conn.send((_MSG_ANSWER, req_id, *_serve(envs, env_of, slot, kind, payload)))
    finally:
        for env in envs.values():
            try:
                env.close()
            except Exception:  # noqa: BLE001, S110 - shutting down; the process group is killed anyway
                pass


# --------------------------------------------------------------------------------------------- pool side
@dataclass
class _Request:
    req_id: int
    slot: int
    kind: str
    payload: Any
    future: Future | None          # None for internal replays
    timeout_s: float
    attempts: int = 0              # workers that died serving it (requests not replayed: call, expert, drop)


@dataclass
class _Episode:
    task_id: str
    actions: list[str] = field(default_factory=list)
    last_observation: str = ""
    failures: int = 0
    done: bool = False


@dataclass
class _Worker:
    index: int
    proc: Any = None
    conn: Connection | None = None
    pending: collections.deque = field(default_factory=collections.deque)
    head_since: float = 0.0
    generation: int = 0
    ready: bool = False            # the current process said it can serve requests
    failures_in_a_row: int = 0     # processes in a row that died before they were ready
    broken: str | None = None      # why the pool stopped restarting this worker
    send_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class PoolStats:
    steps: int
    resets: int
    worker_restarts: int
    crashes: int
    hangs: int
    env_errors: int
    replays: int
    episodes_failed: int


class EnvPool:
    """Environments in ``num_workers`` worker processes (spawn), stepped concurrently; see the module doc.

    Args:
        env_name: a registered env name (``envs.make``).
        env_options: keyword options for ``envs.make`` in every worker.
        num_workers: worker processes.
        step_timeout_s: a step (or expert query) not answered within this many seconds counts as a hang.
        reset_timeout_s: the same for a reset, which includes creating the env (JVM start) in a fresh worker.
        max_failures: failures one episode may survive by replay before its futures get ``EnvError``.
        preload: modules (dotted names or paths to .py files) each worker imports first, so envs registered
            outside ``gopd_fast`` can be made by name.
    """

    def __init__(
        self,
        env_name: str,
        env_options: Mapping[str, Any] | None = None,
        num_workers: int = 2,
        step_timeout_s: float = 60.0,
        reset_timeout_s: float | None = None,
        max_failures: int = 3,
        preload: Sequence[str] = (),
    ) -> None:
        if not isinstance(env_name, str) or not env_name:
            raise TypeError(f"env_name must be a non-empty str, got {env_name!r}")
        if env_options is not None and not isinstance(env_options, Mapping):
            raise TypeError(f"env_options must be a mapping of keyword options, got {type(env_options).__name__}")
        check_int("num_workers", num_workers, low=1)
        check_seconds("step_timeout_s", step_timeout_s)
        if reset_timeout_s is not None:
            check_seconds("reset_timeout_s", reset_timeout_s)
        check_int("max_failures", max_failures, low=0)
        if isinstance(preload, str) or not all(isinstance(p, str) for p in preload):
            raise TypeError("preload must be a sequence of module names or .py paths")
        self.env_name = env_name
        self.env_options = dict(env_options or {})
        self.num_workers = num_workers
        self.step_timeout_s = float(step_timeout_s)
        self.reset_timeout_s = float(reset_timeout_s or max(step_timeout_s, 60.0))
        self.max_failures = max_failures
        self.preload = tuple(preload)

        self._ctx = mp.get_context("spawn")
        self._lock = threading.RLock()
        self._episodes: dict[int, _Episode] = {}
        self._next_id = 0
        self._counts: collections.Counter[str] = collections.Counter()
        self._pending_failures: collections.Counter[int] = collections.Counter()  # failed resets, per slot
        # slot -> why its episode was given up on, until ``restart`` or a new ``reset``: a later step or
        # expert_action there would reach a fresh env that never saw the episode, so it gets this EnvError instead.
        self._failed: dict[int, str] = {}
        self._closing = threading.Event()   # shared with the finalizer, which may run without ``self``
        self._workers = [_Worker(i) for i in range(num_workers)]
        self._wake_r, self._wake_w = self._ctx.Pipe(duplex=False)
        for w in self._workers:
            self._start(w)
        self._thread = threading.Thread(target=self._dispatch, name="gopd-envpool", daemon=True)
        self._thread.start()
        # Runs on close(), on garbage collection and at interpreter exit (weakref.finalize's atexit hook).
        self._finalizer = weakref.finalize(
            self, EnvPool._shutdown_workers, self._workers, self._wake_w, self._closing
        )

    # ------------------------------------------------------------------------------------------ public API
    def reset(self, slot: int, task_id: str) -> Future[Reset]:
        """Start an episode of ``task_id`` in ``slot`` (any non-negative int)."""
        if not isinstance(task_id, str):
            raise TypeError(f"task_id must be a str, got {type(task_id).__name__}")
        return self._submit(slot, _RESET, task_id, self.reset_timeout_s)

    def step(self, slot: int, action: str) -> Future[StepResult]:
        if not isinstance(action, str):
            raise TypeError(f"action must be a str, got {type(action).__name__}")
        return self._submit(slot, _STEP, action, self.step_timeout_s)

    def expert_action(self, slot: int) -> Future[str | None]:
        """The env's ``expert_action()`` in ``slot``'s current state."""
        return self._submit(slot, _EXPERT, None, self.step_timeout_s)

    def call(self, slot: int, name: str, *args: Any) -> Future[Any]:
        """Call the public method ``name`` of ``slot``'s env with ``args`` (or read the attribute ``name``), e.g.
        ``call(0, "tasks", "eval")``, ``call(3, "expert_distance")``, ``call(0, "max_turns")``. Calls are not
        replayed after a failure, so they must not change the episode's state."""
        if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
            raise ValueError(f"name must be a public method or attribute name of the env, got {name!r}")
        return self._submit(slot, _CALL, (name, args), self.step_timeout_s)

    def restart(self, slot: int) -> None:
        """Forget ``slot``'s episode and close its env (after an ``EnvError``); the next ``reset`` starts clean."""
        self._check_slot(slot)
        with self._lock:
            self._episodes.pop(slot, None)
            self._pending_failures.pop(slot, None)
            self._failed.pop(slot, None)
        self._submit(slot, _DROP, None, self.step_timeout_s)

    def reset_many(self, task_ids: Sequence[str], slots: Sequence[int] | None = None) -> list[Reset]:
        """Reset slots ``0..n-1`` (or ``slots``) to ``task_ids`` concurrently and wait for all."""
        slots = list(range(len(task_ids))) if slots is None else list(slots)
        if len(slots) != len(task_ids):
            raise ValueError(f"slots ({len(slots)}) and task_ids ({len(task_ids)}) must have the same length")
        if not all(isinstance(t, str) for t in task_ids):
            raise TypeError("task_ids must be strs")
        futures = self._submit_many([(s, _RESET, t, self.reset_timeout_s) for s, t in zip(slots, task_ids)])
        return [f.result() for f in futures]

    def step_many(self, actions: Mapping[int, str]) -> dict[int, StepResult]:
        """Step every slot of ``actions`` ({slot: action}) concurrently and wait for all."""
        if not all(isinstance(a, str) for a in actions.values()):
            raise TypeError("actions must map slots to str actions")
        slots = list(actions)
        futures = self._submit_many([(s, _STEP, actions[s], self.step_timeout_s) for s in slots])
        return {s: f.result() for s, f in zip(slots, futures)}

    def episode_failures(self, slot: int) -> int:
        """Failures (worker crashes or hangs) the current episode of ``slot`` survived by replay."""
        with self._lock:
            episode = self._episodes.get(slot)
            return 0 if episode is None else episode.failures

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until every live worker has started (imports, preload) and can serve; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            with self._lock:
                if all(w.ready or w.broken is not None for w in self._workers):
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers]

    def worker_of(self, slot: int) -> int:
        return slot % self.num_workers

    def stats(self) -> PoolStats:
        with self._lock:
            c = self._counts
            return PoolStats(
                steps=c["steps"], resets=c["resets"], worker_restarts=c["restarts"], crashes=c["crashes"],
                hangs=c["hangs"], env_errors=c["env_errors"], replays=c["replays"],
                episodes_failed=c["episodes_failed"],
            )

    def close(self) -> None:
        """Stop the workers (their envs close, their process groups are killed). Idempotent."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            pending = [r for w in self._workers for r in w.pending]
            for w in self._workers:
                w.pending.clear()
        _settle([(r.future, EnvError("the EnvPool was closed")) for r in pending])
        self._finalizer()
        self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ internals
    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
            raise ValueError(f"slot must be a non-negative int, got {slot!r}")

    def _start(self, w: _Worker) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main, args=(child, self.env_name, self.env_options, self.preload),
            name=f"gopd-env-{w.index}", daemon=True,
        )
        proc.start()
        child.close()
        w.proc, w.conn, w.generation, w.ready = proc, parent, w.generation + 1, False
        w.head_since = time.monotonic()

    def _deadline(self, w: _Worker) -> float:
        """When ``w``'s head request counts as hung (lock held). Until the worker is ready its start-up (imports,
        a JVM) is allowed ``reset_timeout_s`` on top; ``_read`` restarts the clock when it becomes ready."""
        timeout = w.pending[0].timeout_s
        return w.head_since + (timeout if w.ready else timeout + self.reset_timeout_s)

    def _submit(self, slot: int, kind: str, payload: Any, timeout_s: float) -> Future:
        return self._submit_many([(slot, kind, payload, timeout_s)])[0]

    def _submit_many(self, items: Sequence[tuple[int, str, Any, float]]) -> list[Future]:
        """Queue requests (slot, kind, payload, timeout); one message per worker carries all of its requests."""
        for slot, *_ in items:
            self._check_slot(slot)
        futures: list[Future] = [Future() for _ in items]
        by_worker: dict[int, list[int]] = collections.defaultdict(list)
        for i, (slot, *_) in enumerate(items):
            by_worker[slot % self.num_workers].append(i)
        wake = False
        for index, positions in by_worker.items():
            w = self._workers[index]
            with w.send_lock:
                with self._lock:
                    if self._closing.is_set():
                        raise RuntimeError("the EnvPool is closed")
                    if w.broken is not None:
                        for i in positions:
                            futures[i].set_exception(EnvError(w.broken))
                        continue
                    if not w.pending:
                        w.head_since, wake = time.monotonic(), True   # a new deadline for the dispatcher
                    batch = []
                    for i in positions:
                        slot, kind = items[i][:2]
                        if kind == _RESET:
                            self._failed.pop(slot, None)   # a new episode starts clean
                        elif kind in (_STEP, _EXPERT) and slot in self._failed:
                            futures[i].set_exception(EnvError(
                                f"{self._failed[slot]}; call restart({slot}) or reset({slot}, ...) first"))
                            continue
                        self._next_id += 1
                        batch.append(_Request(self._next_id, *items[i][:3], futures[i], items[i][3]))
                    w.pending.extend(batch)
                    conn = w.conn
                self._send(conn, batch)
        if wake:
            self._wake()
        return futures

    @staticmethod
    def _send(conn: Connection, requests: Sequence[_Request]) -> None:
        if not requests:
            return
        try:
            conn.send((_MSG_REQUESTS, [(r.req_id, r.slot, r.kind, r.payload) for r in requests]))
        except (OSError, ValueError):  # a dead worker: the dispatcher restarts it and sends again
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except (OSError, ValueError):
            pass

    def _dispatch(self) -> None:
        """The pool's one background thread: reads answers, resolves futures, detects crashes and hangs."""
        while True:
            with self._lock:
                if self._closing.is_set():
                    return
                live = [w for w in self._workers if w.broken is None]
                conns = {w.conn: w for w in live}
                sentinels = {w.proc.sentinel: w for w in live}
                now = time.monotonic()
                deadlines = [self._deadline(w) for w in live if w.pending]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            try:
                ready = wait([*conns, *sentinels, self._wake_r], timeout=timeout)
            except (OSError, ValueError):  # a connection closed under us: only during close()
                if self._closing.is_set():
                    return
                continue
            for obj in ready:
                if obj is self._wake_r:
                    try:
                        while self._wake_r.poll():
                            self._wake_r.recv_bytes()
                    except (EOFError, OSError):
                        return
                elif obj in conns:
                    self._read(conns[obj])
            for obj in ready:
                if obj in sentinels:
                    w = sentinels[obj]
                    self._read(w)  # answers sent just before death still count
                    if w.proc.sentinel == obj and not self._closing.is_set():
                        self._recover(w, "crash")
            now = time.monotonic()
            for w in self._workers:
                with self._lock:
                    hung = w.broken is None and bool(w.pending) and now > self._deadline(w)
                    hung = hung and not self._closing.is_set()
                if hung:
                    self._recover(w, "hang")

    def _read(self, w: _Worker) -> None:
        conn = w.conn
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == _MSG_READY:
                    with self._lock:
                        if w.conn is conn:
                            w.ready, w.failures_in_a_row, w.head_since = True, 0, time.monotonic()
                    continue
                _, req_id, status, value = message
                if status == "env_error":
                    self._recover(w, "env_error", detail=value)
                    return
                self._resolve(w, req_id, status, value)
        except (EOFError, OSError):
            pass  # the sentinel reports the death

    def _resolve(self, w: _Worker, req_id: int, status: str, value: Any) -> None:
        settle: list[tuple[Future | None, Any]] = []
        with self._lock:
            if not w.pending or w.pending[0].req_id != req_id:
                return  # an answer from before a restart
            r = w.pending.popleft()
            w.head_since = time.monotonic()
            episode = self._episodes.get(r.slot)
            if r.kind == _REPLAY:
                if status != "ok":
                    settle = self._fail_episode(r.slot, f"its replay after a worker failure raised {value!r}")
                elif episode is not None and value != episode.last_observation:
                    settle = self._fail_episode(r.slot, "its replay after a worker failure diverged")
            else:
                if status == "ok" and r.kind == _RESET:
                    failures = self._pending_failures.pop(r.slot, 0)
                    self._episodes[r.slot] = _Episode(r.payload, [], value.observation, failures)
                    self._counts["resets"] += 1
                elif status == "ok" and r.kind == _STEP and episode is not None:
                    episode.actions.append(r.payload)
                    episode.last_observation = value.observation
                    episode.done = value.done
                    self._counts["steps"] += 1
                current = self._episodes.get(r.slot)
                if status == "ok" and r.kind in (_RESET, _STEP) and current is not None and current.failures:
                    value.info["env_failures"] = current.failures
                settle = [(r.future, value if status == "ok" else _as_error(value))]
        _settle(settle)

    def _fail_episode(self, slot: int, why: str) -> list[tuple[Future | None, Any]]:
        """Give up on ``slot``'s episode (lock held): its waiting requests are dropped and returned with the
        EnvError their futures get once the lock is released; the caller then calls ``restart(slot)``."""
        episode = self._episodes.pop(slot, None)
        self._pending_failures.pop(slot, None)
        self._counts["episodes_failed"] += 1
        w = self._workers[slot % self.num_workers]
        task = episode.task_id if episode else "?"
        error = EnvError(f"episode {task!r} in slot {slot} failed: {why}")
        self._failed[slot] = str(error)
        dropped = [r for r in w.pending if r.slot == slot]
        for r in dropped:
            w.pending.remove(r)
        return [(r.future, error) for r in dropped]

    def _recover(self, w: _Worker, why: str, detail: str = "") -> None:
        """Kill worker ``w`` and its process group, start a new one, replay its episodes, resend its requests."""
        settle: list[tuple[Future | None, Any]] = []
        with w.send_lock, self._lock:
            if self._closing.is_set():
                return
            logger.warning(
                "env worker %d (pid %s): %s%s; restarting it and replaying its episodes",
                w.index, w.proc.pid, why, f" ({detail})" if detail else "",
            )
            self._counts[{"crash": "crashes", "hang": "hangs", "env_error": "env_errors"}[why]] += 1
            _kill_group(w.proc)
            try:
                w.conn.close()
            except OSError:
                pass
            if not w.ready:
                w.failures_in_a_row += 1
            if w.failures_in_a_row > self.max_failures + 2:
                # Its replacements die (or hang) before they are ready, again and again (a broken install?): it
                # cannot be restarted, so stop trying. A worker that comes up is never given up on; the episodes
                # and requests that keep killing it are (max_failures each).
                w.broken = (f"env worker {w.index} failed to start {w.failures_in_a_row} times in a row ({why}); "
                            "not restarted")
                logger.error(w.broken)
                settle = [(r.future, EnvError(w.broken)) for r in w.pending]
                w.pending.clear()
                for slot in [s for s in self._episodes if s % self.num_workers == w.index]:
                    del self._episodes[slot]
            else:
                self._restart(w, settle)
        _settle(settle)

    def _restart(self, w: _Worker, settle: list[tuple[Future | None, Any]]) -> None:
        """Start a fresh worker in place of ``w`` (locks held), replay its episodes, resend its requests."""
        self._counts["restarts"] += 1
        # The head request was being served when the worker failed (a worker serves its requests in order).
        executing = w.pending[0] if w.pending and w.ready else None
        self._start(w)
        requests = [r for r in w.pending if r.kind != _REPLAY]
        w.pending.clear()
        w.pending.extend(requests)
        if executing is not None and executing.kind == _RESET:
            # The failure hit a reset: its old episode (if any) is being replaced, nothing to replay.
            self._episodes.pop(executing.slot, None)
            self._pending_failures[executing.slot] += 1
            if self._pending_failures[executing.slot] > self.max_failures:
                settle += self._fail_episode(executing.slot, f"more than max_failures={self.max_failures} failures")
        elif executing is not None and executing.kind in (_EXPERT, _CALL, _DROP):
            # Not part of any episode's replay: charge the request itself, so one that always kills its worker
            # fails alone instead of restarting the worker forever.
            executing.attempts += 1
            if executing.attempts > self.max_failures:
                w.pending.remove(executing)
                settle.append((executing.future, EnvError(
                    f"{executing.kind} request on slot {executing.slot} failed: its worker died "
                    f"{executing.attempts} times serving it (max_failures={self.max_failures})")))
        replays = []
        for slot in sorted(s for s in self._episodes if s % self.num_workers == w.index):
            episode = self._episodes[slot]
            if episode.done:
                continue  # a finished episode needs no replay (a later step gets "before reset" as it would)
            episode.failures += 1
            if episode.failures > self.max_failures:
                settle += self._fail_episode(slot, f"more than max_failures={self.max_failures} failures")
                continue
            self._counts["replays"] += 1
            self._next_id += 1
            timeout = self.reset_timeout_s + self.step_timeout_s * len(episode.actions)
            payload = (episode.task_id, list(episode.actions))
            replays.append(_Request(self._next_id, slot, _REPLAY, payload, None, timeout))
        w.pending.extendleft(reversed(replays))
        w.head_since = time.monotonic()
        self._send(w.conn, list(w.pending))

    @staticmethod
    def _shutdown_workers(workers: list[_Worker], wake_w: Connection, closing: threading.Event) -> None:
        closing.set()
        for w in workers:
            try:
                w.conn.send((_MSG_SHUTDOWN,))
            except (OSError, ValueError, AttributeError):
                pass
        deadline = time.monotonic() + 5.0
        for w in workers:
            if w.proc is not None:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
                _kill_group(w.proc)
                try:
                    w.conn.close()
                except (OSError, AttributeError):
                    pass
        try:
            wake_w.send_bytes(b"")
        except (OSError, ValueError):
            pass


def _as_error(value: Any) -> BaseException:
    return value if isinstance(value, BaseException) else RuntimeError(str(value))


def _settle(pairs: list[tuple[Future | None, Any]]) -> None:
    """Complete futures outside the pool's locks (their callbacks may call back into the pool)."""
    for future, value in pairs:
        if future is None or future.done():
            continue
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def _kill_group(proc: Any) -> None:
    """SIGKILL the worker's process group (the worker made itself its leader), then the worker, then reap it."""
    if proc.pid is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except (OSError, ValueError, AttributeError):
        pass
    proc.join(timeout=5)


__all__ = ["EnvPool", "PoolStats"]

