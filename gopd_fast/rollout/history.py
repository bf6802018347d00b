"""Token-exact, append-only conversation histories built from any HF chat template.

Why token ids and not text: re-rendering and re-tokenising a conversation after every turn can tokenise the
model's own sampled response differently from how it was sampled (BPE merges across the boundary), which shifts
every later position, breaks the sampled log-probs and throws away the inference engine's prefix cache. Here the
history only ever grows by appending: the prompt of turn k is *exactly*

    prompt(k) = prompt(k-1) + response(k-1) tokens (as sampled) + observation piece(k)

How the pieces are derived from the tokenizer's chat template (works for any template that renders an
assistant message's content verbatim, which is every mainstream one, Qwen3's included):

1. The initial prompt is the template rendered once for ``[system?, user(first observation)]`` with
   ``add_generation_prompt=True`` (and ``enable_thinking``), tokenised without extra special tokens (the
   template itself writes any BOS it wants).
2. The observation piece is cut out of one rendering of a dummy conversation
   ``[system?, user(U), assistant(A), user(O)]`` + generation prompt, where A and O are sentinel strings:
   the text strictly after A is ``close + user header``, then O, then ``user close + generation prompt``.
   Replacing O by the real observation and tokenising the whole piece in one call gives, for Qwen3,
   ``<|im_end|>\n<|im_start|>user\n{obs}<|im_end|>\n<|im_start|>assistant\n`` (plus the empty think block
   when thinking is off).
3. The model usually ends its response by sampling the end-of-turn token itself (``<|im_end|>``), which is
   also the first token of the piece. The overlap (longest suffix of the response equal to a prefix of the
   piece's close part) is dropped, so the end-of-turn token appears once; a response cut by the length limit
   gets the full close part.

Caveat: Qwen3's *official* template strips ``<think>`` blocks from earlier assistant turns when it renders a whole
conversation, so for thinking models the append-only history is what was sampled (the right thing to train on),
not what a fresh render would produce. The Qwen3-style default template of ``gopd_fast.models`` renders assistant
turns verbatim, so there the two agree exactly (tested).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gopd_fast.rollout.episode import Role

_USER_SENTINEL = "GOPDUSERSENTINEL"
_ASSISTANT_SENTINEL = "GOPDASSISTANTSENTINEL"
_OBSERVATION_SENTINEL = "GOPDOBSERVATIONSENTINEL"


class ChatFormat:
    """The token pieces of one chat template: initial prompt and per-turn observation piece.

    Args:
        tokenizer: a HF tokenizer with a ``chat_template``.
        enable_thinking: Qwen3's switch; ``False`` pre-fills an empty ``<think></think>`` block in every
            generation prompt. Templates that do not know the flag ignore it.
        system_prompt: optional system message placed before the first observation.
    """

    def __init__(self, tokenizer: Any, *, enable_thinking: bool = False, system_prompt: str | None = None) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("tokenizer has no chat_template; set one (gopd_fast.models.QWEN3_STYLE_CHAT_TEMPLATE)")
        if not isinstance(enable_thinking, bool):
            raise TypeError(f"enable_thinking must be a bool, got {enable_thinking!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a str or None, got {type(system_prompt).__name__}")
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self.system_prompt = system_prompt
        self._close, self._open_after = self._derive_observation_template()
        # Tokens of the close part alone: bounds how much of a response may overlap with the piece.
        self._close_len = len(self._encode(self._close))

    # -- template plumbing -------------------------------------------------------------------------------
    def _messages(self, *turns: tuple[str, str]) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return head + [{"role": r, "content": c} for r, c in turns]

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    def encode(self, text: str) -> list[int]:
        """Tokens of a text piece, without extra special tokens (the template writes its own)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    _encode = encode   # kept for callers written against the first version

    def _derive_observation_template(self) -> tuple[str, str]:
        text = self.render(self._messages(("user", _USER_SENTINEL), ("assistant", _ASSISTANT_SENTINEL),
                                          ("user", _OBSERVATION_SENTINEL)), add_generation_prompt=True)
        a = text.find(_ASSISTANT_SENTINEL)
        o = text.find(_OBSERVATION_SENTINEL)
        if a < 0 or o < a:
            raise ValueError(
                "the chat template does not render assistant and user contents verbatim, so per-turn pieces "
                "cannot be derived from it; use a template that does (any Qwen/Llama/Mistral-style one)"
            )
        return text[a + len(_ASSISTANT_SENTINEL):o], text[o + len(_OBSERVATION_SENTINEL):]

    # -- the pieces ---------------------------------------------------------------------------------------
    def initial_prompt(self, first_observation: str) -> list[int]:
        """Tokens of ``[system?, user(first_observation)]`` + generation prompt."""
        if not isinstance(first_observation, str):
            raise TypeError(f"first_observation must be a str, got {type(first_observation).__name__}")
        return self._encode(self.render(self._messages(("user", first_observation)), add_generation_prompt=True))

    def observation_piece(self, observation: str) -> list[int]:
        """Tokens appended after a response: close of the assistant turn, the user observation, next header."""
        if not isinstance(observation, str):
            raise TypeError(f"observation must be a str, got {type(observation).__name__}")
        return self._encode(self._close + observation + self._open_after)

    def piece_after(self, response_ids: Sequence[int], observation: str) -> list[int]:
        """The observation piece minus its overlap with the response's tail (usually the sampled eos)."""
        piece = self.observation_piece(observation)
        for k in range(min(self._close_len, len(response_ids)), 0, -1):
            if list(response_ids[-k:]) == piece[:k]:
                return piece[k:]
        return piece

    def response_text(self, response_ids: Sequence[int]) -> str:
        """Decoded text of a response, for action parsing only (never re-encoded into the history)."""
        return self.tokenizer.decode(list(response_ids), skip_special_tokens=True)


@dataclass
class History:
    """One episode's shared token history. Only ``add_response`` / ``add_observation`` modify it, by appending."""

    token_ids: list[int]
    roles: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    turn_roles: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("History needs a non-empty initial prompt")
        self.token_ids = list(self.token_ids)
        self.roles = [int(Role.CONTEXT)] * len(self.token_ids)
        self.logprobs = [0.0] * len(self.token_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    def prompt(self) -> list[int]:
        """The tokens the next turn is generated from (a copy: engines may keep it)."""
        return list(self.token_ids)

    def add_response(self, token_ids: Sequence[int], logprobs: Sequence[float], role: Role) -> tuple[int, int]:
        """Append one generated turn exactly as sampled; returns its ``[start, end)`` span."""
        if role not in (Role.STUDENT, Role.TEACHER):
            raise ValueError(f"role must be Role.STUDENT or Role.TEACHER, got {role!r}")
        if len(token_ids) != len(logprobs):
            raise ValueError(f"response has {len(token_ids)} tokens but {len(logprobs)} logprobs")
        if not token_ids:
            raise ValueError("a generated turn must have at least one token")
        start = len(self.token_ids)
        self.token_ids.extend(int(t) for t in token_ids)
        self.roles.extend([int(role)] * len(token_ids))
        self.logprobs.extend(float(x) for x in logprobs)
        span = (start, len(self.token_ids))
        self.turn_spans.append(span)
        self.turn_roles.append(int(role))
        return span

    def add_observation(self, piece_ids: Sequence[int]) -> None:
        """Append a context piece (observation + chat scaffolding): no loss, no log-prob."""
        self.token_ids.extend(int(t) for t in piece_ids)
        self.roles.extend([int(Role.CONTEXT)] * len(piece_ids))
        self.logprobs.extend([0.0] * len(piece_ids))

    def last_response(self) -> list[int]:
        start, end = self.turn_spans[-1]
        return self.token_ids[start:end]
