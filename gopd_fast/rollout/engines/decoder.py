"""A lean batched forward of a ``Qwen3ForCausalLM`` over per-row KV caches, for the KV-cached engine.

Why not the module stack: for the tiny models of the demo and the study a decode step is a few hundred kFLOPs,
and ``generate`` / the ``transformers`` module stack spend ~7 ms per step in Python (hooks, cache classes, mask
builders). This forward reads the model's own parameters (the q/k/v and gate/up projections fused into one
matmul each, rebuilt by ``refresh`` after a weight sync) and makes ~20 tensor calls per layer, whatever the
batch. Numerics follow ``modeling_qwen3`` (float32 RMSNorm, the same RoPE table, SDPA with GQA), so greedy
tokens match the module forward up to float rounding.

The cache is one tensor ``[layers, 2 (k, v), rows, kv_heads, T, head_dim]``. Each row holds its own sequence
left-aligned; a query at absolute position ``p`` attends keys ``0..p`` of its row, so positions past a row's
end (zeros or padded-prefill writes) are never read before a later step overwrites them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Layer:
    in_norm: torch.Tensor
    qkv: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
        self.layers = []
        for layer in inner.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                in_norm=layer.input_layernorm.weight,
                qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                q_norm=a.q_norm.weight, k_norm=a.k_norm.weight, o=a.o_proj.weight,
                post_norm=layer.post_attention_layernorm.weight,
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
        self.sin = (emb.sin() * scaling).to(self.dtype)

    def new_cache(self, rows: int, length: int) -> torch.Tensor:
        """A zeroed cache for ``rows`` sequences of up to ``length`` positions (zeros: masked slots stay finite)."""
        return torch.zeros(self.num_layers, 2, rows, self.num_kv_heads, length, self.head_dim,
                           dtype=self.dtype, device=self.device)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # modeling_qwen3's RMSNorm: float32 statistics, weight applied in the input dtype
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, last: torch.Tensor,
                span: int) -> torch.Tensor:
        """Run ``ids`` ([rows, n], row r's tokens at absolute ``positions[r]``) through the model, writing their
        keys/values into ``cache`` at those positions; returns the float32 logits at column ``last[r]`` of each
        row ([rows, vocab]). Columns after a row's last real token are padding: computed, never read.
        ``span`` (> every position) bounds the cache positions attended to: decoding reads only the filled part."""
        b, n = ids.shape
        hd, nh, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        x = F.embedding(ids, self.embed)
        cos = self.cos[positions].unsqueeze(1)          # [b, 1, n, hd]
        sin = self.sin[positions].unsqueeze(1)
        keys = torch.arange(span, device=ids.device)
        # additive mask [b, 1, n, span]: causal within the row's own history (-inf past the query's position);
        # on CPU, SDPA with an additive mask was ~1.7x faster than with a boolean one and than matmul attention
        mask = torch.zeros(b, 1, n, span, dtype=self.dtype, device=ids.device).masked_fill_(
            keys > positions[:, None, :, None], float("-inf"))
        index = positions[:, None, :, None].expand(b, nkv, n, hd)
        for i, w in enumerate(self.layers):
            h = self._norm(x, w.in_norm)
            q, k, v = F.linear(h, w.qkv).view(b, n, nh + 2 * nkv, hd).split((nh, nkv, nkv), dim=2)
            q = self._norm(q, w.q_norm).transpose(1, 2)
            k = self._norm(k, w.k_norm).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = cache[i, 0], cache[i, 1]
            kc.scatter_(2, index, k)
            vc.scatter_(2, index, v.transpose(1, 2))
            a = F.scaled_dot_product_attention(q, kc[:, :, :span], vc[:, :, :span], attn_mask=mask,
                                               scale=hd ** -0.5, enable_gqa=nkv != nh)
            x = x + F.linear(a.transpose(1, 2).reshape(b, n, nh * hd), w.o)
            gate, up = F.linear(self._norm(x, w.post_norm), w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down)
        x = x[torch.arange(b, device=ids.device), last]
        return F.linear(self._norm(x, self.norm), self.head).float()
