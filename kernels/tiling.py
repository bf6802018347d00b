"""Tile sizes, launch configurations and buffer helpers shared by the fused linear-KL kernels.

GPU configurations are autotuned from short lists chosen for an H100 (132 SMs, 228 KiB shared memory and 64 K
32-bit registers per SM). Every configuration in them compiles for sm_90a without a single spilled byte (with TMA
loads and wgmma; ``tests/kernels/test_aot.py`` checks it, ``python bench/compile_sm90.py`` prints the table). Every
kernel keeps two fp32 logit tiles live (student and teacher) plus a third tile of exponentials or dz, so:
128 x 256 tiles cannot fit (the two accumulators alone are 256 registers per thread at 8 warps, and 16 warps cap a
thread at 128), the forward and the JSD gradient spill at 128 x 128, and only the KL gradient and the atomic
oracle fit 128 x 128. ``REJECTED_CONFIGS`` keeps the tried-and-spilling candidates for the bench table.

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

# H100 candidates (block_n, block_v, block_d, warps, stages), all spill-free for sm_90a in bf16.
# Forward (_kl_forward, _jsd): two logit tiles + one tile of exponentials; 3 stages of four TMA operand tiles.
FORWARD_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 64, 64, num_warps=8, num_stages=4),
    TileConfig(64, 128, 32, num_warps=8, num_stages=4),
)
# Backward (_grad_logits, _backward_atomic): two logit tiles + dz. The JSD gradient (log M on top) spills at
# 128 x 128, so that tile is pruned for IS_JSD launches (``prune_for_jsd``).
KL_ONLY_CONFIGS: tuple[TileConfig, ...] = (TileConfig(128, 128, 64, num_warps=8, num_stages=3),)
BACKWARD_CONFIGS: tuple[TileConfig, ...] = KL_ONLY_CONFIGS + (
    TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    TileConfig(64, 64, 64, num_warps=8, num_stages=4),
)
GPU_CONFIGS = FORWARD_CONFIGS + BACKWARD_CONFIGS
# Tried for sm_90a and left out (ptxas spills, or shared memory beyond the 227 KiB a block may use).
REJECTED_CONFIGS: tuple[TileConfig, ...] = (
    TileConfig(128, 256, 64, num_warps=8, num_stages=2),
    TileConfig(128, 256, 64, num_warps=16, num_stages=2),
    TileConfig(128, 256, 32, num_warps=8, num_stages=3),
    TileConfig(64, 256, 64, num_warps=8, num_stages=3),
    TileConfig(128, 128, 64, num_warps=8, num_stages=2),
    TileConfig(128, 128, 32, num_warps=8, num_stages=4),
)


def prune_for_jsd(configs: list, named_args: dict, **kwargs) -> list:
    """Autotune pruning: no KL-only tile for a JSD launch (``IS_JSD`` constexpr)."""
    if not kwargs.get("IS_JSD", named_args.get("IS_JSD", False)):
        return configs
    kl_only = {(c.block_n, c.block_v, c.block_d, c.num_warps, c.num_stages) for c in KL_ONLY_CONFIGS}
    kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"], c.num_warps,
                                   c.num_stages) not in kl_only]
    return kept or configs

# Every vocabulary split of the forward starts at a multiple of this, so it is a multiple of every BLOCK_V.
SPLIT_ALIGN = max(c.block_v for c in GPU_CONFIGS)

# Bytes the deterministic backward schedules hold beyond inputs and gradients: two_pass's one dz buffer ([rows, V]
# in pass 1, [N, columns] in pass 2), one_pass's fp32 grad_h accumulator plus the two dz blocks of its block
# pipeline (``pipeline.DZ_BUFFERS``). 94 MiB is 0.99% of the fp32 logits at N=16384, V=151936 (the budget
# is 1%, 94.96 MiB); at N=16384, Ds=4096 in bf16 one_pass fills it: 32 MiB of accumulator (2048 tokens) + 2 x 31 MiB
# of dz (7936 columns), the widest blocks that keep _grad_logits within bench/kernels_traffic.py's limit and both
# buffers within 1%.
BACKWARD_BUFFER_BYTES = 94 * 2**20
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
        configs=[c.as_triton() for c in configs], key=AUTOTUNE_KEY, reset_to_zero=reset_to_zero,
        prune_configs_by={"early_config_prune": prune_for_jsd},
    )(kernel)


def candidate_configs(configs: tuple[TileConfig, ...], is_jsd: bool) -> tuple[TileConfig, ...]:
    """The configurations the autotuner may choose for a launch (``prune_for_jsd`` applied)."""
    return tuple(c for c in configs if not (is_jsd and c in KL_ONLY_CONFIGS))


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
    (``tl.make_tensor_descriptor``): on sm_90+ CUDA devices when every operand is 16-bit and meets TMA's layout
    rules (unit column stride, 16-byte aligned base and row stride). Elsewhere (older GPUs, the interpreter, fp32,
    odd strides) the kernels use masked pointer loads. TMA zero-fills out-of-range rows and columns, as the masks
    do."""
    if interpreting() or not operands or operands[0].device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(operands[0].device)[0] < 9:
        return False
    for t in operands:
        size = t.element_size()
        if size != 2:  # 16-bit operands only (the tensor-core path); fp32 keeps its IEEE pointer path
            return False
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
# Tokens whose tiles sweep the vocabulary together in the 1-D tiled grids (_grad_logits, _backward_atomic): a wave
# of 132 programs covers GROUP_TOKENS / BLOCK_N token tiles (16 of 128 rows, 32 of 64) x the rest in vocabulary
# tiles, so a weight tile is read from HBM once per group while the group's hidden-state rows (2048 x (Ds + Dt) x
# 2 B = 32 MiB at S*) stay in L2. one_pass's token blocks are whole groups where the budget allows.
GROUP_TOKENS = 2048
# L2 of the target GPU (H100: 50 MB) and the part of it the forward lets its resident hidden-state rows take.
L2_BYTES = 50 * 10**6
FORWARD_L2_SHARE = 0.7
FORWARD_SPLIT_COLUMNS = 8192  # about this many vocabulary columns per forward program (64 tiles of 128)


def forward_group_tokens(row_bytes: int) -> int:
    """Tokens per group of the forward's grouped launch order: its programs walk every vocabulary split of a group
    of token tiles before the next group, so the group's hidden-state rows (``row_bytes`` per token: (Ds + Dt) x
    the element size) are read from HBM once and each weight panel once per group. The group's rows take
    ``FORWARD_L2_SHARE`` of the L2 (2136 tokens, 33 tiles of 64, at Ds=Dt=4096 in bf16); the interpreter uses two
    of its tiles so that tests cover several groups."""
    if interpreting():
        return 2 * INTERPRETER_CONFIG.block_n
    return max(1, int(L2_BYTES * FORWARD_L2_SHARE) // max(row_bytes, 1))


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
    """Split the vocabulary for the forward: returns (num_splits, unit); split s covers ``split_bounds(s, ...)``,
    whole units of ``unit`` columns (a multiple of every BLOCK_V), the splits balanced to within one unit.

    Enough splits that (token tiles x splits) fills the machine (N=1024 is 8-16 token tiles on a 132-SM H100), and
    on a GPU splits of about ``FORWARD_SPLIT_COLUMNS``, rounded up to whole waves of the grouped launch order (a
    group's programs, ``forward_group_tokens(row_bytes)``, fill whole waves, so a wave never holds two groups'
    hidden rows), with balanced lengths, the longer first (``split_bounds``), so that a wave's programs stay in
    step. Each split keeps its own online softmax
    statistics, merged afterwards in O(splits x N) (9 x 20 x N fp32, 11.25 MiB at N=16384, V=151936).
    """
    unit = INTERPRETER_CONFIG.block_v if interpreting() else SPLIT_ALIGN
    min_block_n = INTERPRETER_CONFIG.block_n if interpreting() else min(c.block_n for c in FORWARD_CONFIGS)
    token_tiles = triton.cdiv(n_tokens, min_block_n)
    sms = multiprocessor_count(device)
    wanted = triton.cdiv(4 * sms, token_tiles)
    if not interpreting():
        group_tiles = forward_group_tokens(row_bytes) // min_block_n if row_bytes else token_tiles
        per_wave = triton.cdiv(sms, max(1, min(token_tiles, group_tiles)))
        wanted = max(wanted, triton.cdiv(triton.cdiv(vocab, FORWARD_SPLIT_COLUMNS), per_wave) * per_wave)
    return max(1, min(wanted, triton.cdiv(vocab, unit))), unit


def split_bounds(split: int, num_splits: int, vocab: int, unit: int) -> tuple[int, int]:
    """[start, end) columns of a forward vocabulary split (``logit_tiles.split_bounds`` computes the same).

    The splits are whole units, balanced to within one, and the longer ones come first: a group's programs walk
    the splits in order, so its first waves hold the long splits and the rest stay in step. With the long splits
    spread out (or last), the programs of a wave finish a unit apart, each wave adds to the drift, and by the end
    of a group some slots already run the next group: two groups' hidden rows then compete for the L2 (at S* that
    drift cost 2.4 GB of re-read hidden rows in ``bench/kernels_traffic.py``; long-first: none at 64 x 128)."""
    units = triton.cdiv(vocab, unit)
    short, longer = divmod(units, num_splits)
    start = (split * short + min(split, longer)) * unit
    end = ((split + 1) * short + min(split + 1, longer)) * unit
    return start, min(end, vocab)


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
