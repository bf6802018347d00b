"""Forward + backward of the fused linear KL: gopd-fast's Triton kernels vs the tools people use.

Implementations (all bf16 inputs, student hidden and weight get gradients, mean over tokens):
    triton                gopd_fast.fused_linear_kl(backend="triton"), default (one_pass) backward
    triton_one_stream     the same with GOPD_BACKWARD_OVERLAP=0: one_pass's gradient kernel and GEMMs on one
                          stream, one dz buffer (the A/B of kernels/pipeline.py's overlap; triton has it on)
    triton_two_pass,      the same with GOPD_BACKWARD=two_pass / atomic (kernels/backward.py's other schedules)
      triton_atomic
    triton_logit_block    GOPD_BACKWARD=logit_block (every logit once, 1.0x FLOPs) with a buffer of 10% of N V 4
    triton_skip           GOPD_BACKWARD=skip (kernels/skip.py: negligible tiles' gradient products skipped)
    chunked               gopd_fast.fused_linear_kl(backend="chunked")
    torch, torch_compile  the KL a user writes in plain torch (bf16 matmul -> fp32 logits -> log_softmax), eager
                          and torch.compile(dynamic=True)
    liger_jsd             liger_kernel.transformers.LigerFusedLinearJSD at the matching beta endpoint
    liger_jsd_loss        liger_kernel.chunked_loss.LigerFusedLinearJSDLoss (soft loss only, compiled)
    cce                   cut_cross_entropy.linear_cross_entropy: cross-entropy only, the single-model analogue
Objectives: "reverse" = KL(p_s || p_t) (Liger beta=1), "forward" = KL(p_t || p_s) (Liger beta=0).
Inputs (GOPD_BENCH_INPUTS): "realistic" (default; bench/realistic_logits.py: peaked, Zipf-tailed logits like a
trained LM's) or "flat" (normal hidden states and heads: logit std 2, median top-1 probability 0.0065).

Each case records in benchmark.extra_info: peak_extra_mib (torch.cuda.max_memory_allocated minus the inputs and the
gradients), useful_tflop (6 N V Ds + 2 N V Dt) and the device. bench/report.py turns the JSON into a table.
Without CUDA only a tiny CPU case runs (the Triton kernels under the interpreter), so the file stays importable
and runnable in CI: ``pytest bench --benchmark-enable``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# On CPU the kernels need the interpreter, which must be chosen before the first triton import of the process;
# other bench modules collected earlier may already have imported triton (through liger).
INTERPRETER_USABLE = HAS_CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import gopd_fast

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from realistic_logits import realistic_inputs

VOCAB = 151936
GPU_SHAPES = [(n, ds, dt) for n in (1024, 4096, 16384) for ds in (1024, 4096) for dt in (2048, 4096)]
CPU_SHAPE = (32, 48, 40, 500)  # N, Ds, Dt, V: tiny, for CI only
TRITON_SCHEDULES = {"triton": "one_pass", "triton_one_stream": "one_pass", "triton_two_pass": "two_pass",
                    "triton_atomic": "atomic", "triton_logit_block": "logit_block", "triton_skip": "skip"}
LOGIT_BLOCK_SHARE = 0.10  # triton_logit_block's buffer: this share of the fp32 [N, V] logits
INPUTS = os.environ.get("GOPD_BENCH_INPUTS", "realistic")
# Eager torch last: at the target shape it may not fit, and a stage cut short by gpu.sh's budget loses it first.
IMPLS = [*TRITON_SCHEDULES, "torch_compile", "liger_jsd", "cce", "chunked", "liger_jsd_loss", "torch"]
CPU_IMPLS = {*TRITON_SCHEDULES, "chunked", "torch"}
TEMPERATURE = 1.0
ROUNDS = int(os.environ.get("GOPD_BENCH_ROUNDS", "5"))


def useful_flops(n: int, vocab: int, ds: int, dt: int) -> float:
    """Logits of both models once, plus the two student gradient products; any recompute is overhead."""
    return 6.0 * n * vocab * ds + 2.0 * n * vocab * dt


def torch_kl(hs, ws, ht, wt, objective: str, temperature: float = TEMPERATURE):
    """The plain-torch loss a user writes: bf16 matmuls, fp32 log-softmax, full [N, V] tensors."""
    logp_s = torch.log_softmax((hs @ ws.T).float() / temperature, dim=-1)
    with torch.no_grad():
        logp_t = torch.log_softmax((ht @ wt.T).float() / temperature, dim=-1)
    if objective == "reverse":
        kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    else:
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    return kl.mean()


_compiled_torch_kl = None


def make_loss_fn(impl: str, objective: str, n: int, vocab: int, device: torch.device, monkeypatch):
    """A function (hs, ws, ht, wt, targets) -> scalar loss for one implementation, or pytest.skip."""
    global _compiled_torch_kl
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    rw, fw = (ones, zeros) if objective == "reverse" else (zeros, ones)
    beta = 1.0 if objective == "reverse" else 0.0
    if impl.startswith("triton") and not INTERPRETER_USABLE:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run this file in its own pytest process")
    if impl in TRITON_SCHEDULES or impl == "chunked":
        backend = "chunked" if impl == "chunked" else "triton"
        monkeypatch.setenv("GOPD_BACKWARD", TRITON_SCHEDULES.get(impl, "one_pass"))
        monkeypatch.setenv("GOPD_BACKWARD_OVERLAP", "0" if impl == "triton_one_stream" else "1")
        if impl == "triton_logit_block":
            share = LOGIT_BLOCK_SHARE if device.type == "cuda" else 3.0  # CPU: one fp32 block of all 32 tokens
            monkeypatch.setenv("GOPD_BACKWARD_BUFFER_MIB", str(share * n * vocab * 4 / 2**20))

        def fn(hs, ws, ht, wt, targets):
            return gopd_fast.fused_linear_kl(hs, ws, ht, wt, reverse_weight=rw, forward_weight=fw,
                                             temperature=TEMPERATURE,
                                             backend=backend, check_finite=False)
        return fn
    if impl == "torch":
        return lambda hs, ws, ht, wt, targets: torch_kl(hs, ws, ht, wt, objective)
    if impl == "torch_compile":
        if _compiled_torch_kl is None:
            _compiled_torch_kl = torch.compile(torch_kl, dynamic=True)
        return lambda hs, ws, ht, wt, targets: _compiled_torch_kl(hs, ws, ht, wt, objective)
    if impl == "liger_jsd":
        liger = pytest.importorskip("liger_kernel.transformers")
        module = liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=TEMPERATURE)
        return lambda hs, ws, ht, wt, targets: module(hs, ws, ht, wt, None)
    if impl == "liger_jsd_loss":
        chunked_loss = pytest.importorskip("liger_kernel.chunked_loss")
        module = chunked_loss.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                                      temperature=TEMPERATURE, compiled=True)
        return lambda hs, ws, ht, wt, targets: module(hs, ws, ht, wt, targets)
    if impl == "cce":
        if objective != "reverse":
            pytest.skip("cross-entropy has no objective; measured once, under 'reverse'")
        cce = pytest.importorskip("cut_cross_entropy")
        return lambda hs, ws, ht, wt, targets: cce.linear_cross_entropy(hs, ws, targets)
    raise ValueError(f"unknown impl {impl!r}")


def make_inputs(n, ds, dt, vocab, device, dtype):
    if INPUTS not in ("realistic", "flat"):
        raise ValueError(f"GOPD_BENCH_INPUTS must be 'realistic' or 'flat', got {INPUTS!r}")
    g = torch.Generator(device="cpu").manual_seed(0)
    targets = torch.randint(0, vocab, (n,), generator=g).to(device)
    if INPUTS == "realistic":
        p = realistic_inputs(n, vocab, ds, dt, dtype=dtype, device=device)
        return p["hs"].requires_grad_(), p["ws"].requires_grad_(), p["ht"], p["wt"], targets

    def rand(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    hs = rand(n, ds, scale=1.0).requires_grad_()
    ws = rand(vocab, ds, scale=2.0 * ds**-0.5).requires_grad_()
    ht, wt = rand(n, dt, scale=1.0), rand(vocab, dt, scale=2.0 * dt**-0.5)
    return hs, ws, ht, wt, targets


def run_case(benchmark, monkeypatch, impl, objective, n, ds, dt, vocab):
    device = torch.device("cuda" if HAS_CUDA else "cpu")
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    loss_fn = make_loss_fn(impl, objective, n, vocab, device, monkeypatch)
    hs, ws, ht, wt, targets = make_inputs(n, ds, dt, vocab, device, dtype)

    def step():
        loss = loss_fn(hs, ws, ht, wt, targets)
        loss.backward()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return loss

    def clear_grads():
        hs.grad = ws.grad = None

    peak_extra, oom = None, None
    if HAS_CUDA:
        torch.cuda.empty_cache()
    try:
        step()  # compile / autotune outside the measurement
        clear_grads()
        if HAS_CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            grads = hs.numel() * hs.element_size() + ws.numel() * ws.element_size()
            peak_extra = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
            clear_grads()
        benchmark.pedantic(step, setup=clear_grads, rounds=ROUNDS if HAS_CUDA else 1, iterations=1,
                           warmup_rounds=1 if HAS_CUDA else 0)
    except torch.cuda.OutOfMemoryError as err:
        oom = str(err).splitlines()[0]  # skip outside the handler, so the traceback's tensors are freed first
    if oom is not None:
        clear_grads()
        torch.cuda.empty_cache()
        pytest.skip(f"out of memory: {oom}")
    info = {
        "impl": impl, "objective": objective, "inputs": INPUTS, "N": n, "Ds": ds, "Dt": dt, "V": vocab,
        "dtype": str(dtype).removeprefix("torch."), "peak_extra_mib": peak_extra,
        "logits_fp32_mib": n * vocab * 4 / 2**20, "useful_tflop": useful_flops(n, vocab, ds, dt) / 1e12,
        "device": torch.cuda.get_device_name() if HAS_CUDA else "cpu (Triton interpreter)",
    }
    benchmark.extra_info.update(info)
    append_row(benchmark, info)


def append_row(benchmark, info: dict) -> None:
    """Also append the case to $GOPD_BENCH_JSONL at once, so a run cut short by a time limit keeps its rows."""
    path = os.environ.get("GOPD_BENCH_JSONL")
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if not path or stats is None:
        return
    row = dict(info, median_ms=stats.median * 1e3, min_ms=stats.min * 1e3, rounds=stats.rounds)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _shape_id(shape):
    n, ds, dt = shape
    return f"N{n}-Ds{ds}-Dt{dt}"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (V=151936 shapes)")
@pytest.mark.parametrize("objective", ["reverse", "forward"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_linear_kl_gpu(benchmark, monkeypatch, impl, shape, objective):
    n, ds, dt = shape
    run_case(benchmark, monkeypatch, impl, objective, n, ds, dt, VOCAB)


@pytest.mark.skipif(HAS_CUDA, reason="the CPU variant only exists to keep CI able to run this file")
@pytest.mark.parametrize("impl", sorted(CPU_IMPLS))
def test_fused_linear_kl_cpu_tiny(benchmark, monkeypatch, impl):
    n, ds, dt, vocab = CPU_SHAPE
    run_case(benchmark, monkeypatch, impl, "reverse", n, ds, dt, vocab)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_bf16_matmul_rate(benchmark):
    """The card's dense bf16 matmul rate (8192^3 torch.mm): the denominator of the minimal-FLOP floor."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def step():
        for _ in range(10):
            torch.mm(a, b)
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    info = {"impl": "matmul", "flop_per_round": 10 * 2.0 * 8192**3, "device": torch.cuda.get_device_name()}
    benchmark.extra_info.update(info)
    append_row(benchmark, info)
