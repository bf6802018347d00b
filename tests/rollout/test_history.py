"""Append-only token histories and chat-template pieces (gopd_fast.rollout.history)."""
from __future__ import annotations

import itertools

import pytest

from gopd_fast.rollout.episode import Role
from gopd_fast.rollout.history import ChatFormat, History

OBS = ["You are in the kitchen. Task: Put the mug in the fridge.", "You open the fridge.", "Nothing happens."]
RESPONSES = ["Thought: open it.\nAction: open fridge", "Action: take mug from counter", "Action: look"]


def _conversation(chat: ChatFormat, responses: list[str]) -> tuple[list[int], str]:
    """Build the append-only history of a 3-turn chat; responses are tokenised as the model would emit them
    (text + end-of-turn token). Returns (tokens, the concatenated piece texts)."""
    tok = chat.tokenizer
    ids = chat.initial_prompt(OBS[0])
    for k, resp in enumerate(responses):
        resp_ids = tok(resp + "<|im_end|>", add_special_tokens=False).input_ids
        assert resp_ids[-1] == tok.eos_token_id
        ids = ids + resp_ids
        if k + 1 < len(responses):
            ids = ids + chat.piece_after(resp_ids, OBS[k + 1])
    return ids, tok.decode(ids)


@pytest.mark.parametrize("system_prompt", [None, "You are a household agent."])
def test_whole_render_equals_concatenation_thinking_on(tokenizer, system_prompt):
    chat = ChatFormat(tokenizer, enable_thinking=True, system_prompt=system_prompt)
    ids, _ = _conversation(chat, RESPONSES)
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for k, resp in enumerate(RESPONSES):
        msgs += [{"role": "user", "content": OBS[k]}, {"role": "assistant", "content": resp}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    # The rendered conversation ends with "<|im_end|>\n" after the last turn; the history stops at the sampled eos.
    assert full.endswith("<|im_end|>\n")
    assert tokenizer(full[:-1], add_special_tokens=False).input_ids == ids


def test_whole_render_equals_concatenation_thinking_off(tokenizer):
    """With thinking off the empty think block sits in every generation prompt; in a whole-conversation render it
    is part of each assistant message, so the two must still agree token for token."""
    chat = ChatFormat(tokenizer, enable_thinking=False)
    ids, _ = _conversation(chat, RESPONSES)
    think = "<think>\n\n</think>\n\n"
    msgs = []
    for k, resp in enumerate(RESPONSES):
        msgs += [{"role": "user", "content": OBS[k]}, {"role": "assistant", "content": think + resp}]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert tokenizer(full[:-1], add_special_tokens=False).input_ids == ids
    assert chat.initial_prompt(OBS[0])[-len(tokenizer(think).input_ids):] == tokenizer(think).input_ids


def test_observation_piece_is_qwen3_scaffolding(tokenizer):
    chat = ChatFormat(tokenizer, enable_thinking=True)
    expected = "<|im_end|>\n<|im_start|>user\nYou open the fridge.<|im_end|>\n<|im_start|>assistant\n"
    assert chat.observation_piece("You open the fridge.") == tokenizer(expected, add_special_tokens=False).input_ids


def test_piece_after_drops_only_the_sampled_end_of_turn(tokenizer):
    chat = ChatFormat(tokenizer)
    piece = chat.observation_piece("ok")
    eos = tokenizer.eos_token_id
    assert piece[0] == eos
    stopped = tokenizer("Action: look", add_special_tokens=False).input_ids + [eos]
    assert chat.piece_after(stopped, "ok") == piece[1:]          # eos already in the history once
    truncated = tokenizer("Action: lo", add_special_tokens=False).input_ids   # hit max_tokens: no eos
    assert chat.piece_after(truncated, "ok") == piece                # the template closes the turn


def test_history_is_append_only_and_token_exact(tokenizer):
    """Non-canonical response ids (one token per byte of a word the tokenizer has a merge for) must survive
    untouched: a decode/encode round trip would merge them and shift every later position."""
    chat = ChatFormat(tokenizer)
    canonical = tokenizer("fridge", add_special_tokens=False).input_ids
    byte_ids = [tokenizer.convert_tokens_to_ids(c) for c in "fridge"]
    assert len(byte_ids) > len(canonical), "corpus must have taught a merge for 'fridge'"
    h = History(chat.initial_prompt(OBS[0]))
    prompts = [h.prompt()]
    responses = [byte_ids + [tokenizer.eos_token_id], canonical[:1]]   # second one truncated (no eos)
    for k, resp in enumerate(responses):
        span = h.add_response(resp, [-0.5] * len(resp), Role.STUDENT if k == 0 else Role.TEACHER)
        assert h.token_ids[span[0]:span[1]] == resp
        h.add_observation(chat.piece_after(resp, OBS[k + 1]))
        prompts.append(h.prompt())
    for before, after in itertools.pairwise(prompts):
        assert after[:len(before)] == before                   # every prompt extends the previous one
    assert h.turn_roles == [Role.STUDENT, Role.TEACHER]
    assert [h.roles[i] for i in range(*h.turn_spans[0])] == [Role.STUDENT] * len(responses[0])
    gen = {i for s, e in h.turn_spans for i in range(s, e)}
    assert all((h.roles[i] == Role.CONTEXT) == (i not in gen) for i in range(len(h)))
    assert all(h.logprobs[i] == (-0.5 if i in gen else 0.0) for i in range(len(h)))


LLAMA3_STYLE = (
    "{{- '<|begin_of_text|>' }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)


def test_any_template_other_than_qwen3(tokenizer):
    """Pieces derived from a Llama-3-style template reproduce that template's whole-conversation render."""
    original = tokenizer.chat_template
    tokenizer.chat_template = LLAMA3_STYLE
    try:
        chat = ChatFormat(tokenizer)
        text = tokenizer.decode(chat.initial_prompt(OBS[0]))
        for k, resp in enumerate(RESPONSES[:2]):
            resp_ids = tokenizer(resp, add_special_tokens=False).input_ids   # no special stop token here
            text += tokenizer.decode(resp_ids) + tokenizer.decode(chat.piece_after(resp_ids, OBS[k + 1]))
        msgs = [{"role": "user", "content": OBS[0]}, {"role": "assistant", "content": RESPONSES[0]},
                {"role": "user", "content": OBS[1]}, {"role": "assistant", "content": RESPONSES[1]},
                {"role": "user", "content": OBS[2]}]
        assert text == tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    finally:
        tokenizer.chat_template = original


def test_bad_inputs(tokenizer):
    original = tokenizer.chat_template
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"   # drops the contents
    try:
        with pytest.raises(ValueError, match="verbatim"):
            ChatFormat(tokenizer)
    finally:
        tokenizer.chat_template = original
    with pytest.raises(TypeError, match="enable_thinking"):
        ChatFormat(tokenizer, enable_thinking="yes")
    chat = ChatFormat(tokenizer)
    with pytest.raises(TypeError, match="observation"):
        chat.observation_piece(3)
    with pytest.raises(ValueError, match="non-empty"):
        History([])
    h = History([1, 2, 3])
    with pytest.raises(ValueError, match="role"):
        h.add_response([4], [0.0], Role.CONTEXT)
    with pytest.raises(ValueError, match="logprobs"):
        h.add_response([4, 5], [0.0], Role.STUDENT)
    with pytest.raises(ValueError, match="at least one"):
        h.add_response([], [], Role.STUDENT)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_official_qwen3_template(tokenizer, enable_thinking):
    """Qwen3's own template (shipped with trl) gives the same pieces as the default Qwen3-style one."""
    import importlib.resources

    try:
        official = (importlib.resources.files("trl") / "chat_templates" / "qwen3.jinja").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("trl's copy of the Qwen3 chat template is not installed")
    default = ChatFormat(tokenizer, enable_thinking=enable_thinking, system_prompt="S")
    original = tokenizer.chat_template
    tokenizer.chat_template = official
    try:
        qwen3 = ChatFormat(tokenizer, enable_thinking=enable_thinking, system_prompt="S")
        assert qwen3.initial_prompt(OBS[0]) == default.initial_prompt(OBS[0])
        assert qwen3.observation_piece(OBS[1]) == default.observation_piece(OBS[1])
        think = "" if enable_thinking else "<think>\n\n</think>\n\n"
        assert tokenizer.decode(qwen3.observation_piece("o")) == (
            "<|im_end|>\n<|im_start|>user\no<|im_end|>\n<|im_start|>assistant\n" + think)
    finally:
        tokenizer.chat_template = original
