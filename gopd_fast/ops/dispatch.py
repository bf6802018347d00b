"""Which backend runs a ``KLProblem``: the names, the ``GOPD_BACKEND`` override and the automatic choice.

"auto" takes ``GOPD_BACKEND`` when set, else "triton" on CUDA tensors and "chunked" elsewhere; float64 inputs
and machines without triton fall back to "chunked" (an explicit "triton" raises instead). ``backend_fn`` returns
the backend as a function of the problem alone, with its own options bound.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from gopd_fast.ops.chunked import fused_linear_kl_chunked
from gopd_fast.ops.naive import fused_linear_kl_naive
from gopd_fast.ops.problem import KLProblem

__all__ = ["BACKENDS", "BACKEND_ENV", "Backend", "backend_fn", "check_backend", "choose_backend",
           "resolve_backend"]

BACKENDS = ("auto", "naive", "chunked", "triton")
BACKEND_ENV = "GOPD_BACKEND"

Backend = Callable[[KLProblem], tuple[Tensor, "dict[str, Tensor] | None"]]

_warned_triton_fallback = False


def check_backend(backend: object) -> str:
    """``backend`` as given to ``fused_linear_kl`` and the classes built on it (checked at their construction)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend name for ``backend`` ("auto" honours GOPD_BACKEND, then the device)."""
    if check_backend(backend) != "auto":
        return backend
    env = os.environ.get(BACKEND_ENV, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"environment variable {BACKEND_ENV} must be one of {BACKENDS}, got {env!r}")
        if env != "auto":
            return env
    return "triton" if device.type == "cuda" else "chunked"


def choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run inputs of this device and dtype, or a ValueError/ImportError saying why the
    requested one cannot (the one place that decides whether the Triton kernels can take the inputs)."""
    global _warned_triton_fallback
    explicit = backend == "triton" or (backend == "auto" and os.environ.get(BACKEND_ENV, "").strip() == "triton")
    name = resolve_backend(backend, device)
    if name != "triton":
        return name
    if dtype == torch.float64:  # the kernels are bf16/fp16/fp32 only; float64 is for references and tests
        if explicit:
            raise ValueError("backend='triton' supports bfloat16, float16 and float32 inputs, got float64; "
                             "use backend='chunked' or 'naive' for float64")
        return "chunked"
    if not _triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 to "
                         "run the Triton interpreter on CPU (slow, for tests), or use backend='chunked'")
    if explicit:
        _import_triton()  # fail now, with the install hint, rather than mid-call
        return name
    try:  # "auto" on CUDA: prefer triton, but a missing triton is no reason to fail
        _import_triton()
    except ImportError as err:
        if not _warned_triton_fallback:
            warnings.warn(f"fused_linear_kl: triton backend unavailable ({err}); using 'chunked'", stacklevel=3)
            _warned_triton_fallback = True
        return "chunked"
    return name


def backend_fn(name: str, chunk_size: int | None = None) -> Backend:
    """The concrete backend ``name`` as a function of the problem (``chunk_size``: the chunked backend's tile)."""
    if name == "naive":
        return fused_linear_kl_naive
    if name == "chunked":
        return partial(fused_linear_kl_chunked, chunk_size=chunk_size)
    if name == "triton":
        return _import_triton()
    raise ValueError(f"backend_fn needs a concrete backend (naive, chunked, triton), got {name!r}")


def _import_triton() -> Backend:
    try:
        from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
    except ImportError as err:
        raise ImportError(f"backend='triton' needs the triton package and gopd_fast.kernels.fused_linear_kl "
                          f"({err}); use backend='chunked' on machines without them") from err
    return fused_linear_kl_triton


def _triton_usable(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
