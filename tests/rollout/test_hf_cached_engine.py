"""The KV-cached transformers engine (gopd_fast.rollout.engines.hf_cached) against the re-encoding HFEngine."""
from __future__ import annotations

import copy

import pytest
import torch

from gopd_fast import envs as gym
from gopd_fast.models import load_model
from gopd_fast.rollout import ChatFormat, RolloutOptions, run_rollout
from gopd_fast.rollout.engines.base import SamplingConfig
from gopd_fast.rollout.engines.hf import HFEngine
from gopd_fast.rollout.engines.hf_cached import CachedHFEngine, load_hf_engine

TEACHER = "gopd_fast/assets/household-full-teacher"


@pytest.fixture(scope="module")
def teacher_pair():
    """The committed household teacher (a trained 4-layer Qwen3: real, varied episode lengths) in both engines."""
    model, tokenizer = load_model(TEACHER)
    eos = [tokenizer.eos_token_id]
    return (CachedHFEngine(copy.deepcopy(model), pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos),
            HFEngine(model, pad_token_id=tokenizer.pad_token_id, eos_token_ids=eos), tokenizer)


def _household_rollout(engine, tokenizer, tasks, **opts):
    factory = lambda: gym.make("household", seed=0, observe="full", max_turns=20)
    options = RolloutOptions(**{"max_turns": 8, "max_new_tokens": 16, "max_prompt_tokens": 2048,
                                "temperature": 0.0, "max_in_flight": 4, "seed": 0, **opts})
    return run_rollout(tasks, student=engine, teacher=None, chat=ChatFormat(tokenizer), envs=factory, beta=0.0,
                       options=options)


def _tasks(n: int) -> list[str]:
    env = gym.make("household", seed=0, observe="full")
    try:
        return env.tasks("train")[:n]
    finally:
        env.close()


def test_greedy_rollout_matches_the_reencoding_engine(teacher_pair):
    cached, plain, tok = teacher_pair
    cached.reset_prefix_cache()
    # 8 tasks through 5 slots: episodes finish at different turns (8 to 15), new ones join, the batch shrinks
    tasks = _tasks(8)
    a = _household_rollout(cached, tok, tasks, max_turns=15, max_in_flight=5)
    b = _household_rollout(plain, tok, tasks, max_turns=15, max_in_flight=5)
    assert len({e.rounds for e in a.episodes}) > 1, "the workload must end episodes at different turns"
    for x, y in zip(a.episodes, b.episodes, strict=True):
        assert x.token_ids == y.token_ids and x.info["finish"] == y.info["finish"]
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
    m = a.metrics
    # every turn after an episode's first reuses its history: most prompt tokens come from the cache
    assert m["prefix_cache_hit_rate"] > 0.7 and b.metrics["prefix_cache_hit_rate"] == 0.0
    assert m["prompt_tokens"] == b.metrics["prompt_tokens"]


def test_context_limit_ends_episodes_as_today(teacher_pair):
    cached, plain, tok = teacher_pair
    tasks = _tasks(4)
    a = _household_rollout(cached, tok, tasks, max_prompt_tokens=700)
    b = _household_rollout(plain, tok, tasks, max_prompt_tokens=700)
    assert any(e.info["finish"] == "context" for e in a.episodes)
    assert [e.token_ids for e in a.episodes] == [e.token_ids for e in b.episodes]
    assert [e.info["finish"] for e in a.episodes] == [e.info["finish"] for e in b.episodes]
    assert all(len(e.token_ids) <= 700 for e in a.episodes)


def test_extending_prompt_prefills_only_the_new_tokens(teacher_pair):
    cached, plain, tok = teacher_pair
    cached.reset_prefix_cache()
    greedy = SamplingConfig(max_tokens=8, temperature=0.0)
    p1 = [tok.pad_token_id + 5 + i % 50 for i in range(40)]
    g1 = cached.generate([p1], greedy)[0]
    assert g1.num_cached_tokens == 0
    p2 = p1 + g1.token_ids + [17, 18, 19]
    g2 = cached.generate([p2], greedy)[0]
    # KV exists for the prompt and all response tokens but the last one (never fed back)
    assert g2.num_cached_tokens == len(p1) + len(g1.token_ids) - 1
    ref = plain.generate([p2], greedy)[0]
    assert g2.token_ids == ref.token_ids
    torch.testing.assert_close(torch.tensor(g2.logprobs), torch.tensor(ref.logprobs), atol=1e-4, rtol=0)
    assert cached.stats().cached_prompt_tokens >= g2.num_cached_tokens


def test_weight_sync_invalidates_every_cache(teacher_pair):
    cached, plain, _ = teacher_pair
    greedy = SamplingConfig(max_tokens=6, temperature=0.0)
    prompts = [[7 + i for i in range(30)], [9 + i for i in range(25)]]
    gens = cached.generate(prompts, greedy)
    assert len(cached.store) >= 2
    original = {k: v.clone() for k, v in cached.model.state_dict().items()}
    perturbed = {k: v + 0.05 * torch.randn_like(v) for k, v in original.items()}
    cached.sync_weights(perturbed)
    assert len(cached.store) == 0 and cached.store.cached_tokens == 0
    nxt = [p + g.token_ids + [11, 12] for p, g in zip(prompts, gens)]
    after = cached.generate(nxt, greedy)
    assert all(g.num_cached_tokens == 0 for g in after)
    # ... and what it generates is the new weights' output (the fused projections were rebuilt)
    fresh = HFEngine(copy.deepcopy(plain.model), pad_token_id=plain.pad_token_id, eos_token_ids=plain.eos_token_ids)
    fresh.sync_weights(perturbed)
    assert [g.token_ids for g in after] == [g.token_ids for g in fresh.generate(nxt, greedy)]
    cached.sync_weights(original)


def _exact_first_token_probs(model, prompt: list[int], sampling: SamplingConfig) -> torch.Tensor:
    """The sampling distribution of the next token, from one plain forward (temperature, top-k, top-p)."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[:, -1].double() / sampling.temperature
    if sampling.top_k:
        logits = TopKLogitsWarper(sampling.top_k)(None, logits)
    if sampling.top_p < 1:
        logits = TopPLogitsWarper(sampling.top_p)(None, logits)
    return logits.softmax(-1)[0]


def _draws(engine, prompt: list[int], sampling: SamplingConfig, n: int) -> torch.Tensor:
    firsts = [g.token_ids[0] for g in engine.generate([prompt] * n, sampling)]
    return torch.bincount(torch.tensor(firsts), minlength=engine.vocab_size).double() / n


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 0), (1.0, 10)], ids=["plain", "top_p", "top_k"])
def test_sampling_distribution_matches_at_cached_positions(hf_student, tokenizer, top_p, top_k):
    """First tokens drawn after a cached turn follow the exact warped softmax: total-variation distance within a
    bound (above the 99.5th percentile of n=4000 exact draws, by simulation) that a wrong temperature exceeds
    by far, for both engines. The random-init tiny student at temperature 0.05 spreads its mass over ~20 tokens."""
    cached = CachedHFEngine(copy.deepcopy(hf_student.model), pad_token_id=hf_student.pad_token_id,
                            eos_token_ids=hf_student.eos_token_ids)
    base = tokenizer("Task: Put the mug in the fridge.", add_special_tokens=False).input_ids
    first = cached.generate([base], SamplingConfig(max_tokens=4, temperature=0.0))[0]
    prompt = base + first.token_ids + tokenizer(" Action: open fridge", add_special_tokens=False).input_ids
    sampling = SamplingConfig(max_tokens=1, temperature=0.05, top_p=top_p, top_k=top_k, seed=3)
    n = 4000
    emp = _draws(cached, prompt, sampling, n)
    # every draw starts from cached KV: the first turn's, then (later micro-batches) a sibling draw's prompt
    assert cached.stats().cached_prompt_tokens >= n * (len(base) + len(first.token_ids) - 1)
    ref = _draws(hf_student, prompt, sampling, n)
    exact = _exact_first_token_probs(hf_student.model, prompt, sampling)
    wrong = _exact_first_token_probs(hf_student.model, prompt, SamplingConfig(temperature=0.1, top_p=top_p,
                                                                               top_k=top_k))
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())
    bound = 0.065
    assert tv(exact, wrong) > 2 * bound, "the test must be able to tell a wrong distribution apart"
    assert tv(emp, exact) < bound and tv(ref, exact) < bound
    if top_p < 1 or top_k:   # nothing outside the nucleus / top-k is ever drawn
        assert float(emp[exact == 0].sum()) == 0.0


def test_sampled_logprobs_are_raw_teacher_forced_logprobs(teacher_pair):
    cached, plain, _ = teacher_pair
    prompt = [5 + i % 40 for i in range(50)]
    first = cached.generate([prompt], SamplingConfig(max_tokens=5, temperature=0.0))[0]
    p2 = prompt + first.token_ids + [6, 7, 8]
    g = cached.generate([p2], SamplingConfig(max_tokens=10, temperature=1.0, seed=2))[0]
    assert g.num_cached_tokens > 0
    with torch.no_grad():
        logp = torch.log_softmax(plain.model(torch.tensor([p2 + g.token_ids])).logits[0].double(), dim=-1)
    ref = [float(logp[len(p2) - 1 + i, t]) for i, t in enumerate(g.token_ids)]
    torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64),
                               atol=2e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_cache_is_bounded(teacher_pair):
    cached, _, _ = teacher_pair
    prompts = [[5 + (i * j) % 60 for i in range(20 + j)] for j in range(5)]
    s = SamplingConfig(max_tokens=8, temperature=1.0, seed=4)
    cached.reset_prefix_cache()
    a = cached.generate(prompts, s)
    cached.reset_prefix_cache()
    assert [g.token_ids for g in a] == [g.token_ids for g in cached.generate(prompts, s)]
    small = CachedHFEngine(cached.model, pad_token_id=0, eos_token_ids=cached.eos_token_ids, max_cached_tokens=60)
    small.generate(prompts, s)
    assert small.store.cached_tokens <= 60


def test_bad_arguments(model_dirs, tokenizer):
    with pytest.raises(TypeError, match="kv_reuse"):
        load_hf_engine(model_dirs["student"], kv_reuse="yes")
    assert type(load_hf_engine(model_dirs["student"], kv_reuse=False)) is HFEngine
    engine = load_hf_engine(model_dirs["student"], kv_reuse=True)
    assert isinstance(engine, CachedHFEngine)
    with pytest.raises(ValueError, match="exceeds the model's"):
        engine.generate([[5] * 10], SamplingConfig(max_tokens=engine.max_model_len))
    model = copy.deepcopy(engine.model)
    model.config.model_type = "llama"
    with pytest.raises(ValueError, match="kv_reuse = false"):
        CachedHFEngine(model, pad_token_id=0)


@pytest.mark.parametrize("numpy_decode", [True, False], ids=["numpy-decode", "torch-decode"])
def test_final_hidden_matches_a_full_forward(numpy_decode):
    """A teacher that keeps hidden states hands each finished guided episode's final hidden states to the trainer:
    its cached positions' states (prefill and fed-back decode tokens) plus a prefill of what it never ran; they
    equal one full forward over the episode (``Qwen3Decoder.encode``, the trainer's lean teacher) up to float
    rounding, and the finished episodes leave the cache."""
    from gopd_fast.models import build_model, config_for_tokenizer
    from gopd_fast.rollout.engines.decoder import Qwen3Decoder

    model, tok = load_model(TEACHER)
    kw = {"pad_token_id": tok.pad_token_id, "eos_token_ids": [tok.eos_token_id]}
    teacher = CachedHFEngine(copy.deepcopy(model), keep_hidden=True, **kw)
    teacher.decoder = Qwen3Decoder(teacher.model, numpy_decode=numpy_decode)
    student = CachedHFEngine(build_model(config_for_tokenizer("teacher-tiny", tok, num_hidden_layers=2), seed=3),
                             **kw)
    factory = lambda: gym.make("household", seed=0, observe="full", max_turns=20)
    result = run_rollout(_tasks(5), student=student, teacher=teacher, chat=ChatFormat(tok), envs=factory,
                         beta=0.5, options=RolloutOptions(max_turns=6, max_new_tokens=16, max_prompt_tokens=2048,
                                                          temperature=1.0, max_in_flight=3, seed=0))
    episodes = result.episodes
    assert 0 < result.metrics["teacher_turn_fraction"] < 1, "both models must write turns"
    reused = sum(len(e.tokens) for e in teacher.store._entries)
    assert reused > 0
    hidden = teacher.final_hidden([e.token_ids for e in episodes])
    assert len(teacher.store) == 0
    reference = Qwen3Decoder(model, numpy_decode=False)
    for ep, h in zip(episodes, hidden, strict=True):
        n = len(ep.token_ids)
        full = reference.encode(torch.tensor([ep.token_ids]), torch.arange(n)[None])[0]
        assert h.shape == (n, model.config.hidden_size)
        torch.testing.assert_close(h, full, atol=1e-4, rtol=1e-4)
    # a sequence the engine never saw is one prefill (nothing cached), the same states
    again = teacher.final_hidden([episodes[0].token_ids])[0]
    torch.testing.assert_close(again, hidden[0], atol=1e-4, rtol=1e-4)


def test_final_hidden_needs_keep_hidden_and_valid_sequences(teacher_pair):
    cached, _, tok = teacher_pair
    with pytest.raises(RuntimeError, match="keep_hidden=True"):
        cached.final_hidden([[1, 2, 3]])
    model, _ = load_model(TEACHER)
    keeper = CachedHFEngine(model, keep_hidden=True, pad_token_id=tok.pad_token_id)
    assert keeper.final_hidden([]) == []
    with pytest.raises(TypeError, match="sequences must be a list of token-id lists"):
        keeper.final_hidden("abc")
    with pytest.raises(ValueError, match=r"sequences\[1\] must be a non-empty list of token ids"):
        keeper.final_hidden([[1], []])
    with pytest.raises(TypeError, match=r"sequences\[0\] must hold integer token ids, got 2.7"):
        keeper.final_hidden([[1, 2.7]])
    with pytest.raises(ValueError, match=r"sequences\[0\] has token ids outside \[0, 512\)"):
        keeper.final_hidden([[1, 512]])
    with pytest.raises(ValueError, match="exceeds the model's"):
        keeper.final_hidden([[5] * (model.config.max_position_embeddings + 1)])
    with pytest.raises(TypeError, match="keep_hidden must be a bool"):
        CachedHFEngine(model, keep_hidden=1)
    with pytest.raises(ValueError, match="keep_hidden=True needs kv_reuse=True"):
        load_hf_engine(TEACHER, kv_reuse=False, keep_hidden=True)
