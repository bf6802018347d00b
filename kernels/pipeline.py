"""The block pipeline of the one_pass backward (``backward._one_pass``): which stream runs which step of which
block, what each step waits for, and the loop that executes it.

one_pass walks blocks of token rows x vocabulary columns (``blocks``: vocabulary fastest). For block b,
``GRAD_LOGITS`` (the ``_grad_logits`` Triton kernel) writes dz_b into a dz buffer and ``GEMMS`` consumes it on
the main stream: the bias column sums, grad_h += dz @ W_s into the token block's fp32 accumulator,
grad_W += dz^T @ h_s, and after the token block's last vocabulary block the accumulator's store into grad_h.

With ``overlap`` (the default; ``GOPD_BACKWARD_OVERLAP=0`` turns it off for A/B timing) the kernel of block
b + 1 runs on a side stream while the main stream runs block b's GEMMs: dz alternates between two buffers,
block b's GEMMs wait for block b's kernel, and the kernel of block b + 2, which overwrites block b's buffer, waits
for block b's GEMMs. The side stream starts after the work already queued on the main stream (``BEGIN``) and
its last kernel is waited for by the last GEMMs, so the caller's stream sees every result. The accumulators
(grad_h's, grad_W, grad_b) are touched by the main stream only, in block order, so the sums and their rounding
are the same with and without the overlap.

``one_pass_steps`` is a pure function of the block count (tests check its dependencies on CPU); ``run_steps``
executes a step list with a ``Streams``: CUDA streams and events on a GPU, ``Sequential`` elsewhere (CPU, the
interpreter), which runs the same steps in the same order with no streams.

Memory: one_pass sizes its blocks (``backward.one_pass_chunks``) so that the fp32 grad_h accumulator and
``DZ_BUFFERS`` dz blocks together fit ``tiling.backward_buffer_bytes()``, with or without the overlap (the blocks,
hence the GEMM shapes, the traffic and the sums, are the same either way; without it one buffer is allocated and
the budget is not filled): at N=16384, Ds=4096, V=151936 in bf16 a 2048 x 4096 accumulator (32 MiB) and two
2048 x 7936 dz blocks (2 x 31 MiB), 94 MiB = 0.99% of the fp32 logits N x V x 4.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

MAIN, SIDE = "main", "side"
BEGIN, GRAD_LOGITS, GEMMS = "begin", "grad_logits", "gemms"
OVERLAP_ENV = "GOPD_BACKWARD_OVERLAP"
# dz buffers the overlapped pipeline alternates between; ``backward.one_pass_chunks`` budgets this many.
DZ_BUFFERS = 2


def overlap_enabled() -> bool:
    """``GOPD_BACKWARD_OVERLAP``: 1 (default) runs the gradient kernel on a side stream, 0 runs everything on one
    stream (the A/B switch for timing; results are bit for bit the same)."""
    value = os.environ.get(OVERLAP_ENV, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{OVERLAP_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


@dataclass(frozen=True)
class Block:
    """Rows [n_lo, n_lo + height) x columns [v_lo, v_lo + width); ``closes_row``: the token block's last."""

    n_lo: int
    height: int
    v_lo: int
    width: int
    closes_row: bool


def blocks(n_tokens: int, vocab: int, rows: int, columns: int) -> list[Block]:
    """one_pass's blocks in execution order: token blocks of ``rows``, each split into ``columns`` wide blocks."""
    for name, value in (("n_tokens", n_tokens), ("vocab", vocab), ("rows", rows), ("columns", columns)):
        if value < 1:
            raise ValueError(f"{name} must be a positive number, got {value}")
    return [Block(n_lo, min(rows, n_tokens - n_lo), v_lo, min(columns, vocab - v_lo), v_lo + columns >= vocab)
            for n_lo in range(0, n_tokens, rows) for v_lo in range(0, vocab, columns)]


@dataclass(frozen=True)
class Step:
    stream: str  # MAIN or SIDE
    op: str  # BEGIN, GRAD_LOGITS (writes dz into ``buffer``) or GEMMS (reads it)
    block: int  # index into ``blocks``; -1 for BEGIN
    buffer: int  # dz buffer index; -1 for BEGIN
    waits: tuple[int, ...] = ()  # indices of earlier steps, on the other stream, that must finish first


def one_pass_steps(num_blocks: int, overlap: bool) -> list[Step]:
    """The steps in host issue order. Without ``overlap`` (or with a single block, where nothing can overlap):
    kernel, GEMMs, kernel, GEMMs, ... on the main stream with one buffer. With it: BEGIN on the main stream, then
    the kernels of blocks 0 and 1 on the side stream, then for each block b its GEMMs on the main stream
    (waiting for its kernel) and the kernel of block b + 2 (waiting for block b's GEMMs, the last reader of the
    buffer it overwrites), so the side stream always has the next kernel queued."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
    if not overlap or num_blocks == 1:
        return [Step(MAIN, op, b, 0) for b in range(num_blocks) for op in (GRAD_LOGITS, GEMMS)]
    steps = [Step(MAIN, BEGIN, -1, -1)]
    kernel_at: dict[int, int] = {}
    gemms_at: dict[int, int] = {}

    def kernel(b: int) -> None:
        # The first kernel waits for BEGIN, the next ones follow it on their stream, and from the DZ_BUFFERS-th on
        # a kernel waits for the GEMMs that last read its buffer.
        waits = (0,) if b == 0 else (gemms_at[b - DZ_BUFFERS],) if b >= DZ_BUFFERS else ()
        kernel_at[b] = len(steps)
        steps.append(Step(SIDE, GRAD_LOGITS, b, b % DZ_BUFFERS, waits))

    for b in range(min(DZ_BUFFERS, num_blocks)):
        kernel(b)
    for b in range(num_blocks):
        gemms_at[b] = len(steps)
        steps.append(Step(MAIN, GEMMS, b, b % DZ_BUFFERS, (kernel_at[b],)))
        if b + DZ_BUFFERS < num_blocks:
            kernel(b + DZ_BUFFERS)
    return steps


def buffer_count(steps: list[Step]) -> int:
    return max(s.buffer for s in steps) + 1


class Streams(Protocol):
    """What ``run_steps`` needs of the streams: a context that makes a stream current, waiting on and recording
    the events of step indices, and marking a tensor as used by every stream (so its memory is not reused while
    one of them may still read it)."""

    def on(self, stream: str) -> contextlib.AbstractContextManager: ...

    def wait(self, stream: str, step_index: int) -> None: ...

    def record(self, stream: str, step_index: int) -> None: ...

    def share(self, tensor: torch.Tensor) -> None: ...


class Sequential:
    """No streams: the host runs the steps in list order, a valid order of any step list built here (CPU and the
    Triton interpreter run synchronously)."""

    def on(self, stream: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wait(self, stream: str, step_index: int) -> None:
        pass

    def record(self, stream: str, step_index: int) -> None:
        pass

    def share(self, tensor: torch.Tensor) -> None:
        pass


class CudaStreams:
    """The caller's current stream as MAIN and a per-device side stream as SIDE, with one event per waited-on
    step."""

    def __init__(self, device: torch.device) -> None:
        self.streams = {MAIN: torch.cuda.current_stream(device), SIDE: _side_stream(device)}
        self.events: dict[int, torch.cuda.Event] = {}

    def on(self, stream: str) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.streams[stream])

    def wait(self, stream: str, step_index: int) -> None:
        self.streams[stream].wait_event(self.events[step_index])

    def record(self, stream: str, step_index: int) -> None:
        self.events[step_index] = self.streams[stream].record_event()

    def share(self, tensor: torch.Tensor) -> None:
        # Allocated on MAIN: the caching allocator must not hand its memory out again before SIDE's queued work
        # on it is done (the final wait already orders SIDE before MAIN; this keeps it safe on its own).
        tensor.record_stream(self.streams[SIDE])


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def streams_for(device: torch.device, steps: list[Step]) -> Streams:
    """CUDA streams when the steps use the side stream on a CUDA device, else ``Sequential``."""
    if device.type == "cuda" and any(s.stream == SIDE for s in steps):
        return CudaStreams(device)
    return Sequential()


def run_steps(steps: list[Step], run: Callable[[Step], None], streams: Streams) -> None:
    """Issue every step on its stream after waiting for its dependencies; record an event after each step that a
    later one waits for."""
    waited = {i for s in steps for i in s.waits}
    for index, step in enumerate(steps):
        for i in step.waits:
            streams.wait(step.stream, i)
        with streams.on(step.stream):
            run(step)
        if index in waited:
            streams.record(step.stream, index)

