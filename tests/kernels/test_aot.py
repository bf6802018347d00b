"""kernels/aot.py: every configuration the autotuners may choose at the issue's target shape (and logit_block's fixed
tiles) compiles for sm_90a (H100) without spilling, and the logit GEMMs run on wgmma with TMA operand loads. No GPU needed: Triton compiles
ahead of time and its bundled ptxas reports spills.

The compile runs in a subprocess without TRITON_INTERPRET (this test process runs the kernels in the interpreter,
where ``triton.jit`` functions cannot be compiled for a GPU). The kernels take the shape as runtime arguments, so
the code compiled here is the code launched at S* (N=16384, Ds=Dt=4096, V=151936, bf16): the shape only enters
through the 16-divisibility Triton specialises on, which aot assumes as S* has it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
from gopd_fast.kernels import aot, tiling
rows = []
for spec in aot.kernel_specs("bf16"):
    for c in tiling.candidate_configs(spec.configs, spec.constexprs.get("IS_JSD", False)):
        k = aot.compile_kernel(spec, c, "bf16")
        u = aot.ptxas_usage(k.asm["ptx"])
        rows.append({"kernel": spec.name, "config": [c.block_n, c.block_v, c.block_d, c.num_warps, c.num_stages],
                     "spill_stores": u.spill_store_bytes, "spill_loads": u.spill_load_bytes,
                     "shared": k.metadata.shared, "wgmma": aot.uses_wgmma(k), "tma": aot.uses_tma(k),
                     "gemm": spec.gemm})
print(json.dumps(rows))
"""
SHARED_LIMIT = 227 * 1024  # the most dynamic shared memory an H100 block may use


@pytest.mark.slow  # ~33 ptxas compiles: 1-3 minutes on the 2-core CI machine
def test_autotune_configs_compile_for_sm90_without_spills_using_wgmma_and_tma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=1200,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"kl_forward", "jsd", "grad_logits", "grad_logits_jsd", "backward_atomic", "backward_skip",
                       "block_stats", "block_jsd", "block_grad", "block_grad_jsd"}
    for row in rows:
        where = f"{row['kernel']} {row['config']}"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, where
        assert row["shared"] <= SHARED_LIMIT, where
        if row["gemm"]:  # logit_block's kernels read stored logits: no dot, nothing for wgmma or TMA
            assert row["wgmma"] and row["tma"], where
    # The JSD gradient's list is pruned of the KL-only tile, which the KL gradient keeps.
    jsd = [r["config"] for r in rows if r["kernel"] == "grad_logits_jsd"]
    kl = [r["config"] for r in rows if r["kernel"] == "grad_logits"]
    assert len(jsd) == len(kl) - 1 and all(c in kl for c in jsd)
