"""Ownership of one Java simulator process (ScienceWorld, TextWorldExpress) behind py4j.

Both packages start their JVM with ``py4j.launch_gateway(die_on_exit=True)`` inside their env constructor and
talk to it over a local socket. A JVM can crash (OutOfMemoryError, a Scala exception that poisons the state) or
hang (an infinite loop in a task script); py4j then blocks forever or raises. ``JavaSimulator`` makes both
failures bounded and visible:

* every call runs under a watchdog timer; when it fires, the JVM is SIGKILLed, which unblocks the socket read;
* any py4j/socket failure discards the JVM and raises ``EnvError`` (the env pool restarts the env and re-queues
  the episode); the next ``call(..., restart=True)`` (used by ``reset``) starts a fresh JVM;
* ``close()`` and interpreter exit kill the process and reap it, so no ``java`` process outlives its owner.
"""
from __future__ import annotations

import atexit
import contextlib
import shutil
import subprocess
import threading
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

from gopd_fast.envs.base import EnvError, TextEnv
from gopd_fast.envs.gold_path import GoldPath
from gopd_fast.envs.options import action_text, check_seconds

H = TypeVar("H")  # the package's env object (ScienceWorldEnv, TextWorldExpressEnv)
R = TypeVar("R")

_LIVE: weakref.WeakSet[JavaSimulator] = weakref.WeakSet()


def _default_process_of(handle: object) -> subprocess.Popen:
    # Both scienceworld 1.2.x and textworld-express 1.1.x keep the launched JVM here.
    return handle._gateway.java_process  # type: ignore[attr-defined]


class JavaSimulator(Generic[H]):
    """A lazily started JVM-backed simulator with per-call timeouts, crash detection and guaranteed shutdown.

    Args:
        launch: builds the package's env object (this starts the JVM).
        name: used in error messages.
        call_timeout_s: default watchdog limit of one ``call``.
        process_of: returns the ``subprocess.Popen`` of the JVM owned by a handle.
    """

    def __init__(
        self,
        launch: Callable[[], H],
        *,
        name: str,
        call_timeout_s: float = 60.0,
        process_of: Callable[[H], subprocess.Popen] = _default_process_of,
    ) -> None:
        check_seconds("step_timeout_s", call_timeout_s)
        self._launch = launch
        self._process_of = process_of
        self.name = name
        self.call_timeout_s = float(call_timeout_s)
        self._handle: H | None = None
        self._proc: subprocess.Popen | None = None
        self.restarts = 0  # JVMs started after the first one (crash / hang recoveries)
        self._started = 0
        _LIVE.add(self)

    @property
    def pid(self) -> int | None:
        """Process id of the running JVM, None when none is running."""
        return self._proc.pid if self.alive else None  # type: ignore[union-attr]

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def call(self, fn: Callable[[H], R], *, timeout_s: float | None = None, restart: bool = False) -> R:
        """Run ``fn(handle)`` under the watchdog.

        ``restart=True`` starts a JVM when none is running (episode boundaries); ``restart=False`` raises
        ``EnvError`` instead, because the episode's state died with the old JVM.
        """
        if not self.alive:
            self._discard()  # reap a dead JVM, if any
            if not restart:
                raise EnvError(f"{self.name}: the JVM is not running (it crashed or was killed); "
                               "call reset() to start a new episode on a fresh JVM")
            self._start()
        handle, proc = self._handle, self._proc
        assert handle is not None and proc is not None
        limit = self.call_timeout_s if timeout_s is None else float(timeout_s)
        fired = threading.Event()

        def on_timeout() -> None:
            fired.set()
            proc.kill()  # unblocks the py4j socket read in the calling thread

        timer = threading.Timer(limit, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            return fn(handle)
        except EnvError:
            raise
        except Exception as exc:  # py4j errors, broken sockets, Java exceptions surfaced as Py4JJavaError
            if not fired.is_set() and proc.poll() is None and not _is_py4j_or_socket_error(exc):
                raise  # a plain Python error in ``fn`` (e.g. a ValueError from argument checks): not a JVM failure
            self._discard()
            if fired.is_set():
                raise EnvError(f"{self.name}: call exceeded {limit:g} s; the JVM was killed "
                               "and a fresh one starts on the next reset()") from exc
            raise EnvError(f"{self.name}: the JVM failed ({type(exc).__name__}: {exc}); "
                           "a fresh one starts on the next reset()") from exc
        finally:
            timer.cancel()

    def close(self) -> None:
        """Shut the JVM down and reap it. Idempotent."""
        self._discard()

    def _start(self) -> None:
        if shutil.which("java") is None:
            raise RuntimeError(f"{self.name} needs a Java runtime (Java 17): no `java` on PATH")
        handle = self._launch()
        self._handle, self._proc = handle, self._process_of(handle)
        if self._started:
            self.restarts += 1
        self._started += 1

    def _discard(self) -> None:
        handle, proc = self._handle, self._proc
        self._handle, self._proc = None, None
        # Kill first: a graceful py4j shutdown would block on a hung (or stopped) JVM.
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process always exits
                pass
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        if handle is not None:
            gateway = getattr(handle, "_gateway", None)
            if gateway is not None:
                # close(), not shutdown(): shutdown() would try to send a command to the dead JVM.
                with contextlib.suppress(Exception):  # sockets already broken: nothing left to release
                    gateway.close()
                    gateway.shutdown_callback_server()
            # The packages' __del__ calls close() again, which would write to the dead JVM's stdin.
            handle.close = lambda: None  # type: ignore[method-assign]


def _is_py4j_or_socket_error(exc: BaseException) -> bool:
    from py4j.protocol import Py4JError

    return isinstance(exc, (Py4JError, OSError, EOFError))


@atexit.register
def _close_all() -> None:
    for sim in list(_LIVE):
        sim.close()


class JavaGoldPathEnv(TextEnv):
    """What the Java-simulator envs share: one owned JVM (``self._sim``), a recorded gold path (``self._gold``) as
    the expert, and an episode flag (``self._done``). Subclasses set the three in ``__init__`` and implement the
    protocol's abstract methods."""

    _sim: JavaSimulator
    _gold: GoldPath
    _done: bool

    def _command(self, action: str) -> str:
        """The one place where a policy's text crosses into Java (py4j): a str with no lone surrogate, control
        character or newline (the simulators read one line; a newline would be parsed as part of an object name),
        of bounded length, so nothing a policy can emit crashes or stalls the JVM. Non-str -> TypeError. Called
        first in ``step``, so a bad type is reported before any episode-state error."""
        return " ".join(action_text(action).split())

    def _check_steppable(self) -> None:
        if not self._started:
            raise RuntimeError("step() called before reset()")
        if self._done:
            raise RuntimeError("step() called after the episode is done; call reset() first")

    def expert_action(self) -> str | None:
        """The next action of the episode's gold path while the agent has followed it exactly; None after the
        first deviation (a gold path is an open-loop plan, not an oracle) or when the episode has none."""
        return None if self._done else self._gold.next_action()

    @property
    def gold_actions(self) -> tuple[str, ...]:
        """The whole gold path of the current episode (teacher data)."""
        return self._gold.actions

    @property
    def jvm(self) -> JavaSimulator:
        return self._sim

    def close(self) -> None:
        self._sim.close()
        self._done = True
