"""Compile every fused-linear-KL kernel for an H100 (sm_90a) without a GPU and report registers, spills, shared memory.

    python bench/compile_sm90.py [--dtype bf16|fp16|fp32]

Triton lowers each kernel for the target ahead of time (``triton.compile`` on an ``ASTSource``) and its bundled
ptxas reports the per-thread register count and spill bytes. This catches compiled-mode errors that the CPU
interpreter cannot (layouts, constexpr scoping, dtype rules) and checks that the autotune lists in
``kernels/tiling.py`` do not spill. Integer strides and pointers are marked 16-divisible, as Triton's JIT
specialises them at launch for contiguous bf16 tensors with hidden sizes that are multiples of 8.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter

import triton
from gopd_fast.kernels import backward, forward, tiling
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
FP32_PARAMS = {"inv_temp", "beta", "log_beta", "log_one_minus_beta"}
FP32_POINTERS = {"part_ptr", "lse_s_ptr", "lse_t_ptr", "coef_a_ptr", "coef_b_ptr", "kl_ptr", "grad_h_ptr",
                 "grad_w_ptr", "grad_b_ptr"}


def signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    types, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "target_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        elif name in FP32_PARAMS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
        if types[name].startswith("*") or name.startswith("stride") or name in ("Ds", "Dt"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return types, attrs


def ptxas_report(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    regs = next(line.split("Used ")[1].split(" registers")[0] for line in err.splitlines() if "registers" in line)
    spills = next(line.split(",")[1].split(" bytes")[0].strip() for line in err.splitlines() if "spill stores" in line)
    return f"{regs:>3} registers, {spills:>4} B spill stores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args()
    precision = "ieee" if args.dtype == "fp32" else "tf32"
    flags = {"HAS_BS": True, "HAS_BT": True, "PREC_S": precision, "PREC_T": precision}
    kernels = [
        ("kl_forward", forward._kl_forward_kernel, dict(flags, HAS_TARGET=True), tiling.FORWARD_CONFIGS),
        ("jsd", forward._jsd_kernel, flags, tiling.FORWARD_CONFIGS),
        ("backward_atomic", backward._backward_atomic_kernel,
         dict(flags, IS_JSD=False, NEED_GRAD_H=True, NEED_GRAD_W=True, NEED_GRAD_B=True, GROUP=backward.GROUP_N),
         tiling.BACKWARD_CONFIGS),
        ("grad_logits", backward._grad_logits_kernel, dict(flags, IS_JSD=False), tiling.BACKWARD_CONFIGS),
    ]
    print(f"sm_90a, {args.dtype} inputs\n\n| kernel | BLOCK_N x BLOCK_V x BLOCK_D | warps | stages | ptxas | shared KiB |")
    print("|---|---|---|---|---|---|")
    for name, fn, constexprs, configs in kernels:
        for c in configs:
            consts = dict(constexprs, BLOCK_N=c.block_n, BLOCK_V=c.block_v, BLOCK_D=c.block_d)
            types, attrs = signature(fn, args.dtype, consts)
            src = ASTSource(fn=fn, signature=types, attrs=attrs,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            with contextlib.redirect_stderr(io.StringIO()):
                compiled = triton.compile(src, target=TARGET,
                                          options={"num_warps": c.num_warps, "num_stages": c.num_stages})
            print(f"| {name} | {c.block_n} x {c.block_v} x {c.block_d} | {c.num_warps} | {c.num_stages} "
                  f"| {ptxas_report(compiled.asm['ptx'])} | {compiled.metadata.shared / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
