"""torch.autocast support shared by every entry of the loss (``gopd_fast.loss``, ``ops``, ``compat``).

Semantics (Liger-Kernel's): under ``torch.autocast(device, dtype)`` the logit GEMMs take their operands in the
autocast dtype (hidden states, lm_head weights and biases are cast to it exactly as autocast casts the operands of
an ``nn.Linear``: float32/float16/bfloat16 tensors are cast, float64 ones are left alone), while softmax, KL and
the gradient accumulations stay in float32. The loss then runs with autocast switched off, so no op inside it is
re-cast behind its back (that silently rounded the float32 logit tiles to bf16, and mixed dtypes in the
backward). The casts are differentiable: float32 master weights get float32 gradients.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["autocast_cast", "autocast_dtype", "autocast_off"]

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The active autocast dtype for ``device_type`` ("cpu", "cuda"), or None when autocast is off there."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_cast(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The tensors cast to the active autocast dtype of their device (unchanged when autocast is off).

    Non-tensors and None pass through, so this may run before argument validation.
    """
    device = next((t.device for t in tensors if isinstance(t, Tensor)), None)
    dtype = None if device is None else autocast_dtype(device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _CASTABLE and t.dtype != dtype else t
                 for t in tensors)


@contextlib.contextmanager
def autocast_off(device: torch.device | str) -> Iterator[None]:
    """Run the loss's own arithmetic with autocast disabled on ``device`` (a no-op when it is off already)."""
    device_type = device.type if isinstance(device, torch.device) else str(device)
    if not torch.is_autocast_enabled(device_type):
        yield
        return
    with torch.autocast(device_type, enabled=False):
        yield
