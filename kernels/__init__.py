"""Triton kernels of gopd-fast, installed as ``gopd_fast.kernels``.

``fused_linear_kl_triton`` (module ``fused_linear_kl``) is the ``triton`` backend of ``gopd_fast.fused_linear_kl``:
student and teacher lm_head projections fused with the KL, tiled over tokens x vocabulary, forward and backward.
Importing this package does not import triton; the first attribute access does (so ``TRITON_INTERPRET`` can still
be set before that).
"""
from __future__ import annotations

from typing import Any

__all__ = ["FusedLinearKLTriton", "check_triton_runnable", "fused_linear_kl_triton"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fused_linear_kl

        return getattr(fused_linear_kl, name)
    raise AttributeError(f"module 'gopd_fast.kernels' has no attribute {name!r}")
