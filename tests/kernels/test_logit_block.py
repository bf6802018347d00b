"""kernels/logit_block.py and kernels/schedule.py: the schedule that computes every logit once, and the choice."""
from __future__ import annotations

import pytest
import torch
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
from gopd_fast.kernels.schedule import CHOICES, choose_schedule

from gopd_fast.kernels import backward, forward, logit_block, tiling
from gopd_fast.ops.problem import build_problem

GRAD_TOL = {torch.float32: 2e-5, torch.float16: 3e-3}
N, V, DS, DT = 37, 203, 48, 40  # conftest.make_problem's odd default shape


def run(p, *, schedule, jsd_beta=None, temperature=0.8, upstream=None, grad_scale=None, retain=False):
    """Loss, stats and gradients of (loss * upstream).sum() (or of the grad_scale'd scalar)."""
    hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()
    bs = p["bs"].clone().requires_grad_() if p["bs"] is not None else None
    loss, stats = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"], forward_weight=p["fw"],
        jsd_beta=jsd_beta, temperature=temperature, target_ids=p["targets"], grad_scale=grad_scale,
        return_stats=True), schedule=schedule)
    total = loss if grad_scale is not None else (loss * upstream).sum()
    total.backward(retain_graph=retain)
    if retain:
        total.backward()
    return loss.detach(), stats, hs.grad, ws.grad, None if bs is None else bs.grad


def reference_grads(ref, p, *, jsd_beta=None, temperature=0.8, upstream):
    hs, ws = p["hs"].double().requires_grad_(), p["ws"].double().requires_grad_()
    bs = p["bs"].double().requires_grad_() if p["bs"] is not None else None
    loss, stats = ref(hs, ws, p["ht"], p["wt"], bs, p["bt"], p["rw"], p["fw"], jsd_beta=jsd_beta,
                      temperature=temperature, target_ids=p["targets"])
    (loss * upstream.double()).sum().backward()
    return loss.detach(), stats, hs.grad, ws.grad, None if bs is None else bs.grad


def assert_matches(got, want, dtype, rel_err):
    assert rel_err(got[0], want[0]) < 1e-5
    for name, value in want[1].items():
        assert (got[1][name].double() - value).abs().max() < 1e-5, name
    for name, g, w in zip(("hidden", "weight", "bias"), got[2:], want[2:]):
        if w is None:
            assert g is None
            continue
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w) < GRAD_TOL[dtype], name


def forbid_recompute(monkeypatch):
    """Fail on any launch of the kernels that recompute logits (the forward's and the backward's)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("a logit tile was recomputed")

    class Refused:
        def __getitem__(self, _grid):
            return refuse

    for module, name in ((forward, "_kl_forward"), (forward, "_jsd"), (backward, "_grad_logits"),
                         (backward, "_backward_atomic")):
        monkeypatch.setattr(module, name, Refused())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("jsd_beta,temperature", [(None, 0.8), (0.3, 1.3)], ids=["kl", "jsd"])
@pytest.mark.parametrize("budget", ["one_block", "many_blocks"])
def test_matches_float64_computing_each_logit_once(problem, ref, rel_err, monkeypatch, dtype, jsd_beta,
                                                   temperature, budget):
    """grad_output = 2.5 on every token (the grad_scale path): the stored gradients are only scaled, and no kernel
    that recomputes logits runs. many_blocks: 16-token blocks, so grad_W and grad_b are summed over 3 blocks."""
    if budget == "many_blocks":
        monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 16 * logit_block.bytes_per_row(V, dtype.itemsize))
    assert logit_block.block_rows(N, V, dtype.itemsize) == (N if budget == "one_block" else 16)
    p = problem(dtype=dtype)
    forbid_recompute(monkeypatch)
    got = run(p, schedule="logit_block", jsd_beta=jsd_beta, temperature=temperature, grad_scale=2.5)
    want = reference_grads(ref, p, jsd_beta=jsd_beta, temperature=temperature,
                           upstream=torch.full((N,), 2.5, device=p["hs"].device))
    assert got[1]["schedule"] == "logit_block"
    assert rel_err(got[0], want[0].sum() * 2.5) < 1e-5  # grad_scale returns the scaled sum
    assert_matches((want[0], *got[1:]), want, dtype, rel_err)


@pytest.mark.parametrize("bias", [True, False])
def test_per_token_grad_output_recomputes_only_the_weight_side(problem, ref, rel_err, monkeypatch, bias):
    """A different incoming gradient per token: grad_h is the stored one scaled row by row, the weight side (a sum
    over tokens) is recomputed by one_pass's weight pass; all match float64."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 16 * logit_block.bytes_per_row(V, 4))
    p = problem(bias=bias)
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(p["hs"].device)
    got = run(p, schedule="logit_block", upstream=upstream)
    assert_matches(got, reference_grads(ref, p, upstream=upstream), torch.float32, rel_err)


def test_retain_graph_double_backward_doubles_the_gradients(problem, ref, rel_err):
    """The first backward hands the stored gradients over; a retained graph's second backward recomputes them
    (one_pass) and adds the same again."""
    p = problem()
    upstream = torch.full((N,), 0.5, device=p["hs"].device)
    got = run(p, schedule="logit_block", upstream=upstream, retain=True)
    assert_matches(got, reference_grads(ref, p, upstream=2 * upstream), torch.float32, rel_err)


def test_auto_choice_and_overrides(problem, monkeypatch):
    """auto: logit_block when gradients are wanted and the budget holds a block, else one_pass; the choice is in
    the stats; GOPD_BACKWARD and schedule= override it."""
    monkeypatch.delenv("GOPD_BACKWARD", raising=False)
    p = problem(n=21, vocab=101)

    def chosen(schedule=None, grad=True):
        hs = p["hs"].clone().requires_grad_(grad)
        _, stats = fused_linear_kl_triton(build_problem(
            hs, p["ws"], p["ht"], p["wt"], reverse_weight=p["rw"], forward_weight=p["fw"], jsd_beta=None,
            temperature=1.0, target_ids=None, grad_scale=None, return_stats=True), schedule=schedule)
        return stats["schedule"]

    assert chosen() == "logit_block"
    assert chosen(grad=False) == "one_pass"
    with torch.no_grad():
        assert chosen() == "one_pass"
    assert chosen("two_pass") == "two_pass"
    monkeypatch.setenv("GOPD_BACKWARD", "atomic")
    assert chosen() == "atomic"
    monkeypatch.setenv("GOPD_BACKWARD", "auto")
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 15 * logit_block.bytes_per_row(101, 4))  # < one row tile
    assert logit_block.block_rows(21, 101, 4) == 0
    assert chosen() == "one_pass"
    with pytest.raises(ValueError, match="schedule='logit_block' needs at least 16 tokens"):
        chosen("logit_block")


def test_budget_rows_and_gpu_floor(monkeypatch):
    """Blocks are whole row tiles within the budget, or every token; on a GPU auto wants tall blocks (grad_W is
    read and written once per block)."""
    per_row = logit_block.bytes_per_row(151936, 2)
    assert per_row == 151936 * 10
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 40 * per_row)
    assert logit_block.block_rows(100, 151936, 2) == 32  # interpreter row tile: 16
    assert logit_block.block_rows(40, 151936, 2) == 40
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 1000 * per_row)
    assert logit_block.block_rows(16384, 151936, 2) == 896
    assert choose_schedule("auto", needs_grad=True, n_tokens=16384, vocab=151936, operand_bytes=2) == "logit_block"
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 94 * 2**20)  # the default: 64 rows at S*
    assert choose_schedule("auto", needs_grad=True, n_tokens=16384, vocab=151936, operand_bytes=2) == "one_pass"
    assert choose_schedule("auto", needs_grad=True, n_tokens=50, vocab=151936, operand_bytes=2) == "logit_block"
    assert set(CHOICES) >= {"auto", "logit_block", *backward.SCHEDULES}


def test_every_stat_and_gradient_element_is_written(problem, monkeypatch):
    """Buffers handed out filled with NaN (several blocks, JSD, bias, targets) change nothing."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 16 * logit_block.bytes_per_row(101, 4))
    p = problem(n=21, vocab=101)

    def once():
        loss, stats, *grads = run(p, schedule="logit_block", jsd_beta=0.4, grad_scale=1.0)
        return [loss, *(v for k, v in stats.items() if k != "schedule"), *grads]

    clean = once()
    monkeypatch.setattr(tiling, "new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    for a, b in zip(clean, once()):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)


def test_extra_memory_stays_within_the_buffer_budget(problem, monkeypatch):
    """Measured (torch allocator events) forward + backward memory beyond the gradients and O(N) vectors stays
    within the budget with several blocks, and grows with it (so the measurement sees the buffers)."""
    if torch.cuda.is_available():
        pytest.skip("measures CPU allocations (the interpreter's tensors)")
    from gopd_fast.memory import peak_cpu_bytes

    n, vocab = 128, 600
    p = problem(n=n, vocab=vocab, ds=64, dt=48, bias=False)
    per_token = 32 * n * 4  # per-token statistics, coefficients and partials, generously

    def extra(rows):
        budget = rows * logit_block.bytes_per_row(vocab, 4)
        monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", budget)
        assert logit_block.block_rows(n, vocab, 4) == rows
        hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()

        def step():
            loss, _ = fused_linear_kl_triton(build_problem(
                hs, ws, p["ht"], p["wt"], reverse_weight=p["rw"], forward_weight=p["fw"], jsd_beta=None,
                temperature=1.0, target_ids=None, grad_scale=0.5, return_stats=False), schedule="logit_block")
            loss.backward()

        return peak_cpu_bytes(step) - (hs.numel() + ws.numel()) * 4, budget

    small, small_budget = extra(16)
    large, large_budget = extra(64)
    assert small <= small_budget + per_token
    assert small_budget + per_token < large <= large_budget + per_token
