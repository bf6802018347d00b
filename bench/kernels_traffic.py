"""HBM traffic and FLOPs of each Triton kernel at the issue's target shape, modelled from the kernels' actual launch
orders and tile sizes (no GPU needed).

    python bench/kernels_traffic.py [--n 16384] [--ds 4096] [--dt 4096] [--vocab 151936] [--l2-mb 50]

Model. Programs start in launch order on ``--sms`` slots (one resident program per SM: every autotune
configuration uses 128-192 KiB of shared memory) and advance in lockstep, one logit tile per step; a program that
finishes frees its slot for the next. At each step every active program reads, for both models, the [BLOCK_N, D]
hidden-state panel of its token tile and the [BLOCK_V, D] weight panel of its vocabulary tile (streamed through
shared memory by the K loop). A panel is read from HBM when it is not in an LRU cache of ``--l2-mb`` MB (the L2),
so programs that use a panel in the same step share one read. Written outputs (dz blocks, the atomic oracle's fp32
gradients, read-modify-written in L2) count once per eviction. L2 is assumed cold at every launch.

Reference points printed beside each kernel: the compulsory traffic (every input byte read once, every output byte
written once) and the I/O lower bound of any schedule for the kernel's logit GEMMs: Q >= 2 N V D / sqrt(S) words
per GEMM for S words of on-chip memory (Smith et al., "A Tight I/O Lower Bound for Matrix Multiplication", 2019),
with S = L2 + shared memory + register files (50 + 30 + 33 MB on an H100). At S* the bound is ~4x the compulsory
traffic, so no schedule of these GEMMs gets within 2x of compulsory; the script checks each kernel against
2x max(compulsory, bound) and exits 1 if one exceeds it.

FLOPs: 2 N V D per logit GEMM (per model) and per gradient GEMM, against the useful 6 N V Ds + 2 N V Dt of one
forward + backward.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # GPU tile lists and alignments

import torch
from gopd_fast.kernels.backward import one_pass_chunks

from gopd_fast.kernels import tiling

ON_CHIP_MB = {"l2": 50, "shared": 132 * 228 * 1024 / 1e6, "registers": 132 * 256 * 1024 / 1e6}


@dataclass
class Shape:
    n: int
    ds: int
    dt: int
    vocab: int
    elem: int = 2  # bf16


class L2:
    """LRU cache of named byte ranges (panels); counts HBM reads on misses and writes on dirty evictions."""

    def __init__(self, capacity: float) -> None:
        self.capacity, self.used = capacity, 0
        self.lines: OrderedDict[tuple, tuple[int, bool]] = OrderedDict()
        self.read = self.written = 0

    def touch(self, key: tuple, size: int, write: bool = False, read_on_miss: bool = True) -> None:
        if key in self.lines:
            old_size, dirty = self.lines.pop(key)
            self.lines[key] = (old_size, dirty or write)
            return
        if read_on_miss:
            self.read += size
        self.lines[key] = (size, write)
        self.used += size
        while self.used > self.capacity:
            _, (evicted, dirty) = self.lines.popitem(last=False)
            self.used -= evicted
            self.written += evicted if dirty else 0

    def flush(self) -> None:
        self.written += sum(size for size, dirty in self.lines.values() if dirty)
        self.lines.clear()
        self.used = 0


def run_programs(l2: L2, programs, sms: int, step) -> None:
    """Programs (iterables of per-step work items) start in order on ``sms`` slots and advance in lockstep."""
    programs = iter(programs)
    active = [it for it in (next(programs, None) for _ in range(sms)) if it is not None]
    while active:
        still = []
        for it in active:
            item = next(it, None)
            if item is None:
                replacement = next(programs, None)
                if replacement is not None and (item := next(replacement, None)) is not None:
                    step(l2, item)
                    still.append(replacement)
                continue
            step(l2, item)
            still.append(it)
        active = still


def operand_reads(shape: Shape, cfg: tiling.TileConfig):
    """The step function of a logit tile: both models' hidden-state and weight panels."""
    def step(l2: L2, tile: tuple[int, int]) -> None:
        i, j = tile
        for model, d in (("s", shape.ds), ("t", shape.dt)):
            l2.touch(("h", model, i), cfg.block_n * d * shape.elem)
            l2.touch(("w", model, j), cfg.block_v * d * shape.elem)
    return step


def forward_traffic(shape: Shape, cfg: tiling.TileConfig, l2_bytes: float, sms: int) -> int:
    """_kl_forward / _jsd: 1-D grid of (token tile, split) in the grouped order of ``tiling.forward_group_tokens``;
    each program walks its split's vocabulary tiles."""
    row_bytes = (shape.ds + shape.dt) * shape.elem
    splits, unit = tiling.vocab_splits(shape.n, shape.vocab, torch.device("cpu"), row_bytes)
    group = max(1, tiling.forward_group_tokens(row_bytes) // cfg.block_n)
    num_n = math.ceil(shape.n / cfg.block_n)

    def program(pid: int):
        i, s = tiling.grouped_tile(pid, num_n, splits, group)
        lo, hi = tiling.split_bounds(s, splits, shape.vocab, unit)
        return iter([(i, j) for j in range(lo // cfg.block_v, math.ceil(hi / cfg.block_v))])

    l2 = L2(l2_bytes)
    run_programs(l2, (program(pid) for pid in range(num_n * splits)), sms, operand_reads(shape, cfg))
    return l2.read + 9 * splits * shape.n * 4


def grad_logits_traffic(shape: Shape, cfg: tiling.TileConfig, l2_bytes: float, sms: int) -> int:
    """_grad_logits over one_pass's blocks (GPU sizing: cuBLAS accumulates into fp32, no bias): 1-D grouped grid
    per block; dz written in bf16. L2 is flushed between blocks (the block's GEMMs run in between)."""
    rows, columns = one_pass_chunks(shape.n, shape.vocab, shape.ds, shape.elem, fp32_dz=False, partial_bytes=0)
    l2 = L2(l2_bytes)
    reads = operand_reads(shape, cfg)

    def step(cache: L2, tile: tuple[int, int, int, int]) -> None:
        n_lo, v_lo, i, j = tile
        reads(cache, (n_lo // cfg.block_n + i, v_lo // cfg.block_v + j))
        cache.touch(("dz", n_lo, v_lo, i, j), cfg.block_n * cfg.block_v * shape.elem, write=True,
                    read_on_miss=False)

    for n_lo in range(0, shape.n, rows):
        height = min(rows, shape.n - n_lo)
        for v_lo in range(0, shape.vocab, columns):
            width = min(columns, shape.vocab - v_lo)
            num_n, num_v = math.ceil(height / cfg.block_n), math.ceil(width / cfg.block_v)
            group = max(tiling.GROUP_TOKENS // cfg.block_n, 1)
            tiles = (tiling.grouped_tile(pid, num_n, num_v, group) for pid in range(num_n * num_v))
            run_programs(l2, (iter([(n_lo, v_lo, i, j)]) for i, j in tiles), sms, step)
            l2.flush()
    return l2.read + l2.written


def atomic_traffic(shape: Shape, cfg: tiling.TileConfig, l2_bytes: float, sms: int) -> int:
    """_backward_atomic (the test oracle): 1-D grouped grid over all tiles; fp32 grad_h / grad_W panels
    read-modify-written in L2 (zero-initialised buffers read on first touch)."""
    num_n, num_v = math.ceil(shape.n / cfg.block_n), math.ceil(shape.vocab / cfg.block_v)
    reads = operand_reads(shape, cfg)

    def step(l2: L2, tile: tuple[int, int]) -> None:
        reads(l2, tile)
        i, j = tile
        l2.touch(("grad_h", i), cfg.block_n * shape.ds * 4, write=True)
        l2.touch(("grad_w", j), cfg.block_v * shape.ds * 4, write=True)

    l2 = L2(l2_bytes)
    group = max(tiling.GROUP_TOKENS // cfg.block_n, 1)
    tiles = (tiling.grouped_tile(pid, num_n, num_v, group) for pid in range(num_n * num_v))
    run_programs(l2, (iter([t]) for t in tiles), sms, step)
    l2.flush()
    return l2.read + l2.written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--ds", type=int, default=4096)
    parser.add_argument("--dt", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--l2-mb", type=float, default=50.0)
    parser.add_argument("--sms", type=int, default=132)
    args = parser.parse_args()
    shape = Shape(args.n, args.ds, args.dt, args.vocab)
    tiling.multiprocessor_count = lambda device: args.sms  # size the forward's vocabulary splits for that GPU
    n, v, ds, dt, e = shape.n, shape.vocab, shape.ds, shape.dt, shape.elem
    inputs = (n + v) * (ds + dt) * e
    on_chip_words = (args.l2_mb + ON_CHIP_MB["shared"] + ON_CHIP_MB["registers"]) * 1e6 / e
    logit_bound = 2 * n * v * (ds + dt) / math.sqrt(on_chip_words) * e  # both models' logit GEMMs
    useful = 6 * n * v * ds + 2 * n * v * dt
    logit_flops = 2 * n * v * (ds + dt)
    grad_flops = 2 * 2 * n * v * ds
    kernels = [
        ("_kl_forward", forward_traffic, tiling.FORWARD_CONFIGS, inputs, logit_flops),
        ("_jsd (JSD only)", forward_traffic, tiling.FORWARD_CONFIGS, inputs, logit_flops),
        ("_grad_logits (one_pass)", grad_logits_traffic, tiling.BACKWARD_CONFIGS, inputs + n * v * e,
         logit_flops),
        ("_backward_atomic (oracle)", atomic_traffic, tiling.BACKWARD_CONFIGS, inputs + (n + v) * ds * 4 * 2,
         logit_flops + grad_flops),
    ]
    print(f"N={n} Ds={ds} Dt={dt} V={v} bf16, L2 {args.l2_mb:g} MB, {args.sms} SMs; GB = 1e9 bytes")
    print(f"I/O lower bound of the two logit GEMMs (on-chip memory {on_chip_words * e / 1e6:.0f} MB): "
          f"{logit_bound / 1e9:.1f} GB = {logit_bound / inputs:.1f}x the compulsory {inputs / 1e9:.2f} GB of inputs\n")
    print("| kernel | BLOCK_N x BLOCK_V | modelled HBM GB | compulsory GB | lower bound GB | modelled / compulsory "
          "| modelled / max(compulsory, bound) | TFLOP | / useful |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for name, model, configs, compulsory, flops in kernels:
        for cfg in configs:
            traffic = model(shape, cfg, args.l2_mb * 1e6, args.sms)
            bound = max(compulsory, logit_bound + compulsory - inputs)
            ratio = traffic / bound
            if "oracle" not in name:
                worst = max(worst, ratio)
            print(f"| {name} | {cfg.block_n} x {cfg.block_v} | {traffic / 1e9:.1f} | {compulsory / 1e9:.2f} "
                  f"| {bound / 1e9:.1f} | {traffic / compulsory:.1f} | {ratio:.2f} | {flops / 1e12:.1f} "
                  f"| {flops / useful:.2f} |", flush=True)
    print(f"\nuseful FLOPs 6·N·V·Ds + 2·N·V·Dt = {useful / 1e12:.1f} TFLOP. Per schedule: one_pass = _kl_forward + "
          f"_grad_logits + two cuBLAS GEMMs ({grad_flops / 1e12:.1f} TFLOP) = "
          f"{(2 * logit_flops + grad_flops) / useful:.2f}x; the JSD adds _jsd (+{logit_flops / useful:.2f}x).")
    print(f"worst modelled / max(compulsory, bound) of the non-oracle kernels: {worst:.2f} (limit 2)")
    return 0 if worst <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
