"""kernels/fused_linear_kl.py: the triton backend's contract (gopd_fast.ops), errors and the public entry point."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels.backward import SCHEDULES
from gopd_fast.kernels.fused_linear_kl import (
    check_triton_runnable,
    fused_linear_kl_triton,
    schedule_default,
)
from gopd_fast.kernels.schedule import CHOICES

import gopd_fast
from gopd_fast.kernels import backward, forward, tiling
from gopd_fast.ops.problem import build_problem


def call(p, schedule=None, **overrides):
    kwargs = {"jsd_beta": None, "temperature": 1.0, "target_ids": None, "grad_scale": None, "return_stats": False}
    kwargs.update(overrides)
    problem = build_problem(p["hs"], p["ws"], p["ht"], p["wt"], student_bias=p["bs"], teacher_bias=p["bt"],
                            reverse_weight=p["rw"], forward_weight=p["fw"], **kwargs)
    return fused_linear_kl_triton(problem, schedule=schedule)


@pytest.mark.parametrize("beta,weights", [(0.0, "forward"), (1.0, "reverse")])
def test_jsd_endpoints_are_the_kls_weighted_by_reverse_weight(problem, beta, weights):
    p = problem(n=9, vocab=70)
    loss, _ = call(p, jsd_beta=beta)
    zero = torch.zeros_like(p["rw"])
    rw, fw = (zero, p["rw"]) if weights == "forward" else (p["rw"], zero)
    expected, _ = call({**p, "rw": rw, "fw": fw})
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)


def test_grad_scale_returns_scaled_sum_with_matching_grads(problem):
    p = problem(n=11, vocab=70)
    hs = p["hs"].clone().requires_grad_()
    scalar, _ = call({**p, "hs": hs}, grad_scale=0.25, temperature=1.5)
    assert scalar.shape == () and scalar.dtype == torch.float32
    scalar.backward()
    hs_ref = p["hs"].clone().requires_grad_()
    per_token, _ = call({**p, "hs": hs_ref}, temperature=1.5)
    (per_token.sum() * 0.25).backward()
    assert torch.allclose(scalar, per_token.sum() * 0.25)
    assert torch.allclose(hs.grad, hs_ref.grad, rtol=1e-5, atol=1e-7)


def test_stats_keys_and_values(problem, ref):
    p = problem(n=13, vocab=70)
    _, stats = call(p, return_stats=True, target_ids=p["targets"], temperature=0.9)
    _, expected = ref(p["hs"], p["ws"], p["ht"], p["wt"], p["bs"], p["bt"], p["rw"], p["fw"], jsd_beta=None,
                      temperature=0.9, target_ids=p["targets"])
    assert set(stats) == set(expected) | {"schedule"}
    for name, value in expected.items():
        assert not stats[name].requires_grad
        assert (stats[name].double() - value).abs().max() < 1e-5, name
    _, no_targets = call(p, return_stats=True)
    assert set(no_targets) == {"reverse_kl", "forward_kl", "student_entropy", "schedule"}
    assert call(p)[1] is None


@pytest.mark.parametrize("schedule", SCHEDULES)  # logit_block: tests/kernels/test_logit_block.py
def test_every_output_element_is_written(problem, monkeypatch, schedule):
    """Buffers the kernels fully overwrite are handed out filled with NaN; results must not change. The small
    buffer budget splits the backward into several token and vocabulary blocks."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 4096)
    p = problem(n=21, vocab=101)

    def run():
        hs, ws, bs = (p[k].clone().requires_grad_() for k in ("hs", "ws", "bs"))
        loss, stats = call({**p, "hs": hs, "ws": ws, "bs": bs}, jsd_beta=0.4, return_stats=True,
                           target_ids=p["targets"], schedule=schedule)
        loss.sum().backward()
        return [loss.detach(), *(v for k, v in stats.items() if k != "schedule"), hs.grad, ws.grad, bs.grad]

    clean = run()

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(forward, "new_output", poisoned)
    monkeypatch.setattr(backward, "new_output", poisoned)
    dirty = run()
    for a, b in zip(clean, dirty):
        assert torch.isfinite(b).all()
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_schedule_env_var(monkeypatch):
    monkeypatch.delenv("GOPD_BACKWARD", raising=False)
    assert schedule_default() == "auto"
    for name in CHOICES:
        monkeypatch.setenv("GOPD_BACKWARD", f" {name.upper()} ")
        assert schedule_default() == name
    monkeypatch.setenv("GOPD_BACKWARD", "0")
    with pytest.raises(ValueError, match="GOPD_BACKWARD must be one of auto, logit_block, one_pass, two_pass, "
                                         "atomic, skip; got '0'"):
        schedule_default()


def test_bad_inputs_raise_clear_errors(problem, monkeypatch):
    p = problem(n=4, vocab=40)
    with pytest.raises(TypeError, match="float64"):
        call({**p, "hs": p["hs"].double()})
    with pytest.raises(ValueError, match="one device"):
        check_triton_runnable(p["hs"], torch.empty(3, device="meta"))
    if p["hs"].device.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            call(p)


def test_public_entry_point_matches_naive_backend(problem):
    """gopd_fast.fused_linear_kl(backend="triton") with masked tokens, mean reduction and stats."""
    p = problem(n=19, vocab=90)
    rw = p["rw"].clone()
    rw[::3] = 0.0
    fw = torch.where(rw == 0, torch.zeros_like(rw), p["fw"])
    results = {}
    for backend in ("naive", "triton"):
        hs = p["hs"].clone().requires_grad_()
        loss, stats = gopd_fast.fused_linear_kl(
            hs, p["ws"], p["ht"], p["wt"], reverse_weight=rw, forward_weight=fw, temperature=1.2,
            student_bias=p["bs"], teacher_bias=p["bt"], target_ids=p["targets"], backend=backend, return_stats=True)
        loss.backward()
        results[backend] = (loss.detach(), hs.grad, stats.reverse_kl, stats.student_logprob)
    for a, b in zip(results["naive"], results["triton"]):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
