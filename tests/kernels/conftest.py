"""Run the Triton kernels with Triton's CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported anywhere in the process (triton's own jit'd
library functions are created at import time). Other test areas import triton at collection (through liger, trl,
vllm), so tests/kernels runs in its own pytest process (see the Makefile) or after a tests/conftest.py that sets the
variable first; this file sets it for its own process and fails loudly if triton was imported without it.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
_ENV_BEFORE = os.environ.get("TRITON_INTERPRET")
_TRITON_PREIMPORTED = "triton" in sys.modules
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
_INTERPRETER_OK = _HAS_CUDA or not _TRITON_PREIMPORTED or _ENV_BEFORE == "1"

DEVICE = torch.device("cuda" if _HAS_CUDA else "cpu")
# Interpreter-friendly dtypes: the interpreter computes bf16 tl.dot wrongly, so bf16 is checked on GPU only.
INTERPRETER_DTYPES = (torch.float32, torch.float16)


@pytest.fixture(autouse=True)
def _triton_runnable():
    if not _INTERPRETER_OK:
        pytest.fail("triton was imported (e.g. by liger/vllm/trl tests collected earlier) before TRITON_INTERPRET=1 "
                    "was set, so the interpreter cannot run; run tests/kernels in its own pytest process "
                    "(pytest tests --ignore=tests/kernels && pytest tests/kernels) or set the variable at the top of "
                    "tests/conftest.py")


def reference(hs, ws, ht, wt, bs, bt, rw, fw, *, jsd_beta, temperature, target_ids=None):
    """Float64 per-token loss and stats from materialised logits (independent of gopd_fast); differentiable."""
    hs, ws = hs.double(), ws.double()
    zs = hs @ ws.T + (0 if bs is None else bs.double())
    zt = ht.double() @ wt.double().T + (0 if bt is None else bt.double())
    logp_s = torch.log_softmax(zs / temperature, -1)
    logp_t = torch.log_softmax(zt / temperature, -1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    rkl = (p_s * (logp_s - logp_t)).sum(-1)
    fkl = (p_t * (logp_t - logp_s)).sum(-1)
    rw, fw = rw.double(), fw.double()
    if jsd_beta is None:
        loss = rw * rkl + fw * fkl
    elif jsd_beta == 0.0:
        loss = rw * fkl
    elif jsd_beta == 1.0:
        loss = rw * rkl
    else:  # TRL / Liger: M = beta p_t + (1 - beta) p_s
        m = jsd_beta * p_t + (1 - jsd_beta) * p_s
        loss = rw * (jsd_beta * (p_t * (logp_t - m.log())).sum(-1) + (1 - jsd_beta) * (p_s * (logp_s - m.log())).sum(-1))
    stats = {"reverse_kl": rkl, "forward_kl": fkl, "student_entropy": -(p_s * logp_s).sum(-1)}
    if target_ids is not None:
        stats["student_logprob"] = logp_s.gather(1, target_ids[:, None])[:, 0]
        stats["teacher_logprob"] = logp_t.gather(1, target_ids[:, None])[:, 0]
    return loss, {k: v.detach() for k, v in stats.items()}


def make_problem(n=37, vocab=203, ds=48, dt=40, dtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """Odd shapes (no dimension a multiple of any tile), logits of O(1-10) so the distributions are non-trivial."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

    return {
        "hs": rand(n, ds), "ws": rand(vocab, ds, scale=ds**-0.5 * 3), "ht": rand(n, dt),
        "wt": rand(vocab, dt, scale=dt**-0.5 * 3),
        "bs": rand(vocab, scale=0.5) if bias else None, "bt": rand(vocab, scale=0.5) if bias else None,
        "rw": torch.rand(n, generator=g).to(device), "fw": torch.rand(n, generator=g).to(device),
        "targets": torch.randint(0, vocab, (n,), generator=g).to(device),
    }


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 when both are 0)."""
    scale = expected.double().abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


@pytest.fixture
def problem():
    return make_problem


@pytest.fixture
def ref():
    return reference


@pytest.fixture
def rel_err():
    return max_rel_err
