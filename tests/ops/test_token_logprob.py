"""fused_linear_logprob against float64 naive math (full logits), including torch.autograd.gradcheck."""
import pytest
import torch

from gopd_fast.ops.token_logprob import fused_linear_logprob


def _reference(hidden, weight, bias, targets, temperature, ignore_index=-100):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    log_p = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != ignore_index
    lp = log_p.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    lp = torch.where(valid, lp, 0.0)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return lp, entropy


def _inputs(n=37, d=16, v=203, with_bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.7).requires_grad_()
    bias = (torch.randn(v, generator=g, dtype=dtype) * 0.3).requires_grad_() if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_float64_reference_values_and_grads(temperature, with_bias):
    hidden, weight, bias, targets = _inputs(with_bias=with_bias)
    targets[3] = -100
    # uneven tiles on both axes: 203 = 3*64 + 11 columns, 37 = 2*16 + 5 rows
    lp, ent = fused_linear_logprob(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True,
        chunk_size=64, token_block=16,
    )
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    ref_lp, ref_ent = _reference(*ref_inputs, targets, temperature)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.double(), ref_ent, rtol=1e-5, atol=1e-5)
    assert lp[3] == 0

    g = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    params = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad((lp * up_lp).sum() + (ent * up_ent).sum(), params)
    ref_params = [t for t in ref_inputs if t is not None]
    ref_grads = torch.autograd.grad(
        (ref_lp * up_lp.double()).sum() + (ref_ent * up_ent.double()).sum(), ref_params
    )
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(n=4, d=3, v=11, dtype=torch.float64)
    targets[0] = -100

    def fn(h, w, b):
        return fused_linear_logprob(
            h, w, targets, bias=b, temperature=0.9, return_entropy=True, chunk_size=5, token_block=3
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_policy_gradient_opd_loss_gradient():
    """verl/tinker style: loss = -mean(adv.detach() * logp), adv = teacher_logp - student_logp."""
    hidden, weight, _, targets = _inputs(with_bias=False, seed=3)
    teacher_lp = -torch.rand(37, generator=torch.Generator().manual_seed(4)) * 5
    lp = fused_linear_logprob(hidden, weight, targets, chunk_size=50)
    loss = -((teacher_lp - lp).detach() * lp).mean()
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref_lp, _ = _reference(h64, w64, None, targets, 1.0)
    (-((teacher_lp.double() - ref_lp).detach() * ref_lp).mean()).backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_bf16_inputs_accumulate_in_float32():
    hidden, weight, _, targets = _inputs(with_bias=False, dtype=torch.bfloat16)
    lp = fused_linear_logprob(hidden, weight, targets, chunk_size=64)
    assert lp.dtype == torch.float32
    ref_lp, _ = _reference(hidden.detach(), weight.detach(), None, targets, 1.0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-4)
    lp.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_rejects_bad_inputs():
    hidden, weight, _, targets = _inputs(with_bias=False)
    with pytest.raises(ValueError, match="weight"):
        fused_linear_logprob(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="target_ids"):
        fused_linear_logprob(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="target_ids must lie"):
        fused_linear_logprob(hidden, weight, torch.full_like(targets, 10_000))
    with pytest.raises(TypeError, match="int64"):
        fused_linear_logprob(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(hidden, weight, targets, temperature=0.0)


@pytest.mark.gpu
def test_cuda_matches_float64_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hidden, weight, bias, targets = _inputs(n=300, d=64, v=5000)
    cuda = [t.detach().cuda().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = fused_linear_logprob(cuda[0], cuda[1], targets.cuda(), bias=cuda[2], return_entropy=True,
                                   chunk_size=1024)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), cuda)
    ref_params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref_lp, ref_ent = _reference(*ref_params, targets, 1.0)
    ref_grads = torch.autograd.grad(ref_lp.sum() + ref_ent.sum(), ref_params)
    torch.testing.assert_close(lp.double().cpu(), ref_lp, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("chunk_size", [16, 4096])
def test_minus_inf_bias_masks_entries_exactly(chunk_size):
    # masked entries (including a whole vocabulary tile) have probability 0: the log-probs and the entropy are those
    # of the unmasked vocabulary, and the masked rows of the head get exactly zero gradient (no NaN)
    hidden, weight, bias, targets = _inputs(n=9, v=61, dtype=torch.float64, seed=3)
    masked = torch.zeros(61, dtype=torch.bool)
    masked[[0, 5, 60]] = True
    masked[16:32] = True
    with torch.no_grad():
        bias[masked] = float("-inf")
    keep = (~masked).nonzero().squeeze(1)
    targets = keep[torch.randint(0, keep.numel(), (9,), generator=torch.Generator().manual_seed(1))]
    lp, ent = fused_linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=chunk_size)
    grads = torch.autograd.grad((lp + 0.3 * ent).sum(), [hidden, weight, bias])
    h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, weight[keep], bias[keep]))
    remap = torch.full((61,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    ref_lp, ref_ent = _reference(h2, w2, b2, remap[targets], 1.0)
    ref_grads = torch.autograd.grad((ref_lp + 0.3 * ref_ent).sum(), [h2, w2, b2])
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1][keep], ref_grads[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[2][keep], ref_grads[2], rtol=1e-10, atol=1e-12)
    assert bool((grads[1][masked] == 0).all()) and bool((grads[2][masked] == 0).all())


def test_masked_target_has_log_prob_minus_inf_and_finite_gradients():
    hidden, weight, bias, targets = _inputs(n=4, v=29, dtype=torch.float64, seed=4)
    with torch.no_grad():
        bias[7] = float("-inf")
    targets[0] = 7
    lp = fused_linear_logprob(hidden, weight, targets, bias=bias)
    assert lp[0].item() == float("-inf") and bool(torch.isfinite(lp[1:]).all())
    grads = torch.autograd.grad(lp.sum(), [hidden, weight, bias])  # d log p(x) / dz = onehot(x) - p: finite
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert grads[2][7].item() == 1.0  # the masked target's bias: 1 from the one-hot, p = 0 everywhere
