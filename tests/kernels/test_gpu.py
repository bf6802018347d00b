"""bf16 checks of the kernels on a CUDA device (the Triton interpreter computes bf16 tl.dot wrongly)."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels.backward import SCHEDULES, mm_accumulate
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton

from gopd_fast.kernels import tiling
from gopd_fast.ops.problem import build_problem

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: bf16 tl.dot is wrong in the "
                       "Triton interpreter"),
]


@pytest.mark.parametrize("jsd_beta", [None, 0.5])
@pytest.mark.parametrize("schedule", [*SCHEDULES, "logit_block", "skip"])
def test_bf16_matches_float64(problem, ref, rel_err, jsd_beta, schedule):
    p = problem(n=517, vocab=8191, ds=320, dt=192, dtype=torch.bfloat16, device=torch.device("cuda"))
    hs, ws, bs = (p[k].clone().requires_grad_() for k in ("hs", "ws", "bs"))
    loss, stats = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"], forward_weight=p["fw"],
        jsd_beta=jsd_beta, temperature=0.9, target_ids=p["targets"], grad_scale=None,
        return_stats=True), schedule=schedule)
    loss.sum().backward()
    hs64, ws64, bs64 = (p[k].double().requires_grad_() for k in ("hs", "ws", "bs"))
    want, want_stats = ref(hs64, ws64, p["ht"], p["wt"], bs64, p["bt"], p["rw"], p["fw"], jsd_beta=jsd_beta,
                           temperature=0.9, target_ids=p["targets"])
    want.sum().backward()
    # Logits are exact fp32 products of bf16 inputs: the loss is fp32-accurate, the gradients carry the bf16
    # rounding of dz (matmul operand) and of the returned gradient.
    assert rel_err(loss, want) < 1e-4
    for name in want_stats:
        assert (stats[name].double() - want_stats[name]).abs().max() < 1e-3, name
    for got, exp in ((hs.grad, hs64.grad), (ws.grad, ws64.grad), (bs.grad, bs64.grad)):
        assert rel_err(got, exp) < 2e-2


def test_large_vocab_bf16_no_logits_materialised(problem):
    """Qwen-sized vocabulary: peak extra memory stays far below one [N, V] fp32 logits tensor."""
    p = problem(n=1024, vocab=151936, ds=512, dt=512, dtype=torch.bfloat16, device=torch.device("cuda"))
    hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=p["bs"], teacher_bias=p["bt"], reverse_weight=p["rw"],
        forward_weight=p["fw"], jsd_beta=None, temperature=1.0, target_ids=None, grad_scale=1.0, return_stats=False))
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = 1024 * 151936 * 4
    assert torch.isfinite(loss) and torch.isfinite(ws.grad).all()
    assert extra < logits_bytes / 2


def test_one_pass_many_blocks_bf16(problem, ref, rel_err, monkeypatch):
    """bf16 with 5 token blocks (grad_W summed across them in bf16) and 64 vocabulary blocks per token block."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 2 * 128 * 320 * 4)
    p = problem(n=517, vocab=8191, ds=320, dt=192, dtype=torch.bfloat16, device=torch.device("cuda"))
    hs, ws, bs = (p[k].clone().requires_grad_() for k in ("hs", "ws", "bs"))
    loss, _ = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"], forward_weight=p["fw"],
        jsd_beta=None, temperature=0.9, target_ids=None, grad_scale=None, return_stats=False), schedule="one_pass")
    loss.sum().backward()
    hs64, ws64, bs64 = (p[k].double().requires_grad_() for k in ("hs", "ws", "bs"))
    ref(hs64, ws64, p["ht"], p["wt"], bs64, p["bt"], p["rw"], p["fw"], jsd_beta=None,
        temperature=0.9)[0].sum().backward()
    for got, exp in ((hs.grad, hs64.grad), (ws.grad, ws64.grad), (bs.grad, bs64.grad)):
        assert rel_err(got, exp) < 2e-2


@pytest.mark.parametrize("bias", [True, False])
def test_one_pass_overlap_matches_one_stream_bf16(problem, monkeypatch, bias):
    """The block pipeline on real streams (gradient kernel of block b + 1 on a side stream beside block b's GEMMs,
    two dz buffers, several blocks under the small budget set here) gives bit for bit the gradients of the
    one-stream run."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 2 * 128 * 320 * 4)
    p = problem(n=517, vocab=8191, ds=320, dt=192, dtype=torch.bfloat16, device=torch.device("cuda"), bias=bias)

    def grads(overlap):
        monkeypatch.setenv("GOPD_BACKWARD_OVERLAP", overlap)
        hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()
        bs = p["bs"].clone().requires_grad_() if bias else None
        loss, _ = fused_linear_kl_triton(build_problem(
            hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"],
            forward_weight=p["fw"], jsd_beta=None, temperature=0.9, target_ids=None, grad_scale=None,
            return_stats=False), schedule="one_pass")
        loss.sum().backward()
        torch.cuda.synchronize()
        return [hs.grad, ws.grad] + ([bs.grad] if bias else [])

    for a, b in zip(grads("1"), grads("0"), strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.parametrize("first", [True, False])
def test_mm_accumulate_into_fp32(first):
    """The fp32 accumulation of 16-bit products (cuBLAS out_dtype where torch has it) against float64."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(300, 257, device="cuda", generator=g, dtype=torch.bfloat16)
    b = torch.randn(257, 129, device="cuda", generator=g, dtype=torch.bfloat16)
    out = torch.full((300, 129), float("nan") if first else 1.5, device="cuda")
    mm_accumulate(out, a, b, first=first)
    want = a.double() @ b.double() + (0.0 if first else 1.5)
    assert (out.double() - want).abs().max() < 1e-3
