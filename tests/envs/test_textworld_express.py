"""TextWorldExpress adapter and the shared JVM ownership (watchdog, restart, shutdown) on the real jar.

TextWorldExpress starts its JVM in well under a second, so the JavaSimulator failure paths are tested here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time

import pytest

from gopd_fast.envs import EnvError, make

pytestmark = [
    pytest.mark.java,
    pytest.mark.skipif(shutil.which("java") is None, reason="TextWorldExpress needs a Java runtime (java not on PATH)"),
]
pytest.importorskip("textworld_express", reason="the textworld-express package is not installed")


@pytest.fixture(scope="module")
def env():
    e = make("textworld-express", games=["coin", "cookingworld", "arithmetic"], max_seeds_per_game=4, max_turns=60)
    yield e
    e.close()


def _stop_and_wait(pid: int, timeout_s: float = 5.0) -> None:
    """SIGSTOP ``pid`` and wait until every thread is stopped: the signal is asynchronous, and a TextWorldExpress
    step takes well under a millisecond, so a request sent right after ``os.kill`` could still be answered."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = []
        for task in os.listdir(f"/proc/{pid}/task"):   # every JVM thread, not just the main one
            with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s")


def _pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _pid_alive(pid)


def _java_children() -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "java"], capture_output=True, text=True, check=False).stdout
    return {int(p) for p in out.split()}


def test_splits_use_the_games_seed_folds(env):
    handle = env.jvm.call(lambda h: h, restart=True)
    handle.load("coin", "")
    folds = {"train": set(handle.getValidSeedsTrain()), "dev": set(handle.getValidSeedsDev()),
             "test": set(handle.getValidSeedsTest())}
    for split in ("train", "dev", "test"):
        ids = env.tasks(split)
        assert len(ids) == 3 * 4 and ids == env.tasks(split)
        coin_seeds = {int(t.split(":")[1]) for t in ids if t.startswith("coin:")}
        assert len(coin_seeds) == 4 and coin_seeds <= folds[split]
    assert env.tasks("eval") == env.tasks("test")
    assert not folds["train"] & folds["test"] and not folds["dev"] & folds["test"]
    with pytest.raises(ValueError, match="unknown split"):
        env.tasks("valid")


@pytest.mark.parametrize("game", ["coin", "cookingworld", "arithmetic"])
def test_gold_path_wins_with_score_100(env, game):
    task_id = next(t for t in env.tasks("test") if t.startswith(game + ":"))
    first = env.reset(task_id)
    assert first.task and first.observation and first.admissible_actions
    step = None
    while (action := env.expert_action()) is not None:
        if action != "look around":  # the gold path's actions are admissible where they are taken
            assert action in (step.admissible_actions if step else first.admissible_actions)
        step = env.step(action)
        assert 0.0 <= step.score <= 100.0
        if step.done:
            break
    assert step is not None and step.done and step.success and step.score == 100.0
    assert env.turns == len(env.gold_actions)
    with pytest.raises(RuntimeError, match="after the episode is done"):
        env.step("look around")


def test_deviation_invalid_action_and_turn_limit(env):
    task_id = env.tasks("dev")[0]
    env.reset(task_id)
    gold = env.gold_actions
    env.step(gold[0])
    assert env.expert_action() == gold[1]
    bad = env.step("dance wildly")
    assert bad.info.get("invalid_action") and "Unknown action" in bad.observation and not bad.done
    assert env.expert_action() is None
    env.max_turns = 3
    try:
        last = env.step("look around")
        assert last.done and last.info["truncated"] and not last.success
    finally:
        env.max_turns = 60


def test_bad_input_is_rejected_with_clear_errors(env):
    for bad in ["coin", "coin:abc", "chess:1", "coin:5000"]:
        with pytest.raises(ValueError):
            env.reset(bad)
    with pytest.raises(TypeError):
        env.step(42)
    with pytest.raises(ValueError, match="unknown TextWorldExpress games"):
        make("textworld-express", games=["zork"])
    with pytest.raises(TypeError, match="option games must be a list of strs"):
        make("textworld-express", games="coin")
    fresh = make("textworld-express", games=["coin"])
    with pytest.raises(RuntimeError, match="before reset"):
        fresh.step("look around")
    fresh.close()


def test_bad_game_params_are_reported_by_the_jar(env):
    e = make("textworld-express", games=["coin"], game_params={"coin": "numLocations=500"})
    try:
        with pytest.raises(ValueError, match="less than or equal to 11"):
            e.tasks("train")
        e.game_params["coin"] = "foo=1"
        with pytest.raises(ValueError, match="Unrecognized property name"):
            e.reset("coin:3")
    finally:
        e.close()


def test_killed_jvm_raises_env_error_and_reset_restarts(env):
    env.reset(env.tasks("test")[0])
    pid = env.jvm.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EnvError, match="JVM"):
        env.step("look around")
    assert not _pid_alive(pid)
    with pytest.raises(EnvError, match="not running"):  # the episode died with its JVM
        env.step("look around")
    restarts = env.jvm.restarts
    assert env.reset(env.tasks("test")[0]).observation
    assert env.jvm.restarts == restarts + 1 and env.jvm.pid not in (None, pid)


def test_hung_jvm_is_killed_by_the_watchdog(env):
    env.reset(env.tasks("test")[0])
    pid = env.jvm.pid
    env.jvm.call_timeout_s = 0.5
    _stop_and_wait(pid)  # the JVM stops answering: the step would block forever without the watchdog
    try:
        start = time.monotonic()
        with pytest.raises(EnvError, match="exceeded 0.5 s"):
            env.step("look around")
        assert time.monotonic() - start < 5
        assert not _pid_alive(pid)
    finally:
        env.jvm.call_timeout_s = 30.0
        if _pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert env.reset(env.tasks("test")[0]).observation


def test_close_leaves_no_java_process():
    before = _java_children()
    e = make("textworld-express", games=["coin"])
    e.reset(e.tasks("train")[0])
    pid = e.jvm.pid
    assert pid in _java_children() - before
    e.close()
    e.close()  # idempotent
    assert not _pid_alive(pid) and _java_children() <= before


def test_interpreter_exit_kills_the_jvm(tmp_path):
    # A child interpreter starts an env and exits without close(): the atexit hook must reap the JVM.
    script = ("from gopd_fast.envs import make\n"
              "e = make('textworld-express', games=['coin'])\n"
              "e.reset(e.tasks('train')[0])\n"
              "print(e.jvm.pid)\n")
    out = subprocess.run([os.sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert _wait_gone(int(out.stdout.split()[-1]))


def test_sigkilled_owner_takes_its_jvm_down():
    # What the env pool relies on when it kills a hung worker: no atexit runs, yet the JVM must not leak
    # (py4j's die_on_exit: the JVM exits when its stdin, held by the dead owner, closes).
    script = ("import time\nfrom gopd_fast.envs import make\n"
              "e = make('textworld-express', games=['coin'])\n"
              "e.reset(e.tasks('train')[0])\n"
              "print(e.jvm.pid, flush=True)\ntime.sleep(120)\n")
    owner = subprocess.Popen([os.sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        jvm_pid = int(owner.stdout.readline())
        assert _pid_alive(jvm_pid)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
    assert _wait_gone(jvm_pid)


def test_missing_java_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    e = make("textworld-express", games=["coin"])  # constructing starts nothing
    with pytest.raises(RuntimeError, match="needs a Java runtime"):
        e.reset("coin:3")  # (split lists may be cached by earlier envs; an episode always needs the JVM)
    e.close()


@pytest.mark.parametrize(("options", "error", "name"), [
    ({"max_turns": True}, TypeError, "max_turns"), ({"seed": "0"}, TypeError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"), ({"max_seeds_per_game": True}, TypeError, "max_seeds_per_game"),
    ({"max_seeds_per_game": 0}, ValueError, "max_seeds_per_game"),
    ({"step_timeout_s": -1}, ValueError, "step_timeout_s"), ({"game_params": "coin"}, TypeError, "game_params"),
    ({"games": [1]}, TypeError, "games"), ({"colour": 1}, TypeError, "colour"),
    ({"game_params": {"coin": "numLocations=5\udcff"}}, ValueError, "game_params"),
    ({"game_params": {"coin": "numLocations=5\n"}}, ValueError, "game_params"),
])
def test_options_are_checked_not_coerced(options, error, name):
    with pytest.raises(error, match=name):
        make("textworld-express", **options)


@pytest.mark.parametrize("bad", ["coin:²", "coin:٣", "coin:-1", "coin:020003", "coin:", "coin:+20003"])
def test_odd_task_ids_name_the_expected_form(env, bad):
    with pytest.raises(ValueError, match="<game>:<seed>"):
        env.reset(bad)


def test_any_str_action_gets_the_games_own_answer_and_the_jvm_survives(env, malformed_actions):
    env.reset(env.tasks("dev")[0])
    pid, restarts = env.jvm.pid, env.jvm.restarts
    for action in malformed_actions:
        step = env.step(action)
        assert isinstance(step.observation, str) and not step.done, action[:40]
        env.turns = 0   # stay under the turn limit: this checks the answers, not the limit
    assert env.jvm.pid == pid and env.jvm.restarts == restarts
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(b"look around")
