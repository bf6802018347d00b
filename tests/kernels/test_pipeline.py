"""kernels/pipeline.py: the one_pass block pipeline's steps, their dependencies, the loop that issues them, and the
backward it runs (exact against float64, bit for bit the same with and without the overlap)."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch
from gopd_fast.kernels.fused_linear_kl import fused_linear_kl_triton
from gopd_fast.kernels.pipeline import BEGIN, GEMMS, GRAD_LOGITS, MAIN, SIDE

from gopd_fast.kernels import backward, pipeline, tiling
from gopd_fast.ops.problem import build_problem


def ordered_pairs(steps: list[pipeline.Step]) -> set[tuple[int, int]]:
    """(i, j) for every step i ordered before step j: earlier on the same stream, or through a chain of waits (a
    GPU may run any two steps not related here at the same time)."""
    before: list[set[int]] = []
    last_on: dict[str, int] = {}
    for step in steps:
        direct = set(step.waits) | ({last_on[step.stream]} if step.stream in last_on else set())
        before.append(direct.union(*(before[i] for i in direct)))
        last_on[step.stream] = len(before) - 1
    return {(i, j) for j, earlier in enumerate(before) for i in earlier}


def step_of(steps, op, block):
    (index,) = [i for i, s in enumerate(steps) if s.op == op and s.block == block]
    return index


@pytest.mark.parametrize("num_blocks", [1, 2, 3, 4, 9])
@pytest.mark.parametrize("overlap", [True, False])
def test_every_dependency_is_ordered(num_blocks, overlap):
    steps = pipeline.one_pass_steps(num_blocks, overlap)
    hb = ordered_pairs(steps)
    work = [s for s in steps if s.op != BEGIN]
    assert sorted((s.op, s.block) for s in work) == sorted(itertools.product((GEMMS, GRAD_LOGITS), range(num_blocks)))
    for j, step in enumerate(steps):  # a wait names an earlier step (host order) on the other stream
        assert all(i < j and steps[i].stream != step.stream for i in step.waits)
    for b in range(num_blocks):
        kernel, gemms = step_of(steps, GRAD_LOGITS, b), step_of(steps, GEMMS, b)
        assert (kernel, gemms) in hb and steps[kernel].buffer == steps[gemms].buffer  # GEMMs read their block's dz
        for other, step in enumerate(steps):
            # Any other write of that buffer is finished before this kernel writes it, or waits until the GEMMs
            # that read it are done: no dz is overwritten while read, none read before it is complete.
            if step.op == GRAD_LOGITS and step.buffer == steps[kernel].buffer and other != kernel:
                assert (other, kernel) in hb or (gemms, other) in hb, (b, step)
    # The accumulators (grad_h's, grad_W, grad_b) are only touched by the GEMMs: one stream, in block order.
    gemms = [i for i, s in enumerate(steps) if s.op == GEMMS]
    assert {steps[i].stream for i in gemms} == {MAIN}
    assert [steps[i].block for i in gemms] == list(range(num_blocks))
    # The side stream starts after the main stream's queued work and ends before the last step (the caller's stream).
    side = [i for i, s in enumerate(steps) if s.stream == SIDE]
    last = len(steps) - 1
    assert steps[last].stream == MAIN and all((i, last) in hb for i in side)
    assert all((0, i) in hb for i in side) and (not side or steps[0].op == BEGIN)


@pytest.mark.parametrize("num_blocks", [2, 3, 9])
def test_overlap_runs_the_next_kernel_beside_the_gemms(num_blocks):
    """With the overlap, the kernel of block b + 1 is ordered neither before nor after block b's GEMMs (a GPU may
    run them together), on two alternating buffers (``DZ_BUFFERS``, which one_pass's block sizes budget for);
    without it everything is one stream, one buffer."""
    steps = pipeline.one_pass_steps(num_blocks, overlap=True)
    hb = ordered_pairs(steps)
    assert pipeline.buffer_count(steps) == pipeline.DZ_BUFFERS == 2
    assert {s.stream for s in steps if s.op == GRAD_LOGITS} == {SIDE}
    for b in range(num_blocks - 1):
        kernel, gemms = step_of(steps, GRAD_LOGITS, b + 1), step_of(steps, GEMMS, b)
        assert (kernel, gemms) not in hb and (gemms, kernel) not in hb
    serial = pipeline.one_pass_steps(num_blocks, overlap=False)
    assert pipeline.buffer_count(serial) == 1 and {s.stream for s in serial} == {MAIN}
    assert [(s.op, s.block) for s in serial] == [(op, b) for b in range(num_blocks) for op in (GRAD_LOGITS, GEMMS)]
    assert pipeline.one_pass_steps(1, overlap=True) == pipeline.one_pass_steps(1, overlap=False)  # nothing to overlap


class RecordingStreams:
    """A ``pipeline.Streams`` that logs what ``run_steps`` asks of it."""

    def __init__(self):
        self.log: list[tuple] = []
        self.current = None

    @contextlib.contextmanager
    def on(self, stream):
        self.log.append(("enter", stream))
        self.current = stream
        yield
        self.current = None

    def wait(self, stream, step_index):
        self.log.append(("wait", stream, step_index))

    def record(self, stream, step_index):
        self.log.append(("record", stream, step_index))

    def share(self, tensor):
        self.log.append(("share",))


def test_run_steps_waits_before_and_records_after_each_step():
    steps = pipeline.one_pass_steps(5, overlap=True)
    streams = RecordingStreams()
    ran = []

    def run(step):
        assert streams.current == step.stream  # the step is issued on its own stream
        ran.append(steps.index(step))
        streams.log.append(("run", steps.index(step)))

    pipeline.run_steps(steps, run, streams)
    assert ran == list(range(len(steps)))
    recorded = set()
    for j, step in enumerate(steps):
        at = streams.log.index(("run", j))
        waits = [e for e in streams.log[:at] if e[0] == "wait" and e[2] in step.waits]
        assert {e[2] for e in waits} == set(step.waits) and all(e[1] == step.stream for e in waits)
        assert all(i in recorded for i in step.waits)  # an event exists before anything waits on it
        if any(j in s.waits for s in steps):
            assert streams.log[at + 1] == ("record", step.stream, j)
            recorded.add(j)


def test_cpu_runs_sequentially():
    steps = pipeline.one_pass_steps(4, overlap=True)
    assert isinstance(pipeline.streams_for(torch.device("cpu"), steps), pipeline.Sequential)


def test_overlap_switch(monkeypatch):
    monkeypatch.delenv(pipeline.OVERLAP_ENV, raising=False)
    assert pipeline.overlap_enabled()
    monkeypatch.setenv(pipeline.OVERLAP_ENV, " 0 ")
    assert not pipeline.overlap_enabled()
    monkeypatch.setenv(pipeline.OVERLAP_ENV, "yes")
    with pytest.raises(ValueError, match="GOPD_BACKWARD_OVERLAP must be 0 or 1"):
        pipeline.overlap_enabled()


def test_blocks_tile_the_grid_once():
    plan = pipeline.blocks(37, 203, 16, 64)
    covered = torch.zeros(37, 203, dtype=torch.int32)
    for blk in plan:
        covered[blk.n_lo: blk.n_lo + blk.height, blk.v_lo: blk.v_lo + blk.width] += 1
        assert blk.closes_row == (blk.v_lo + blk.width == 203)
    assert bool((covered == 1).all()) and len(plan) == 3 * 4
    with pytest.raises(ValueError, match="columns must be a positive number"):
        pipeline.blocks(37, 203, 16, 0)
    with pytest.raises(ValueError, match="num_blocks must be at least 1"):
        pipeline.one_pass_steps(0, overlap=True)


def grads(p, *, jsd_beta, upstream):
    hs, ws = p["hs"].clone().requires_grad_(), p["ws"].clone().requires_grad_()
    bs = p["bs"].clone().requires_grad_() if p["bs"] is not None else None
    loss, _ = fused_linear_kl_triton(build_problem(
        hs, ws, p["ht"], p["wt"], student_bias=bs, teacher_bias=p["bt"], reverse_weight=p["rw"],
        forward_weight=p["fw"], jsd_beta=jsd_beta, temperature=1.1, target_ids=None, grad_scale=None,
        return_stats=False), schedule="one_pass")
    (loss * upstream).sum().backward()
    return [hs.grad, ws.grad] + ([bs.grad] if bs is not None else [])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("jsd_beta", [None, 0.6], ids=["kl", "jsd"])
def test_one_pass_pipeline_exact_and_same_with_or_without_overlap(problem, ref, rel_err, monkeypatch, dtype, tol,
                                                                  bias, jsd_beta):
    """Odd sizes, 3 token blocks x 2-7 vocabulary blocks, buffers poisoned with NaN: with the overlap (two
    alternating dz buffers) the gradients match float64 and equal, bit for bit, the one-stream run's."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    partial = 0 if dtype == torch.float32 else itemsize
    budget = 2 * 16 * 48 * (4 + partial)  # a 16-row accumulator and a dz block of a few tiles
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", budget)
    rows, columns = backward.one_pass_chunks(37, 203, 48, itemsize, fp32_dz=bias, partial_bytes=partial)
    assert rows < 37 and columns < 203  # several token and vocabulary blocks: the blocking meant here
    monkeypatch.setattr(backward, "new_output",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))
    p = problem(dtype=dtype, bias=bias)
    upstream = torch.randn(37, generator=torch.Generator().manual_seed(5)).to(p["hs"].device)
    monkeypatch.setenv(pipeline.OVERLAP_ENV, "1")
    overlapped = grads(p, jsd_beta=jsd_beta, upstream=upstream)
    monkeypatch.setenv(pipeline.OVERLAP_ENV, "0")
    one_stream = grads(p, jsd_beta=jsd_beta, upstream=upstream)
    hs, ws = p["hs"].double().requires_grad_(), p["ws"].double().requires_grad_()
    bs = p["bs"].double().requires_grad_() if bias else None
    loss, _ = ref(hs, ws, p["ht"], p["wt"], bs, p["bt"], p["rw"], p["fw"], jsd_beta=jsd_beta, temperature=1.1)
    (loss * upstream.double()).sum().backward()
    for got, same, want in zip(overlapped, one_stream, [hs.grad, ws.grad] + ([bs.grad] if bias else []),
                               strict=True):
        assert torch.equal(got, same)
        assert got.dtype == dtype and rel_err(got, want) < tol
