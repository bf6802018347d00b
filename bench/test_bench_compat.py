"""CPU benchmark of the drop-in losses against the code they replace: forward + backward time and peak memory.

Cases (float32, N tokens, hidden D, vocabulary V, gradients for the student's hidden states and head):
- ``gkd/trl``: TRL 1.16 ``GKDTrainer.generalized_jsd_loss`` on full logits (the heads applied with ``F.linear``).
- ``gkd/fused``: ``gopd_fast.compat.trl.fused_gkd_loss`` on hidden states + heads.
- ``liger/liger``: ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss(compiled=False)``.
- ``liger/fused``: ``gopd_fast.compat.LigerFusedLinearJSDLoss``.
- ``topk/naive`` and ``topk/fused``: the top-k (k=64) teacher KL from full student logits vs ``fused_linear_topk_kl``.

Peak memory: the largest live total of torch CPU allocations during one call (torch.profiler allocator events,
replayed in time order), measured in its own run before the timed rounds; printed with -s and stored in
``extra_info``. Default shapes are small (N=512, D=64, V=32000) so that the suite runs in seconds:

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/test_bench_compat.py --benchmark-enable -s
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from gopd_fast.memory import peak_cpu_bytes

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

N, D, V, K = 512, 64, 32000, 64


def _inputs():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(N, D, generator=g).requires_grad_()
    w_s = (torch.randn(V, D, generator=g) * 0.1).requires_grad_()
    h_t = torch.randn(N, D, generator=g)
    w_t = torch.randn(V, D, generator=g) * 0.1
    labels = torch.randint(0, V, (N,), generator=g)
    return h_s, w_s, h_t, w_t, labels


def _case(name: str):
    h_s, w_s, h_t, w_t, labels = _inputs()
    if name == "gkd/trl":
        from trl.experimental.gkd import GKDTrainer

        return lambda: GKDTrainer.generalized_jsd_loss(F.linear(h_s, w_s), F.linear(h_t, w_t), labels=labels,
                                                       beta=0.5).backward()
    if name == "gkd/fused":
        from gopd_fast.compat.trl import fused_gkd_loss

        s_head, t_head = torch.nn.Linear(D, V, bias=False), torch.nn.Linear(D, V, bias=False)
        s_head.weight, t_head.weight = torch.nn.Parameter(w_s.detach()), torch.nn.Parameter(w_t)
        return lambda: fused_gkd_loss(h_s, h_t, s_head, t_head, labels, beta=0.5).backward()
    if name == "liger/liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss(compiled=False)
        return lambda: fn(h_s, w_s, h_t, w_t, labels).backward()
    if name == "liger/fused":
        from gopd_fast.compat import LigerFusedLinearJSDLoss

        fn = LigerFusedLinearJSDLoss()
        return lambda: fn(h_s, w_s, h_t, w_t, labels).backward()
    t_lp, t_ids = torch.log_softmax(h_t @ w_t.T, -1).topk(K, dim=-1)
    if name == "topk/naive":
        def naive():
            log_p = torch.log_softmax(h_s @ w_s.T, -1)
            tail = torch.logsumexp(log_p.scatter(1, t_ids, float("-inf")), -1, keepdim=True)
            q_s = torch.cat([log_p.gather(1, t_ids), tail], 1)
            q_t = torch.cat([t_lp, (1 - t_lp.exp().sum(1, keepdim=True)).clamp_min(1e-8).log()], 1)
            ((q_s.exp() * (q_s - q_t)).sum() / N).backward()
        return naive
    from gopd_fast import fused_linear_topk_kl

    return lambda: fused_linear_topk_kl(h_s, w_s, t_ids, t_lp).backward()


@pytest.mark.parametrize("name", ["gkd/trl", "gkd/fused", "liger/liger", "liger/fused", "topk/naive", "topk/fused"])
def test_compat(benchmark, name):
    run = _case(name)
    run()  # warm-up (lazy imports, first-touch)
    peak = peak_cpu_bytes(run)
    benchmark.extra_info.update({"peak_bytes": peak, "N": N, "D": D, "V": V})
    print(f"\n{name}: peak {peak / 2**20:.1f} MiB (N={N}, D={D}, V={V})")
    benchmark.pedantic(run, rounds=3, iterations=1)
