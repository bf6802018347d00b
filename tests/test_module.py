"""gopd_fast.FusedLinearKL over plain, PEFT-LoRA and FSDP2-sharded lm_heads."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gopd_fast import FusedLinearKL, fused_linear_kl

pytestmark = pytest.mark.usefixtures("single_thread")

D_S, D_T, V, N = 12, 10, 37, 15


def _heads(rng, bias=True, dtype=torch.float64):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    return nn.Linear(D_S, V, bias=bias, dtype=dtype), nn.Linear(D_T, V, bias=bias, dtype=dtype)


def _hidden(rng, dtype=torch.float64):
    return (torch.randn(N, D_S, generator=rng, dtype=dtype).requires_grad_(),
            torch.randn(N, D_T, generator=rng, dtype=dtype))


def _reference_from_logits(logits_s, logits_t, temperature=1.0):
    """Reverse KL per token from logits produced by the heads' own forward (float64)."""
    logp_s = torch.log_softmax(logits_s.double() / temperature, -1)
    logp_t = torch.log_softmax(logits_t.double() / temperature, -1)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def test_plain_heads_match_the_function_and_defaults_are_overridable(rng):
    student, teacher = _heads(rng)
    h_s, h_t = _hidden(rng)
    loss_fn = FusedLinearKL(student, teacher, temperature=2.0, reduction="sum")
    got = loss_fn(h_s, h_t)
    want = fused_linear_kl(h_s, student.weight, h_t, teacher.weight, student_bias=student.bias,
                           teacher_bias=teacher.bias, temperature=2.0, reduction="sum")
    torch.testing.assert_close(got, want)
    per_token = loss_fn(h_s, h_t, reduction="none")  # per-call override
    torch.testing.assert_close(per_token, _reference_from_logits(student(h_s), teacher(h_t), temperature=2.0))
    got.backward()
    assert student.weight.grad is not None and student.bias.grad is not None
    assert teacher.weight.grad is None and teacher.bias.grad is None
    assert "temperature=2.0" in repr(loss_fn)


def test_weights_cannot_be_passed_twice(rng):
    student, teacher = _heads(rng)
    with pytest.raises(TypeError, match="student_weight"):
        FusedLinearKL(student, teacher, student_weight=student.weight)
    with pytest.raises(TypeError, match="teacher_bias"):
        FusedLinearKL(student, teacher)(*_hidden(rng), teacher_bias=teacher.bias)


def test_master_weights_are_cast_to_the_activation_dtype(rng):
    student, teacher = _heads(rng, dtype=torch.float32)
    h_s, h_t = (h.detach().to(torch.bfloat16).requires_grad_() for h in _hidden(rng))
    loss = FusedLinearKL(student, teacher)(h_s, h_t)
    loss.backward()
    assert student.weight.grad.dtype == torch.float32 and torch.isfinite(student.weight.grad).all()


@pytest.mark.parametrize("defaults,error,name", [
    ({"temperature": "2"}, TypeError, "temperature"),
    ({"temperature": True}, TypeError, "temperature"),
    ({"jsd_beta": 1.5}, ValueError, "jsd_beta"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"backend": "fast"}, ValueError, "backend"),
    ({"truncate_teacher_vocab": "yes"}, TypeError, "truncate_teacher_vocab"),
    ({"tempurature": 2.0}, TypeError, "tempurature"),  # a typo is not silently ignored until the first call
])
def test_bad_defaults_fail_at_construction(rng, defaults, error, name):
    with pytest.raises(error, match=name):
        FusedLinearKL(*_heads(rng), **defaults)


def test_heads_with_minus_inf_bias_and_autocast(rng):
    # padded vocabulary: the last rows of both heads are masked; under bf16 autocast, float32 heads
    student, teacher = _heads(rng, dtype=torch.float32)
    with torch.no_grad():
        student.bias[-3:] = float("-inf")
        teacher.bias[-3:] = float("-inf")
    h_s, h_t = (h.detach().float().requires_grad_() for h in _hidden(rng))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = FusedLinearKL(student, teacher, backend="chunked")(h_s, h_t)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert student.weight.grad.dtype == torch.float32 and bool(torch.isfinite(student.weight.grad).all())
    assert bool((student.weight.grad[-3:] == 0).all())


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_peft_lora_head_includes_the_delta_and_trains_the_adapters(rng, dropout):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(D_S, V, bias=True, dtype=torch.float64)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules=["lm_head"]))
    head = model.base_model.model.lm_head
    with torch.no_grad():  # LoRA starts with B = 0; make the delta matter
        for p in head.lora_B.parameters():
            p.normal_(0, 0.5)
        for p in head.lora_A.parameters():
            p.data = p.data.double()
        for p in head.lora_B.parameters():
            p.data = p.data.double()
    model.train()
    _, teacher = _heads(rng)
    h_s, h_t = _hidden(rng)
    lora_params = [p for n, p in head.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    assert not head.base_layer.weight.requires_grad  # PEFT freezes the base weight

    torch.manual_seed(7)  # identical dropout masks in both computations
    loss = FusedLinearKL(head, teacher)(h_s, h_t, reduction="sum")
    got = torch.autograd.grad(loss, [h_s, *lora_params])
    torch.manual_seed(7)
    want_loss = _reference_from_logits(head(h_s), teacher(h_t)).sum()
    want = torch.autograd.grad(want_loss, [h_s, *lora_params])
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert any(g.abs().sum() > 0 for g in got[1:])


_FSDP_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from gopd_fast import FusedLinearKL

    rank, world, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.manual_seed(0)
    student, teacher = nn.Linear(8, 29, bias=False), nn.Linear(6, 29, bias=False)
    full_weight = student.weight.detach().clone()
    fully_shard(student, mesh=init_device_mesh("cpu", (world,)))
    assert isinstance(student.weight, DTensor)

    def data(r):  # every rank has different tokens
        g = torch.Generator().manual_seed(100 + r)
        return torch.randn(5, 8, generator=g), torch.randn(5, 6, generator=g)

    h_s, h_t = data(rank)
    FusedLinearKL(student, teacher, reduction="sum")(h_s, h_t).backward()
    grad = student.weight.grad
    assert isinstance(grad, DTensor), type(grad)
    # FSDP2 semantics: the mean over ranks of each rank's full-weight gradient
    expected = torch.zeros_like(full_weight)
    for r in range(world):
        w = full_weight.clone().requires_grad_()
        hs, ht = data(r)
        logp_s = torch.log_softmax(hs @ w.T, -1)
        logp_t = torch.log_softmax(ht @ teacher.weight.detach().T, -1)
        (logp_s.exp() * (logp_s - logp_t)).sum().backward()
        expected += w.grad / world
    torch.testing.assert_close(grad.full_tensor(), expected, rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()
    print("rank", rank, "ok")
    """
)


def test_fsdp2_sharded_student_head(tmp_path):
    """Two gloo processes shard the student head with fully_shard; the gradient is a DTensor equal to FSDP2's."""
    script = tmp_path / "worker.py"
    script.write_text(_FSDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), "2", store], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
        outputs.append(out)
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, out[-3000:]
