"""Accuracy of the Triton fused linear KL against float64 materialised logits (loss, stats and gradients).

    python bench/kernels_accuracy.py                      # CPU: Triton interpreter, fp32 and fp16, tiny shapes
    python bench/kernels_accuracy.py --dtypes bfloat16 --n 2048 --vocab 32768 --ds 1024 --dt 2048   # on a GPU
    python bench/kernels_accuracy.py --buffer-bytes 4096  # small backward buffers: many token/vocabulary blocks

Prints a markdown table of max |error| / max |reference| per quantity, for both objectives and every backward
schedule (``logit_block`` and ``skip`` included). TRITON_INTERPRET is set automatically when there is no CUDA device.
"""
from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():  # before the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gopd_fast.kernels.backward import SCHEDULES, one_pass_blocks
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton

from gopd_fast.kernels import logit_block, tiling
from gopd_fast.ops.problem import build_problem


def reference(hs, ws, bs, ht, wt, bt, rw, fw, jsd_beta, temperature):
    zs = (hs.double() @ ws.double().T + bs.double()) / temperature
    zt = (ht.double() @ wt.double().T + bt.double()) / temperature
    logp_s, logp_t = zs.log_softmax(-1), zt.log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    rkl = (p_s * (logp_s - logp_t)).sum(-1)
    fkl = (p_t * (logp_t - logp_s)).sum(-1)
    if jsd_beta is None:
        loss = rw.double() * rkl + fw.double() * fkl
    else:
        log_m = torch.log(jsd_beta * p_t + (1 - jsd_beta) * p_s)
        loss = rw.double() * (jsd_beta * (p_t * (logp_t - log_m)).sum(-1)
                              + (1 - jsd_beta) * (p_s * (logp_s - log_m)).sum(-1))
    return loss, {"reverse_kl": rkl.detach(), "forward_kl": fkl.detach(),
                  "student_entropy": -(p_s * logp_s).sum(-1).detach()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def measure(dtype, n, vocab, ds, dt, jsd_beta, schedule, device, temperature=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs, ws, bs = rand(n, ds), rand(vocab, ds, scale=3 * ds**-0.5), rand(vocab, scale=0.5)
    ht, wt, bt = rand(n, dt), rand(vocab, dt, scale=3 * dt**-0.5), rand(vocab, scale=0.5)
    rw, fw = torch.rand(n, generator=g).to(device), torch.rand(n, generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)
    leaves = [t.clone().requires_grad_() for t in (hs, ws, bs)]
    loss, stats = fused_linear_kl_triton(build_problem(
        leaves[0], leaves[1], ht, wt, student_bias=leaves[2], teacher_bias=bt, reverse_weight=rw, forward_weight=fw,
        jsd_beta=jsd_beta, temperature=temperature, target_ids=None, grad_scale=None,
        return_stats=True), schedule=schedule)
    (loss * upstream).sum().backward()
    ref_leaves = [t.double().requires_grad_() for t in (hs, ws, bs)]
    ref_loss, ref_stats = reference(ref_leaves[0], ref_leaves[1], ref_leaves[2], ht, wt, bt, rw, fw, jsd_beta,
                                    temperature)
    (ref_loss * upstream.double()).sum().backward()
    errors = {"loss": rel(loss, ref_loss)}
    errors.update({k: rel(stats[k], ref_stats[k]) for k in ref_stats})
    errors.update({f"grad_{k}": rel(a.grad, b.grad) for k, a, b in zip(("h", "W", "b"), leaves, ref_leaves)})
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--n", type=int, default=37)
    parser.add_argument("--vocab", type=int, default=203)
    parser.add_argument("--ds", type=int, default=48)
    parser.add_argument("--dt", type=int, default=40)
    parser.add_argument("--buffer-bytes", type=int, default=tiling.BACKWARD_BUFFER_BYTES,
                        help="tiling.BACKWARD_BUFFER_BYTES: the deterministic schedules' buffer budget")
    args = parser.parse_args()
    tiling.BACKWARD_BUFFER_BYTES = args.buffer_bytes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    columns = None
    for dtype_name in args.dtypes.split(","):
        for objective, beta in (("kl", None), ("jsd0.3", 0.3)):
            for schedule in (*SCHEDULES, "logit_block", "skip"):
                dtype = getattr(torch, dtype_name)
                if schedule == "logit_block" and not logit_block.block_rows(args.n, args.vocab, dtype.itemsize):
                    print(f"| {dtype_name} | {objective} | logit_block | buffer too small for one block |")
                    continue
                errors = measure(dtype, args.n, args.vocab, args.ds, args.dt, beta, schedule, device)
                if columns is None:
                    columns = list(errors)
                    rows, width = one_pass_blocks(args.n, args.vocab, args.ds, dtype, device, fp32_dz=True)
                    print(f"N={args.n} V={args.vocab} Ds={args.ds} Dt={args.dt} on {device}, backward buffers "
                          f"{args.buffer_bytes} B (one_pass blocks of {rows} tokens x {width} columns at the first "
                          "dtype); max |err| / max |float64 reference|\n")
                    print("| dtype | objective | backward | " + " | ".join(columns) + " |")
                    print("|---" * (3 + len(columns)) + "|")
                print(f"| {dtype_name} | {objective} | {schedule} | "
                      + " | ".join(f"{errors[c]:.1e}" for c in columns) + " |")


if __name__ == "__main__":
    main()
