"""Attention over packed rows that runs each episode on its own (``attn_implementation = "packed_sdpa"``).

``gopd_fast.packing`` isolates the episodes packed into one row by restarting ``position_ids`` at 0. With the
stock ``sdpa`` implementation transformers turns that into a dense block-diagonal [L, L] mask per row and the
CPU kernel then computes every query against every key of the row (profiled on the demo's step: 53% of the
step in masked attention, 20% more building the mask). Here each segment (a run of consecutive positions) is
one ``scaled_dot_product_attention`` call with ``is_causal=True``: no mask, no cross-episode work, and the
flash kernel skips the causal upper triangle. Same math as the dense mask, up to float rounding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``[start, end)`` runs of consecutive positions (an episode, or the padding tail)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [rows, length], got shape {tuple(position_ids.shape)}")
    length = position_ids.shape[1]
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    out = []
    for row in starts.cpu():
        s = row.nonzero().squeeze(-1).tolist()
        out.append(list(zip(s, s[1:] + [length])))
    return out


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          position_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention interface: ``query`` [b, heads, L, d], ``key`` / ``value`` [b, kv_heads, L, d];
    returns [b, L, heads, d]. Needs ``position_ids`` (the packed layout) and no cache / padding mask."""
    if position_ids is None or attention_mask is not None or key.shape[2] != query.shape[2]:
        raise ValueError(f"{NAME} attention needs position_ids and no attention mask or KV cache (packed training "
                         "forwards only); use attn_implementation = 'sdpa' elsewhere")
    gqa = key.shape[1] != query.shape[1]
    rows = []
    # unbind / split, not slicing: their backward concatenates the pieces' gradients, where each slice's backward
    # would write into a zeroed full-size gradient of its own
    for q, k, v, segs in zip(query.unbind(0), key.unbind(0), value.unbind(0),
                             segments(position_ids.expand(query.shape[0], -1))):
        sizes = [e - s for s, e in segs]
        # 4-D operands: the CPU flash kernel (which skips the causal upper triangle) only takes [b, h, L, d]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scaling,
                                                dropout_p=dropout, enable_gqa=gqa)
                 for qs, ks, vs in zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None     # the segments come from position_ids; nothing to build


def register() -> str:
    """Make ``attn_implementation = "packed_sdpa"`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME
