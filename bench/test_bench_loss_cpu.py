"""CPU benchmark of ``fused_linear_kl``: naive vs chunked backend, forward + backward, time and peak memory.

Variants (reverse KL on every token, float32, no bias, gradients for student hidden states and weight):
- ``naive``: materialises the [N, V] logits, autograd does the backward.
- ``chunked``: ``reduction="mean"``, so the backend gets ``grad_scale`` and computes the gradients during the
  forward pass (no recompute in backward).
- ``chunked-recompute``: ``reduction="none"`` then ``.mean()``: the backend saves lse/RKL and recomputes the logit
  tiles in backward. Comparing it with ``chunked`` is the measured justification of the eager choice.

Shapes: the default is small (N=256, D=256, V=32000) so that a plain ``pytest bench`` (benchmarks disabled: each
case runs once) takes seconds. ``GOPD_BENCH_FULL=1`` runs the issue's shapes N=2048, D=1024, V in {32000, 151936};
the naive case then needs about 6 GiB of RAM and each case takes minutes on 2 cores (one timed round each):

    OMP_NUM_THREADS=1 GOPD_BENCH_FULL=1 .venv/bin/python -m pytest bench/test_bench_loss_cpu.py --benchmark-enable -s

(one thread: on a shared, oversubscribed 2-core box, 2 OpenMP threads slowed the chunked path's many short
parallel regions far more than naive's few long ones; figures in bench/RESULTS.md, section "loss (CPU)").

Memory: measured in its own run before the timed rounds, as the growth of the process's peak resident set size
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) over the resident size just before
the call. It is what the machine really has to provide (allocator slack and library buffers included), at page
granularity. ``workspace`` subtracts the gradient tensors every backend must return (same size for all), which
is the memory the algorithm itself adds. Reported in ``extra_info`` (``--benchmark-json``) and printed with -s.
"""
from __future__ import annotations

import ctypes
import gc
import os
import time

import pytest
import torch

from gopd_fast import fused_linear_kl

FULL = os.environ.get("GOPD_BENCH_FULL") == "1"
N, D = (2048, 1024) if FULL else (256, 256)
VOCABS = (32000, 151936) if FULL else (32000,)
VARIANTS = ("naive", "chunked", "chunked-recompute")


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Return freed heap pages to the OS, reset the peak RSS, return the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the figure is then a little more conservative
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS:")


def _inputs(vocab: int, n: int = N, d: int = D):
    g = torch.Generator().manual_seed(0)
    scale = d**-0.5  # logits of unit scale
    return (torch.randn(n, d, generator=g).requires_grad_(), (torch.randn(vocab, d, generator=g) * scale).requires_grad_(),
            torch.randn(n, d, generator=g), torch.randn(vocab, d, generator=g) * scale)


def _step(variant: str, h_s, w_s, h_t, w_t) -> None:
    h_s.grad = w_s.grad = None
    if variant == "chunked-recompute":
        loss = fused_linear_kl(h_s, w_s, h_t, w_t, backend="chunked", reduction="none").mean()
    else:
        loss = fused_linear_kl(h_s, w_s, h_t, w_t, backend=variant)
    loss.backward()


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_fwd_bwd_cpu(benchmark, variant, vocab):
    _step(variant, *_inputs(64, n=16, d=32))  # lazy library initialisation must not count as workspace
    h_s, w_s, h_t, w_t = _inputs(vocab)
    before = _reset_peak_rss()
    start = time.perf_counter()
    _step(variant, h_s, w_s, h_t, w_t)
    untimed_s = time.perf_counter() - start
    peak_extra = _status_bytes("VmHWM:") - before
    grads = h_s.grad.nbytes + w_s.grad.nbytes
    mib = 2.0**20
    benchmark.extra_info.update(
        N=N, D=D, V=vocab, threads=torch.get_num_threads(), peak_rss_extra_mib=round(peak_extra / mib, 1),
        grads_mib=round(grads / mib, 1), workspace_mib=round((peak_extra - grads) / mib, 1),
        memory_run_s=round(untimed_s, 2),
    )
    print(f"\n[loss cpu] {variant:18s} N={N} D={D} V={vocab}: peak RSS +{peak_extra / mib:.0f} MiB "
          f"(gradients {grads / mib:.0f} MiB, workspace {(peak_extra - grads) / mib:.0f} MiB); "
          f"memory run {untimed_s:.1f} s", flush=True)
    benchmark.pedantic(_step, args=(variant, h_s, w_s, h_t, w_t), rounds=1 if FULL else 3, iterations=1)
    print(f"[loss cpu] {variant:18s} V={vocab}: timed run {benchmark.stats.stats.min:.1f} s" if benchmark.stats
          else "", flush=True)
