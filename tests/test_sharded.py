"""ZeRO-3-style row-partitioned heads (gloo, 2 processes), DeepSpeed placeholders, and PEFT heads in the TRL path."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gopd_fast.sharded import check_materialized, zero3_gathered

_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from gopd_fast import fused_linear_kl, fused_linear_logprob, fused_linear_topk_kl
    from gopd_fast.sharded import gather_rows

    rank, world, store = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    torch.manual_seed(0)
    vocab, d_s, d_t = 29, 8, 6
    full_w = torch.randn(vocab, d_s, dtype=torch.float64)
    teacher_w = torch.randn(vocab, d_t, dtype=torch.float64)
    rows = [15, 14]  # uneven partition, as ZeRO-3 leaves it when V is not divisible by the world size
    start = sum(rows[:rank])
    local = full_w[start:start + rows[rank]].clone().requires_grad_()

    def data(r):  # every rank has different tokens
        g = torch.Generator().manual_seed(100 + r)
        h_s, h_t = torch.randn(5, d_s, generator=g, dtype=torch.float64), torch.randn(5, d_t, generator=g, dtype=torch.float64)
        targets = torch.randint(0, vocab, (5,), generator=g)
        t_lp, t_ids = torch.log_softmax(h_t @ teacher_w.T, -1).topk(4, dim=-1)
        return h_s, h_t, targets, t_ids, t_lp

    def losses(w, h_s, h_t, targets, t_ids, t_lp):
        return (fused_linear_kl(h_s, w, h_t, teacher_w, forward_weight=1.0, reduction="sum")
                + fused_linear_logprob(h_s, w, targets).sum()
                + fused_linear_topk_kl(h_s, w, t_ids, t_lp, reduction="sum"))

    weight = gather_rows(local)
    assert weight.shape == full_w.shape and torch.equal(weight.detach(), full_w)
    losses(weight, *data(rank)).backward()

    expected = torch.zeros_like(full_w)  # the gradient a replicated head would get, summed over ranks
    for r in range(world):
        w = full_w.clone().requires_grad_()
        h_s, h_t, targets, t_ids, t_lp = data(r)
        z_s = torch.log_softmax(h_s @ w.T, -1)
        z_t = torch.log_softmax(h_t @ teacher_w.T, -1)
        tail = torch.logsumexp(z_s.scatter(1, t_ids, float("-inf")), -1, keepdim=True)
        q_s = torch.cat([z_s.gather(1, t_ids), tail], 1)
        q_t = torch.cat([t_lp, (1 - t_lp.exp().sum(1, keepdim=True)).clamp_min(1e-8).log()], 1)
        total = ((z_t.exp() * (z_t - z_s)).sum() + z_s.gather(1, targets[:, None]).sum()
                 + (q_s.exp() * (q_s - q_t)).sum())
        total.backward()
        expected += w.grad
    torch.testing.assert_close(local.grad, expected[start:start + rows[rank]], rtol=1e-9, atol=1e-10)
    dist.destroy_process_group()
    print("rank", rank, "ok")
    """
)


def test_row_partitioned_head_gathers_and_reduces_gradients(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
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


def test_zero3_placeholder_is_refused_with_the_fix():
    placeholder = torch.nn.Parameter(torch.empty(0))
    placeholder.ds_shape = torch.Size([512, 64])  # what DeepSpeed ZeRO-3 leaves outside a gather
    with pytest.raises(ValueError, match="zero3_gathered"):
        check_materialized(placeholder, "lm_head.weight")
    weight = torch.nn.Parameter(torch.randn(4, 3))
    assert check_materialized(weight) is weight


def test_zero3_gathered_is_a_no_op_for_ordinary_parameters():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    with zero3_gathered(weight, None):
        assert weight.shape == (4, 3)


def test_peft_lora_lm_head_in_the_trl_loss():
    """fused_gkd_loss on a PEFT model whose lm_head carries LoRA equals TRL's loss on the PEFT model's logits."""
    peft = pytest.importorskip("peft")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    from gopd_fast.compat.trl import backbone_hidden_states, fused_gkd_loss, output_head
    from gopd_fast.models import build_model, tiny_qwen3_config

    student = build_model(tiny_qwen3_config("student-tiny", 300), seed=0)
    teacher = build_model(tiny_qwen3_config("teacher-tiny", 300), seed=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    model = peft.get_peft_model(student, config)
    for name, p in model.named_parameters():  # LoRA B starts at 0; make the delta nonzero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    assert type(output_head(model)).__name__ == "Linear" and hasattr(output_head(model), "lora_A")
    input_ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        t_out = teacher(input_ids=input_ids)
    ref = GKDTrainer.generalized_jsd_loss(model(input_ids=input_ids).logits[:, :-1], t_out.logits[:, :-1],
                                          labels=labels[:, 1:], beta=0.5)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    h_s = backbone_hidden_states(model, input_ids=input_ids)
    h_t = backbone_hidden_states(teacher, input_ids=input_ids).detach()
    ours = fused_gkd_loss(h_s[:, :-1], h_t[:, :-1], output_head(model), output_head(teacher), labels[:, 1:],
                          beta=0.5)
    grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    assert len(grads) == len(ref_grads) > 2
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * want.abs().max().item() + 1e-8)
