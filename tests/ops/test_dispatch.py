"""gopd_fast.ops.dispatch: backend names, the automatic choice and the functions of a problem it returns."""
from __future__ import annotations

import pytest
import torch

from gopd_fast.ops.chunked import fused_linear_kl_chunked
from gopd_fast.ops.dispatch import backend_fn, check_backend, choose_backend
from gopd_fast.ops.naive import fused_linear_kl_naive
from gopd_fast.ops.problem import build_problem

pytestmark = pytest.mark.usefixtures("single_thread")


def test_check_backend_names_the_choices():
    assert check_backend("chunked") == "chunked"
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("fast")
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend(None)


def test_backend_fn_binds_the_chunk_size(rng):
    h_s = torch.randn(6, 4, generator=rng, dtype=torch.float64)
    w_s = torch.randn(40, 4, generator=rng, dtype=torch.float64)
    problem = build_problem(h_s, w_s, h_s.flip(0), w_s.flip(0), reverse_weight=torch.ones(6),
                            forward_weight=torch.ones(6))
    assert backend_fn("naive") is fused_linear_kl_naive
    got, _ = backend_fn("chunked", chunk_size=7)(problem)
    torch.testing.assert_close(got, fused_linear_kl_chunked(problem, chunk_size=7)[0], rtol=0, atol=0)
    torch.testing.assert_close(got, fused_linear_kl_naive(problem)[0], rtol=1e-12, atol=1e-12)


def test_backend_fn_needs_a_concrete_backend():
    with pytest.raises(ValueError, match="concrete backend"):
        backend_fn("auto")


def test_choose_backend_float64(monkeypatch):
    monkeypatch.delenv("GOPD_BACKEND", raising=False)
    cuda = torch.device("cuda")
    assert choose_backend("auto", cuda, torch.float64) == "chunked"  # the kernels have no float64
    with pytest.raises(ValueError, match="float64"):
        choose_backend("triton", cuda, torch.float64)
    monkeypatch.setenv("GOPD_BACKEND", "triton")
    with pytest.raises(ValueError, match="float64"):
        choose_backend("auto", cuda, torch.float64)


def test_choose_backend_cpu(monkeypatch):
    monkeypatch.delenv("GOPD_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, torch.float32) == "chunked"
    assert choose_backend("naive", cpu, torch.float32) == "naive"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        choose_backend("triton", cpu, torch.float32)
