"""gopd_fast.models: local tokenizer training, tiny Qwen3 configs, save/load through from_pretrained."""
from __future__ import annotations

import pytest
import torch

from gopd_fast import models

CORPUS = [
    "You are in the middle of a room. Looking around you, you see a fridge 1, a table 1 and a drawer 2.",
    "Your task is to: put a clean apple in the fridge.",
    "Thought: the apple is probably on the table.\nAction: go to table 1",
    "You arrive at table 1. On the table 1, you see an apple 1 and a knife 3.",
    "Action: take apple 1 from table 1",
] * 10


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return models.train_tokenizer(CORPUS, vocab_size=400, save_dir=tmp_path_factory.mktemp("tok"))


def test_tokenizer_special_tokens_and_byte_fallback(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) <= 400
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"):
        ids = tokenizer(special, add_special_tokens=False).input_ids
        assert len(ids) == 1, f"{special} must be a single token, got {ids}"
    # Byte-level: text never seen in training (unicode included) round-trips exactly.
    text = "zebra quokka ünïcødé 42 <think>why</think>\n\tdone"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    # The corpus taught it merges: a frequent word is shorter than its byte count.
    assert len(tokenizer("apple", add_special_tokens=False).input_ids) < len("apple")


def test_chat_template_renders_qwen3_format(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    on = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    off = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": "A"}], tokenize=False)
    assert full == on + "A<|im_end|>\n"


def test_saved_tokenizer_reloads_identically(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Thought: go.\nAction: open fridge 1<|im_end|>\n<|im_start|>user\nok"
    assert again(text).input_ids == tokenizer(text).input_ids
    assert again.chat_template == tokenizer.chat_template
    assert again.eos_token_id == tokenizer.eos_token_id and again.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("size", models.TINY_SIZES)
def test_tiny_configs(size):
    cfg = models.tiny_qwen3_config(size, vocab_size=300)
    assert cfg.model_type == "qwen3" and cfg.vocab_size == 300
    assert cfg.head_dim >= 32 and cfg.tie_word_embeddings is False
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert models.tiny_qwen3_config(size, 300, num_hidden_layers=1).num_hidden_layers == 1


def test_build_save_load_identical_logits(tokenizer, tmp_path):
    cfg = models.config_for_tokenizer("student-tiny", tokenizer)
    model = models.build_model(cfg, seed=3)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    # Same seed -> same weights; different seed -> different weights.
    assert torch.equal(models.build_model(cfg, seed=3).lm_head.weight, model.lm_head.weight)
    assert not torch.equal(models.build_model(cfg, seed=4).lm_head.weight, model.lm_head.weight)

    models.save_model(model, tokenizer, tmp_path)
    loaded, loaded_tok = models.load_model(tmp_path, dtype="float32")
    assert type(loaded).__name__ == "Qwen3ForCausalLM" and not loaded.training
    ids = torch.tensor([tokenizer("Action: take apple 1 from table 1", add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded_tok.eos_token_id == tokenizer.eos_token_id

    bf16, _ = models.load_model(tmp_path, dtype="bfloat16")
    assert bf16.lm_head.weight.dtype == torch.bfloat16


def test_keep_layers_drops_layers_and_survives_a_round_trip(tokenizer, tmp_path):
    cfg = models.config_for_tokenizer("student-tiny", tokenizer, num_hidden_layers=3)
    ids = torch.tensor([tokenizer("Action: take apple 1 from table 1", add_special_tokens=False).input_ids])
    full = models.build_model(cfg, seed=5).eval()
    with torch.no_grad():
        # Keeping every layer changes nothing; keeping [0, 2] equals the full model with layer 1 skipped.
        same = models.keep_layers(models.build_model(cfg, seed=5).eval(), range(3))
        torch.testing.assert_close(same(ids).logits, full(ids).logits, rtol=0, atol=0)
        dropped = models.keep_layers(models.build_model(cfg, seed=5).eval(), [0, 2])
        skipped = models.build_model(cfg, seed=5).eval()
        # layer 1 passes its input through: the residual stream skips it
        skipped.model.layers[1].register_forward_hook(
            lambda module, args, kwargs, output: args[0] if args else kwargs["hidden_states"], with_kwargs=True)
        torch.testing.assert_close(dropped(ids).logits, skipped(ids).logits, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(dropped(ids).logits, full(ids).logits)
    assert dropped.config.num_hidden_layers == 2 and len(dropped.config.layer_types) == 2
    assert cfg.num_hidden_layers == 3 and full.config.num_hidden_layers == 3   # the shared config is untouched
    assert [layer.self_attn.layer_idx for layer in dropped.model.layers] == [0, 1]
    models.save_model(dropped, tokenizer, tmp_path)
    loaded, _ = models.load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, dropped(ids).logits, rtol=0, atol=0)
        # The cached path (generate) uses the renumbered KV-cache slots.
        out = loaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)
    for bad in ([], [1, 1], [2, 1], [0, 3], [-1], [0.5], [True]):
        with pytest.raises(ValueError, match="keep must be"):
            models.keep_layers(models.build_model(cfg, seed=5), bad)
    with pytest.raises(TypeError, match="Qwen3ForCausalLM"):
        models.keep_layers(torch.nn.Linear(2, 2), [0])


def test_bad_arguments_raise(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        models.train_tokenizer(CORPUS, vocab_size=100)
    with pytest.raises(TypeError, match="iterable of strings"):
        models.train_tokenizer("one string", vocab_size=400)
    with pytest.raises(TypeError, match="non-empty"):
        models.train_tokenizer([], vocab_size=400)
    with pytest.raises(ValueError, match="unknown size"):
        models.tiny_qwen3_config("huge", vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        models.tiny_qwen3_config("student-tiny", vocab_size=0)
    with pytest.raises(ValueError, match="head_dim"):
        models.tiny_qwen3_config("student-tiny", vocab_size=300, head_dim=16)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        models.tiny_qwen3_config("student-tiny", vocab_size=300, tie_word_embeddings=True)
    with pytest.raises(TypeError, match="Qwen3Config"):
        models.build_model({"hidden_size": 64})
    with pytest.raises(ValueError, match="dtype"):
        models.load_model(tmp_path, dtype="int8")
    with pytest.raises(FileNotFoundError):
        models.load_model(tmp_path / "missing")
