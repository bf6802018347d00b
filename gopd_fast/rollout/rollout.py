"""Many multi-turn episodes in flight, one generation batch per engine per turn.

Each round, every live episode draws its guidance coin; the teacher-turn episodes are generated as one batch by
the teacher engine, then the student-turn episodes as one batch by the student engine. The teacher batch's env
steps are submitted as soon as it returns, so they run while the student batch generates (and the student
batch's steps run while the loop collects results). With ``generation_chunks=n`` each role's batch is split in n,
so env steps overlap generation even when one role writes every turn (for envs whose step time grows with the
number of episodes, e.g. an EnvPool with few workers). Episodes that end free their slot for the next task, so the
batch stays full while tasks remain.

An episode ends when the env says ``done``, after ``max_turns`` generated turns, or when the next prompt plus a
full response would not fit in ``max_prompt_tokens`` (``info["finish"]`` says which). The final observation is
not appended: nothing after the last action is trained on.

Envs are reached through an ``EnvSlots`` (rollout/envs.py): ``gopd_fast.envs.pool.EnvPool`` (worker processes,
the production path) or ``ThreadedEnvs`` (in-process, built here from an env factory). Env failures:
* An ``EnvPool`` survives a worker crash or hang by replaying the episode's actions in a fresh worker; the
  rollout only sees a slower future, and the replay count (``info["env_failures"]``) is added to the episode's
  ``env_failures`` (the history is unaffected: the replayed env is in the same state).
* An ``EnvError`` from a reset or step future (a pool that gave up, a ``ThreadedEnvs`` env that crashed, or no
  answer within ``env_timeout_s``): the slot is restarted and the episode starts over from its task's reset with
  an empty history (counted in ``env_failures``; the discarded turns in ``metrics["wasted_turns"]``). After
  ``max_env_restarts`` such restarts the episode is dropped and counted in ``metrics["episodes_dropped"]``: a
  partially rolled-out episode from a crashed env is never handed to the trainer.

Generation failures: an engine that raises ``GenerationFailed`` (a remote server that stayed unreachable through
its retries) hands back the generations that succeeded; the episodes whose turn failed start over from their
task's reset (counted in ``metrics["generation_failures"]``, their turns in ``wasted_turns``). After
``max_generation_retries`` such restarts of one episode the rollout raises: a run never trains on fewer episodes
than it asked for because a server was down.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gopd_fast.envs.base import EnvError, TextEnv
from gopd_fast.rollout.engines.base import Generation, GenerationEngine, SamplingConfig
from gopd_fast.rollout.engines.remote import GenerationFailed
from gopd_fast.rollout.envs import EnvSlots, ThreadedEnvs, wait_env
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.rollout.guidance import DEFAULT_ACTION_PATTERN, ActionParser, GuidanceCoin
from gopd_fast.rollout.history import ChatFormat, History


@dataclass(frozen=True)
class RolloutOptions:
    max_turns: int = 30
    max_new_tokens: int = 256           # per turn
    max_prompt_tokens: int = 4096       # history cap (prompt + one response must fit)
    temperature: float = 1.0
    top_p: float = 1.0
    max_in_flight: int = 64             # episodes generated together
    max_env_restarts: int = 2           # per episode, before it is dropped
    max_generation_retries: int = 3     # per episode: restarts after a failed generation before the rollout raises
    env_timeout_s: float | None = 600.0  # a reset/step slower than this counts as a hung env (EnvPool also
    #                                      detects hangs itself, with its own timeouts, and replays the episode)
    action_pattern: str = DEFAULT_ACTION_PATTERN
    generation_chunks: int = 1          # batches per role per turn (>1: env steps overlap more generation)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_new_tokens", "max_prompt_tokens", "max_in_flight", "generation_chunks"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("max_env_restarts", "max_generation_retries"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.max_prompt_tokens <= self.max_new_tokens:
            raise ValueError(f"max_prompt_tokens ({self.max_prompt_tokens}) must exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")


@dataclass
class RolloutResult:
    episodes: list[Episode]             # finished episodes, in task order (dropped ones omitted)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class _Live:
    index: int
    task_id: str
    coin: GuidanceCoin
    slot: int = -1
    history: History | None = None
    actions: list[str] = field(default_factory=list)
    parsed: list[bool] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    env_failures: int = 0       # failures that restarted the episode here
    replayed: int = 0           # failures an EnvPool survived by replaying this attempt (its info["env_failures"])
    restarts: int = 0           # EnvErrors that restarted this episode (decides when it is dropped)
    generation_restarts: int = 0  # failed generations that restarted this episode
    score: float = 0.0
    success: bool = False


class _Counters:
    def __init__(self) -> None:
        self.prompt_tokens = {Role.STUDENT: 0, Role.TEACHER: 0}
        self.cached_tokens = {Role.STUDENT: 0, Role.TEACHER: 0}
        self.generated_tokens = {Role.STUDENT: 0, Role.TEACHER: 0}
        self.generate_seconds = 0.0
        self.env_wait_seconds = 0.0
        self.env_failures = 0
        self.env_replays = 0
        self.dropped = 0
        self.generation_failures = 0
        self.wasted_turns = 0   # turns thrown away by restarts

    def add(self, role: Role, prompts: list[list[int]], gens: list[Generation]) -> None:
        self.prompt_tokens[role] += sum(len(p) for p in prompts)
        self.cached_tokens[role] += sum(g.num_cached_tokens for g in gens)
        self.generated_tokens[role] += sum(len(g.token_ids) for g in gens)


def run_rollout(
    tasks: Sequence[str],
    *,
    student: GenerationEngine,
    teacher: GenerationEngine | None,
    chat: ChatFormat,
    envs: EnvSlots | Callable[[], TextEnv],
    beta: float,
    options: RolloutOptions = RolloutOptions(),
) -> RolloutResult:
    """Roll out one episode per task id with guidance probability ``beta`` (fixed for all of them).

    Args:
        tasks: task ids (``env.tasks(split)`` entries); repeats allowed (one episode each).
        student / teacher: engines; ``teacher`` may be None only when ``beta == 0``.
        chat: the chat format (template pieces, thinking on/off) shared by both models' tokenizer.
        envs: an ``EnvSlots`` (e.g. ``ThreadedEnvs`` or a pool adapter), or an env factory (then a
            ``ThreadedEnvs`` is created and closed here).
        beta: probability that the teacher writes a turn (from the curriculum).
    """
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise TypeError("tasks must be a sequence of task-id strings")
    if not isinstance(student, GenerationEngine):
        raise TypeError(f"student must be a GenerationEngine, got {type(student).__name__}")
    if teacher is None and beta > 0:
        raise ValueError(f"beta={beta} > 0 needs a teacher engine")
    if teacher is not None and not isinstance(teacher, GenerationEngine):
        raise TypeError(f"teacher must be a GenerationEngine or None, got {type(teacher).__name__}")
    GuidanceCoin(beta, options.seed)  # validates beta early
    for name, engine in (("student", student), ("teacher", teacher)):
        if engine is not None and options.max_prompt_tokens > engine.max_model_len:
            raise ValueError(f"options.max_prompt_tokens ({options.max_prompt_tokens}) exceeds the {name} engine's "
                             f"max_model_len ({engine.max_model_len})")
    owned = not hasattr(envs, "step")   # a factory: the envs live (and die) with this call
    if owned:
        slots: EnvSlots = ThreadedEnvs(envs, max_workers=min(options.max_in_flight, 8))  # type: ignore[arg-type]
    else:
        slots = envs  # type: ignore[assignment]
    try:
        return _Rollout(tasks, student, teacher, chat, slots, beta, options).run()
    finally:
        if owned:
            slots.close()


def _split(items: list, chunks: int) -> list[list]:
    """``items`` in at most ``chunks`` contiguous, non-empty, near-equal parts."""
    size = -(-len(items) // chunks) if items else 1
    return [items[i:i + size] for i in range(0, len(items), size)]


class _Rollout:
    def __init__(self, tasks, student, teacher, chat, slots, beta, options) -> None:
        self.tasks = list(tasks)
        self.engines = {Role.STUDENT: student, Role.TEACHER: teacher}
        self.chat, self.slots, self.beta, self.opt = chat, slots, float(beta), options
        self.parser = ActionParser(options.action_pattern)
        self.sampling = SamplingConfig(max_tokens=options.max_new_tokens, temperature=options.temperature,
                                       top_p=options.top_p)
        self.counters = _Counters()
        self.done: dict[int, Episode] = {}
        self.free_slots = list(range(min(options.max_in_flight, max(len(self.tasks), 1))))[::-1]

    # -- episode lifecycle ------------------------------------------------------------------------------
    def _start(self, starting: list[_Live]) -> tuple[list[_Live], list[_Live]]:
        """Reset the envs of ``starting`` episodes (in parallel); returns (started, to retry next round)."""
        futures = [(st, self.slots.reset(st.slot, st.task_id)) for st in starting]
        started, retry = [], []
        t0 = time.perf_counter()
        for st, fut in futures:
            try:
                first = wait_env(fut, self.opt.env_timeout_s)
            except EnvError:
                if self._fail(st):
                    retry.append(st)
                continue
            st.replayed = int(first.info.get("env_failures", 0))
            st.history = History(self.chat.initial_prompt(first.prompt))
            st.actions, st.parsed, st.finish_reasons = [], [], []
            started.append(st)
        self.counters.env_wait_seconds += time.perf_counter() - t0
        return started, retry

    def _discard_attempt(self, st: _Live) -> None:
        """Throw away this attempt's history (its turns count as wasted); the episode restarts from its reset."""
        if st.history is not None:
            self.counters.wasted_turns += len(st.history.turn_spans)
        st.history = None

    def _fail(self, st: _Live) -> bool:
        """Record an env failure; restart the slot. True if the episode should be retried, False if dropped."""
        st.env_failures += 1 + st.replayed
        st.replayed = 0
        st.restarts += 1
        self.counters.env_failures += 1
        self._discard_attempt(st)
        self.slots.restart(st.slot)
        if st.restarts > self.opt.max_env_restarts:
            self.counters.dropped += 1
            self.free_slots.append(st.slot)
            return False
        return True

    def _requeue_failed_generation(self, st: _Live, error: GenerationFailed) -> None:
        """The episode's turn got no generation: start it over from its task's reset (the env is reset there)."""
        st.generation_restarts += 1
        self.counters.generation_failures += 1
        self._discard_attempt(st)
        if st.generation_restarts > self.opt.max_generation_retries:
            raise RuntimeError(f"episode {st.index} (task {st.task_id!r}) failed to generate "
                               f"{st.generation_restarts} times: {error}") from error

    def _finish(self, st: _Live, finish: str) -> None:
        h = st.history
        assert h is not None
        self.done[st.index] = Episode(
            task_id=st.task_id, token_ids=h.token_ids, roles=h.roles, logprobs=h.logprobs,
            turn_spans=h.turn_spans, turn_roles=h.turn_roles, actions=st.actions, score=st.score,
            success=st.success, rounds=len(h.turn_spans), beta=self.beta,
            env_failures=st.env_failures + st.replayed,
            info={"finish": finish, "truncated": finish != "done", "parsed_actions": st.parsed,
                  "finish_reasons": st.finish_reasons},
        )
        self.counters.env_replays += st.replayed
        self.free_slots.append(st.slot)

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> RolloutResult:
        t_start = time.perf_counter()
        queue = deque(_Live(i, t, GuidanceCoin(self.beta, self.opt.seed, i)) for i, t in enumerate(self.tasks))
        retry: list[_Live] = []
        live: list[_Live] = []
        rounds = 0
        while queue or live or retry:
            starting = retry
            retry = []
            while queue and self.free_slots:
                st = queue.popleft()
                st.slot = self.free_slots.pop()
                starting.append(st)
            if starting:
                started, retry = self._start(starting)
                live.extend(started)
            if not live:
                continue
            live = self._round(live, retry)
            rounds += 1
        wall = time.perf_counter() - t_start
        return RolloutResult([self.done[i] for i in sorted(self.done)], self._metrics(wall, rounds))

    def _round(self, live: list[_Live], retry: list[_Live]) -> list[_Live]:
        """One turn of every live episode; returns the episodes still live afterwards."""
        groups: dict[Role, list[_Live]] = {Role.TEACHER: [], Role.STUDENT: []}
        for st in live:
            groups[st.coin.draw()].append(st)
        # Teacher batch(es) first, then student: every batch's env steps are submitted as soon as it returns, so
        # they run while the later batches generate. ``generation_chunks`` > 1 splits each role's batch to get
        # that overlap even when one role writes every turn (smaller batches: worth it only for slow envs).
        batches = [(role, chunk) for role in (Role.TEACHER, Role.STUDENT)
                   for chunk in _split(groups[role], self.opt.generation_chunks)]
        pending = []
        for role, group in batches:
            prompts = [st.history.prompt() for st in group]  # type: ignore[union-attr]
            t0 = time.perf_counter()
            try:
                gens: list[Generation | None] = list(self.engines[role].generate(prompts, self.sampling))
            except GenerationFailed as e:
                gens = list(e.generations)
                for i in e.failed:
                    self._requeue_failed_generation(group[i], e)
                    retry.append(group[i])
            self.counters.generate_seconds += time.perf_counter() - t0
            ok = [(st, p, gen) for st, p, gen in zip(group, prompts, gens) if gen is not None]
            self.counters.add(role, [p for _, p, _ in ok], [gen for _, _, gen in ok])
            for st, _, gen in ok:
                st.history.add_response(gen.token_ids, gen.logprobs, role)  # type: ignore[union-attr]
                parsed = self.parser(self.chat.response_text(gen.token_ids))
                st.actions.append(parsed.action)
                st.parsed.append(parsed.parsed)
                st.finish_reasons.append(gen.finish_reason)
                pending.append((st, gen, self.slots.step(st.slot, parsed.action)))

        still_live = []
        t0 = time.perf_counter()
        for st, gen, fut in pending:
            try:
                res = wait_env(fut, self.opt.env_timeout_s)
            except EnvError:
                if self._fail(st):
                    retry.append(st)
                continue
            st.score, st.success = float(res.score), bool(res.success)
            st.replayed = max(st.replayed, int(res.info.get("env_failures", 0)))
            h = st.history
            assert h is not None
            if res.done:
                self._finish(st, "done")
            elif len(h.turn_spans) >= self.opt.max_turns:
                self._finish(st, "max_turns")
            else:
                piece = self.chat.piece_after(gen.token_ids, res.observation)
                if len(h) + len(piece) + self.opt.max_new_tokens > self.opt.max_prompt_tokens:
                    self._finish(st, "context")
                else:
                    h.add_observation(piece)
                    still_live.append(st)
        self.counters.env_wait_seconds += time.perf_counter() - t0
        return still_live

    def _metrics(self, wall: float, rounds: int) -> dict[str, float]:
        c = self.counters
        eps = list(self.done.values())
        prompt = sum(c.prompt_tokens.values())
        cached = sum(c.cached_tokens.values())
        generated = sum(c.generated_tokens.values())
        turns = sum(e.rounds for e in eps)
        teacher_turns = sum(r == Role.TEACHER for e in eps for r in e.turn_roles)
        m = {
            "episodes": float(len(eps)), "episodes_dropped": float(c.dropped), "env_failures": float(c.env_failures),
            "generation_failures": float(c.generation_failures),
            "env_replays": float(c.env_replays),
            "wasted_turns": float(c.wasted_turns), "rounds": float(rounds),
            "turns": float(turns), "teacher_turn_fraction": teacher_turns / turns if turns else 0.0,
            "success_rate": sum(e.success for e in eps) / len(eps) if eps else 0.0,
            "mean_score": sum(e.score for e in eps) / len(eps) if eps else 0.0,
            "prompt_tokens": float(prompt), "cached_prompt_tokens": float(cached),
            "prefix_cache_hit_rate": cached / prompt if prompt else 0.0,
            "generated_tokens": float(generated),
            "generate_seconds": c.generate_seconds, "env_wait_seconds": c.env_wait_seconds,
            "wall_seconds": wall, "tokens_per_second": generated / wall if wall else 0.0,
        }
        if isinstance(self.slots, ThreadedEnvs):
            m["env_busy_seconds"] = self.slots.busy_seconds
        for role, name in ((Role.STUDENT, "student"), (Role.TEACHER, "teacher")):
            p = c.prompt_tokens[role]
            m[f"{name}_prefix_cache_hit_rate"] = c.cached_tokens[role] / p if p else 0.0
            m[f"{name}_generated_tokens"] = float(c.generated_tokens[role])
        return m
