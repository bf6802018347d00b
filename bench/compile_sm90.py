"""Compile every fused-linear-KL kernel for an H100 (sm_90a) without a GPU and report registers, spills, shared
memory, and whether the code uses wgmma and TMA.

    python bench/compile_sm90.py [--dtype bf16|fp16|fp32] [--rejected]

Each kernel is compiled ahead of time (``gopd_fast.kernels.aot``) for every configuration its autotuner may choose
(``tiling.candidate_configs``; logit_block's memory-bound kernels: their one fixed tile); ``--rejected`` adds the candidates that were tried and left out
(``tiling.REJECTED_CONFIGS``), to show why. Triton's bundled ptxas reports the per-thread register count and spill
bytes. ``tests/kernels/test_aot.py`` asserts the bf16 result (no spills, wgmma + TMA) for the autotune lists.
"""
from __future__ import annotations

import argparse
import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

from gopd_fast.kernels import aot, tiling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=sorted(aot.DTYPES))
    parser.add_argument("--rejected", action="store_true", help="also compile tiling.REJECTED_CONFIGS")
    args = parser.parse_args()
    print(f"sm_90a, {args.dtype} inputs, USE_TMA=True\n")
    print("| kernel | BLOCK_N x BLOCK_V x BLOCK_D | warps | stages | registers | spill stores / loads (B) "
          "| shared KiB | wgmma | TMA | autotune list |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for spec in aot.kernel_specs(args.dtype):
        listed = tiling.candidate_configs(spec.configs, spec.constexprs.get("IS_JSD", False))
        extra = tuple(c for c in tiling.REJECTED_CONFIGS + spec.configs if c not in listed) if args.rejected else ()
        for c in listed + tuple(dict.fromkeys(extra)):
            compiled = aot.compile_kernel(spec, c, args.dtype)
            usage = aot.ptxas_usage(compiled.asm["ptx"])
            print(f"| {spec.name} | {c.block_n} x {c.block_v} x {c.block_d} | {c.num_warps} | {c.num_stages} "
                  f"| {usage.registers} | {usage.spill_store_bytes} / {usage.spill_load_bytes} "
                  f"| {compiled.metadata.shared / 1024:.0f} | {'yes' if aot.uses_wgmma(compiled) else 'no'} "
                  f"| {'yes' if aot.uses_tma(compiled) else 'no'} | {'yes' if c in listed else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
