"""The multi-episode rollout loop (gopd_fast.rollout.rollout) with HF engines, the household env and a scripted
env for failure injection."""
from __future__ import annotations

import math
import threading
import time

import pytest

from gopd_fast import envs as gym
from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv
from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.history import ChatFormat
from gopd_fast.rollout.rollout import RolloutOptions, run_rollout

OPTS = RolloutOptions(max_turns=4, max_new_tokens=16, max_prompt_tokens=2048, max_in_flight=8, seed=0)


class ScriptedEnv(TextEnv):
    """Solved after ``solve_after`` steps. ``faults`` maps task id -> how many of its first resets/steps raise
    EnvError (shared across env instances, like a flaky machine); ``hang_s`` makes the first step of task "hang"
    sleep that long."""

    name = "scripted"

    def __init__(self, faults: dict[str, int] | None = None, solve_after: int = 3, hang_s: float = 0.0) -> None:
        super().__init__(max_turns=50)
        self.faults, self.solve_after, self.hang_s = faults if faults is not None else {}, solve_after, hang_s
        self.task = None

    def tasks(self, split: str) -> list[str]:
        return [f"t{i}" for i in range(10)]

    def _maybe_fail(self) -> None:
        if self.faults.get(self.task, 0) > 0:
            self.faults[self.task] -= 1
            raise EnvError(f"injected failure in {self.task}")

    def reset(self, task_id: str) -> Reset:
        self.task, self.turns = task_id, 0
        self._maybe_fail()
        return Reset(observation=f"Task {task_id}: reach the end.", task=task_id)

    def step(self, action: str) -> StepResult:
        self.turns += 1
        if self.task == "hang" and self.turns == 1 and self.hang_s:
            time.sleep(self.hang_s)
        self._maybe_fail()
        done = self.turns >= self.solve_after
        return StepResult(observation=f"Step {self.turns} done.", score=100.0 * self.turns / self.solve_after,
                          done=done, success=done)


def _household(max_turns: int = 20):
    if "household" not in gym.registered() and not _try_household():
        pytest.skip("household env not available")
    return lambda: gym.make("household", seed=0, max_turns=max_turns)


def _try_household() -> bool:
    try:
        gym.make("household", seed=0).close()
    except (ValueError, ImportError):
        return False
    return True


def _check_episode_structure(ep, prompts_by_role) -> None:
    """Token-exact bookkeeping: each turn's prompt is exactly the history before the turn, generated tokens carry
    their role and a log-prob, everything else is context with log-prob 0."""
    assert len(ep.token_ids) == len(ep.roles) == len(ep.logprobs)
    assert ep.rounds == len(ep.turn_spans) == len(ep.turn_roles) == len(ep.actions)
    gen = set()
    for (s, e), role in zip(ep.turn_spans, ep.turn_roles):
        assert ep.token_ids[:s] in prompts_by_role[role], "turn prompt is not the exact history prefix"
        assert all(ep.roles[i] == role for i in range(s, e))
        assert all(ep.logprobs[i] <= 0.0 for i in range(s, e)) and any(ep.logprobs[i] < 0 for i in range(s, e))
        gen.update(range(s, e))
    for i in range(len(ep.token_ids)):
        if i not in gen:
            assert ep.roles[i] == Role.CONTEXT and ep.logprobs[i] == 0.0
    assert ep.turn_spans[-1][1] == len(ep.token_ids), "nothing is appended after the last action"


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_extremes_use_one_engine_only(beta, hf_student, hf_teacher, tokenizer, recording):
    student, teacher = recording(hf_student), recording(hf_teacher)
    factory = _household()
    tasks = factory().tasks("train")[:4]
    res = run_rollout(tasks, student=student, teacher=teacher, chat=ChatFormat(tokenizer), envs=factory,
                      beta=beta, options=OPTS)
    assert len(res.episodes) == 4 and [e.task_id for e in res.episodes] == tasks
    want = Role.TEACHER if beta == 1.0 else Role.STUDENT
    assert all(r == want for ep in res.episodes for r in ep.turn_roles)
    assert all(ep.beta == beta for ep in res.episodes)
    used, unused = (teacher, student) if beta == 1.0 else (student, teacher)
    assert unused.prompts == [] and len(used.prompts) == sum(ep.rounds for ep in res.episodes)
    by_role = {Role.STUDENT: student.prompts, Role.TEACHER: teacher.prompts}
    for ep in res.episodes:
        _check_episode_structure(ep, by_role)
    assert res.metrics["teacher_turn_fraction"] == beta


def test_household_history_token_exact_and_fraction_matches_beta(hf_student, hf_teacher, tokenizer, recording):
    factory = _household(max_turns=6)
    tasks = factory().tasks("train")[:12]
    student, teacher = recording(hf_student), recording(hf_teacher)
    beta = 0.5
    opts = RolloutOptions(max_turns=6, max_new_tokens=12, max_prompt_tokens=2048, max_in_flight=6, seed=1)
    res = run_rollout(tasks, student=student, teacher=teacher, chat=ChatFormat(tokenizer), envs=factory,
                      beta=beta, options=opts)
    assert len(res.episodes) == 12   # 12 tasks through 6 slots: slots are reused
    by_role = {Role.STUDENT: student.prompts, Role.TEACHER: teacher.prompts}
    for ep in res.episodes:
        _check_episode_structure(ep, by_role)
    turns = [r for ep in res.episodes for r in ep.turn_roles]
    frac = sum(r == Role.TEACHER for r in turns) / len(turns)
    assert abs(frac - beta) <= 5 * math.sqrt(beta * (1 - beta) / len(turns))
    assert len(teacher.prompts) == sum(r == Role.TEACHER for r in turns)
    m = res.metrics
    assert m["generated_tokens"] == sum(ep.num_loss_tokens for ep in res.episodes)   # no restarts here
    assert m["generate_seconds"] > 0 and m["env_wait_seconds"] >= 0 and m["tokens_per_second"] > 0
    # The coins depend only on (seed, episode index): a second rollout draws the same roles per turn.
    res2 = run_rollout(tasks, student=hf_student, teacher=hf_teacher, chat=ChatFormat(tokenizer), envs=factory,
                       beta=beta, options=opts)
    n = min(len(a.turn_roles) for a in res.episodes + res2.episodes)
    assert [e.turn_roles[:n] for e in res.episodes] == [e.turn_roles[:n] for e in res2.episodes]


def test_turn_limit_solved_and_context_endings(hf_student, tokenizer):
    chat = ChatFormat(tokenizer)
    solved = run_rollout(["t0", "t1"], student=hf_student, teacher=None, chat=chat,
                         envs=lambda: ScriptedEnv(solve_after=2), beta=0.0, options=OPTS)
    assert all(e.rounds == 2 and e.success and e.score == 100.0 and e.info["finish"] == "done"
               for e in solved.episodes)
    assert solved.metrics["success_rate"] == 1.0
    limited = run_rollout(["t0"], student=hf_student, teacher=None, chat=chat,
                          envs=lambda: ScriptedEnv(solve_after=10), beta=0.0, options=OPTS)
    ep = limited.episodes[0]
    assert ep.rounds == OPTS.max_turns and not ep.success and ep.info["finish"] == "max_turns"
    short = RolloutOptions(max_turns=10, max_new_tokens=16, max_prompt_tokens=80, seed=0)
    ctx = run_rollout(["t0"], student=hf_student, teacher=None, chat=chat,
                      envs=lambda: ScriptedEnv(solve_after=10), beta=0.0, options=short)
    ep = ctx.episodes[0]
    assert ep.info["finish"] == "context" and ep.info["truncated"] and len(ep.token_ids) <= 80


def test_env_failures_restart_or_drop(hf_student, tokenizer):
    """t1 fails once mid-episode (restarted, counted), t2 fails on reset once (retried), t3 fails every time
    (dropped after max_env_restarts), the others are untouched."""
    faults = {"t1": 0, "t2": 1, "t3": 100}
    lock = threading.Lock()

    class Flaky(ScriptedEnv):
        def step(self, action: str) -> StepResult:
            with lock:
                if self.task == "t1" and self.turns == 1 and faults["t1"] == 0:
                    faults["t1"] = -1
                    self.turns += 1
                    raise EnvError("JVM died")
            return super().step(action)

    opts = RolloutOptions(max_turns=5, max_new_tokens=8, max_prompt_tokens=2048, max_env_restarts=2, seed=0)
    res = run_rollout(["t0", "t1", "t2", "t3", "t4"], student=hf_student, teacher=None, chat=ChatFormat(tokenizer),
                      envs=lambda: Flaky(faults=faults, solve_after=3), beta=0.0, options=opts)
    by_task = {e.task_id: e for e in res.episodes}
    assert sorted(by_task) == ["t0", "t1", "t2", "t4"]
    assert by_task["t1"].env_failures == 1 and by_task["t2"].env_failures == 1
    assert by_task["t0"].env_failures == 0 and by_task["t4"].env_failures == 0
    # The restarted episode is a clean, complete episode: 3 turns, nothing left over from the crashed attempt.
    assert all(e.rounds == 3 and e.success for e in res.episodes)
    m = res.metrics
    assert m["episodes_dropped"] == 1 and m["env_failures"] == 1 + 1 + 3 and m["wasted_turns"] >= 2


def test_hung_env_is_a_failure(hf_student, tokenizer):
    opts = RolloutOptions(max_turns=3, max_new_tokens=8, max_prompt_tokens=2048, env_timeout_s=1.0, seed=0)
    res = run_rollout(["hang", "t0"], student=hf_student, teacher=None, chat=ChatFormat(tokenizer),
                      envs=lambda: ScriptedEnv(solve_after=2, hang_s=3.0), beta=0.0, options=opts)
    # "hang" hangs on the first step of every attempt: restarted twice, then dropped.
    assert [e.task_id for e in res.episodes] == ["t0"]
    assert res.metrics["episodes_dropped"] == 1 and res.metrics["env_failures"] == 3


def test_bad_arguments(hf_student, tokenizer):
    chat = ChatFormat(tokenizer)
    with pytest.raises(ValueError, match="teacher"):
        run_rollout(["t0"], student=hf_student, teacher=None, chat=chat, envs=ScriptedEnv, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        run_rollout(["t0"], student=hf_student, teacher=hf_student, chat=chat, envs=ScriptedEnv, beta=1.5)
    with pytest.raises(TypeError, match="tasks"):
        run_rollout("t0", student=hf_student, teacher=None, chat=chat, envs=ScriptedEnv, beta=0.0)
    with pytest.raises(TypeError, match="student"):
        run_rollout(["t0"], student="hf", teacher=None, chat=chat, envs=ScriptedEnv, beta=0.0)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        RolloutOptions(max_new_tokens=100, max_prompt_tokens=50)
    with pytest.raises(ValueError, match="max_model_len"):
        run_rollout(["t0"], student=hf_student, teacher=None, chat=chat, envs=ScriptedEnv, beta=0.0,
                    options=RolloutOptions(max_prompt_tokens=hf_student.max_model_len + 1))
    with pytest.raises(ValueError, match="max_turns"):
        RolloutOptions(max_turns=0)


CRASHY_ENV = '''
import os
from gopd_fast.envs.base import register
from gopd_fast.envs.household.env import HouseholdEnv

MARKER = {marker!r}


@register("crashy-household")
class CrashyHousehold(HouseholdEnv):
    """The household env whose worker process dies once, on the second step of the first episode that gets
    there (a marker file makes it happen exactly once across worker restarts)."""

    def step(self, action):
        if self.turns == 1 and not os.path.exists(MARKER):
            open(MARKER, "w").close()
            os._exit(1)
        return super().step(action)
'''


def test_rollout_through_env_pool_survives_a_worker_crash(hf_student, hf_teacher, tokenizer, tmp_path):
    """Greedy rollouts are deterministic, so the same tasks rolled out (a) in-process and (b) through an EnvPool
    whose worker is killed mid-episode must give token-identical episodes; (b) reports the replayed failure."""
    pytest.importorskip("gopd_fast.envs.household.env")
    from gopd_fast.envs.pool import EnvPool

    env_file = tmp_path / "crashy.py"
    env_file.write_text(CRASHY_ENV.format(marker=str(tmp_path / "crashed")))
    opts = RolloutOptions(max_turns=4, max_new_tokens=10, max_prompt_tokens=2048, temperature=0.0, seed=2)
    chat = ChatFormat(tokenizer)
    tasks = gym.make("household", seed=0).tasks("train")[:4]
    reference = run_rollout(tasks, student=hf_student, teacher=hf_teacher, chat=chat, beta=0.5, options=opts,
                            envs=lambda: gym.make("household", seed=0, max_turns=10))
    with EnvPool("crashy-household", {"seed": 0, "max_turns": 10}, num_workers=2, preload=[str(env_file)]) as pool:
        pooled = run_rollout(tasks, student=hf_student, teacher=hf_teacher, chat=chat, beta=0.5, options=opts,
                             envs=pool)
        assert pool.stats().crashes == 1
    assert (tmp_path / "crashed").exists()
    for a, b in zip(reference.episodes, pooled.episodes):
        assert (a.task_id, a.token_ids, a.roles, a.actions, a.score) == (b.task_id, b.token_ids, b.roles, b.actions,
                                                                        b.score)
    assert sum(e.env_failures for e in pooled.episodes) >= 1 and pooled.metrics["env_replays"] >= 1
    assert pooled.metrics["episodes_dropped"] == 0 and pooled.metrics["wasted_turns"] == 0


def test_generation_chunks_overlap_env_steps_with_generation(tokenizer):
    """With generation_chunks=2 the first chunk's env steps are already running while the second chunk
    generates (the timeline is recorded, not timed against a threshold); the episodes are unchanged."""
    from gopd_fast.rollout.engines.base import Generation, GenerationEngine

    events: list[tuple[str, float]] = []
    response = tokenizer("Action: look", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    class SlowEngine(GenerationEngine):
        max_model_len = 4096

        def generate(self, prompts, sampling):
            events.append(("gen_start", time.perf_counter()))
            time.sleep(0.2)
            events.append(("gen_end", time.perf_counter()))
            return [Generation(list(response), [-1.0] * len(response), "stop") for _ in prompts]

        def sync_weights(self, weights):
            return 0.0

    class SlowEnv(ScriptedEnv):
        def step(self, action):
            events.append(("step_start", time.perf_counter()))
            time.sleep(0.2)
            return super().step(action)

    def run(chunks):
        events.clear()
        opts = RolloutOptions(max_turns=3, max_new_tokens=8, max_prompt_tokens=512, generation_chunks=chunks)
        return run_rollout(["t0", "t1", "t2", "t3"], student=SlowEngine(), teacher=None, chat=ChatFormat(tokenizer),
                           envs=lambda: SlowEnv(solve_after=1), beta=0.0, options=opts)

    one = run(1)
    assert [e for e, _ in events] == ["gen_start", "gen_end"] + ["step_start"] * 4
    two = run(2)
    gen_ends = [t for e, t in events if e == "gen_end"]
    steps = sorted(t for e, t in events if e == "step_start")
    assert len(gen_ends) == 2 and len(steps) == 4
    assert steps[0] < gen_ends[1], "chunk 1's env steps must start before chunk 2 finishes generating"
    assert [e.token_ids for e in one.episodes] == [e.token_ids for e in two.episodes]
    with pytest.raises(ValueError, match="generation_chunks"):
        RolloutOptions(generation_chunks=0)
