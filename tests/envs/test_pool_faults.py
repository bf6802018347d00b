"""EnvPool fault injection: a worker is restarted whatever it held (nothing, a busy step, a reset in progress),
by SIGKILL or by a hang (SIGSTOP), again and again; it is only given up on when its replacements cannot start."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv, register
from gopd_fast.envs.pool import _MSG_REQUESTS, _MSG_SHUTDOWN, EnvPool

HERE = str(Path(__file__).resolve())
OPTS = {"reset_timeout_s": 120.0, "preload": [HERE]}
HANG_OPTS = {"step_timeout_s": 1.0, "reset_timeout_s": 10.0, "preload": [HERE]}   # a hung reset is seen in 10 s


@register("test-faulty")
class FaultyEnv(TextEnv):
    """Test-only counter world whose reset takes ``reset_sleep_s`` (a window to kill it mid-reset) and whose
    ``explode()`` kills its own worker (a request outside any episode that always crashes)."""

    name = "test-faulty"

    def __init__(self, reset_sleep_s: float = 0.0, max_turns: int = 6) -> None:
        super().__init__(max_turns)
        self.reset_sleep_s = reset_sleep_s

    def tasks(self, split: str) -> list[str]:
        return [f"t/{i}" for i in range(4)]

    def reset(self, task_id: str) -> Reset:
        time.sleep(self.reset_sleep_s)
        self.task, self.turns = task_id, 0
        return Reset(f"{task_id} start", "count")

    def step(self, action: str) -> StepResult:
        self.turns += 1
        done = self.turns >= self.max_turns
        return StepResult(f"{self.task} {self.turns} {action}", 10.0 * self.turns, done, done)

    def explode(self) -> None:
        os._exit(9)


def _play(pool: EnvPool, slot: int, task: str, turns: int = 6) -> list[str]:
    pool.reset(slot, task).result(timeout=120)
    return [pool.step(slot, f"a{i}").result(timeout=120).observation for i in range(turns)]


def _expected(task: str, turns: int = 6) -> list[str]:
    return [f"{task} {i + 1} a{i}" for i in range(turns)]


def _kill_and_wait(pool: EnvPool, worker: int, sig: int = signal.SIGKILL) -> None:
    """Kill worker ``worker`` and wait until its replacement is up (it must come up: no request is needed)."""
    pid = pool.worker_pids()[worker]
    os.kill(pid, sig)
    deadline = time.monotonic() + 60
    while pool.worker_pids()[worker] == pid and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.worker_pids()[worker] != pid, "the dead worker was not replaced"
    assert pool.wait_ready(timeout_s=60)


def test_protocol_messages_are_tagged():
    """The shutdown message and a request batch can never be confused (an empty batch was read as shutdown)."""
    assert _MSG_REQUESTS != _MSG_SHUTDOWN
    with EnvPool("test-faulty", num_workers=1, **OPTS) as pool:
        assert pool.wait_ready(timeout_s=60)
        pool._send(pool._workers[0].conn, [])   # nothing to send: nothing is sent
        assert pool.call(0, "max_turns").result(timeout=60) == 6
        assert pool.stats().worker_restarts == 0


def test_sigkill_of_a_worker_that_never_held_an_episode():
    with EnvPool("test-faulty", num_workers=2, max_failures=1, **OPTS) as pool:
        assert pool.wait_ready(timeout_s=60)
        _kill_and_wait(pool, 1)
        assert _play(pool, 1, "t/1") == _expected("t/1")    # slot 1 lives on the replaced worker
        stats = pool.stats()
        assert (stats.crashes, stats.worker_restarts, stats.replays, stats.episodes_failed) == (1, 1, 0, 0)


def test_idle_worker_killed_more_often_than_max_failures_is_still_restarted():
    with EnvPool("test-faulty", num_workers=1, max_failures=1, **OPTS) as pool:
        assert _play(pool, 0, "t/0") == _expected("t/0")    # the episode is over: the worker is idle
        for _ in range(4):                                    # max_failures + 3 kills, each followed by a restart
            _kill_and_wait(pool, 0)
        assert _play(pool, 0, "t/2") == _expected("t/2")
        stats = pool.stats()
        assert (stats.crashes, stats.worker_restarts, stats.episodes_failed) == (4, 4, 0)
        assert stats.replays == 0                             # a finished episode is neither replayed nor charged


def test_busy_workers_killed_repeatedly_over_the_run_lose_no_episode():
    """One kill per episode, mid-step, five episodes: more failures than max_failures over the run, none lost."""
    with EnvPool("test-faulty", num_workers=1, max_failures=1, **OPTS) as pool:
        for k in range(5):
            task = f"t/{k % 4}"
            pool.reset(0, task).result(timeout=120)
            got = []
            for i in range(6):
                if i == 2 + k % 3:
                    os.kill(pool.worker_pids()[0], signal.SIGKILL)
                got.append(pool.step(0, f"a{i}").result(timeout=120))
            assert [r.observation for r in got] == _expected(task)
            assert got[-1].info["env_failures"] == 1
        stats = pool.stats()
        assert stats.crashes == 5 and stats.worker_restarts == 5 and stats.episodes_failed == 0
        assert stats.replays == 5


def test_worker_killed_mid_reset_answers_the_reset():
    with EnvPool("test-faulty", {"reset_sleep_s": 1.5}, num_workers=1, max_failures=2, **OPTS) as pool:
        assert pool.wait_ready(timeout_s=60)
        for k in range(3):                          # more than max_failures resets hit over the run
            future = pool.reset(0, f"t/{k}")
            time.sleep(0.5)                         # inside the env's reset
            os.kill(pool.worker_pids()[0], signal.SIGKILL)
            assert future.result(timeout=120).observation == f"t/{k} start"
            assert pool.step(0, "x").result(timeout=60).observation == f"t/{k} 1 x"
        stats = pool.stats()
        assert stats.crashes == 3 and stats.episodes_failed == 0 and stats.replays == 0


def test_hung_idle_worker_is_replaced_when_next_used():
    with EnvPool("test-faulty", num_workers=1, **HANG_OPTS) as pool:
        assert _play(pool, 0, "t/0") == _expected("t/0")
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)                # hung while idle: noticed at the next request's deadline
        assert _play(pool, 0, "t/3") == _expected("t/3")
        assert pool.worker_pids()[0] != pid and pool.stats().hangs == 1


def test_hung_busy_worker_replays_its_episode():
    with EnvPool("test-faulty", num_workers=2, **HANG_OPTS) as pool:
        pool.reset(0, "t/0").result(timeout=120)
        first = pool.step(0, "a0").result(timeout=60)
        os.kill(pool.worker_pids()[0], signal.SIGSTOP)
        rest = [pool.step(0, f"a{i}").result(timeout=120) for i in range(1, 6)]
        assert [first.observation] + [r.observation for r in rest] == _expected("t/0")
        assert rest[-1].info["env_failures"] == 1 and pool.stats().hangs == 1


def test_worker_hung_mid_reset_answers_the_reset():
    opts = {**HANG_OPTS, "reset_timeout_s": 5.0}
    with EnvPool("test-faulty", {"reset_sleep_s": 1.5}, num_workers=1, **opts) as pool:
        assert pool.wait_ready(timeout_s=60)
        future = pool.reset(0, "t/2")
        time.sleep(0.5)                             # inside the env's reset
        pid = pool.worker_pids()[0]
        os.kill(pid, signal.SIGSTOP)
        assert future.result(timeout=120).observation == "t/2 start"
        assert pool.step(0, "x").result(timeout=60).observation == "t/2 1 x"
        assert pool.stats().hangs == 1 and pool.worker_pids()[0] != pid


def test_request_that_always_kills_its_worker_fails_alone():
    with EnvPool("test-faulty", num_workers=1, max_failures=2, **OPTS) as pool:
        with pytest.raises(EnvError, match="died 3 times"):
            pool.call(0, "explode").result(timeout=120)
        assert _play(pool, 0, "t/1") == _expected("t/1")   # the worker itself was never given up
        assert pool.stats().crashes == 3


@pytest.mark.parametrize(("options", "error"), [
    ({"num_workers": True}, TypeError), ({"num_workers": 0}, ValueError), ({"step_timeout_s": float("inf")}, ValueError),
    ({"step_timeout_s": True}, TypeError), ({"reset_timeout_s": 0}, ValueError), ({"max_failures": -1}, ValueError),
    ({"max_failures": 1.0}, TypeError),
])
def test_pool_arguments_are_checked(options, error):
    with pytest.raises(error, match=next(iter(options))):
        EnvPool("test-faulty", **options)
