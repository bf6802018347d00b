"""The decode step of ``Qwen3Decoder`` in NumPy, for float32 models on CPU.

Why: a decode step of the demo's tiny models is ~130 small tensor calls (4 layers), and on the project's 2-core
CPU box each torch call costs ~10-20 us in a step's mixed sequence (measured: a 4-layer step with 4 rows took
1.6 ms with a 10-position history, ~2.5-3 ms with 760), far above its arithmetic. The same step written with
NumPy calls, which cost a few microseconds each, took ~1.6 ms at 760 positions (same process, alternating, load
~2-3). It reads the decoder's folded weights and its torch KV cache through zero-copy array views, so prefill
(torch: fused SDPA, FLOP-bound) and decode (NumPy: call-bound) share one cache. Numerics are the torch step's
(the same folded weights and tables) up to float rounding: OpenBLAS instead of MKL, ``x / sqrt`` for ``x * rsqrt``.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from gopd_fast.rollout.engines.decoder import Qwen3Decoder


@dataclass
class NumpyWeights:
    """Zero-copy NumPy views of a ``Qwen3Decoder``'s folded float32 weights and tables (valid until its next
    ``refresh``, which builds new ones)."""

    layers: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # qkv, o, gate_up, down, qk_norm
    embed: np.ndarray
    head: np.ndarray
    final_norm: np.ndarray
    cos: np.ndarray
    sin: np.ndarray


def numpy_weights(dec: Qwen3Decoder) -> NumpyWeights:
    """Views of ``dec``'s weights; they share memory with its torch tensors."""
    arr = lambda t: t.detach().numpy()
    return NumpyWeights(
        layers=[(arr(w.qkv), arr(w.o), arr(w.gate_up), arr(w.down), arr(n)) for w, n in zip(dec.layers, dec.qk_norms)],
        embed=arr(dec.embed), head=arr(dec.head), final_norm=arr(dec.final_norm), cos=arr(dec.cos),
        sin=arr(dec.sin_signed))


@functools.cache
def _openblas_thread_limit() -> Callable[[int], int] | None:
    """``openblas_set_num_threads_local`` of numpy's bundled OpenBLAS (pip wheels), or None for another BLAS.

    Why: with more than one OpenBLAS thread (the default without ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS``, as
    under ``make demo``) a decode step's small GEMMs wait on a helper thread that a busy second core seldom runs:
    a 16-row step took 39 ms instead of 10 ms on the shared 2-core box. The limit is per calling thread (OpenBLAS
    >= 0.3.27), so other numpy work in the process keeps its threads."""
    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*.so")
    for path in glob.glob(libs):
        try:
            fn = ctypes.CDLL(path).openblas_set_num_threads_local
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def _rms(x: np.ndarray, eps: float) -> np.ndarray:
    # ufunc calls only: np.mean / np.roll / np.split are Python wrappers that cost more than the math here
    return x / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps)


def decode_step(dec: Qwen3Decoder, w: NumpyWeights, ids: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor,
                span: int, hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``Qwen3Decoder.forward`` (one decode step of every row) on NumPy views: same arguments, same cache writes,
    float32 logits [rows, vocab] as a torch tensor (and with ``hidden`` the final hidden states [rows, hidden])."""
    limit = _openblas_thread_limit()
    if limit is not None:
        limit(1)                                              # ~0.3 us; this thread only
    nh, nkv, hd, eps = dec.num_heads, dec.num_kv_heads, dec.head_dim, dec.eps
    nqk, group, half = nh + nkv, nh // nkv, hd // 2
    ids_np, pos = ids.numpy(), positions.numpy()
    kv = cache.numpy()                                        # [layers, 2, rows, kv_heads, T, hd]
    b = ids_np.shape[0]
    rows = np.arange(b)
    x = w.embed[ids_np]                                       # [b, hidden]
    cos, sin = w.cos[pos], w.sin[pos]                         # [b, 1, hd]
    # additive mask [b, 1, 1, span]: each row sees its own history only
    mask = np.where(np.arange(span)[None, :] > pos[:, None], np.float32(-np.inf),
                    np.float32(0))[:, None, None, :]
    with np.errstate(over="ignore"):                          # exp(-gate) of a very negative gate: silu -> -0
        for i, (wqkv, wo, wgu, wdown, qk_norm) in enumerate(w.layers):
            qkv = (_rms(x, eps) @ wqkv).reshape(b, nqk + nkv, hd)
            qk = _rms(qkv[:, :nqk], eps) * qk_norm
            qk = qk * cos + np.concatenate((qk[..., half:], qk[..., :half]), axis=-1) * sin   # roll by half
            kc, vc = kv[i, 0], kv[i, 1]                       # [b, kv_heads, T, hd]
            kc[rows, :, pos] = qk[:, nh:]
            vc[rows, :, pos] = qkv[:, nqk:]
            # keys @ q^T, not q @ keys^T: the cache is the plain (row-major) operand then, 2-3x faster in OpenBLAS
            # (the scores come out [.., span, group]; the mask add writes them back in row order for the softmax)
            q_t = qk[:, :nh].reshape(b, nkv, group, hd).swapaxes(-1, -2)
            scores = np.add(np.matmul(kc[:, :, :span], q_t).swapaxes(-1, -2), mask, order="C")
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            x = x + np.matmul(scores, vc[:, :, :span]).reshape(b, nh * hd) @ wo
            gu = _rms(x, eps) @ wgu
            gate, up = gu[:, :gu.shape[1] // 2], gu[:, gu.shape[1] // 2:]
            x = x + (gate / (1 + np.exp(-gate)) * up) @ wdown
    normed = _rms(x, eps)
    logits = torch.from_numpy(normed @ w.head)
    return (logits, torch.from_numpy(normed * w.final_norm)) if hidden else logits
