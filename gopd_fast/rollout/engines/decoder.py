"""A lean batched forward of a ``Qwen3ForCausalLM`` over per-row KV caches, for the KV-cached engine (and the
trainer's frozen teacher: ``encode``).

Why not the module stack: for the tiny models of the demo and the study a decode step is a few hundred kFLOPs,
and ``generate`` / the ``transformers`` module stack spend ~7 ms per step in Python (hooks, cache classes, mask
builders). This forward reads the model's weights once per weight sync (``refresh``) into a form that needs few
calls per layer: the RMSNorm weights folded into the pre-transposed projections that follow them, q/k/v and
gate/up each one matmul, the residual adds fused into ``addmm``, the attention scale folded into q_norm's weight.
A decode step is ~16 tensor calls per layer whatever the batch, in NumPy for float32 on CPU (engines/
numpy_step.py: a torch call costs ~10-20 us there) and in torch elsewhere. Numerics follow ``modeling_qwen3`` up
to float rounding (the folds change the order of a few products), so greedy tokens match the module forward but
for near-ties.

The cache is one tensor ``[layers, 2 (k, v), rows, kv_heads, T, head_dim]``. Each row holds its own sequence
left-aligned; a query at absolute position ``p`` attends keys ``0..p`` of its row only (an additive mask), so
rows of different lengths decode together. ``prefill`` runs each row's new tokens after its cached history
(projections and cache writes packed over all rows, then one fused attention call per row: no padding);
``forward`` is one decode step of every row (plain batched matmuls: on CPU they beat SDPA for one query per row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gopd_fast.packed_attention import segments
from gopd_fast.rollout.engines.numpy_step import decode_step, numpy_weights


@dataclass
class _Layer:
    qkv: torch.Tensor        # [hidden, (heads + 2 kv_heads) * head_dim]: q, k, v stacked, input norm folded in
    o: torch.Tensor          # [heads * head_dim, hidden]
    gate_up: torch.Tensor    # [hidden, 2 * intermediate]: gate and up stacked, post-attention norm folded in
    down: torch.Tensor       # [intermediate, hidden]


class Qwen3Decoder:
    """Batched prefill / decode steps of a ``Qwen3ForCausalLM`` over a ragged, row-per-sequence KV cache.

    Args:
        model: a ``transformers`` Qwen3 causal LM (``config.model_type == "qwen3"``, no attention bias, SiLU MLP,
            default RoPE). The decoder keeps references to its parameters; call ``refresh`` after loading new
            weights into it (the fused projections are copies).
        numpy_decode: decode steps in NumPy (engines/numpy_step.py: fewer microseconds per call) instead of torch;
            default: for a float32 model on CPU. Prefill is torch either way.
    """

    def __init__(self, model: torch.nn.Module, numpy_decode: bool | None = None) -> None:
        cfg = model.config
        problems = []
        if getattr(cfg, "model_type", None) != "qwen3":
            problems.append(f"model_type {getattr(cfg, 'model_type', None)!r} (need 'qwen3')")
        if getattr(cfg, "attention_bias", False):
            problems.append("attention_bias=True")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {cfg.hidden_act!r}")
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type {rope.get('rope_type')!r}")
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            problems.append("sliding-window attention")
        if problems:
            raise ValueError("the KV-cached engine supports plain Qwen3 models only; this model has "
                             + ", ".join(problems) + " (use the re-encoding engine: rollout.kv_reuse = false)")
        self.model = model
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_heads = int(cfg.num_attention_heads)
        self.num_kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.hidden_size = int(cfg.hidden_size)
        self.eps = float(cfg.rms_norm_eps)
        self.max_positions = int(cfg.max_position_embeddings)
        on_cpu32 = model.lm_head.weight.device.type == "cpu" and model.lm_head.weight.dtype == torch.float32
        if numpy_decode is None:
            numpy_decode = on_cpu32
        if not isinstance(numpy_decode, bool) or (numpy_decode and not on_cpu32):
            raise ValueError(f"numpy_decode must be a bool (True only for a float32 model on CPU), got "
                             f"{numpy_decode!r} for a {model.lm_head.weight.dtype} model on "
                             f"{model.lm_head.weight.device}")
        self.numpy_decode = numpy_decode
        self._buffer = torch.empty(0, dtype=model.lm_head.weight.dtype, device=model.lm_head.weight.device)
        self.refresh()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read the model's parameters (after ``load_state_dict``): rebuilds the folded projections and the
        RoPE tables (copies: the decoder never writes to the model)."""
        inner = self.model.model
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        fold = lambda weight, norm: (weight * norm).t().contiguous()   # W diag(norm), as [in, out] for mm
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                qkv=fold(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                         layer.input_layernorm.weight),
                o=a.o_proj.weight.t().contiguous(),
                gate_up=fold(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                             layer.post_attention_layernorm.weight),
                down=mlp.down_proj.weight.t().contiguous(),
            ))
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.head = fold(self.model.lm_head.weight, inner.norm.weight)
        rotary = inner.rotary_emb
        # The module's own formula (Qwen3RotaryEmbedding.forward), tabulated once for every position.
        freqs = torch.arange(self.max_positions, device=self.device, dtype=torch.float32)[:, None] \
            * rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                      # [positions, 1, head_dim]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        # rotate_half(x) * sin == roll(x, head_dim / 2) * (sin with its first half negated)
        sign = torch.ones(hd, dtype=torch.float32, device=self.device)
        sign[:hd // 2] = -1
        self.cos = (emb.cos() * scaling).to(self.dtype)                      # [positions, 1, head_dim]
        self.sin_signed = (emb.sin() * scaling * sign).to(self.dtype)
        # q_norm's weight for every query head (times the attention scale: no scaling of the scores later),
        # k_norm's for every kv head: q and k are normed in one call per layer
        self.qk_norms = [torch.cat([lyr.self_attn.q_norm.weight.expand(nh, -1) * hd ** -0.5,
                                    lyr.self_attn.k_norm.weight.expand(nkv, -1)]) for lyr in inner.layers]
        self._numpy = numpy_weights(self) if self.numpy_decode else None

    def new_cache(self, rows: int, length: int, filled: list[int] | None = None) -> torch.Tensor:
        """A cache for ``rows`` sequences of up to ``length`` positions. Positions the caller does not write before
        they are read must be finite (attention masks them additively): row r's positions from ``filled[r]`` on
        are zeroed, all of them without ``filled``.

        With ``filled`` the cache is a view of a buffer the decoder reuses, valid until the next such call: a
        fresh zeroed tensor per call cost the 32-in-flight demo rollout 0.4 s of its 8.3 s (page faults and
        memset of ~70 MB per teacher call), where only the tails past each prompt need zeros."""
        shape = (self.num_layers, 2, rows, self.num_kv_heads, length, self.head_dim)
        if filled is None:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        if len(filled) != rows or not all(0 <= n <= length for n in filled):
            raise ValueError(f"filled must hold {rows} lengths in [0, {length}], got {filled!r}")
        numel = math.prod(shape)
        if self._buffer.numel() < numel:
            self._buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
        cache = self._buffer[:numel].view(shape)
        for r, n in enumerate(filled):
            cache[:, :, r, :, n:].zero_()
        return cache

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim without weight (the weights are folded into what follows)."""
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def _qkv(self, x: torch.Tensor, layer: int, cos: torch.Tensor, sin: torch.Tensor):
        """q [t, heads, hd] (times the attention scale), k and v [t, kv_heads, hd] of hidden states ``x``
        [t, hidden], RoPE applied; ``cos`` / ``sin`` are [t, 1, hd] (the signed sin table)."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = torch.mm(self._norm(x), self.layers[layer].qkv).view(x.shape[0], nh + 2 * nkv, hd)
        qk, v = qkv.split((nh + nkv, nkv), dim=1)
        qk = self._norm(qk) * self.qk_norms[layer]                # q_norm / k_norm in one call
        qk = torch.addcmul(qk * cos, qk.roll(hd // 2, dims=-1), sin)
        return qk[:, :nh], qk[:, nh:], v

    def _attn_out_mlp(self, x: torch.Tensor, attn: torch.Tensor, w: _Layer) -> torch.Tensor:
        """The rest of a layer: ``x`` + o_proj(attention output ``attn`` [t, heads * hd]), then the SwiGLU MLP
        with its residual (each residual add fused into its matmul)."""
        x = torch.addmm(x, attn, w.o)
        gate, up = torch.mm(self._norm(x), w.gate_up).chunk(2, dim=-1)
        return torch.addmm(x, F.silu(gate).mul_(up), w.down)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(self._norm(x), self.head).float()

    def final_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The model's ``last_hidden_state`` of residual-stream rows ``x`` [t, hidden]: the final RMSNorm, weighted."""
        return F.rms_norm(x, (x.shape[-1],), self.final_norm, self.eps)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, span: int,
                hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One decode step: token ``ids[r]`` ([rows]) of row r at absolute position ``positions[r]``; writes its
        keys/values into ``cache`` and returns the float32 next-token logits [rows, vocab]; with ``hidden`` also
        the final hidden states at those positions [rows, hidden] (``final_hidden``). ``span`` (> every position)
        bounds the cache positions attended to: only the filled part is read."""
        if self._numpy is not None:
            return decode_step(self, self._numpy, ids, positions, cache, span, hidden=hidden)
        b = ids.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)                                   # [b, hidden]
        cos, sin = self.cos[positions], self.sin_signed[positions]
        # additive mask [b, 1, 1, span]: each row sees its own history only (-inf past its position)
        mask = torch.zeros(b, 1, 1, span, dtype=self.dtype, device=ids.device).masked_fill_(
            torch.arange(span, device=ids.device) > positions[:, None, None, None], float("-inf"))
        index = positions[:, None, None, None].expand(b, nkv, 1, hd)
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, i, cos, sin)
            kc, vc = cache[i, 0], cache[i, 1]
            kc.scatter_(2, index, k[:, :, None])
            vc.scatter_(2, index, v[:, :, None])
            # plain matmuls, each kv head's query group folded together (no repeated keys)
            scores = torch.matmul(q.reshape(b, nkv, nh // nkv, hd), kc[:, :, :span].transpose(-1, -2)).add_(mask)
            a = torch.matmul(scores.softmax(dim=-1), vc[:, :, :span])
            x = self._attn_out_mlp(x, a.view(b, nh * hd), w)
        return (self._logits(x), self.final_hidden(x)) if hidden else self._logits(x)

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], starts: list[int], cache: torch.Tensor,
                hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run row r's new tokens ``rows[r]`` (at positions ``starts[r]``...) after its cached history, writing
        their keys/values into ``cache``; returns the float32 logits after each row's last token [rows, vocab],
        and with ``hidden`` the final hidden states of every new token, rows concatenated [tokens, hidden].
        Projections and cache writes run on all rows' tokens packed (no padding); attention is one fused SDPA
        call per row over its own history, so rows with few new tokens (a continuing episode) cost no more than
        their tokens."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        lens = [len(r) for r in rows]
        device = self.device
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
        positions = torch.tensor([p for s, n in zip(starts, lens) for p in range(s, s + n)], device=device)
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                         torch.tensor(lens, device=device))
        x = F.embedding(ids, self.embed)                                   # [tokens, hidden]
        cos, sin = self.cos[positions], self.sin_signed[positions]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        # Per row, the additive mask of its new tokens [n, s + n]: the cached history is visible to all of them,
        # the new block is causal. A row without history needs none (is_causal: the kernel skips the triangle).
        masks = [None if s == 0 else
                 torch.full((n, s + n), float("-inf"), dtype=self.dtype, device=device).triu_(s + 1)
                 for s, n in zip(starts, lens)]
        # CPU SDPA (flash, online softmax) beat matmul + softmax by ~20% on a few hundred queries against a long
        # cached history: it never writes the [queries, keys] scores out
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, i, cos, sin)
            cache[i, 0, row_of, :, positions] = k
            cache[i, 1, row_of, :, positions] = v
            outs = []
            for r, (s, n) in enumerate(zip(starts, lens)):
                kc, vc = cache[i, 0, r, :, :s + n], cache[i, 1, r, :, :s + n]   # [kv_heads, s + n, hd]
                a = F.scaled_dot_product_attention(
                    q[offsets[r]:offsets[r + 1]].transpose(0, 1)[None], kc[None], vc[None], attn_mask=masks[r],
                    is_causal=masks[r] is None, scale=1.0, enable_gqa=nh != nkv)
                outs.append(a[0].transpose(0, 1))
            x = self._attn_out_mlp(x, torch.cat(outs).view(-1, nh * hd), w)
        last = torch.tensor(offsets[1:], device=device) - 1
        return (self._logits(x[last]), self.final_hidden(x)) if hidden else self._logits(x[last])

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The model's final hidden states (``last_hidden_state``: after the final RMSNorm, before the head)
        [rows, length, hidden] for packed rows ``input_ids`` / ``position_ids`` [rows, length], each run of
        consecutive positions one causal sequence (``gopd_fast.packing``'s layout, as "packed_sdpa" reads it).
        No cache: projections over all tokens at once, one fused causal attention call per sequence."""
        if input_ids.shape != position_ids.shape or input_ids.dim() != 2:
            raise ValueError(f"input_ids and position_ids must both be [rows, length], got "
                             f"{tuple(input_ids.shape)} and {tuple(position_ids.shape)}")
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        rows, length = input_ids.shape
        flat_pos = position_ids.reshape(-1)
        x = F.embedding(input_ids.reshape(-1), self.embed)                 # [rows * length, hidden]
        cos, sin = self.cos[flat_pos], self.sin_signed[flat_pos]
        sizes = [e - s for segs in segments(position_ids) for s, e in segs]   # row-major: rows concatenate
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, i, cos, sin)
            attn = [F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                                   vs.transpose(0, 1)[None], is_causal=True, scale=1.0,
                                                   enable_gqa=nh != nkv)[0].transpose(0, 1)
                    for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes))]
            x = self._attn_out_mlp(x, torch.cat(attn).reshape(-1, nh * hd), w)
        return self.final_hidden(x).view(rows, length, -1)
