"""gopd_fast.ops.problem: the one place the JSD endpoints are mapped, and what ``build_problem`` guarantees."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gopd_fast.ops.naive import fused_linear_kl_naive
from gopd_fast.ops.problem import build_problem, canonical_objective

pytestmark = pytest.mark.usefixtures("single_thread")


def _operands(rng, n=5, ds=4, dt=3, v=11, vt=None, dtype=torch.float32):
    def randn(*shape):
        return torch.randn(*shape, generator=rng, dtype=torch.float64).to(dtype)

    return randn(n, ds).requires_grad_(), randn(v, ds).requires_grad_(), randn(n, dt), randn(vt or v, dt)


@pytest.mark.parametrize("beta", [None, 0.0, 0.3, 1.0])
def test_canonical_objective_maps_the_endpoints(beta):
    rw, fw = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    got_rw, got_fw, got_beta = canonical_objective(rw, fw, beta)
    if beta == 0.0:  # forward KL, weighted by reverse_weight
        assert got_beta is None and got_rw.eq(0).all() and got_fw.equal(rw)
    elif beta == 1.0:  # reverse KL
        assert got_beta is None and got_rw.equal(rw) and got_fw.eq(0).all()
    elif beta is None:
        assert got_beta is None and got_rw is rw and got_fw is fw
    else:  # inside (0, 1): the JSD, never a forward term
        assert got_beta == 0.3 and got_rw.equal(rw) and got_fw.eq(0).all()


def test_canonical_objective_drops_the_forward_term_of_a_jsd():
    _, fw, beta = canonical_objective(torch.ones(2), torch.ones(2), 0.5)
    assert beta == 0.5 and fw.eq(0).all()


@pytest.mark.parametrize("beta, plain", [(0.0, "forward"), (1.0, "reverse")])
def test_a_backend_sees_an_endpoint_as_plain_kl(rng, beta, plain):
    h_s, w_s, h_t, w_t = _operands(rng, dtype=torch.float64)
    rw, zeros = torch.rand(5, generator=rng, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    endpoint = build_problem(h_s, w_s, h_t, w_t, reverse_weight=rw, forward_weight=zeros, jsd_beta=beta)
    assert endpoint.jsd_beta is None
    weights = {"reverse_weight": zeros, "forward_weight": rw} if plain == "forward" else {
        "reverse_weight": rw, "forward_weight": zeros}
    kl = build_problem(h_s, w_s, h_t, w_t, **weights)
    torch.testing.assert_close(fused_linear_kl_naive(endpoint)[0], fused_linear_kl_naive(kl)[0], rtol=0, atol=0)


def test_build_problem_fields(rng):
    h_s, w_s, h_t, w_t = _operands(rng, vt=14, dtype=torch.bfloat16)
    h_t.requires_grad_()
    b_t = torch.zeros(14, dtype=torch.bfloat16)
    b_t[2] = -math.inf
    problem = build_problem(h_s, w_s, h_t, w_t, teacher_bias=b_t, reverse_weight=torch.ones(5, dtype=torch.bool),
                            forward_weight=torch.zeros(5), target_ids=torch.arange(5, dtype=torch.int32),
                            grad_scale=2, temperature=3)
    assert problem.accumulation_dtype == torch.float32
    assert problem.reverse_weight.dtype == problem.forward_weight.dtype == torch.float32
    assert problem.teacher_weight.shape == (11, 3) and problem.teacher_bias.shape == (11,)  # the student's vocab
    assert not problem.teacher_hidden.requires_grad and not problem.teacher_weight.requires_grad
    assert problem.target_ids.dtype == torch.int64
    assert problem.grad_scale == 2.0 and isinstance(problem.grad_scale, float) and problem.temperature == 3.0
    assert problem.masked_vocab and problem.needs_grad == (True, True, False)
    assert (problem.n_tokens, problem.vocab) == (5, 11)
    assert not problem.uses_forward_kl
    with pytest.raises(dataclasses.FrozenInstanceError):
        problem.jsd_beta = 0.5


def test_build_problem_under_no_grad_needs_no_gradient(rng):
    h_s, w_s, h_t, w_t = _operands(rng, dtype=torch.float64)
    with torch.no_grad():
        problem = build_problem(h_s, w_s, h_t, w_t, reverse_weight=torch.ones(5), forward_weight=torch.ones(5))
    assert problem.needs_grad == (False, False, False)
    assert problem.accumulation_dtype == torch.float64 and problem.uses_forward_kl and not problem.masked_vocab
