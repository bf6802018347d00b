"""The accumulation dtype of every loss in ``gopd_fast.ops`` (the one owner of that rule)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype"]


def accumulation_dtype(*operands: Tensor | torch.dtype) -> torch.dtype:
    """float64 when any operand (a tensor or a dtype) is float64, float32 otherwise: bf16/fp16 logits, softmax
    statistics and KLs are never rounded to 16 bits, and float64 references stay exact."""
    dtypes = (op.dtype if isinstance(op, Tensor) else op for op in operands)
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32
