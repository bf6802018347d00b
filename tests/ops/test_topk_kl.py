"""fused_linear_topk_kl against a float64 reference that materialises the full logits and the k+1 buckets."""
import pytest
import torch

from gopd_fast.ops.topk_kl import fused_linear_topk_kl


def _reference(hidden, weight, bias, ids, teacher_lp, temperature, floor, rw, fw):
    """Naive float64: full log-softmax, bucket masses by explicit summation over the complement of the top-k."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    log_p = torch.log_softmax(z / temperature, dim=-1)
    in_topk = torch.zeros_like(log_p, dtype=torch.bool).scatter(1, ids, True)
    log_tail = torch.logsumexp(log_p.masked_fill(in_topk, float("-inf")), dim=1)
    log_qs = torch.cat([log_p.gather(1, ids), log_tail[:, None]], dim=1)
    t = teacher_lp.double()
    log_qt = torch.cat([t, (1 - t.exp().sum(1)).clamp_min(floor).log()[:, None]], dim=1)
    rkl = (log_qs.exp() * (log_qs - log_qt)).sum(1)
    fkl = (log_qt.exp() * (log_qt - log_qs)).sum(1)
    return rw.double() * rkl + fw.double() * fkl, rkl, fkl


def _teacher_topk(n, v, k, gen, sharpness=1.0):
    teacher_logits = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2.0 * sharpness
    lp, ids = torch.log_softmax(teacher_logits, -1).topk(k, dim=-1)
    return ids, lp.float()


def _student(n, d, v, gen, dtype=torch.float32, bias=True):
    hidden = torch.randn(n, d, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=gen, dtype=dtype) * 0.2).requires_grad_() if bias else None
    return hidden, weight, b


def _compare(hidden, weight, bias, ids, tlp, *, temperature=1.0, floor=1e-8, chunk_size=64, token_block=16,
             rw=None, fw=None, rtol=1e-4):
    n = hidden.shape[0]
    loss, stats = fused_linear_topk_kl(
        hidden, weight, ids, tlp, reverse_weight=rw, forward_weight=fw, student_bias=bias,
        temperature=temperature, teacher_tail_floor=floor, reduction="sum", return_stats=True,
        chunk_size=chunk_size, token_block=token_block,
    )
    params = [p for p in (hidden, weight, bias) if p is not None]
    grads = torch.autograd.grad(loss, params)
    ref_params = [p.detach().double().requires_grad_() for p in params]
    ref_bias = ref_params[2] if bias is not None else None
    rw_t = torch.ones(n) if rw is None and fw is None else (torch.as_tensor(rw if rw is not None else 0.0)
                                                             .expand(n))
    fw_t = torch.as_tensor(fw if fw is not None else 0.0).expand(n)
    ref_tok, ref_rkl, ref_fkl = _reference(ref_params[0], ref_params[1], ref_bias, ids, tlp, temperature, floor,
                                           rw_t, fw_t)
    ref_grads = torch.autograd.grad(ref_tok.sum(), ref_params)
    torch.testing.assert_close(loss.double(), ref_tok.sum(), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats["reverse_kl"].double(), ref_rkl, rtol=rtol, atol=1e-5)
    torch.testing.assert_close(stats["forward_kl"].double(), ref_fkl, rtol=rtol, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-5)
    return grads


@pytest.mark.parametrize("direction", ["reverse", "forward", "mixed"])
def test_matches_float64_reference(direction):
    gen = torch.Generator().manual_seed(0)
    n, d, v, k = 29, 12, 150, 8
    hidden, weight, bias = _student(n, d, v, gen)
    ids, tlp = _teacher_topk(n, v, k, gen)
    if direction == "reverse":
        rw, fw = 1.0, None
    elif direction == "forward":
        rw, fw = None, 1.0
    else:
        rw, fw = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    # 150 = 2*64 + 22 columns; top-k ids straddle tiles; 29 = 16 + 13 rows
    _compare(hidden, weight, bias, ids, tlp, rw=rw, fw=fw, temperature=0.8)


def test_concentrated_teacher_gradient_is_nonzero_and_exact():
    """Teacher top-k sums to 1 (tail floored); student puts ~all mass on the top-k: no clamp may kill the grad."""
    gen = torch.Generator().manual_seed(1)
    n, d, v, k = 10, 8, 96, 4
    hidden, weight, _ = _student(n, d, v, gen, dtype=torch.float64, bias=False)
    support = torch.randperm(v, generator=gen)[:k]
    ids = support.expand(n, k).contiguous()
    tlp = torch.log_softmax(torch.randn(n, k, generator=gen), dim=-1)  # all of the teacher's mass on the top-k
    bias = torch.full((v,), -15.0, dtype=torch.float64).index_fill_(0, support, 0.0).requires_grad_()
    for fw, rw in [(None, 1.0), (1.0, None)]:  # student tail mass ~3e-5 against a floored teacher tail of 1e-8
        grads = _compare(hidden, weight, bias, ids, tlp, rw=rw, fw=fw, chunk_size=32, rtol=1e-6)
        assert all(g.abs().sum() > 0 for g in grads)
        tail_cols = torch.ones(v, dtype=torch.bool).index_fill_(0, support, False)
        assert grads[2][tail_cols].abs().max() > 0  # the tail mass is still pushed down


def test_concentrated_student_tail_gradient_matches_reference():
    """Student tail mass far below float32 epsilon relative to 1: a 1 - sum(p_topk) estimate would be 0."""
    gen = torch.Generator().manual_seed(2)
    n, d, v, k = 6, 4, 40, 3
    hidden = torch.randn(n, d, generator=gen, dtype=torch.float64)
    ids, tlp = _teacher_topk(n, v, k, gen)
    weight = torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.1
    bias = torch.full((v,), -20.0, dtype=torch.float64)
    bias.scatter_(0, ids[0], 0.0)  # first row's top-k gets almost all of the student's mass ...
    hidden, weight, bias = hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_()
    grads = _compare(hidden, weight, bias, ids, tlp, rw=1.0, chunk_size=16, rtol=1e-6)
    tail_cols = torch.ones(v, dtype=torch.bool).scatter(0, ids[0], False)
    assert grads[2][tail_cols].abs().max() > 0  # ... and the tail columns still get gradient


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(3)
    hidden, weight, bias = _student(3, 2, 9, gen, dtype=torch.float64)
    ids, tlp = _teacher_topk(3, 9, 3, gen)
    fw = torch.tensor([0.3, 1.0, 0.0])
    rw = torch.tensor([1.0, 0.5, 2.0])

    def fn(h, w, b):
        return fused_linear_topk_kl(h, w, ids, tlp.double(), reverse_weight=rw, forward_weight=fw, student_bias=b,
                                    temperature=1.3, reduction="none", chunk_size=5, token_block=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-6)


def test_k_equals_vocab_is_the_full_kl():
    gen = torch.Generator().manual_seed(4)
    n, d, v = 5, 6, 20
    hidden, weight, _ = _student(n, d, v, gen, bias=False)
    teacher_logits = torch.randn(n, v, generator=gen)
    tlp_full = torch.log_softmax(teacher_logits, -1)
    ids = torch.stack([torch.randperm(v, generator=gen) for _ in range(n)])
    loss = fused_linear_topk_kl(hidden, weight, ids, tlp_full.gather(1, ids), reduction="none", chunk_size=7)
    log_ps = torch.log_softmax(hidden.detach().double() @ weight.detach().double().T, -1)
    full_rkl = (log_ps.exp() * (log_ps - tlp_full.double())).sum(-1)
    torch.testing.assert_close(loss.double(), full_rkl, rtol=1e-4, atol=1e-5)


def test_rejects_bad_inputs():
    gen = torch.Generator().manual_seed(5)
    hidden, weight, _ = _student(4, 3, 10, gen, bias=False)
    ids, tlp = _teacher_topk(4, 10, 3, gen)
    with pytest.raises(ValueError, match="distinct"):
        fused_linear_topk_kl(hidden, weight, ids[:, [0, 0, 1]], tlp)
    with pytest.raises(ValueError, match="lie in"):
        fused_linear_topk_kl(hidden, weight, ids + 10, tlp)
    with pytest.raises(ValueError, match="shaped like"):
        fused_linear_topk_kl(hidden, weight, ids, tlp[:, :2])
    with pytest.raises(ValueError, match="log-probabilities"):
        fused_linear_topk_kl(hidden, weight, ids, -tlp)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_topk_kl(hidden, weight, ids, tlp, reduction="batchmean")
    with pytest.raises(ValueError, match="reverse_weight"):
        fused_linear_topk_kl(hidden, weight, ids, tlp, reverse_weight=-1.0)


@pytest.mark.gpu
def test_cuda_matches_float64_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(6)
    hidden, weight, bias = _student(300, 64, 5000, gen)
    ids, tlp = _teacher_topk(300, 5000, 20, gen)
    cuda = [t.detach().cuda().requires_grad_() for t in (hidden, weight, bias)]
    loss = fused_linear_topk_kl(*cuda[:2], ids.cuda(), tlp.cuda(), student_bias=cuda[2], forward_weight=0.5,
                                reverse_weight=1.0, reduction="sum", chunk_size=1024)
    grads = torch.autograd.grad(loss, cuda)
    ref_params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref, _, _ = _reference(*ref_params, ids, tlp, 1.0, 1e-8, torch.ones(300), torch.full((300,), 0.5))
    ref_grads = torch.autograd.grad(ref.sum(), ref_params)
    torch.testing.assert_close(loss.double().cpu(), ref.sum(), rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-3, atol=1e-4)


def test_minus_inf_bias_on_tail_entries_is_exact():
    # student entries masked with a -inf bias (outside the teacher's top-k, one whole tile) have probability 0:
    # the result is the top-k KL of the unmasked vocabulary, and the masked head rows get zero gradient
    gen = torch.Generator().manual_seed(11)
    n, d, v, k = 7, 6, 70, 4
    hidden, weight, bias = _student(n, d, v, gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(16, generator=gen)[:k] for _ in range(n)])  # top-k among the first 16
    tlp = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), -1).gather(1, ids)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[32:48] = True
    masked[[20, 69]] = True
    with torch.no_grad():
        bias[masked] = float("-inf")
    keep = (~masked).nonzero().squeeze(1)
    remap = torch.full((v,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    for rw, fw in ((1.0, 0.0), (0.3, 0.8)):
        loss = fused_linear_topk_kl(hidden, weight, ids, tlp, reverse_weight=rw, forward_weight=fw,
                                    student_bias=bias, reduction="sum", chunk_size=16, token_block=3)
        grads = torch.autograd.grad(loss, [hidden, weight, bias])
        h2, w2, b2 = (t.detach().clone().requires_grad_() for t in (hidden, weight[keep], bias[keep]))
        ref, _, _ = _reference(h2, w2, b2, remap[ids], tlp, 1.0, 1e-8, torch.full((n,), rw), torch.full((n,), fw))
        ref_grads = torch.autograd.grad(ref.sum(), [h2, w2, b2])
        torch.testing.assert_close(loss, ref.sum(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(grads[0], ref_grads[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(grads[1][keep], ref_grads[1], rtol=1e-9, atol=1e-12)
        assert bool((grads[1][masked] == 0).all()) and bool((grads[2][masked] == 0).all())


def test_masked_top_k_entry_makes_the_forward_kl_infinite_with_finite_gradients():
    # the teacher puts mass on an entry the student masks: forward KL = +inf, reverse KL finite, no NaN anywhere
    gen = torch.Generator().manual_seed(12)
    n, d, v, k = 5, 6, 40, 3
    hidden, weight, bias = _student(n, d, v, gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)])
    tlp = torch.log_softmax(torch.randn(n, v, generator=gen, dtype=torch.float64), -1).gather(1, ids)
    with torch.no_grad():
        bias[ids[0, 0]] = float("-inf")
    loss, stats = fused_linear_topk_kl(hidden, weight, ids, tlp, reverse_weight=1.0, forward_weight=1.0,
                                       student_bias=bias, reduction="none", return_stats=True)
    assert stats["forward_kl"][0].item() == float("inf") and bool(torch.isfinite(stats["reverse_kl"]).all())
    assert loss[0].item() == float("inf")
    grads = torch.autograd.grad(loss.sum(), [hidden, weight, bias])
    assert all(bool(torch.isfinite(g).all()) for g in grads)
