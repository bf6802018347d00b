"""A lean batched forward of a ``Qwen3ForCausalLM`` over per-row KV caches, for the KV-cached engine.

Why not the module stack: for the tiny models of the demo and the study a decode step is a few hundred kFLOPs,
and ``generate`` / the ``transformers`` module stack spend ~7 ms per step in Python (hooks, cache classes, mask
builders). This forward reads the model's own parameters (the q/k/v and gate/up projections fused into one
matmul each, rebuilt by ``refresh`` after a weight sync) and makes ~25 tensor calls per layer and decode step,
whatever the batch. Numerics follow ``modeling_qwen3`` (RMSNorm, the same RoPE table, softmax attention with GQA),
so greedy tokens match the module forward up to float rounding. Attention is plain batched matmuls with each kv
head's query group folded together: on CPU that beat SDPA with a mask for these shapes (profiled).

The cache is one tensor ``[layers, 2 (k, v), rows, kv_heads, T, head_dim]``. Each row holds its own sequence
left-aligned; a query at absolute position ``p`` attends keys ``0..p`` of its row only (an additive mask), so
rows of different lengths decode together. ``prefill`` runs each row's new tokens after its cached history
(projections packed over all rows, attention per row); ``forward`` is one decode step of every row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: torch.Tensor        # q, k, v projections stacked: one matmul
    qk_norm: torch.Tensor    # [heads + kv_heads, head_dim]: q_norm's weight per query head, k_norm's per kv head
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor    # gate and up projections stacked: one matmul
    down: torch.Tensor


class Qwen3Decoder:
    """Batched prefill / decode steps of a ``Qwen3ForCausalLM`` over a ragged, row-per-sequence KV cache.

    Args:
        model: a ``transformers`` Qwen3 causal LM (``config.model_type == "qwen3"``, no attention bias, SiLU MLP,
            default RoPE). The decoder keeps references to its parameters; call ``refresh`` after loading new
            weights into it (the fused projections are copies).
    """

    def __init__(self, model: torch.nn.Module) -> None:
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
        self.refresh()

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-read the model's parameters (after ``load_state_dict``): rebuilds the fused projections."""
        inner = self.model.model
        nh, nkv = self.num_heads, self.num_kv_heads
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                in_norm=layer.input_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                qk_norm=torch.cat([a.q_norm.weight.expand(nh, -1), a.k_norm.weight.expand(nkv, -1)]),
                o=a.o_proj.weight, post_norm=layer.post_attention_layernorm.weight,
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), down=mlp.down_proj.weight,
            ))
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.head = self.model.lm_head.weight
        rotary = inner.rotary_emb
        # The module's own formula (Qwen3RotaryEmbedding.forward), tabulated once for every position.
        freqs = torch.arange(self.max_positions, device=self.device, dtype=torch.float32)[:, None] \
            * rotary.inv_freq.to(device=self.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = (emb.cos() * scaling).to(self.dtype)
        # rotate_half(x) * sin == roll(x, head_dim / 2) * (sin with its first half negated): 2 ops fewer
        sign = torch.ones(self.head_dim, dtype=torch.float32, device=self.device)
        sign[:self.head_dim // 2] = -1
        self.sin_signed = (emb.sin() * scaling * sign).to(self.dtype)

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        """A zeroed cache for ``rows`` sequences of up to ``length`` positions (zeros: masked slots stay finite)."""
        return torch.zeros(self.num_layers, 2, rows, self.num_kv_heads, length, self.head_dim,
                           dtype=self.dtype, device=self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps=self.eps)

    def _qkv(self, x: torch.Tensor, w: _Layer, cos: torch.Tensor, sin: torch.Tensor):
        """q [..., heads, hd], k and v [..., kv_heads, hd] of hidden states ``x`` [..., hidden], RoPE applied;
        ``cos`` / ``sin`` are [..., 1, hd] (the signed sin table)."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(self._norm(x, w.in_norm), w.qkv).unflatten(-1, (nh + 2 * nkv, hd))
        qk, v = qkv.split((nh + nkv, nkv), dim=-2)
        qk = F.rms_norm(qk, (hd,), eps=self.eps) * w.qk_norm      # q_norm / k_norm in one call
        qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
        q, k = qk.split((nh, nkv), dim=-2)
        return q, k, v

    def _mlp_residual(self, x: torch.Tensor, w: _Layer) -> torch.Tensor:
        gate, up = F.linear(self._norm(x, w.post_norm), w.gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w.down)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, span: int) -> torch.Tensor:
        """One decode step: token ``ids[r]`` ([rows]) of row r at absolute position ``positions[r]``; writes its
        keys/values into ``cache`` and returns the float32 next-token logits [rows, vocab]. ``span`` (> every
        position) bounds the cache positions attended to: only the filled part is read."""
        b = ids.shape[0]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        x = F.embedding(ids, self.embed)                                   # [b, hidden]
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]
        # additive mask [b, 1, 1, span]: each row sees its own history only (-inf past its position)
        mask = torch.zeros(b, 1, 1, span, dtype=self.dtype, device=ids.device).masked_fill_(
            torch.arange(span, device=ids.device) > positions[:, None, None, None], float("-inf"))
        index = positions[:, None, None, None].expand(b, nkv, 1, hd)
        scale = hd ** -0.5
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w, cos, sin)
            kc, vc = cache[i, 0], cache[i, 1]
            kc.scatter_(2, index, k[:, :, None])
            vc.scatter_(2, index, v[:, :, None])
            # plain matmuls, each kv head's query group folded together (no repeated keys)
            scores = torch.matmul(q.view(b, nkv, nh // nkv, hd) * scale, kc[:, :, :span].transpose(-1, -2))
            a = torch.matmul((scores + mask).softmax(dim=-1), vc[:, :, :span])
            x = self._mlp_residual(x + F.linear(a.view(b, nh * hd), w.o), w)
        return F.linear(self._norm(x, self.norm), self.head).float()

    @torch.no_grad()
    def prefill(self, rows: list[list[int]], starts: list[int], cache: torch.Tensor) -> torch.Tensor:
        """Run row r's new tokens ``rows[r]`` (at positions ``starts[r]``...) after its cached history, writing
        their keys/values into ``cache``; returns the float32 logits after each row's last token [rows, vocab].
        The projections run on all rows' tokens packed (no padding); attention runs per row over its own
        history, so rows with few new tokens (a continuing episode) cost no more than their tokens."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        lens = [len(r) for r in rows]
        device = self.device
        ids = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
        positions = torch.cat([torch.arange(s, s + n, device=device) for s, n in zip(starts, lens)])
        x = F.embedding(ids, self.embed)                                   # [tokens, hidden]
        cos, sin = self.cos[positions][:, None], self.sin_signed[positions][:, None]
        offsets = [0]
        for n in lens:
            offsets.append(offsets[-1] + n)
        group = nh // nkv
        # Per row, the additive causal mask of its new tokens among themselves [kv_heads, group * n, n] (each kv
        # head's query group folded into the rows); the cached history before them is visible to all of them.
        # Plain batched matmuls were ~2x faster than CPU SDPA with a mask for these shapes (a few hundred
        # queries against a long cached history).
        masks = [torch.zeros(n, n, dtype=self.dtype, device=device).masked_fill_(
            torch.ones(n, n, dtype=torch.bool, device=device).triu_(1), float("-inf"))
            .expand(nkv, group, n, n).reshape(nkv, group * n, n) for n in lens]
        scale = hd ** -0.5
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w, cos, sin)
            q = q * scale
            outs = []
            for r, (s, n) in enumerate(zip(starts, lens)):
                lo, hi = offsets[r], offsets[r + 1]
                kc, vc = cache[i, 0, r], cache[i, 1, r]                    # [kv_heads, T, hd]
                kc[:, s:s + n] = k[lo:hi].transpose(0, 1)
                vc[:, s:s + n] = v[lo:hi].transpose(0, 1)
                qr = q[lo:hi].transpose(0, 1).reshape(nkv, group * n, hd)  # heads of one kv group adjacent
                scores = torch.bmm(qr, kc[:, :s + n].transpose(1, 2))
                scores[:, :, s:] += masks[r]
                a = torch.bmm(scores.softmax(dim=-1), vc[:, :s + n]).view(nh, n, hd)
                outs.append(a.transpose(0, 1).reshape(n, nh * hd))
            x = self._mlp_residual(x + F.linear(torch.cat(outs), w.o), w)
        last = torch.tensor([o - 1 for o in offsets[1:]], device=device)
        return F.linear(self._norm(x[last], self.norm), self.head).float()
