"""Skip fraction and accuracy of the ``skip`` backward (kernels/skip.py) on realistic inputs.

Builds ``realistic_logits.realistic_inputs`` at a Qwen-sized vocabulary, runs the forward and the skip backward
for the reverse KL, the forward KL and the JSD (beta = 0.5) with 128 x 128 tiles under the interpreter (the
autotuner's tiles on a GPU; the table gives the tile grid), and prints one markdown row per
objective: the fraction of tiles whose gradient products were skipped, the probability-only statistic (tiles all
below 2^-12 under both models), and the gradients' errors against float64 autograd through materialised logits
(max |error| / max |reference| and the norm ratio), with eps = 2^-12 (the default) and, for comparison, eps = 0
(``--eps-log2`` picks others).

Runs on a GPU, or on CPU under the Triton interpreter (set TRITON_INTERPRET=1; fp32; slow, so keep N small):
    TRITON_INTERPRET=1 python bench/skip_fraction.py --n 256 --vocab 151936 --ds 128 --dt 128
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from realistic_logits import logit_statistics, realistic_inputs

OBJECTIVES = {"reverse KL": (None, 1.0, 0.0), "forward KL": (None, 0.0, 1.0), "JSD beta=0.5": (0.5, 1.0, 0.0)}


def reference_grads(p, beta, rw, fw):
    hs, ws = p["hs"].double().requires_grad_(), p["ws"].double().requires_grad_()
    logp_s = (hs @ ws.T).log_softmax(-1)
    logp_t = (p["ht"].double() @ p["wt"].double().T).log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if beta is None:
        loss = rw * (p_s * (logp_s - logp_t)).sum(-1) + fw * (p_t * (logp_t - logp_s)).sum(-1)
    else:
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        loss = rw * (beta * (p_t * (logp_t - log_m)).sum(-1) + (1 - beta) * (p_s * (logp_s - log_m)).sum(-1))
    return torch.autograd.grad(loss.sum(), (hs, ws))


def errors(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = got.double() - want
    return f"{(diff.abs().max() / want.abs().max()).item():.1e} / {(diff.norm() / want.norm()).item():.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--ds", type=int, default=128)
    parser.add_argument("--dt", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--eps-log2", default="-12,none",
                        help="comma-separated log2 of the skip thresholds; 'none' is eps = 0 (nothing skipped)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from gopd_fast.kernels.forward import kl_forward
    from gopd_fast.kernels.objective import grad_coefficients, loss_and_kl_stat
    from gopd_fast.kernels.skip import skip_backward

    from gopd_fast.kernels import tiling

    if tiling.interpreting():  # the GPU tile size, so the skipped tiles are the ones a GPU would skip
        tiling.INTERPRETER_CONFIG = tiling.TileConfig(block_n=128, block_v=128, block_d=64)
    dtype = getattr(torch, args.dtype)
    epsilons = [0.0 if e.strip() == "none" else 2.0 ** float(e) for e in args.eps_log2.split(",")]
    p = realistic_inputs(args.n, args.vocab, args.ds, args.dt, dtype=dtype, device=device)
    stats = logit_statistics((p["hs"].double() @ p["ws"].double().T).cpu(),
                             (p["ht"].double() @ p["wt"].double().T).cpu())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {device}, {args.dtype}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, N={args.n} V={args.vocab} Ds={args.ds} "
          f"Dt={args.dt}; inputs: entropy {stats['entropy_student_mean']:.2f} / {stats['entropy_teacher_mean']:.2f} "
          f"nats, median top-1 {stats['top1_student_median']:.3f} / {stats['top1_teacher_median']:.3f}, top-1 "
          f"agreement {stats['top1_agreement']:.3f}, tiles all < 2^-12 {stats['quiet_tile_fraction']:.3f}\n")
    print("| objective | eps | tiles skipped | grad_h error (max / norm) | grad_W error (max / norm) |")
    print("|---|---|---|---|---|")
    n = args.n
    for name, (beta, rw_value, fw_value) in OBJECTIVES.items():
        rw = torch.full((n,), rw_value, device=device)
        fw = torch.full((n,), fw_value, device=device)
        fwd = kl_forward(p["hs"], p["ws"], p["ht"], p["wt"], None, None, None, 1.0, beta)
        _, kl = loss_and_kl_stat(fwd, rw, fw, beta)
        a, b = grad_coefficients(torch.ones_like(rw), rw, fw, beta, 1.0)
        want_h, want_w = reference_grads(p, beta, rw.double(), fw.double())  # float64 on the inputs' device
        for eps in epsilons:
            grad_h, grad_w, _, skipped = skip_backward(
                p["hs"], p["ws"], p["ht"], p["wt"], None, None, fwd["lse_s"], fwd["lse_t"], a, b, kl.contiguous(),
                temperature=1.0, jsd_beta=beta, need_grad_h=True, need_grad_w=True, need_grad_b=False, eps=eps)
            label = f"2^{round(math.log2(eps))}" if eps else "0"
            tiles = f"{skipped.float().mean().item():.3f} of {skipped.shape[0]} x {skipped.shape[1]}"
            print(f"| {name} | {label} | {tiles} | {errors(grad_h, want_h)} | "
                  f"{errors(grad_w, want_w)} |", flush=True)


if __name__ == "__main__":
    main()
