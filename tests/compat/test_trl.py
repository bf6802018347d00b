"""TRL plug-in on tiny Qwen3 models (CPU): same loss and gradients as TRL's own loss, lower peak memory.

Peak memory is measured with torch.profiler's allocator events (``profile_memory=True``): tracemalloc does not
see torch's CPU allocations, and process RSS is too coarse for models this small. The events of one
loss+backward call are replayed in time order and the largest running total of live bytes is the peak.
"""
import copy
import os
import types

import pytest
import torch

from gopd_fast.memory import peak_cpu_bytes

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import DistillationConfig, DistillationTrainer
from trl.experimental.gkd import GKDConfig, GKDTrainer

from gopd_fast import models
from gopd_fast.compat.trl import FusedDistillationTrainer, FusedGKDTrainer, fused_gkd_loss

VOCAB = 512
CORPUS = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gopd_trl"))
    tok = models.train_tokenizer(CORPUS, vocab_size=VOCAB)
    ids = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    # hidden 64, head_dim 32, 2 layers (student-tiny); the teacher is wider; both with a 512-row lm_head
    student = models.build_model(models.tiny_qwen3_config("student-tiny", VOCAB, **ids), seed=0)
    teacher = models.build_model(models.tiny_qwen3_config("teacher-tiny", VOCAB, **ids), seed=1)
    with torch.no_grad():  # make the teacher's distributions far from the student's, so the loss is not ~0
        teacher.lm_head.weight.mul_(8.0)
    rows = [{"messages": [{"role": "user", "content": f"fox {i} and dog"},
                          {"role": "assistant", "content": f"the lazy dog {i} jumps over {i * 3}"}]} for i in range(4)]
    return {"tok": tok, "student": student, "teacher": teacher, "rows": rows, "out": out}


@pytest.fixture(scope="module")
def gkd(tiny):
    args = GKDConfig(output_dir=tiny["out"], per_device_train_batch_size=2, per_device_eval_batch_size=2,
                     max_length=64, report_to="none", beta=0.3, lmbda=0.0, use_cpu=True, max_steps=1,
                     save_strategy="no")
    rows = datasets.Dataset.from_list(tiny["rows"])
    return FusedGKDTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args,
                           processing_class=tiny["tok"], train_dataset=rows, eval_dataset=rows)


def _loss_and_grads(fn, model):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 37])
def test_gkd_loss_and_grads_match_trl(gkd, tiny, num_items):
    """Against TRL's GKDTrainer.compute_loss (full logits + generalized_jsd_loss), in float32 and float64.

    TRL's own float32 gradients are off by up to ~1% of their magnitude (the JSD is a difference of large
    per-vocabulary terms); the fused loss agrees with TRL run in float64 to ~1e-6, so float64 is the tight check.
    """
    batch = gkd.data_collator(tiny["rows"][:3])
    model = gkd.model
    ours, grads = _loss_and_grads(lambda: gkd.compute_loss(model, batch, num_items_in_batch=num_items), model)
    ref, ref_grads = _loss_and_grads(lambda: GKDTrainer.compute_loss(gkd, model, batch, num_items_in_batch=num_items),
                                     model)
    assert ref.item() > 1e-2  # a real divergence, not two near-identical random models
    # TRL's float32 loss is itself ~1.5e-4 off here (it differs from TRL in float64); float64 below is the tight check
    torch.testing.assert_close(ours, ref, rtol=5e-4, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=0, atol=2e-2 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")

    student64, teacher64 = copy.deepcopy(model).double(), copy.deepcopy(gkd.teacher_model).double()
    trl_self = types.SimpleNamespace(teacher_model=teacher64, beta=gkd.beta,
                                     generalized_jsd_loss=GKDTrainer.generalized_jsd_loss)
    ref64, ref64_grads = _loss_and_grads(
        lambda: GKDTrainer.compute_loss(trl_self, student64, batch, num_items_in_batch=num_items), student64)
    torch.testing.assert_close(ours.double(), ref64, rtol=1e-5, atol=1e-7)
    for name, want in ref64_grads.items():
        torch.testing.assert_close(grads[name].double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_gkd_peak_memory_is_lower_than_trl(gkd, tiny):
    batch = gkd.data_collator(tiny["rows"])
    model = gkd.model

    def run(fn):
        model.zero_grad(set_to_none=True)
        fn().backward()

    run(lambda: gkd.compute_loss(model, batch))  # warm-up both paths (lazy inits are not part of the peak)
    run(lambda: GKDTrainer.compute_loss(gkd, model, batch))
    trl_peak = peak_cpu_bytes(lambda: run(lambda: GKDTrainer.compute_loss(gkd, model, batch)))
    ours_peak = peak_cpu_bytes(lambda: run(lambda: gkd.compute_loss(model, batch)))
    logits_bytes = batch["input_ids"].numel() * VOCAB * 4
    print(f"peak CPU bytes: TRL {trl_peak}, fused {ours_peak}, one [B, L, V] fp32 logits tensor {logits_bytes}")
    # TRL holds both models' logits, their log-softmaxes, the mixture and the KL terms: several [B, L, V] buffers
    assert ours_peak < trl_peak - 2 * logits_bytes


def test_gkd_trainer_trains_one_step_and_evaluates(gkd):
    before = gkd.model.lm_head.weight.detach().clone()
    result = gkd.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, gkd.model.lm_head.weight.detach())
    metrics = gkd.evaluate()  # Trainer.prediction_step asks compute_loss for outputs: there are no logits
    assert metrics["eval_loss"] > 0 and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_distillation_trainer_matches_trl(tiny):
    args = DistillationConfig(output_dir=tiny["out"], per_device_train_batch_size=2, report_to="none", beta=0.6,
                              temperature=1.3, use_cpu=True, max_steps=1, save_strategy="no",
                              max_completion_length=8)
    prompts = datasets.Dataset.from_list([{"prompt": r["messages"][:1]} for r in tiny["rows"]])
    trainer = FusedDistillationTrainer(model=tiny["student"], teacher_model=tiny["teacher"], args=args,
                                       processing_class=tiny["tok"], train_dataset=prompts)
    g = torch.Generator().manual_seed(0)
    inputs = {
        "prompt_ids": torch.randint(0, VOCAB, (2, 6), generator=g),
        "prompt_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
        "completion_ids": torch.randint(0, VOCAB, (2, 5), generator=g),
        "completion_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    model = trainer.model
    outs = {}
    for name, fn in (("trl", lambda: DistillationTrainer._compute_loss(trainer, model, inputs, None)),
                     ("ours", lambda: trainer._compute_loss(model, inputs, None))):
        model.zero_grad(set_to_none=True)
        loss, entropy_sum, n_valid = fn()
        loss.backward()
        outs[name] = (loss.detach(), entropy_sum, n_valid, model.lm_head.weight.grad.clone())
    for got, want in zip(outs["ours"], outs["trl"]):
        torch.testing.assert_close(got.to(want.dtype), want, rtol=2e-4, atol=1e-6)


def test_fused_gkd_loss_matches_generalized_jsd_loss_on_random_hidden_states():
    g = torch.Generator().manual_seed(1)
    student_head, teacher_head = torch.nn.Linear(16, 300, bias=False), torch.nn.Linear(24, 300)
    h_s, h_t = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    labels = torch.randint(0, 300, (2, 7), generator=g)
    labels[0, :3] = -100
    for beta in (0.0, 0.25, 1.0):
        ref = GKDTrainer.generalized_jsd_loss(student_head(h_s), teacher_head(h_t), labels=labels, beta=beta,
                                              temperature=0.8)
        ours = fused_gkd_loss(h_s, h_t, student_head, teacher_head, labels, beta=beta, temperature=0.8)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("num_items", [None, 9])
def test_fused_gkd_loss_without_labels_matches_trl(beta, num_items):
    # TRL: no labels -> every position counts and "batchmean" divides by the batch size (dim 0), not the tokens
    g = torch.Generator().manual_seed(2)
    student_head, teacher_head = torch.nn.Linear(16, 300), torch.nn.Linear(24, 300, bias=False)
    h_s = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    h_t = torch.randn(3, 5, 24, generator=g)
    ref = GKDTrainer.generalized_jsd_loss(student_head(h_s), teacher_head(h_t), beta=beta, temperature=1.3,
                                          num_items_in_batch=num_items)
    ours = fused_gkd_loss(h_s, h_t, student_head, teacher_head, beta=beta, temperature=1.3,
                          num_items_in_batch=num_items, backend="chunked")
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    ref_grads = torch.autograd.grad(ref, [h_s, student_head.weight])
    for got, want in zip(torch.autograd.grad(ours, [h_s, student_head.weight]), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_gkd_trainer_loss_under_bf16_autocast(gkd, tiny):
    # what Trainer(bf16=True) does: the loss runs under torch.autocast; no dtype error, float32 loss, and close to
    # the float32 loss (bf16 backbones move it by ~1e-2)
    batch = gkd.data_collator(tiny["rows"][:2])
    plain = gkd.compute_loss(gkd.model, batch).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gkd.compute_loss(gkd.model, batch)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.detach(), plain, rtol=5e-2, atol=1e-3)
    gkd.model.zero_grad(set_to_none=True)
    loss.backward()
    grad = gkd.model.lm_head.weight.grad
    assert grad.dtype == torch.float32 and bool(torch.isfinite(grad).all()) and grad.abs().sum() > 0
    gkd.model.zero_grad(set_to_none=True)


class _CountingWrapper(torch.nn.Module):
    """Stands in for DDP / FSDP / DeepSpeed wrappers: the loss must run through its forward (where their hooks are)."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_gkd_wrapped_models_go_through_the_wrapper_forward(gkd, tiny, monkeypatch):
    batch = gkd.data_collator(tiny["rows"][:2])
    plain = gkd.compute_loss(gkd.model, batch).detach()
    student, teacher = _CountingWrapper(gkd.model), _CountingWrapper(gkd.teacher_model)
    monkeypatch.setattr(gkd.accelerator, "unwrap_model", lambda m, **kw: m.module if isinstance(m, _CountingWrapper)
                        else m)
    monkeypatch.setattr(gkd, "teacher_model", teacher)
    wrapped = gkd.compute_loss(student, batch)
    assert student.calls == 1 and teacher.calls == 1
    torch.testing.assert_close(wrapped.detach(), plain)
    wrapped.backward()
    assert gkd.model.lm_head.weight.grad is not None
