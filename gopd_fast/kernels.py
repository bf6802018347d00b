"""Triton kernels of gopd-fast, ``gopd_fast.kernels``: the modules live in the repository's top-level ``kernels/``
folder (installed as ``gopd_fast/kernels/``), and this module is their package.

The folder has no ``__init__.py`` on purpose: from the repository root a regular ``kernels`` package would shadow
an installed top-level ``kernels`` distribution (Hugging Face's, which transformers imports); a folder without one
is at most a namespace portion, which Python ranks below any installed regular package. This module sets
``__path__`` to that folder, so ``gopd_fast.kernels.<module>`` imports work from a source tree, an editable install
and a wheel alike.

``fused_linear_kl_triton`` (module ``fused_linear_kl``) is the ``triton`` backend of ``gopd_fast.fused_linear_kl``:
student and teacher lm_head projections fused with the KL, tiled over tokens x vocabulary, forward and backward.
Importing this package does not import triton; the first attribute access does (so ``TRITON_INTERPRET`` can still
be set before that).
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gopd_fast.kernels.fused_linear_kl import (
        FusedLinearKLTriton,
        check_triton_runnable,
        fused_linear_kl_triton,
    )

__all__ = ["FusedLinearKLTriton", "check_triton_runnable", "fused_linear_kl_triton"]


def _kernel_folder() -> str:
    """gopd_fast/kernels/ in a wheel (or a checkout's symlink to kernels/), else the checkout's kernels/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent / "kernels"):
        if (candidate / "fused_linear_kl.py").is_file():
            return str(candidate)
    raise ImportError(f"gopd_fast.kernels: no kernels folder with fused_linear_kl.py next to {here}")


__path__ = [_kernel_folder()]  # a module with __path__ is a package: submodules are found there


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.fused_linear_kl"), name)
    raise AttributeError(f"module 'gopd_fast.kernels' has no attribute {name!r}")
