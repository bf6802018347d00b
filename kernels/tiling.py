"""Tile sizes, launch configurations and buffer helpers shared by the fused linear-KL kernels.

GPU configurations are autotuned from short lists chosen for an H100 (132 SMs, 228 KiB shared memory and 64 K
32-bit registers per SM). They were checked without a GPU by compiling every kernel for sm_90a with Triton's
bundled ptxas (``python bench/compile_sm90.py``): the forward keeps two fp32 logit tiles plus their exponentials
live and spills at 128 x 128 with 8 warps (255 registers, ~0.9 KB of spills per thread), so its list favours
64-row tiles, which fit without spilling; the backward kernels fit 128 x 128 with 8 warps.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) autotuning would only multiply the already
slow interpreted run time, so one small fixed configuration is used instead.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (set ``TRITON_INTERPRET=1`` before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_n: int  # tokens per tile
    block_v: int  # vocabulary entries per tile
    block_d: int  # hidden-dimension slice per tl.dot
    num_warps: int = 4
    num_stages: int = 2

    def as_triton(self) -> triton.Config:
        return triton.Config(
            {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_D": self.block_d},
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


# The interpreter's configuration: small enough that tiny odd test shapes (e.g. N=37, V=203) span several token
# and vocabulary tiles, so masking, the split-vocabulary combine and atomics are all exercised.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=32, block_d=16)

# H100 candidates (block_n, block_v, block_d, warps, stages). Forward: two logit tiles + online statistics.
FORWARD_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 64, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 32, num_warps=8, num_stages=4),
    TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
)
# Backward (atomic and gradient-of-logits kernels): two logit tiles + dz.
BACKWARD_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 128, 64, num_warps=8, num_stages=3),
    TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 64, 64, num_warps=8, num_stages=4),
)
GPU_CONFIGS = FORWARD_CONFIGS + BACKWARD_CONFIGS

# Every vocabulary split of the forward starts at a multiple of this, so it is a multiple of every BLOCK_V.
SPLIT_ALIGN = max(c.block_v for c in GPU_CONFIGS)

# Bytes the deterministic backward schedules hold beyond inputs and gradients: two_pass's one dz buffer ([rows, V]
# in pass 1, [N, columns] in pass 2), one_pass's dz block plus its fp32 grad_h accumulator. 80 MiB is 0.84% of the
# fp32 logits at N=16384, V=151936 (the budget is 1%).
BACKWARD_BUFFER_BYTES = 80 * 2**20
BUFFER_ENV = "GOPD_BACKWARD_BUFFER_MIB"


def backward_buffer_bytes() -> int:
    """The deterministic schedules' buffer budget: ``GOPD_BACKWARD_BUFFER_MIB`` when set, else
    ``BACKWARD_BUFFER_BYTES``. More memory means taller one_pass token blocks: fewer roundings of a 16-bit grad_W
    and fewer accumulator passes."""
    value = os.environ.get(BUFFER_ENV, "").strip()
    if not value:
        return BACKWARD_BUFFER_BYTES
    try:
        mib = float(value)
    except ValueError:
        mib = -1.0
    if not 0 < mib < float("inf"):
        raise ValueError(f"{BUFFER_ENV} must be a positive number of MiB, got {value!r}")
    return int(mib * 2**20)

# Autotune keys: the problem dimensions that change the best tile (dtypes are part of Triton's key already). N enters
# as a power-of-two bucket (``n_bucket``, every kernel's ``N_BUCKET`` argument): a tile tuned at N=1024 (few token
# tiles, many vocabulary splits) is not reused at N=16384, and varying batch sizes do not retune at every step.
AUTOTUNE_KEY = ["N_BUCKET", "Ds", "Dt", "V"]


def n_bucket(n_tokens: int) -> int:
    """The autotune bucket of a token count: the next power of two (at least 1)."""
    return 1 << max(n_tokens - 1, 0).bit_length()


def autotuned(kernel, configs: tuple[TileConfig, ...], reset_to_zero: list[str] | None = None):
    """Wrap a ``@triton.jit`` kernel in ``triton.autotune`` over ``configs`` (not under the interpreter)."""
    if interpreting():
        return kernel
    return triton.autotune(
        configs=[c.as_triton() for c in configs], key=AUTOTUNE_KEY, reset_to_zero=reset_to_zero
    )(kernel)


def launch_meta(*operands: torch.Tensor) -> dict[str, int | bool]:
    """Extra launch arguments of every kernel: the operand-load path (``USE_TMA``, see ``use_tma``) and, under the
    interpreter, the fixed tile (the autotuner picks it on a GPU)."""
    meta: dict[str, int | bool] = {"USE_TMA": use_tma(*operands)}
    if interpreting():
        c = INTERPRETER_CONFIG
        meta.update(BLOCK_N=c.block_n, BLOCK_V=c.block_v, BLOCK_D=c.block_d)
    return meta


# --- operand loads: TMA tensor descriptors on Hopper, pointer loads elsewhere (the one switch) ---
TMA_ALIGN_BYTES = 16  # a TMA descriptor's base address and row stride must be multiples of 16 bytes


def use_tma(*operands: torch.Tensor) -> bool:
    """Whether the kernels load their [rows, D] operand tiles through TMA tensor descriptors
    (``tl.make_tensor_descriptor``): on sm_90+ CUDA devices when every operand meets TMA's layout rules (unit
    column stride, 16-byte aligned base and row stride). Elsewhere (older GPUs, the interpreter, odd strides) the
    kernels use masked pointer loads. TMA zero-fills out-of-range rows and columns, as the masks do."""
    if interpreting() or not operands or operands[0].device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(operands[0].device)[0] < 9:
        return False
    for t in operands:
        size = t.element_size()
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % TMA_ALIGN_BYTES \
                or t.data_ptr() % TMA_ALIGN_BYTES:
            return False
    _ensure_descriptor_allocator()
    return True


def _ensure_descriptor_allocator() -> None:
    """Device-side descriptors (``tl.make_tensor_descriptor``) live in a per-launch global scratch buffer that
    Triton asks the host for; give it torch's caching allocator once."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


# --- launch order (L2 reuse) ---
# Token tiles that sweep the vocabulary together in 1-D tiled grids (_grad_logits, _backward_atomic): each wave of
# programs covers GROUP_N token tiles x (programs / GROUP_N) vocabulary tiles, so a weight tile is read from HBM
# once per group and the group's hidden-state rows stay in L2 while it walks the vocabulary.
GROUP_N = 16
# L2 of the target GPU (H100: 50 MB) and the part of it the forward lets its resident hidden-state rows take.
L2_BYTES = 50 * 10**6
FORWARD_L2_SHARE = 0.5


def grouped_tile(pid: int, num_n: int, num_v: int, group: int) -> tuple[int, int]:
    """(token tile, vocabulary tile) of program ``pid`` in the grouped launch order: token tiles fastest within a
    group of ``group`` token tiles, then vocabulary tiles, then groups. The Python twin of
    ``logit_tiles.grouped_tile`` (the traffic model and the tests use it; a test checks the two agree)."""
    per_group = group * num_v
    first_n = (pid // per_group) * group
    size = min(num_n - first_n, group)
    local = pid % per_group
    return first_n + local % size, local // size


def multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def vocab_splits(n_tokens: int, vocab: int, device: torch.device, row_bytes: int = 0) -> tuple[int, int]:
    """Split the vocabulary so that (token tiles x splits) fills the machine and each wave of programs shares its
    hidden-state rows through L2: returns (num_splits, per_split).

    The forward's grid is (splits, token tiles) with the split fastest, so a wave of P programs holds P / splits
    token tiles, each walking its vocabulary split tile by tile. Their hidden-state rows (``row_bytes`` per token:
    (Ds + Dt) x the element size) are re-read for every vocabulary tile and must stay in L2; the splits' weight
    tiles are read once per wave. So there are at least enough splits that a wave's rows fit in
    ``FORWARD_L2_SHARE`` of the L2 (12 at Ds=Dt=4096, bf16, 128-token tiles on 132 SMs), and enough that small token
    counts still fill the GPU (N=1024 is 8-16 token tiles on a 132-SM H100). Each split keeps its own online
    softmax statistics, merged afterwards in O(splits x N).
    """
    align = INTERPRETER_CONFIG.block_v if interpreting() else SPLIT_ALIGN
    min_block_n = INTERPRETER_CONFIG.block_n if interpreting() else min(c.block_n for c in FORWARD_CONFIGS)
    max_block_n = INTERPRETER_CONFIG.block_n if interpreting() else max(c.block_n for c in FORWARD_CONFIGS)
    token_tiles = triton.cdiv(n_tokens, min_block_n)
    sms = multiprocessor_count(device)
    wanted = triton.cdiv(4 * sms, token_tiles)
    if row_bytes:
        resident_tiles = max(1, int(L2_BYTES * FORWARD_L2_SHARE) // (max_block_n * row_bytes))
        wanted = max(wanted, triton.cdiv(sms, resident_tiles))
    splits = max(1, min(wanted, triton.cdiv(vocab, align)))
    per_split = triton.cdiv(triton.cdiv(vocab, splits), align) * align
    return triton.cdiv(vocab, per_split), per_split


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact-ish IEEE fp32 products (TF32 would round logits to 10 mantissa bits)."""
    return dot_precision_name("fp32" if dtype == torch.float32 else "16-bit")


def dot_precision_name(dtype_name: str) -> str:
    """``dot_precision`` by Triton type name ('fp32', 'bf16', ...), for ahead-of-time compilation."""
    return "ieee" if dtype_name == "fp32" else "tf32"


def annotate(kernel_name: str) -> contextlib.AbstractContextManager:
    """A torch.profiler range named ``gopd::<kernel>`` around a launch, so profiles group time by kernel even where
    the kernels are not device kernels (the interpreter); nothing at all when no profiler is running."""
    if not getattr(torch.autograd.profiler, "_is_profiler_enabled", False):  # private flag: absent means "off"
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"gopd::{kernel_name}")


def new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a buffer that a kernel fully overwrites (uninitialised; tests patch this to poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)
