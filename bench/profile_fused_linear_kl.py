"""Where the time of one fused linear KL forward + backward goes, by kernel family, for each backward schedule.

    python bench/profile_fused_linear_kl.py                                    # GPU: the issue's target shape
    python bench/profile_fused_linear_kl.py --n 4096 --schedules one_pass      # a smaller case
    python bench/profile_fused_linear_kl.py --n 32 --vocab 500 --ds 48 --dt 40 # CPU: Triton interpreter (plumbing)

torch.profiler records a few steps after a warm-up (autotuning); kernels are grouped into families: the forward
kernel, the backward's gradient-of-logits (recompute) kernel, the atomic backward kernel, GEMMs (cuBLAS) and the
rest (elementwise, reductions, copies). Each family's time is divided by its FLOPs where it has a known count, so
the table says how close each part runs to the card's matmul rate. On CUDA the times are device (kernel) times; on
CPU they are the host times of the kernels' launch annotations (``tiling.annotate``: interpreted kernels), torch's
matmuls and the rest of the wall time, which checks the plumbing and says nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

FAMILIES = ("forward", "forward_jsd", "grad_logits", "backward_atomic", "gemm", "other")
_PATTERNS = (  # (family, regex on the kernel / op name), first match wins
    ("forward_jsd", re.compile(r"_jsd_kernel")),
    ("forward", re.compile(r"_kl_forward_kernel")),
    ("grad_logits", re.compile(r"_grad_logits_kernel")),
    ("backward_atomic", re.compile(r"_backward_atomic_kernel")),
    ("gemm", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|aten::(add)?mm_?$", re.IGNORECASE)),
)


def family(name: str) -> str:
    """The kernel family of a profiler event name."""
    for fam, pattern in _PATTERNS:
        if pattern.search(name):
            return fam
    return "other"


@dataclass(frozen=True)
class Shape:
    n: int
    vocab: int
    ds: int
    dt: int


def family_flops(shape: Shape, schedule: str, jsd: bool) -> dict[str, float]:
    """FLOPs each family does in one forward + backward (student hidden and weight both get gradients)."""
    logits = 2.0 * shape.n * shape.vocab * (shape.ds + shape.dt)  # both models' logit tiles once
    grads = 4.0 * shape.n * shape.vocab * shape.ds                # dz @ W_s and dz^T @ h_s
    flops = {"forward": logits, "forward_jsd": logits if jsd else 0.0}
    if schedule == "atomic":
        flops["backward_atomic"] = logits + grads
    else:
        flops["grad_logits"] = logits * (2 if schedule == "two_pass" else 1)
        flops["gemm"] = grads
    return flops


def aggregate(events: list[tuple[str, float, int]]) -> dict[str, tuple[float, int]]:
    """(name, self time in us, calls) events -> family -> (total us, calls)."""
    totals: dict[str, tuple[float, int]] = {}
    for name, time_us, calls in events:
        fam = family(name)
        t, c = totals.get(fam, (0.0, 0))
        totals[fam] = (t + time_us, c + calls)
    return totals


def table(totals: dict[str, tuple[float, int]], flops: dict[str, float], steps: int) -> list[dict]:
    """Per-step rows for every family with time or FLOPs, plus a total row."""
    rows = []
    total_ms = sum(t for t, _ in totals.values()) / 1e3 / steps
    for fam in FAMILIES:
        time_us, calls = totals.get(fam, (0.0, 0))
        fl = flops.get(fam, 0.0)
        if time_us == 0 and fl == 0:
            continue
        ms = time_us / 1e3 / steps
        rows.append({"family": fam, "calls": calls / steps, "ms": ms,
                     "share": ms / total_ms if total_ms else 0.0,
                     "tflops": fl / (ms * 1e-3) / 1e12 if ms > 0 and fl > 0 else None})
    rows.append({"family": "total", "calls": sum(c for _, c in totals.values()) / steps, "ms": total_ms,
                 "share": 1.0, "tflops": sum(flops.values()) / (total_ms * 1e-3) / 1e12 if total_ms else None})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| kernel family | calls / step | ms / step | share | TFLOP/s on its FLOPs |", "|---|---|---|---|---|"]
    for r in rows:
        rate = "-" if r["tflops"] is None else f"{r['tflops']:.3g}"
        lines.append(f"| {r['family']} | {r['calls']:.0f} | {r['ms']:.3f} | {100 * r['share']:.1f}% | {rate} |")
    return "\n".join(lines)


def profile(shape: Shape, schedule: str, dtype: torch.dtype, jsd_beta: float | None, steps: int,
            device: torch.device) -> list[dict]:
    from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from gopd_fast.ops.problem import build_problem

    g = torch.Generator().manual_seed(0)

    def rand(*dims, scale):
        return (torch.randn(*dims, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rand(shape.n, shape.ds, scale=1.0).requires_grad_()
    ws = rand(shape.vocab, shape.ds, scale=2.0 * shape.ds**-0.5).requires_grad_()
    ht, wt = rand(shape.n, shape.dt, scale=1.0), rand(shape.vocab, shape.dt, scale=2.0 * shape.dt**-0.5)
    rw = torch.ones(shape.n, device=device)
    fw = torch.zeros(shape.n, device=device)

    def step():
        hs.grad = ws.grad = None
        loss, _ = fused_linear_kl_triton(build_problem(
            hs, ws, ht, wt, reverse_weight=rw, forward_weight=fw, jsd_beta=jsd_beta, temperature=1.0, target_ids=None,
            grad_scale=1.0 / shape.n, return_stats=False), schedule=schedule)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()  # autotune / compile outside the profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall_us = (time.perf_counter() - start) * 1e6
    events = device_events(prof.key_averages()) if device.type == "cuda" else host_events(prof.key_averages(),
                                                                                          wall_us)
    jsd = jsd_beta is not None and 0.0 < jsd_beta < 1.0
    return table(aggregate(events), family_flops(shape, schedule, jsd), steps)


def device_events(averages) -> list[tuple[str, float, int]]:
    """CUDA: every device kernel with its own time (the kernels' names say their family; the kernels/ launch
    annotations, which may also appear on the device timeline, are left out so nothing counts twice)."""
    events = []
    for evt in averages:
        time_us = getattr(evt, "self_device_time_total", None)
        if time_us is None:
            time_us = evt.self_cuda_time_total
        if evt.device_type != torch.autograd.DeviceType.CUDA or time_us <= 0 or evt.key.startswith("gopd::"):
            continue
        events.append((evt.key, float(time_us), int(evt.count)))
    return events


def host_events(averages, wall_us: float) -> list[tuple[str, float, int]]:
    """CPU (interpreter): the kernels/ launch annotations (inclusive time), torch's matmuls (self time), and the
    rest of the wall time as "other"."""
    events = []
    for evt in averages:
        if evt.key.startswith("gopd::"):
            events.append((evt.key, float(evt.cpu_time_total), int(evt.count)))
        elif family(evt.key) == "gemm":
            events.append((evt.key, float(evt.self_cpu_time_total), int(evt.count)))
    events.append(("other", max(wall_us - sum(t for _, t, _ in events), 0.0), 0))
    return events


def main(argv: list[str] | None = None) -> str:
    from gopd_fast.kernels.backward import SCHEDULES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--ds", type=int, default=4096)
    parser.add_argument("--dt", type=int, default=4096)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 under the interpreter")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--jsd-beta", type=float, default=None, help="default: reverse KL")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    shape = Shape(args.n, args.vocab, args.ds, args.dt)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    parts = [(f"N={shape.n} V={shape.vocab} Ds={shape.ds} Dt={shape.dt} {str(dtype).removeprefix('torch.')} "
             f"on {where}; objective {'reverse KL' if args.jsd_beta is None else f'JSD beta={args.jsd_beta}'}; "
             f"mean of {args.steps} forward+backward steps")]
    for schedule in args.schedules.split(","):
        if schedule not in SCHEDULES:
            parser.error(f"--schedules: {schedule!r} is not one of {', '.join(SCHEDULES)}")
        rows = profile(shape, schedule, dtype, args.jsd_beta, args.steps, device)
        parts.append(f"### backward schedule `{schedule}`\n\n{format_rows(rows)}")
        print(parts[-1] + "\n", flush=True)
    text = "\n\n".join(parts) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    main()
