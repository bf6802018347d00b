"""EnvPool: concurrent stepping equals sequential stepping; a SIGKILLed or hanging worker is restarted, its
episodes are replayed and complete, failures are counted; bad input never breaks the pool; nothing leaks."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gopd_fast import envs
from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv, register
from gopd_fast.envs.pool import EnvPool

HERE = str(Path(__file__).resolve())
POOL_OPTS = {"reset_timeout_s": 120.0}   # a fresh worker imports the package (torch included) on a busy box


@register("test-flaky")
class FlakyEnv(TextEnv):
    """Test-only env: a counter world. It hangs (or dies) at turn ``fail_at`` while ``marker`` does not exist yet
    (so the first attempt fails and the replay succeeds), or on every attempt with ``always=True``; it can also
    start a child process (a stand-in for a JVM) to check that the pool kills it."""

    name = "test-flaky"

    def __init__(self, fail_at: int = 0, mode: str = "hang", marker: str = "", always: bool = False,
                 child_pid_file: str = "", max_turns: int = 10) -> None:
        super().__init__(max_turns)
        self.fail_at, self.mode, self.marker, self.always = fail_at, mode, marker, always
        if child_pid_file:
            child = subprocess.Popen(["sleep", "600"])
            Path(child_pid_file).write_text(str(child.pid))

    def tasks(self, split: str) -> list[str]:
        return [f"count/{i}" for i in range(4)]

    def reset(self, task_id: str) -> Reset:
        self.task, self.turns = task_id, 0
        return Reset(f"{task_id} start", "count")

    def step(self, action: str) -> StepResult:
        self.turns += 1
        if self.turns == self.fail_at and (self.always or not os.path.exists(self.marker)):
            if self.marker:
                Path(self.marker).touch()
            if self.mode == "hang":
                time.sleep(600)
            os._exit(3)
        done = self.turns >= self.max_turns
        return StepResult(f"{self.task} {self.turns} {action}", 10.0 * self.turns, done, done)


def _expert_episode(env, task_id: str) -> list[StepResult]:
    env.reset(task_id)
    out = []
    while env.expert_action() is not None:
        out.append(env.step(env.expert_action()))
    return out


@pytest.fixture(scope="module")
def household_pool():
    with EnvPool("household", {"seed": 0}, num_workers=2, step_timeout_s=30.0, **POOL_OPTS) as pool:
        yield pool


def test_pool_equals_sequential_env(household_pool):
    pool, env = household_pool, envs.make("household", seed=0)
    tasks = env.tasks("eval")[:6]
    firsts = pool.reset_many(tasks)
    assert [f.observation for f in firsts] == [env.reset(t).observation for t in tasks]
    reference = {slot: _expert_episode(env, t) for slot, t in enumerate(tasks)}
    got: dict[int, list[StepResult]] = {slot: [] for slot in range(len(tasks))}
    live = set(got)
    while live:   # all episodes in flight together; each gets the oracle's action from its own worker
        actions = {s: a for s, a in ((s, pool.expert_action(s).result()) for s in sorted(live)) if a}
        live = set(actions)
        for slot, result in pool.step_many(actions).items():
            got[slot].append(result)
    assert got == reference
    assert all(results[-1].success for results in got.values())
    assert pool.stats().worker_restarts == 0


def test_sigkill_mid_episode_replays_and_completes(household_pool):
    pool, env = household_pool, envs.make("household", seed=0)
    task = env.tasks("train")[7]
    reference = _expert_episode(env, task)
    before = pool.stats()
    pool.reset(2, task).result()
    results: list[StepResult] = []
    env.reset(task)
    for i, ref in enumerate(reference):
        if i == 3:
            victim = pool.worker_pids()[pool.worker_of(2)]
            os.kill(victim, signal.SIGKILL)
        action = env.expert_action()
        env.step(action)
        results.append(pool.step(2, action).result())
    assert [r.observation for r in results] == [r.observation for r in reference]
    assert results[-1].success and results[-1].info["env_failures"] == 1
    assert pool.episode_failures(2) == 1
    after = pool.stats()
    assert after.crashes == before.crashes + 1 and after.replays >= before.replays + 1
    assert victim not in pool.worker_pids()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)


def test_bad_input_gets_clear_errors_and_never_restarts(household_pool):
    pool = household_pool
    restarts = pool.stats().worker_restarts
    with pytest.raises(ValueError, match="unknown household task id"):
        pool.reset(0, "household/nope/1").result()
    with pytest.raises(RuntimeError, match="before reset"):
        pool.step(11, "look").result()
    pool.reset(1, "household/train/0").result()
    assert pool.step(1, "fly to the moon").result().info["invalid_action"]
    with pytest.raises(TypeError, match="action must be a str"):
        pool.step(1, 3)
    with pytest.raises(ValueError, match="slot must be a non-negative int"):
        pool.step(-1, "look")
    assert pool.stats().worker_restarts == restarts
    with pytest.raises(ValueError, match="num_workers"):
        EnvPool("household", num_workers=0)
    with EnvPool("no-such-env", num_workers=1, **POOL_OPTS) as bad, pytest.raises(ValueError, match="unknown env"):
        bad.reset(0, "x").result()


def test_hanging_env_is_killed_and_episode_completes(tmp_path):
    opts = {"fail_at": 2, "mode": "hang", "marker": str(tmp_path / "hung")}
    with EnvPool("test-flaky", opts, num_workers=1, step_timeout_s=1.0, preload=[HERE], **POOL_OPTS) as pool:
        pool.reset(0, "count/1").result()
        pid = pool.worker_pids()[0]
        t0 = time.monotonic()
        results = [pool.step(0, f"a{i}").result() for i in range(10)]
        assert time.monotonic() - t0 < 60
        assert [r.observation for r in results] == [f"count/1 {i + 1} a{i}" for i in range(10)]
        assert results[-1].done and results[1].info["env_failures"] == 1
        stats = pool.stats()
        assert (stats.hangs, stats.crashes, stats.worker_restarts, stats.replays) == (1, 0, 1, 1)
        assert pool.episode_failures(0) == 1 and pool.worker_pids()[0] != pid


def test_persistent_failure_gives_env_error_then_restart_recovers(tmp_path):
    opts = {"fail_at": 1, "mode": "crash", "always": True}
    with EnvPool("test-flaky", opts, num_workers=1, max_failures=1, preload=[HERE], **POOL_OPTS) as pool:
        pool.reset(0, "count/0").result()
        with pytest.raises(EnvError, match="max_failures=1"):
            pool.step(0, "x").result()
        assert pool.stats().episodes_failed == 1 and pool.stats().crashes == 2
        pool.restart(0)
        assert pool.reset(0, "count/2").result().observation == "count/2 start"


def test_a_failed_episodes_later_requests_get_env_error_not_a_fresh_env(tmp_path):
    """A crash fails every live episode of the worker (max_failures=0), including one whose caller has no request
    pending yet: its next step must get the EnvError, not reach the fresh env that never saw a reset."""
    opts = {"fail_at": 1, "mode": "crash", "always": True}
    with EnvPool("test-flaky", opts, num_workers=1, max_failures=0, preload=[HERE], **POOL_OPTS) as pool:
        pool.reset(0, "count/0").result()
        pool.reset(1, "count/1").result()
        with pytest.raises(EnvError, match="slot 0 failed"):
            pool.step(0, "x").result()
        for request in (lambda: pool.step(1, "x"), lambda: pool.expert_action(1)):
            with pytest.raises(EnvError, match=r"'count/1' in slot 1 failed: .*call restart\(1\)"):
                request().result(timeout=5)
        pool.restart(1)
        assert pool.reset(1, "count/3").result().observation == "count/3 start"
        assert pool.reset(0, "count/2").result().observation == "count/2 start"   # a reset alone also clears it


def test_close_kills_workers_and_their_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    pool = EnvPool("test-flaky", {"child_pid_file": str(pid_file)}, num_workers=1, preload=[HERE], **POOL_OPTS)
    pool.reset(0, "count/0").result()
    worker, child = pool.worker_pids()[0], int(pid_file.read_text())
    assert _alive(child)
    pool.close()
    pool.close()  # idempotent
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker) and not _alive(child)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step(0, "x")


def _alive(pid: int) -> bool:
    """Running (a zombie awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_broken_preload_is_reported_not_restarted(tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("raise RuntimeError('plugin exploded')\n")
    with EnvPool("household", num_workers=1, preload=[str(bad)], **POOL_OPTS) as pool:
        with pytest.raises(ImportError, match="plugin exploded"):
            pool.reset(0, "household/train/0").result()
        assert pool.stats().worker_restarts == 0


def test_worker_dying_at_start_is_given_up_on(tmp_path):
    dying = tmp_path / "dying_plugin.py"
    dying.write_text("import os\nos._exit(7)\n")
    with EnvPool("household", num_workers=1, max_failures=0, preload=[str(dying)], **POOL_OPTS) as pool:
        with pytest.raises(EnvError):
            pool.reset(0, "household/train/0").result(timeout=60)
        deadline = time.monotonic() + 60
        while pool.stats().crashes < 3 and time.monotonic() < deadline:   # it keeps dying while idle
            time.sleep(0.1)
        time.sleep(1.0)
        assert pool.stats().crashes == 3 and pool.stats().worker_restarts == 2   # max_failures + 2, then stop
        with pytest.raises(EnvError, match="in a row.*not restarted"):
            pool.step(0, "look").result(timeout=5)


def test_interpreter_exit_without_close_leaks_nothing(tmp_path):
    """A script that forgets close(): the pool's exit hook still stops the worker and the child it started."""
    pid_file = tmp_path / "child.pid"
    script = (
        "from gopd_fast.envs.pool import EnvPool\n"
        "if __name__ == '__main__':\n"
        f"    pool = EnvPool('test-flaky', {{'child_pid_file': {str(pid_file)!r}}}, num_workers=1,\n"
        f"                   preload=[{HERE!r}], reset_timeout_s=120)\n"
        "    pool.reset(0, 'count/0').result()\n"
        "    print(pool.worker_pids()[0], flush=True)\n"
    )
    path = tmp_path / "forgetful.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120, check=True)
    worker, child = int(out.stdout.split()[-1]), int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while (_alive(child) or _alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker) and not _alive(child), out.stderr
    assert "restarting" not in out.stderr      # the exit hook stopped the pool first, not crash recovery
