"""gopd_fast.compat.LigerFusedLinearJSD against Liger-Kernel's own ``liger_kernel.transformers.LigerFusedLinearJSD``.

Liger's class runs a Triton kernel, which on CPU needs the Triton interpreter (``TRITON_INTERPRET=1`` before triton
is imported), so its numbers are computed in a subprocess; the in-process tests check the formula in float64.
"""
from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gopd_fast.compat import LigerFusedLinearJSD, liger_fused_linear_jsd_shift_labels

pytestmark = pytest.mark.usefixtures("single_thread")

N, DS, DT, V = 13, 7, 9, 31
CASES = [(0.0, 1.0, True), (1.0, 2.0, True), (0.3, 0.7, True), (0.5, 1.0, False), (0.8, 1.3, False)]


def _inputs(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x_s, w_s = torch.randn(N, DS, generator=g), torch.randn(V, DS, generator=g) * 0.5
    x_t, w_t = torch.randn(N, DT, generator=g), torch.randn(V, DT, generator=g) * 0.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[2, 5, 6]] = -100
    return [t.to(dtype) for t in (x_s, w_s, x_t, w_t)] + [labels]


def _loss_and_grads(fn, x_s, w_s, x_t, w_t, labels):
    x_s, w_s = x_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss = fn(x_s, w_s, x_t, w_t, labels)
    return (loss.detach(), *torch.autograd.grad(loss, [x_s, w_s]))


_LIGER_SCRIPT = textwrap.dedent("""
    import sys, torch
    from liger_kernel.transformers import LigerFusedLinearJSD
    cases, inputs, out = torch.load(sys.argv[1]), torch.load(sys.argv[2]), {}
    for beta, temperature, with_labels in cases:
        x_s, w_s, x_t, w_t, labels = inputs[(beta, temperature)]
        x_s, w_s = x_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(
            x_s, w_s, x_t, w_t, labels if with_labels else None)
        loss.backward()
        out[(beta, temperature)] = (loss.detach(), x_s.grad, w_s.grad)
    torch.save(out, sys.argv[3])
""")


@pytest.mark.slow
def test_same_loss_and_grads_as_liger(tmp_path):
    pytest.importorskip("liger_kernel.transformers")
    inputs = {(beta, t): _inputs(seed=int(beta * 10 + t * 100)) for beta, t, _ in CASES}
    torch.save(CASES, tmp_path / "cases.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    paths = [str(tmp_path / name) for name in ("cases.pt", "inputs.pt", "out.pt")]
    run = subprocess.run([sys.executable, "-c", _LIGER_SCRIPT, *paths], env=env, capture_output=True, text=True,
                         timeout=600, check=False)
    if run.returncode != 0 and "triton" in run.stderr.lower() and "No module named" in run.stderr:
        pytest.skip(f"Liger's Triton kernel cannot run here: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr[-2000:]
    reference = torch.load(tmp_path / "out.pt")
    for beta, temperature, with_labels in CASES:
        x_s, w_s, x_t, w_t, labels = inputs[(beta, temperature)]
        ours = _loss_and_grads(LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature, backend="chunked"),
                               x_s, w_s, x_t, w_t, labels if with_labels else None)
        for got, want in zip(ours, reference[(beta, temperature)]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def _formula(x_s, w_s, x_t, w_t, labels, beta, temperature, ignore_index=-100):
    """Liger's loss, written out: sum over valid tokens of JSD_beta (TRL's convention) / number of valid tokens."""
    logp_s = torch.log_softmax(x_s @ w_s.T / temperature, -1)
    logp_t = torch.log_softmax(x_t @ w_t.T / temperature, -1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if beta == 0:
        per_token = (p_t * (logp_t - logp_s)).sum(-1)
    elif beta == 1:
        per_token = (p_s * (logp_s - logp_t)).sum(-1)
    else:
        log_m = torch.log(beta * p_t + (1 - beta) * p_s)
        per_token = beta * (p_t * (logp_t - log_m)).sum(-1) + (1 - beta) * (p_s * (logp_s - log_m)).sum(-1)
    valid = torch.ones(x_s.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    return (per_token * valid).sum() / valid.sum()


@pytest.mark.parametrize("beta,temperature,with_labels", CASES)
@pytest.mark.parametrize("backend", ["naive", "chunked"])
def test_matches_the_formula_in_float64(beta, temperature, with_labels, backend):
    x_s, w_s, x_t, w_t, labels = _inputs(seed=3, dtype=torch.float64)
    labels = labels if with_labels else None
    ours = _loss_and_grads(LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature, backend=backend),
                           x_s, w_s, x_t, w_t, labels)
    functional = _loss_and_grads(
        lambda *a: liger_fused_linear_jsd_shift_labels(*a, jsd_beta=beta, temperature=temperature, backend=backend),
        x_s, w_s, x_t, w_t, labels)
    want = _loss_and_grads(lambda *a: _formula(*a, beta, temperature), x_s, w_s, x_t, w_t, labels)
    for got, f, w in zip(ours, functional, want):
        torch.testing.assert_close(got, w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(f, w, rtol=1e-10, atol=1e-12)


def test_custom_ignore_index_leading_dims_and_all_ignored():
    x_s, w_s, x_t, w_t, labels = _inputs(seed=4, dtype=torch.float64)
    labels[labels == -100] = 7
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.4, ignore_index=7)
    flat = loss_fn(x_s, w_s, x_t, w_t, labels)
    torch.testing.assert_close(flat, _formula(x_s, w_s, x_t, w_t, labels, 0.4, 1.0, ignore_index=7))
    batched = loss_fn(x_s[:12].reshape(3, 4, DS), w_s, x_t[:12].reshape(3, 4, DT), w_t, labels[:12].reshape(3, 4))
    torch.testing.assert_close(batched, loss_fn(x_s[:12], w_s, x_t[:12], w_t, labels[:12]))
    x_s = x_s.clone().requires_grad_()
    zero = loss_fn(x_s, w_s, x_t, w_t, torch.full((N,), 7))
    assert zero.item() == 0.0  # like Liger: no valid token, no loss and no gradient
    (grad,) = torch.autograd.grad(zero, [x_s])
    assert grad.abs().sum() == 0


def test_same_signatures_as_liger():
    liger = pytest.importorskip("liger_kernel.transformers")
    import liger_kernel.transformers.functional as liger_functional

    ref = inspect.signature(liger.LigerFusedLinearJSD.__init__).parameters
    ours = inspect.signature(LigerFusedLinearJSD.__init__).parameters
    assert list(ours)[: len(ref)] == list(ref)
    assert all(ours[k].default == ref[k].default for k in ref if k != "self")
    assert list(inspect.signature(LigerFusedLinearJSD.forward).parameters) == list(
        inspect.signature(liger.LigerFusedLinearJSD.forward).parameters)
    ref_fn = inspect.signature(liger_functional.liger_fused_linear_jsd).parameters
    ours_fn = inspect.signature(liger_fused_linear_jsd_shift_labels).parameters
    assert list(ours_fn)[: len(ref_fn)] == list(ref_fn)
    assert all(ours_fn[k].default == ref_fn[k].default for k in ref_fn)


@pytest.mark.parametrize("kwargs,error,name", [
    ({"jsd_beta": "0.5"}, TypeError, "jsd_beta"),
    ({"jsd_beta": 1.5}, ValueError, "jsd_beta"),
    ({"jsd_beta": True}, TypeError, "jsd_beta"),
    ({"jsd_beta": math.nan}, ValueError, "jsd_beta"),
    ({"temperature": 0}, ValueError, "temperature"),
    ({"temperature": "2"}, TypeError, "temperature"),
    ({"temperature": 1e-30}, ValueError, "temperature"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"accum_dtype": "float32"}, TypeError, "accum_dtype"),
    ({"backend": "cuda"}, ValueError, "backend"),
])
def test_bad_arguments_fail_at_construction(kwargs, error, name):
    with pytest.raises(error, match=name):
        LigerFusedLinearJSD(**kwargs)


def test_bad_labels_name_the_argument():
    x_s, w_s, x_t, w_t, labels = _inputs(seed=5)
    with pytest.raises(TypeError, match="shift_labels"):
        LigerFusedLinearJSD()(x_s, w_s, x_t, w_t, labels.float())
    with pytest.raises(ValueError, match="shift_labels"):
        LigerFusedLinearJSD()(x_s, w_s, x_t, w_t, labels[:-1])
