"""bench/kernels_traffic.py: the HBM traffic model of the kernels' launch orders stays within its limit at S*.

The model replays each kernel's grid in its launch order (the Python twins of the kernels' index maps) through an
LRU L2, so a change of launch order, group size, vocabulary split or autotune list that makes a kernel re-read its
operands fails here. The limit is 2x max(compulsory traffic, the logit GEMMs' I/O lower bound) for every kernel
but the atomic test oracle (the script's docstring says why not 2x compulsory).
"""
from __future__ import annotations

import kernels_traffic as traffic  # bench/ is on pytest's pythonpath (pyproject.toml)
import pytest

from gopd_fast.kernels import tiling


def test_every_autotune_candidate_at_s_star_is_within_the_limit():
    rows = traffic.model_rows(traffic.Shape(*traffic.S_STAR), oracle=False)
    # Every candidate the autotuners may pick at S* is modelled (the rows are not an empty or partial list).
    assert [r.config for r in rows if r.kernel == "_kl_forward"] == list(tiling.FORWARD_CONFIGS)
    assert [r.config for r in rows if r.kernel.startswith("_grad_logits")] == list(tiling.BACKWARD_CONFIGS)
    for r in rows:
        assert r.bound >= r.compulsory > 0 and r.traffic >= r.compulsory, r
        assert r.ratio <= traffic.LIMIT, f"{r.kernel} {r.config}: {r.traffic / 1e9:.1f} GB = {r.ratio:.2f}x"
    assert traffic.worst_ratio(rows) <= traffic.LIMIT


def test_gpu_sizing_is_restored_for_this_interpreter_process():
    """The model sizes splits and blocks for a GPU; the interpreter's tiles are back afterwards."""
    before = tiling.interpreting()
    with traffic.gpu_sizing(132):
        assert not tiling.interpreting()
    assert tiling.interpreting() == before


@pytest.mark.parametrize("limit,status", [(100.0, 0), (1.0, 1)])
def test_exit_status_is_the_check(capsys, limit, status):
    """The script exits 1 when a kernel is over the limit (a small shape keeps this cheap)."""
    args = ["--n", "2048", "--ds", "512", "--dt", "512", "--vocab", "16384", "--no-oracle", "--limit", str(limit)]
    assert traffic.main(args) == status
    assert ("OVER the limit" in capsys.readouterr().out) == (status == 1)
