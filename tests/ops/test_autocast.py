"""torch.autocast support (``gopd_fast.ops.autocast``) in every entry point of the loss, on CPU autocast.

The semantics under ``autocast(dtype)``: GEMM operands rounded to ``dtype`` (as autocast rounds an nn.Linear's),
everything after in float32. So the reference is float64 math on the operands rounded to ``dtype``: the values must
match it to float32 accuracy (they were ~1e-3 off when autocast rounded the float32 logit tiles), and gradients to
the precision of ``dtype`` (they come back through the cast, as for an nn.Linear under autocast).
"""
from __future__ import annotations

import pytest
import torch

from gopd_fast import FusedLinearKL, fused_linear_kl, fused_linear_logprob, fused_linear_topk_kl
from gopd_fast.compat import LigerFusedLinearJSD, LigerFusedLinearJSDLoss
from gopd_fast.compat.trl import fused_gkd_loss
from gopd_fast.ops.autocast import autocast_cast, autocast_dtype, autocast_off

pytestmark = pytest.mark.usefixtures("single_thread")

DTYPES = [torch.bfloat16, torch.float16]
GRAD_RTOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # a few ulps of the autocast dtype
N, DS, DT, V = 13, 11, 9, 53


def test_helpers():
    x32, x64, ints = torch.ones(2), torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)
    assert autocast_dtype("cpu") is None
    assert autocast_cast(x32, None, 3) == (x32, None, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_dtype("cpu") == torch.bfloat16
        cast = autocast_cast(x32, x64, ints, None)
        assert [t.dtype if t is not None else None for t in cast] == [torch.bfloat16, torch.float64, torch.long,
                                                                      None]
        with autocast_off("cpu"):
            assert autocast_dtype("cpu") is None
            assert (x32 @ x32).dtype == torch.float32
        assert (x32[None] @ x32[:, None]).dtype == torch.bfloat16


def _inputs(seed, hidden_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, DS, generator=g).to(hidden_dtype).requires_grad_()
    w_s = (torch.randn(V, DS, generator=g) * 0.5).requires_grad_()  # float32 master weights
    b_s = (torch.randn(V, generator=g) * 0.3).requires_grad_()
    h_t = torch.randn(N, DT, generator=g).to(hidden_dtype)
    w_t, b_t = torch.randn(V, DT, generator=g) * 0.5, torch.randn(V, generator=g) * 0.3
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4]] = -100
    topk_lp = torch.log_softmax(h_t.double() @ w_t.double().T, -1)[:, :5].float()  # a remote teacher's top-5
    return {"h_s": h_s, "w_s": w_s, "b_s": b_s, "h_t": h_t, "w_t": w_t, "b_t": b_t, "labels": labels,
            "topk_lp": topk_lp}


def _rounded64(x, dtype):
    """The float64 twin of an input as autocast's GEMM sees it (rounded to ``dtype``); a fresh leaf."""
    out = {}
    for k, t in x.items():
        if k == "topk_lp":  # teacher log-probs, not a GEMM operand: not rounded
            out[k] = t.double()
        elif t.dtype.is_floating_point:
            t64 = t.detach().to(dtype).double()
            out[k] = t64.requires_grad_() if t.requires_grad else t64
        else:
            out[k] = t
    return out


def _heads(x):
    student, teacher = torch.nn.Linear(DS, V), torch.nn.Linear(DT, V)
    with torch.no_grad():
        student.weight.copy_(x["w_s"]), student.bias.copy_(x["b_s"])
        teacher.weight.copy_(x["w_t"]), teacher.bias.copy_(x["b_t"])
    return student.to(x["w_s"].dtype), teacher.to(x["w_t"].dtype)


def _reference(x):
    """fused_linear_kl's reverse KL by plain float64 softmax math (independent of gopd_fast)."""
    z_s = x["h_s"] @ x["w_s"].T + x["b_s"]
    z_t = x["h_t"] @ x["w_t"].T + x["b_t"]
    logp_s, logp_t = torch.log_softmax(z_s, -1), torch.log_softmax(z_t, -1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1).mean()


# entry point name -> (function of the inputs dict returning a scalar loss, student leaves it differentiates)
ENTRIES = {
    "fused_linear_kl naive": lambda x: fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=x["b_s"],
                                                       teacher_bias=x["b_t"], backend="naive"),
    "fused_linear_kl chunked": lambda x: fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"],
                                                         student_bias=x["b_s"], teacher_bias=x["b_t"],
                                                         backend="chunked", chunk_size=7),
    "fused_linear_kl chunked per-token": lambda x: fused_linear_kl(
        x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=x["b_s"], teacher_bias=x["b_t"], backend="chunked",
        reduction="none", chunk_size=7).mean(),
    "FusedLinearKL": lambda x: FusedLinearKL(*_heads(x), backend="chunked")(x["h_s"], x["h_t"]),
    "LigerFusedLinearJSDLoss": lambda x: LigerFusedLinearJSDLoss(beta=0.3, backend="chunked")(
        x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"], x["b_s"], x["b_t"]),
    "LigerFusedLinearJSD": lambda x: LigerFusedLinearJSD(jsd_beta=0.7, backend="chunked")(
        x["h_s"], x["w_s"], x["h_t"], x["w_t"], x["labels"]),
    "fused_gkd_loss": lambda x: fused_gkd_loss(x["h_s"], x["h_t"], *_heads(x), x["labels"], beta=0.4,
                                               backend="naive"),
    "fused_linear_logprob": lambda x: fused_linear_logprob(x["h_s"], x["w_s"], x["labels"].clamp_min(0),
                                                           bias=x["b_s"], return_entropy=True)[1].mean(),
    "fused_linear_topk_kl": lambda x: fused_linear_topk_kl(x["h_s"], x["w_s"], torch.arange(5).repeat(N, 1),
                                                           x["topk_lp"], student_bias=x["b_s"], forward_weight=1.0),
}


def _leaves(x, name):
    return [x["h_s"]] if name in ("FusedLinearKL", "fused_gkd_loss") else (
        [x["h_s"], x["w_s"]] if "JSD" in name else [x["h_s"], x["w_s"], x["b_s"]])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ENTRIES))
@pytest.mark.parametrize("backward_inside", [False, True])
def test_entry_points_under_cpu_autocast_match_float64_on_rounded_operands(name, dtype, backward_inside):
    fn = ENTRIES[name]
    x = _inputs(seed=len(name))
    ref_x = _rounded64(x, dtype)
    ref = fn(ref_x)
    ref_grads = torch.autograd.grad(ref, _leaves(ref_x, name))
    with torch.autocast("cpu", dtype=dtype):
        loss = fn(x)
        if backward_inside:  # a backward under autocast must not re-cast the backward's own tiles either
            got_grads = torch.autograd.grad(loss, _leaves(x, name))
    if not backward_inside:
        got_grads = torch.autograd.grad(loss, _leaves(x, name))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-6, atol=1e-7)
    for got, want, leaf in zip(got_grads, ref_grads, _leaves(x, name)):
        assert got.dtype == leaf.dtype  # float32 master weights get float32 gradients
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * want.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_low_precision_hidden_states_with_float32_heads(dtype, backend):
    # what an HF model under autocast hands over: bf16/fp16 hidden states, float32 lm_head weights
    x = _inputs(seed=3, hidden_dtype=dtype)
    with torch.no_grad():
        x["h_s"].clamp_(-4, 4)
    with pytest.raises(ValueError, match="student_weight dtype"):  # outside autocast the mismatch is an error
        fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], backend=backend)
    with torch.autocast("cpu", dtype=dtype):
        loss = fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=x["b_s"],
                               teacher_bias=x["b_t"], backend=backend)
    ref_x = _rounded64(x, dtype)
    torch.testing.assert_close(loss.double(), _reference(ref_x).detach(), rtol=2e-6, atol=1e-7)
    grad_h, grad_w = torch.autograd.grad(loss, [x["h_s"], x["w_s"]])
    ref_h, ref_w = torch.autograd.grad(_reference(ref_x), [ref_x["h_s"], ref_x["w_s"]])
    assert grad_h.dtype == dtype and grad_w.dtype == torch.float32
    for got, want in ((grad_h, ref_h), (grad_w, ref_w)):
        torch.testing.assert_close(got.double(), want, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * want.abs().max())


def test_float64_inputs_are_left_alone_under_autocast():
    x = _rounded64(_inputs(seed=5), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=x["b_s"], teacher_bias=x["b_t"],
                               backend="chunked")
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, _reference(x), rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_autocast_triton_backend_matches_float64_and_backpropagates_twice(dtype, reduction):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the Triton backend of fused_linear_kl under CUDA autocast)")
    x = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if v.dtype.is_floating_point else v.cuda())
         for k, v in _inputs(seed=7).items()}
    with torch.autocast("cuda", dtype=dtype):
        loss = fused_linear_kl(x["h_s"], x["w_s"], x["h_t"], x["w_t"], student_bias=x["b_s"], teacher_bias=x["b_t"],
                               backend="triton", reduction=reduction).mean()
    assert loss.dtype == torch.float32
    ref_x = _rounded64(x, dtype)
    torch.testing.assert_close(loss.double(), _reference(ref_x).detach(), rtol=1e-5, atol=1e-6)
    loss.backward(retain_graph=True)
    first = x["w_s"].grad.clone()
    loss.backward()  # a second backward accumulates the same gradient again
    torch.testing.assert_close(x["w_s"].grad, 2 * first)
    (ref_w,) = torch.autograd.grad(_reference(ref_x), [ref_x["w_s"]])
    assert first.dtype == torch.float32
    torch.testing.assert_close(first.double(), ref_w, rtol=GRAD_RTOL[dtype], atol=GRAD_RTOL[dtype] * ref_w.abs().max())
