"""gopd_fast.fused_linear_kl against an independent float64 reference (tests/conftest.py), for both CPU backends."""
from __future__ import annotations

import math

import pytest
import torch

from gopd_fast import KLStats, fused_linear_kl
from gopd_fast.loss import resolve_backend

pytestmark = pytest.mark.usefixtures("single_thread")

BACKENDS = ["naive", "chunked"]
# Odd sizes: N, V and the chunk are not multiples of each other; student and teacher hidden sizes differ.
N, DS, DT, V, CHUNK = 37, 19, 23, 101, 13


def make_problem(rng, n=N, ds=DS, dt=DT, v=V, vt=None, dtype=torch.float32, bias=True, scale=1.0):
    def randn(*shape):
        return (torch.randn(*shape, generator=rng, dtype=torch.float64) * scale).to(dtype)

    vt = vt or v
    return {
        "student_hidden": randn(n, ds).requires_grad_(),
        "student_weight": randn(v, ds).requires_grad_(),
        "teacher_hidden": randn(n, dt),
        "teacher_weight": randn(vt, dt),
        "student_bias": randn(v).requires_grad_() if bias else None,
        "teacher_bias": randn(vt) if bias else None,
    }


def student_grads(p, loss):
    inputs = [p["student_hidden"], p["student_weight"]] + ([p["student_bias"]] if p["student_bias"] is not None
                                                          else [])
    return torch.autograd.grad(loss, inputs)


def reference_of(reference_loss, p, **kw):
    return reference_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"],
                          b_s=p["student_bias"], b_t=p["teacher_bias"], **kw)


def run(p, backend, **kw):
    kw.setdefault("chunk_size", CHUNK)
    return fused_linear_kl(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"],
                           student_bias=p["student_bias"], teacher_bias=p["teacher_bias"], backend=backend, **kw)


def assert_close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


OBJECTIVES = {
    "reverse": {},
    "forward": {"forward_weight": "w2", "reverse_weight": "zero"},
    "mixed": {"reverse_weight": "w1", "forward_weight": "w2"},
    "jsd0": {"jsd_beta": 0.0, "reverse_weight": "w1"},
    "jsd0.3": {"jsd_beta": 0.3, "reverse_weight": "w1"},
    "jsd1": {"jsd_beta": 1.0, "reverse_weight": "w1"},
}


def objective_weights(name, rng, n=N):
    # w1 and w2 have zeros (masked tokens) and a disjoint support, like student/teacher turns of one episode
    role = torch.rand(n, generator=rng) < 0.5
    mask = torch.rand(n, generator=rng) < 0.8
    values = {"w1": (role & mask).float() * 1.5, "w2": (~role & mask).float() * 0.7, "zero": torch.zeros(n)}
    return {k: values[v] if isinstance(v, str) else v for k, v in OBJECTIVES[name].items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_matches_float64_reference(rng, reference_loss, backend, objective, reduction):
    p = make_problem(rng, dtype=torch.float64)
    kw = objective_weights(objective, rng)
    ref_kw = {("rw" if k == "reverse_weight" else "fw" if k == "forward_weight" else k): v for k, v in kw.items()}
    ref_per_token, _ = reference_of(reference_loss, p, temperature=1.7, **ref_kw)
    loss = run(p, backend, temperature=1.7, reduction=reduction, **kw)
    active = ((kw.get("reverse_weight", torch.ones(N)) != 0) | (kw.get("forward_weight", torch.zeros(N)) != 0))
    if reduction == "mean":
        expected = ref_per_token.sum() / active.sum()
        assert loss.shape == () and loss.dtype == torch.float64
    else:
        expected = ref_per_token
        assert loss.shape == (N,)
        assert torch.all(loss[~active] == 0)
    assert_close(loss, expected, rtol=1e-9, atol=1e-11)
    upstream = torch.linspace(0.5, 2.0, N, dtype=torch.float64) if reduction == "none" else None
    got = student_grads(p, loss if upstream is None else (loss * upstream).sum())
    want = student_grads(p, expected if upstream is None else (expected * upstream).sum())
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_normalizer(rng, reference_loss, backend):
    p = make_problem(rng, dtype=torch.float64)
    rw = (torch.rand(N, generator=rng) < 0.6).double() * torch.rand(N, generator=rng, dtype=torch.float64)
    per_token, _ = reference_of(reference_loss, p, rw=rw)
    n_active = int((rw != 0).sum())
    assert_close(run(p, backend, reverse_weight=rw, reduction="sum"), per_token.sum(), rtol=1e-10)
    assert_close(run(p, backend, reverse_weight=rw, reduction="mean"), per_token.sum() / n_active, rtol=1e-10)
    assert_close(run(p, backend, reverse_weight=rw, normalizer=1000.0), per_token.sum() / 1000, rtol=1e-10)
    assert_close(run(p, backend, reverse_weight=rw, normalizer=torch.tensor(7)), per_token.sum() / 7, rtol=1e-10)
    loss = run(p, backend, reverse_weight=rw, normalizer=1000.0)
    got = student_grads(p, loss)
    for g, w in zip(got, student_grads(p, per_token.sum() / 1000)):
        assert_close(g, w, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(rng, reference_loss, dtype):
    # Logits of magnitude ~30: a bf16 rounding of the logits themselves would be off by ~0.1 per logit.
    p = make_problem(rng, n=64, ds=48, dt=40, v=509, dtype=dtype, scale=0.8)
    loss = run(p, "chunked", chunk_size=128, forward_weight=torch.full((64,), 0.5), reverse_weight=torch.ones(64))
    assert loss.dtype == torch.float32
    expected, _ = reference_of(reference_loss, p, rw=torch.ones(64), fw=torch.full((64,), 0.5))  # same rounded inputs
    assert_close(loss, expected.mean(), rtol=2e-5, atol=1e-5)
    got = student_grads(p, loss)
    want = student_grads(p, expected.mean())
    for g, w in zip(got, want):
        assert g.dtype == dtype
        tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-4}
        assert_close(g, w.to(dtype), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_match_reference_and_skip_masked_tokens(rng, reference_loss, backend):
    p = make_problem(rng, dtype=torch.float64)
    rw = (torch.arange(N) % 3 != 0).double()
    targets = torch.randint(0, V, (N,), generator=rng)
    targets[rw == 0] = -100  # ignored positions may hold any id
    _loss, stats = run(p, backend, reverse_weight=rw, target_ids=targets, return_stats=True, temperature=0.7)
    assert isinstance(stats, KLStats)
    _, ref = reference_of(reference_loss, p, rw=rw, targets=targets.clamp(min=0), temperature=0.7)
    mask = rw != 0
    assert torch.equal(stats.token_mask, mask)
    for key, want in ref.items():
        got = getattr(stats, key)
        assert not got.requires_grad
        assert_close(got[mask], want[mask], rtol=1e-9, atol=1e-11)
        assert torch.all(got[~mask] == 0)
    no_targets = run(p, backend, return_stats=True)[1]
    assert no_targets.student_logprob is None and no_targets.teacher_logprob is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_masked_gives_exact_zero_and_zero_grads(rng, backend, reduction):
    p = make_problem(rng)
    with torch.no_grad():
        p["student_hidden"][0] = math.nan  # garbage at masked positions must not leak
    loss, stats = run(p, backend, reverse_weight=torch.zeros(N), reduction=reduction, return_stats=True)
    assert torch.all(loss == 0) and loss.shape == (() if reduction != "none" else (N,))
    for g in student_grads(p, loss.sum()):
        assert torch.all(g == 0)
    assert not stats.token_mask.any() and torch.all(stats.reverse_kl == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_are_dropped_before_compute(rng, reference_loss, backend):
    p = make_problem(rng, dtype=torch.float64)
    rw = torch.ones(N, dtype=torch.float64)
    rw[5] = 0
    with torch.no_grad():
        p["student_hidden"][5] = math.inf
        p["teacher_hidden"][5] = math.nan
    loss = run(p, backend, reverse_weight=rw, reduction="sum")
    clean = {k: (v.detach().clone() if v is not None else None) for k, v in p.items()}
    clean["student_hidden"][5] = 0
    clean["teacher_hidden"][5] = 0
    expected, _ = reference_of(reference_loss, clean, rw=rw)
    assert_close(loss, expected.sum(), rtol=1e-10)
    grad_h = student_grads(p, loss)[0]
    assert torch.all(grad_h[5] == 0) and torch.isfinite(grad_h).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_gradient(rng, backend):
    p = make_problem(rng)
    for key in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        p[key].requires_grad_()
    for reduction in ("mean", "none"):
        run(p, backend, reduction=reduction, forward_weight=torch.ones(N)).sum().backward()
        assert all(p[k].grad is None for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
        assert p["student_weight"].grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_batch_dims(rng, backend):
    p = make_problem(rng, n=2 * 5)
    rw = (torch.rand(2, 5, generator=rng) < 0.7).float()
    flat = run(p, backend, reverse_weight=rw.reshape(-1), reduction="none")
    batched = {k: (v.detach().reshape(2, 5, -1) if k.endswith("hidden") else v) for k, v in p.items()}
    out, stats = run(batched, backend, reverse_weight=rw, reduction="none", return_stats=True)
    assert out.shape == (2, 5) and stats.reverse_kl.shape == (2, 5)
    assert_close(out.reshape(-1), flat)


def test_vocab_padding_option(rng, reference_loss):
    p = make_problem(rng, vt=V + 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"pass truncate_teacher_vocab=True to use the shared first {V} rows"):
        run(p, "chunked")
    loss = run(p, "chunked", truncate_teacher_vocab=True, reduction="none")
    assert_close(loss, reference_of(reference_loss, p)[0], rtol=1e-10)  # the reference also uses the first V
    small = make_problem(rng, vt=V - 1)
    with pytest.raises(ValueError, match="teacher_weight has 100 rows but student_weight has 101"):
        run(small, "chunked", truncate_teacher_vocab=True)


def test_backends_agree_and_chunk_size_is_irrelevant(rng):
    p = make_problem(rng, dtype=torch.float64)
    kw = {"reverse_weight": torch.rand(N, generator=rng), "forward_weight": torch.rand(N, generator=rng),
              "reduction": "none"}
    ref = run(p, "naive", **kw)
    for chunk in (1, 7, V, 4 * V):
        assert_close(run(p, "chunked", chunk_size=chunk, **kw), ref, rtol=1e-10, atol=1e-12)
    assert_close(fused_linear_kl(p["student_hidden"], p["student_weight"], p["teacher_hidden"],
                                 p["teacher_weight"], student_bias=p["student_bias"], teacher_bias=p["teacher_bias"],
                                 **kw), ref, rtol=1e-10, atol=1e-12)  # default chunk


def test_gradcheck_chunked(rng):
    # reduction="none" (recompute path). The scalar path keeps forward-computed gradients for a single backward,
    # which gradcheck's reentrancy check cannot use; it is compared with the float64 reference above instead.
    reduction = "none"
    p = make_problem(rng, n=5, ds=3, dt=4, v=11, dtype=torch.float64)
    rw, fw = torch.rand(5, generator=rng), torch.rand(5, generator=rng)
    rw[2] = 0

    def f(h, w, b):
        out = fused_linear_kl(h, w, p["teacher_hidden"], p["teacher_weight"], student_bias=b,
                              teacher_bias=p["teacher_bias"], reverse_weight=rw, forward_weight=fw,
                              temperature=0.9, reduction=reduction, backend="chunked", chunk_size=4)
        return out

    assert torch.autograd.gradcheck(f, (p["student_hidden"], p["student_weight"], p["student_bias"]))

    def g(h, w, b):
        return fused_linear_kl(h, w, p["teacher_hidden"], p["teacher_weight"], student_bias=b, jsd_beta=0.4,
                               reduction=reduction, backend="chunked", chunk_size=4)

    assert torch.autograd.gradcheck(g, (p["student_hidden"], p["student_weight"], p["student_bias"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("jsd_beta", [None, 0.4])
def test_second_backward_with_retain_graph_accumulates_again(rng, backend, reduction, jsd_beta):
    # Liger's behaviour: a second backward through the same graph adds the same gradients once more
    p = make_problem(rng, dtype=torch.float64)
    leaves = [p["student_hidden"], p["student_weight"], p["student_bias"]]
    loss = run(p, backend, reduction=reduction, jsd_beta=jsd_beta).sum()
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward()
    for t, g in zip(leaves, first):
        assert g.abs().sum() > 0
        assert_close(t.grad, 2 * g, rtol=1e-12)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()  # without retain_graph the saved gradients are freed, as for any autograd graph


def test_scaled_upstream_gradient(rng):
    p = make_problem(rng, dtype=torch.float64)
    base = student_grads(p, run(p, "chunked"))
    scaled = student_grads(p, 3.5 * run(p, "chunked"))
    for b, s in zip(base, scaled):
        assert_close(s, 3.5 * b, rtol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_grad_scalar_loss_matches_and_skips_eager_gradients(rng, reduction, monkeypatch):
    # Under no_grad (evaluation) a scalar reduction must not pay for the eager-gradient sweep.
    from gopd_fast.ops import chunked

    p = make_problem(rng, dtype=torch.float64)
    with_grad = run(p, "chunked", reduction=reduction).detach()
    calls = []
    real = chunked._ChunkedKLScalar.apply
    monkeypatch.setattr(chunked._ChunkedKLScalar, "apply", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        without = run(p, "chunked", reduction=reduction)
    assert calls == []
    assert_close(without, with_grad, rtol=1e-12)


@pytest.mark.parametrize("objective", ["jsd0", "jsd0.3", "jsd1", "mixed"])
def test_the_backend_gets_one_compacted_canonical_problem(rng, monkeypatch, objective):
    # the contract as code: tokens without loss are gone and a JSD endpoint arrives as plain KL weights
    import gopd_fast.loss as loss_module

    seen = []
    real = loss_module.backend_fn
    monkeypatch.setattr(loss_module, "backend_fn", lambda name, chunk_size: lambda problem: (
        seen.append(problem), real(name, chunk_size)(problem))[1])
    p = make_problem(rng)
    weights = objective_weights(objective, rng)
    run(p, "chunked", **weights)
    (problem,) = seen
    active = weights["reverse_weight"] != 0
    if "forward_weight" in weights:
        active |= weights["forward_weight"] != 0
    assert problem.n_tokens == int(active.sum()) < N
    w1 = weights["reverse_weight"][active]
    beta = weights.get("jsd_beta")
    assert problem.jsd_beta == (0.3 if beta == 0.3 else None)
    if beta == 0.0:  # forward KL weighted by reverse_weight
        assert problem.reverse_weight.eq(0).all() and problem.forward_weight.equal(w1)
    elif beta is not None:
        assert problem.reverse_weight.equal(w1) and problem.forward_weight.eq(0).all()
    else:
        assert problem.forward_weight.equal(weights["forward_weight"][active])
    assert problem.student_hidden.shape == (problem.n_tokens, DS)
    assert problem.grad_scale == pytest.approx(1.0 / problem.n_tokens)
    assert problem.needs_grad == (True, True, True)


def test_check_finite(rng):
    p = make_problem(rng)
    with torch.no_grad():
        p["teacher_hidden"][3, 1] = math.nan
    with pytest.raises(ValueError, match="teacher_hidden has non-finite values"):
        run(p, "chunked")
    assert torch.isnan(run(p, "chunked", check_finite=False))


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GOPD_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "chunked"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setenv("GOPD_BACKEND", "naive")
    assert resolve_backend("auto", cpu) == "naive"
    assert resolve_backend("chunked", cpu) == "chunked"  # an explicit backend wins over the environment
    monkeypatch.setenv("GOPD_BACKEND", "fast")
    with pytest.raises(ValueError, match="GOPD_BACKEND"):
        resolve_backend("auto", cpu)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(rng, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        run(make_problem(rng), "triton")


# ------------------------------------------------------------------------------------------------------------------
# Bad input: each case names the offending argument
# ------------------------------------------------------------------------------------------------------------------
def _bad_cases():
    n, v = 6, 9

    def base():
        return {"student_hidden": torch.randn(n, 4), "student_weight": torch.randn(v, 4),
                    "teacher_hidden": torch.randn(n, 5), "teacher_weight": torch.randn(v, 5)}

    cases = {
        "student_hidden rank": ({"student_hidden": torch.randn(4)}, "student_hidden"),
        "student_weight rank": ({"student_weight": torch.randn(v, 4, 1)}, "student_weight"),
        "teacher_weight rank": ({"teacher_weight": torch.randn(v * 5)}, "teacher_weight"),
        "N mismatch": ({"teacher_hidden": torch.randn(n + 1, 5)}, "teacher_hidden"),
        "student hidden size": ({"student_weight": torch.randn(v, 3)}, "student_weight"),
        "teacher hidden size": ({"teacher_weight": torch.randn(v, 4)}, "teacher_weight"),
        "integer hidden": ({"student_hidden": torch.ones(n, 4, dtype=torch.int64)}, "student_hidden"),
        "integer teacher weight": ({"teacher_weight": torch.ones(v, 5, dtype=torch.int32)}, "teacher_weight"),
        "weight dtype": ({"student_weight": torch.randn(v, 4, dtype=torch.float64)}, "student_weight"),
        "device": ({"teacher_weight": torch.randn(v, 5, device="meta")}, "teacher_weight"),
        "student_bias shape": ({"student_bias": torch.randn(v + 1)}, "student_bias"),
        "teacher_bias dtype": ({"teacher_bias": torch.randn(v, dtype=torch.float64)}, "teacher_bias"),
        "negative weight": ({"reverse_weight": torch.tensor([1.0, -0.5, 0, 0, 0, 0])}, "reverse_weight"),
        "nan weight": ({"forward_weight": torch.tensor([math.nan, 0, 0, 0, 0, 0])}, "forward_weight"),
        "inf weight": ({"reverse_weight": torch.full((n,), math.inf)}, "reverse_weight"),
        "weight shape": ({"reverse_weight": torch.ones(n + 1)}, "reverse_weight"),
        "temperature 0": ({"temperature": 0.0}, "temperature"),
        "temperature negative": ({"temperature": -1.0}, "temperature"),
        "temperature nan": ({"temperature": math.nan}, "temperature"),
        "jsd_beta high": ({"jsd_beta": 1.5}, "jsd_beta"),
        "jsd_beta negative": ({"jsd_beta": -0.1}, "jsd_beta"),
        "jsd with forward_weight": ({"jsd_beta": 0.5, "forward_weight": torch.ones(n)}, "forward_weight"),
        "target out of range": ({"target_ids": torch.tensor([0, 1, 2, 3, 4, v])}, "target_ids"),
        "target negative": ({"target_ids": torch.tensor([0, 1, -1, 3, 4, 5])}, "target_ids"),
        "target float": ({"target_ids": torch.zeros(n)}, "target_ids"),
        "target shape": ({"target_ids": torch.zeros(n + 1, dtype=torch.long)}, "target_ids"),
        "reduction": ({"reduction": "avg"}, "reduction"),
        "backend": ({"backend": "cuda"}, "backend"),
        "normalizer zero": ({"normalizer": 0.0}, "normalizer"),
        "normalizer negative": ({"normalizer": -3}, "normalizer"),
        "normalizer with sum": ({"normalizer": 4.0, "reduction": "sum"}, "normalizer"),
        "chunk_size": ({"chunk_size": 0}, "chunk_size"),
        "student hidden nan": ({"student_hidden": torch.full((n, 4), math.nan)}, "student_hidden"),
    }
    return base, cases


_BASE, _CASES = _bad_cases()


@pytest.mark.parametrize("case", list(_CASES))
def test_bad_input_names_the_argument(case):
    override, name = _CASES[case]
    kwargs = {**_BASE(), **override}
    positional = [kwargs.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(ValueError, match=name):
        fused_linear_kl(*positional, backend=kwargs.pop("backend", "chunked"), **kwargs)


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="student_hidden"):
        fused_linear_kl([[1.0]], torch.randn(3, 1), torch.randn(1, 1), torch.randn(3, 1))


# ------------------------------------------------------------------------------------------------------------------
# Extreme but accepted inputs: finite loss -> finite gradients, or a clear bound naming the argument
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-4, 1e4])
def test_temperatures_at_the_accepted_bounds_are_exact(rng, reference_loss, backend, temperature):
    p = make_problem(rng, dtype=torch.float64)
    loss = run(p, backend, temperature=temperature, reduction="sum")
    want, _ = reference_of(reference_loss, p, temperature=temperature)
    assert_close(loss, want.sum(), rtol=1e-9, atol=1e-12)
    for got, ref in zip(student_grads(p, loss), student_grads(p, want.sum())):
        assert bool(torch.isfinite(got).all())
        # at tau=1e-4 the distributions are one-hot and the true gradient ~0 is a difference of logit/tau-sized
        # terms: float64 rounding of those (|z|/tau ~ 1e4) is the floor
        assert_close(got, ref, rtol=1e-8, atol=1e-10 * max(ref.abs().max().item(), 1.0) / temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [5e-324, 1e-12, 1 - 1e-12])
def test_jsd_beta_next_to_the_endpoints_is_finite_and_exact(rng, reference_loss, backend, beta):
    p = make_problem(rng, dtype=torch.float64)
    loss = run(p, backend, jsd_beta=beta, reduction="sum")
    want, _ = reference_of(reference_loss, p, jsd_beta=beta)
    assert_close(loss, want.sum(), rtol=1e-6, atol=1e-12)
    for got, ref in zip(student_grads(p, loss), student_grads(p, want.sum())):
        assert bool(torch.isfinite(got).all())
        # the interior formula tends to 0 at the endpoints: float64 rounding (~1e-16 of O(1) terms) is the floor
        assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item() + 1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_below_the_limit_give_finite_gradients(rng, backend):
    # logits near 1e6 with a small temperature: the loss is finite and so are the float32 gradients
    p = make_problem(rng, scale=30.0)
    loss = run(p, backend, temperature=1e-3)
    grads = student_grads(p, loss)
    assert math.isfinite(loss.item()) and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("override,name", [
    ({"scale": 1e4}, "student_hidden"),  # logits / temperature ~ 1e9
    ({"scale": 1e2, "temperature": 1e-4}, "temperature"),
    ({"reverse_weight": 1e38}, "reverse_weight"),  # the loss itself would overflow
    ({"reverse_weight": 1e29}, "reverse_weight"),  # a finite loss, but the gradients would overflow
    ({"normalizer": 1e-40}, "normalizer"),
])
def test_inputs_that_would_overflow_are_rejected_naming_the_argument(rng, override, name):
    override = dict(override)
    p = make_problem(rng, scale=override.pop("scale", 1.0))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=name):
            run(p, backend, **override)


def test_non_finite_head_weights_are_rejected_or_propagate_with_check_finite_false(rng):
    p = make_problem(rng)
    with torch.no_grad():
        p["teacher_weight"][4, 2] = math.inf
    with pytest.raises(ValueError, match="teacher_weight has non-finite values"):
        run(p, "chunked")
    assert not math.isfinite(run(p, "chunked", check_finite=False).item())
