"""gopd_fast.ops.precision: the one accumulation-dtype rule, for tensors and dtypes alike."""
from __future__ import annotations

import torch

from gopd_fast.ops.precision import accumulation_dtype


def test_accumulation_dtype():
    bf16, f64 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float64)
    assert accumulation_dtype(bf16, bf16) == torch.float32
    assert accumulation_dtype(bf16, f64) == torch.float64


def test_accumulation_dtype_of_dtypes():
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.float32, torch.float64) == torch.float64
