"""gopd_fast.compat.LigerFusedLinearJSDLoss against Liger-Kernel's own class (its chunked_loss path, on CPU)."""
import pytest
import torch

liger = pytest.importorskip("liger_kernel.chunked_loss")

from gopd_fast.compat import LigerFusedLinearJSDLoss


def _inputs(seed, n=24, ds=16, dt=20, v=97, vt=None, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    vt = v if vt is None else vt
    x_s = torch.randn(n, ds, generator=g, dtype=dtype)
    w_s = torch.randn(v, ds, generator=g, dtype=dtype) * 0.4
    x_t = torch.randn(n, dt, generator=g, dtype=dtype)
    w_t = torch.randn(vt, dt, generator=g, dtype=dtype) * 0.4
    b_s = torch.randn(v, generator=g, dtype=dtype) * 0.3 if bias else None
    b_t = torch.randn(vt, generator=g, dtype=dtype) * 0.3 if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.25] = -100
    return x_s, w_s, x_t, w_t, labels, b_s, b_t


def _run(loss_fn, x_s, w_s, x_t, w_t, labels, b_s, b_t):
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x_s, w_s, b_s)]
    out = loss_fn(leaves[0], leaves[1], x_t, w_t, labels, leaves[2], b_t)
    total = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(total, [t for t in leaves if t is not None])
    return out, grads


CASES = [
    # beta, temperature, weight_hard, weight_soft, bias, return_soft_hard
    (0.5, 1.0, 0.5, 0.5, True, False),
    (0.0, 1.0, 0.0, 1.0, False, False),  # forward-KL endpoint
    (1.0, 2.0, 0.3, 0.7, True, True),  # reverse-KL endpoint, temperature, both parts returned
    (0.3, 0.7, 0.2, 1.0, True, True),  # asymmetric beta: catches a swapped convention
    (0.8, 1.5, 1.0, 0.0, False, False),  # hard loss only
]


@pytest.mark.parametrize("beta,temperature,w_hard,w_soft,bias,split", CASES)
def test_same_loss_and_grads_as_liger(beta, temperature, w_hard, w_soft, bias, split):
    args = {"weight_hard_loss": w_hard, "weight_soft_loss": w_soft, "beta": beta, "temperature": temperature,
                "return_soft_hard_loss": split}
    ref_fn = liger.LigerFusedLinearJSDLoss(compiled=False, chunk_size=8, **args)
    ours_fn = LigerFusedLinearJSDLoss(**args)
    inputs = _inputs(seed=int(beta * 10 + temperature * 100), bias=bias)
    ref_out, ref_grads = _run(ref_fn, *inputs)
    out, grads = _run(ours_fn, *inputs)
    ref_out = ref_out if isinstance(ref_out, tuple) else (ref_out,)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(ref_out)
    for got, want in zip(out, ref_out):
        torch.testing.assert_close(got.detach(), want.detach().to(got.dtype), rtol=2e-5, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-6)


def test_padded_teacher_vocab_and_custom_ignore_index():
    x_s, w_s, x_t, w_t, labels, b_s, b_t = _inputs(seed=7, v=90, vt=96)
    labels[labels == -100] = 3  # custom ignore_index: positions labelled 3 are masked instead
    args = {"beta": 0.4, "ignore_index": 3, "temperature": 1.3}
    ref_out, ref_grads = _run(liger.LigerFusedLinearJSDLoss(compiled=False, **args), x_s, w_s, x_t, w_t, labels,
                              b_s, b_t)
    out, grads = _run(LigerFusedLinearJSDLoss(**args), x_s, w_s, x_t, w_t, labels, b_s, b_t)
    torch.testing.assert_close(out.detach(), ref_out.detach(), rtol=2e-5, atol=2e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-6)


def test_all_labels_ignored_gives_zero_like_liger():
    x_s, w_s, x_t, w_t, labels, b_s, b_t = _inputs(seed=8)
    labels[:] = -100
    out, grads = _run(LigerFusedLinearJSDLoss(), x_s, w_s, x_t, w_t, labels, b_s, b_t)
    ref_out, _ = _run(liger.LigerFusedLinearJSDLoss(compiled=False), x_s, w_s, x_t, w_t, labels, b_s, b_t)
    assert out.item() == 0.0 == ref_out.item()
    assert all(g.abs().sum() == 0 for g in grads)


def test_same_constructor_signature_as_liger():
    import inspect

    ref = inspect.signature(liger.LigerFusedLinearJSDLoss.__init__).parameters
    ours = inspect.signature(LigerFusedLinearJSDLoss.__init__).parameters
    assert list(ours)[: len(ref)] == list(ref)
    assert all(ours[k].default == ref[k].default for k in ref if k != "self")
    ref_call = inspect.signature(liger.LigerFusedLinearJSDLoss.forward).parameters
    assert list(inspect.signature(LigerFusedLinearJSDLoss.forward).parameters) == list(ref_call)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        LigerFusedLinearJSDLoss(temperature=0)
    with pytest.raises(ValueError, match="beta"):
        LigerFusedLinearJSDLoss(beta=1.5)
    x_s, w_s, x_t, w_t, labels, _b_s, _b_t = _inputs(seed=9, v=90, vt=80, bias=False)
    with pytest.raises(ValueError, match="teacher_weight"):
        LigerFusedLinearJSDLoss()(x_s, w_s, x_t, w_t, labels)


@pytest.mark.gpu
def test_cuda_triton_backend_matches_liger():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (the Triton backend of fused_linear_kl)")
    inputs = [t.cuda() if t is not None else None for t in _inputs(seed=11)]
    args = {"beta": 0.3, "temperature": 1.2, "weight_hard_loss": 0.4, "weight_soft_loss": 0.6}
    ref_out, ref_grads = _run(liger.LigerFusedLinearJSDLoss(compiled=False, **args), *inputs)
    out, grads = _run(LigerFusedLinearJSDLoss(backend="triton", **args), *inputs)
    torch.testing.assert_close(out.detach(), ref_out.detach(), rtol=1e-4, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("position,value,error,name", [
    (0, [[1.0]], TypeError, "student_input"),
    (0, torch.randn(24), ValueError, "student_input"),
    (1, torch.randn(97), ValueError, "student_weight"),
    (2, torch.randn(23, 20), ValueError, "teacher_input"),  # one token short: fused_linear_kl's check, renamed
    (4, torch.zeros(24), TypeError, "true_labels"),
    (4, torch.full((24,), 97), ValueError, "true_labels"),  # out of the vocabulary and not ignore_index
    (5, [0.0] * 97, TypeError, "student_bias"),
    (6, torch.randn(96), ValueError, "teacher_bias"),
])
def test_bad_tensors_name_liger_s_argument(position, value, error, name):
    args = list(_inputs(seed=12))
    args[position] = value
    with pytest.raises(error, match=name):
        LigerFusedLinearJSDLoss()(*args)
