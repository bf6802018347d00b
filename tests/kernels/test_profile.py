"""bench/profile_fused_linear_kl.py: kernel families, FLOP accounting and the launch annotations it reads."""
from __future__ import annotations

import profile_fused_linear_kl as prof  # bench/ is on pytest's pythonpath (pyproject.toml)
import pytest
import torch

from gopd_fast.kernels import tiling


@pytest.mark.parametrize("name,expected", [
    ("_kl_forward_kernel", "forward"),
    ("gopd::_jsd_kernel", "forward_jsd"),
    ("_grad_logits_kernel", "grad_logits"),
    ("_backward_atomic_kernel", "backward_atomic"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN", "gemm"),
    ("aten::addmm", "gemm"),
    ("aten::addmm_", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("aten::mm_backward_helper", "other"),
])
def test_kernel_families(name, expected):
    assert prof.family(name) == expected


def test_flop_accounting_matches_the_schedules():
    shape = prof.Shape(n=16384, vocab=151936, ds=4096, dt=4096)
    useful = 6.0 * shape.n * shape.vocab * shape.ds + 2.0 * shape.n * shape.vocab * shape.dt
    totals = {s: sum(prof.family_flops(shape, s, jsd=False).values()) for s in ("one_pass", "two_pass", "atomic")}
    assert totals["one_pass"] == pytest.approx(1.5 * useful)
    assert totals["atomic"] == pytest.approx(1.5 * useful)
    assert totals["two_pass"] == pytest.approx(2.0 * useful)


def test_table_shares_and_rates():
    rows = prof.table({"forward": (3000.0, 3), "gemm": (1000.0, 6)}, {"forward": 3e9, "gemm": 0.0}, steps=3)
    by = {r["family"]: r for r in rows}
    assert by["forward"]["ms"] == pytest.approx(1.0) and by["forward"]["share"] == pytest.approx(0.75)
    assert by["forward"]["tflops"] == pytest.approx(3e9 / 1e-3 / 1e12)
    assert by["gemm"]["tflops"] is None and by["gemm"]["calls"] == 2
    assert by["total"]["ms"] == pytest.approx(4 / 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="exact launch counts are for the interpreter (cuBLAS may "
                    "split a GEMM into several kernels)")
def test_profile_counts_each_launch(monkeypatch):
    """With buffers small enough for several blocks, the profile sees one gradient-of-logits launch and two GEMMs
    per one_pass block (via tiling.annotate), and one forward launch."""
    monkeypatch.setattr(tiling, "BACKWARD_BUFFER_BYTES", 4096)
    from gopd_fast.kernels.backward import one_pass_chunks

    shape = prof.Shape(n=21, vocab=101, ds=24, dt=16)
    rows, columns = one_pass_chunks(shape.n, shape.vocab, shape.ds, 4, fp32_dz=False, partial_bytes=0)
    blocks = -(-shape.n // rows) * -(-shape.vocab // columns)
    assert blocks > 1
    table = {r["family"]: r for r in prof.profile(shape, "one_pass", torch.float32, None, steps=2,
                                                  device=torch.device("cpu"))}
    assert table["forward"]["calls"] == 1
    assert table["grad_logits"]["calls"] == blocks
    assert table["gemm"]["calls"] == 2 * blocks
    assert sum(r["share"] for f, r in table.items() if f != "total") == pytest.approx(1.0)
