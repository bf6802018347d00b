"""Ahead-of-time compilation of the kernels for a GPU target without a GPU (``triton.compile`` on an ``ASTSource``).

Used by ``bench/compile_sm90.py`` (a table of registers, spills and shared memory per autotune configuration) and by
``tests/kernels/test_aot.py`` (zero spills, wgmma and TMA at the issue's target shape). Triton's bundled ptxas
reports the per-thread register count and spill bytes. Integer strides, hidden sizes and pointers are marked
16-divisible, as Triton's JIT specialises them at launch for contiguous 16-bit tensors with hidden sizes that are
multiples of 8; every kernel is compiled with ``USE_TMA=True``, the path ``tiling.use_tma`` picks on sm_90.
Importing this module does not import triton's GPU backend until ``compile_kernel`` runs; the interpreter must be
off (``TRITON_INTERPRET`` unset) for ``triton.compile`` to target a GPU.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import backward, forward, logit_block, skip, tiling

SM90 = GPUTarget("cuda", 90, 32)
_FP32_PARAMS = {"inv_temp", "beta", "log_beta", "log_one_minus_beta", "eps"}
_FP32_POINTERS = {"zs_ptr", "zt_ptr", "part_ptr", "lse_s_ptr", "lse_t_ptr", "coef_a_ptr", "coef_b_ptr", "kl_ptr", "grad_h_ptr",
                  "grad_w_ptr", "grad_b_ptr"}
_DIVISIBLE = ("Ds", "Dt")
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Any  # a triton.JITFunction
    constexprs: dict[str, Any]
    configs: tuple[tiling.TileConfig, ...]
    gemm: bool = True  # computes logits with tl.dot (wgmma, TMA loads); False: reads stored logits (logit_block)


def kernel_specs(dtype: str = "bf16") -> list[KernelSpec]:
    """Every kernel with the constexprs of its most demanding use (biases, targets, all gradients) and the
    configurations its autotuner may choose (logit_block's memory-bound kernels: their one fixed tile)."""
    precision = tiling.dot_precision_name(dtype)
    flags = {"HAS_BS": True, "HAS_BT": True, "PREC_S": precision, "PREC_T": precision, "USE_TMA": True}
    stored = {"HAS_BS": True, "HAS_BT": True}  # logit_block's kernels on its fp32 logit buffer
    return [
        KernelSpec("kl_forward", forward._kl_forward_kernel, dict(flags, HAS_TARGET=True), tiling.FORWARD_CONFIGS),
        KernelSpec("jsd", forward._jsd_kernel, flags, tiling.FORWARD_CONFIGS),
        KernelSpec("grad_logits", backward._grad_logits_kernel, dict(flags, IS_JSD=False, GROUP_TOKENS=tiling.GROUP_TOKENS),
                   tiling.BACKWARD_CONFIGS),
        KernelSpec("grad_logits_jsd", backward._grad_logits_kernel, dict(flags, IS_JSD=True, GROUP_TOKENS=tiling.GROUP_TOKENS),
                   tiling.BACKWARD_CONFIGS),
        KernelSpec("backward_atomic", backward._backward_atomic_kernel,
                   dict(flags, IS_JSD=False, NEED_GRAD_H=True, NEED_GRAD_W=True, NEED_GRAD_B=True,
                        GROUP_TOKENS=tiling.GROUP_TOKENS), tiling.BACKWARD_CONFIGS),
        KernelSpec("backward_skip", skip._backward_skip_kernel,
                   dict(flags, IS_JSD=False, NEED_GRAD_H=True, NEED_GRAD_W=True, NEED_GRAD_B=True,
                        GROUP_TOKENS=tiling.GROUP_TOKENS), tiling.BACKWARD_CONFIGS),
        KernelSpec("block_stats", logit_block._block_stats_kernel, dict(stored, HAS_TARGET=True),
                   (logit_block.STATS_TILE,), gemm=False),
        KernelSpec("block_jsd", logit_block._block_jsd_kernel, stored, (logit_block.STATS_TILE,), gemm=False),
        KernelSpec("block_grad", logit_block._block_grad_kernel, dict(stored, IS_JSD=False, FP32_DZ=True),
                   (logit_block.GRAD_TILE,), gemm=False),
        KernelSpec("block_grad_jsd", logit_block._block_grad_kernel, dict(stored, IS_JSD=True, FP32_DZ=True),
                   (logit_block.GRAD_TILE,), gemm=False),
    ]


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    types, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name == "target_ptr":
            types[name] = "*i64"
        elif name == "skipped_ptr":
            types[name] = "*i8"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
        elif name in _FP32_PARAMS:
            types[name] = "fp32"
        else:
            types[name] = "i32"
        if types[name].startswith("*") or name.startswith("stride") or name in _DIVISIBLE:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return types, attrs


def compile_kernel(spec: KernelSpec, config: tiling.TileConfig, dtype: str = "bf16", target: GPUTarget = SM90):
    """The compiled kernel (``.asm`` holds 'ttgir' and 'ptx'; ``.metadata.shared`` the shared memory in bytes)."""
    consts = dict(spec.constexprs, BLOCK_N=config.block_n, BLOCK_V=config.block_v)
    if "BLOCK_D" in spec.fn.arg_names:
        consts["BLOCK_D"] = config.block_d
    types, attrs = _signature(spec.fn, dtype, consts)
    src = ASTSource(fn=spec.fn, signature=types, attrs=attrs,
                    constexprs={(spec.fn.arg_names.index(k),): v for k, v in consts.items()})
    with contextlib.redirect_stderr(io.StringIO()):
        return triton.compile(src, target=target,
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})


@dataclass(frozen=True)
class PtxasUsage:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int


def ptxas_usage(ptx: str, arch: str = "sm_90a") -> PtxasUsage:
    """Registers per thread and spill bytes that Triton's bundled ptxas reports for ``ptx``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run([ptxas, f"-arch={arch}", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    registers = re.search(r"Used (\d+) registers", err)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", err)
    if not registers or not spills:
        raise RuntimeError(f"unexpected ptxas report:\n{err}")
    return PtxasUsage(int(registers.group(1)), int(spills.group(1)), int(spills.group(2)))


def uses_wgmma(compiled) -> bool:
    """Hopper warpgroup MMAs in both the TTGIR and the PTX."""
    return "ttng.warp_group_dot" in compiled.asm["ttgir"] and "wgmma.mma_async" in compiled.asm["ptx"]


def uses_tma(compiled) -> bool:
    """Operand tiles loaded by the Tensor Memory Accelerator (bulk tensor copies from a descriptor)."""
    return "cp.async.bulk.tensor" in compiled.asm["ptx"]
