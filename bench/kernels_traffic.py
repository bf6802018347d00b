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
``--limit`` (2) x max(compulsory, bound) and its exit status is the check: 1 if a kernel other than the atomic test
oracle exceeds it (``tests/kernels/test_traffic.py`` runs the same check at S*).

The one_pass backward runs block b's GEMMs on the main stream while ``_grad_logits`` of block b + 1 runs on a side
stream (``kernels/pipeline.py``); the model keeps a cold L2 per block (the GEMMs evict the block's panels either
way) and does not model the two streams sharing the L2.

FLOPs: 2 N V D per logit GEMM (per model) and per gradient GEMM, against the useful 6 N V Ds + 2 N V Dt of one
forward + backward.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from gopd_fast.kernels.backward import one_pass_chunks

from gopd_fast.kernels import tiling

S_STAR = (16384, 4096, 4096, 151936)  # the target shape: N, Ds, Dt, V
LIMIT = 2.0  # modelled traffic / max(compulsory, I/O lower bound), every kernel but the atomic oracle

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


@contextlib.contextmanager
def gpu_sizing(sms: int) -> Iterator[None]:
    """The GPU's tile lists, alignments and split sizing for a ``sms``-SM GPU, whatever this process is (a test
    under the Triton interpreter included); restored on exit."""
    saved = tiling.interpreting, tiling.multiprocessor_count
    tiling.interpreting = lambda: False
    tiling.multiprocessor_count = lambda device: sms
    try:
        yield
    finally:
        tiling.interpreting, tiling.multiprocessor_count = saved


@dataclass(frozen=True)
class Row:
    kernel: str
    config: tiling.TileConfig
    traffic: float  # modelled HBM bytes
    compulsory: float  # every input byte read once, every output byte written once
    bound: float  # max(compulsory, the logit GEMMs' I/O lower bound + the kernel's other compulsory bytes)
    flops: float

    @property
    def ratio(self) -> float:
        return self.traffic / self.bound

    @property
    def checked(self) -> bool:
        """Whether the limit applies: every kernel but the atomic schedule, a test oracle."""
        return "oracle" not in self.kernel


def io_lower_bound(shape: Shape, l2_mb: float) -> float:
    """Bytes any schedule of the two logit GEMMs moves (Smith et al. 2019) with the L2, shared memory and registers
    of an H100 on chip."""
    words = (l2_mb + ON_CHIP_MB["shared"] + ON_CHIP_MB["registers"]) * 1e6 / shape.elem
    return 2 * shape.n * shape.vocab * (shape.ds + shape.dt) / math.sqrt(words) * shape.elem


def model_rows(shape: Shape, l2_mb: float = 50.0, sms: int = 132, oracle: bool = True) -> list[Row]:
    """One row per (kernel, autotune candidate) at ``shape`` (the JSD lists pruned as the autotuner prunes them)."""
    n, v, ds, dt, e = shape.n, shape.vocab, shape.ds, shape.dt, shape.elem
    inputs = (n + v) * (ds + dt) * e
    logit_bound = io_lower_bound(shape, l2_mb)
    logit_flops = 2 * n * v * (ds + dt)
    grad_flops = 2 * 2 * n * v * ds
    kernels = [
        ("_kl_forward", forward_traffic, tiling.FORWARD_CONFIGS, inputs, logit_flops),
        ("_jsd (JSD only)", forward_traffic, tiling.FORWARD_CONFIGS, inputs, logit_flops),
        ("_grad_logits (one_pass)", grad_logits_traffic, tiling.BACKWARD_CONFIGS, inputs + n * v * e, logit_flops),
    ]
    if oracle:
        kernels.append(("_backward_atomic (oracle)", atomic_traffic, tiling.BACKWARD_CONFIGS,
                        inputs + (n + v) * ds * 4 * 2, logit_flops + grad_flops))
    rows = []
    with gpu_sizing(sms):
        for name, model, configs, compulsory, flops in kernels:
            bound = max(compulsory, logit_bound + compulsory - inputs)
            for cfg in configs:
                rows.append(Row(name, cfg, model(shape, cfg, l2_mb * 1e6, sms), compulsory, bound, flops))
    return rows


def worst_ratio(rows: list[Row]) -> float:
    return max(row.ratio for row in rows if row.checked)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=S_STAR[0])
    parser.add_argument("--ds", type=int, default=S_STAR[1])
    parser.add_argument("--dt", type=int, default=S_STAR[2])
    parser.add_argument("--vocab", type=int, default=S_STAR[3])
    parser.add_argument("--l2-mb", type=float, default=50.0)
    parser.add_argument("--sms", type=int, default=132)
    parser.add_argument("--limit", type=float, default=LIMIT,
                        help="exit 1 when a checked kernel's modelled / max(compulsory, bound) exceeds this")
    parser.add_argument("--no-oracle", action="store_true", help="leave out the atomic oracle (the slowest model)")
    args = parser.parse_args(argv)
    shape = Shape(args.n, args.ds, args.dt, args.vocab)
    n, v, ds, dt, e = shape.n, shape.vocab, shape.ds, shape.dt, shape.elem
    inputs = (n + v) * (ds + dt) * e
    logit_bound = io_lower_bound(shape, args.l2_mb)
    useful = 6 * n * v * ds + 2 * n * v * dt
    logit_flops = 2 * n * v * (ds + dt)
    grad_flops = 2 * 2 * n * v * ds
    on_chip_mb = args.l2_mb + ON_CHIP_MB["shared"] + ON_CHIP_MB["registers"]
    print(f"N={n} Ds={ds} Dt={dt} V={v} bf16, L2 {args.l2_mb:g} MB, {args.sms} SMs; GB = 1e9 bytes")
    print(f"I/O lower bound of the two logit GEMMs (on-chip memory {on_chip_mb:.0f} MB): "
          f"{logit_bound / 1e9:.1f} GB = {logit_bound / inputs:.1f}x the compulsory {inputs / 1e9:.2f} GB of inputs\n")
    print("| kernel | BLOCK_N x BLOCK_V x BLOCK_D | modelled HBM GB | compulsory GB | lower bound GB "
          "| modelled / compulsory | modelled / max(compulsory, bound) | TFLOP | / useful |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = model_rows(shape, args.l2_mb, args.sms, oracle=not args.no_oracle)
    for r in rows:
        c = r.config
        print(f"| {r.kernel} | {c.block_n} x {c.block_v} x {c.block_d} | {r.traffic / 1e9:.1f} "
              f"| {r.compulsory / 1e9:.2f} | {r.bound / 1e9:.1f} | {r.traffic / r.compulsory:.1f} | {r.ratio:.2f} "
              f"| {r.flops / 1e12:.1f} | {r.flops / useful:.2f} |")
    print(f"\nuseful FLOPs 6·N·V·Ds + 2·N·V·Dt = {useful / 1e12:.1f} TFLOP. Per schedule: one_pass = _kl_forward + "
          f"_grad_logits + two cuBLAS GEMMs ({grad_flops / 1e12:.1f} TFLOP) = "
          f"{(2 * logit_flops + grad_flops) / useful:.2f}x; the JSD adds _jsd (+{logit_flops / useful:.2f}x).")
    worst = worst_ratio(rows)
    verdict = "within" if worst <= args.limit else "OVER"
    print(f"worst modelled / max(compulsory, bound) of the non-oracle kernels: {worst:.2f} ({verdict} the limit "
          f"{args.limit:g})")
    return 0 if worst <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
