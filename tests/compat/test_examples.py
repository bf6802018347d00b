"""Every example in examples/ is included verbatim in docs/integration.md, and runs."""
import math
import os
import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ["trl_gkd", "liger_swap", "liger_transformers_swap", "verl_custom_loss", "plain_pytorch"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_doc_includes_the_example_verbatim(name):
    doc = (ROOT / "docs" / "integration.md").read_text()
    code = (ROOT / "examples" / f"{name}.py").read_text().rstrip("\n")
    assert f"```python\n{code}\n```" in doc, f"docs/integration.md is out of date for examples/{name}.py"


def _main(name):
    return runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name=f"example_{name}")["main"]


def test_plain_pytorch_example_trains():
    losses = _main("plain_pytorch")(steps=3)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_liger_example_matches_liger():
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    import gopd_fast.compat

    ours = _main("liger_swap")()
    original = gopd_fast.compat.LigerFusedLinearJSDLoss
    try:  # the same script with Liger's own class behind the swapped import
        gopd_fast.compat.LigerFusedLinearJSDLoss = lambda **kw: liger.LigerFusedLinearJSDLoss(compiled=False, **kw)
        theirs = _main("liger_swap")()
    finally:
        gopd_fast.compat.LigerFusedLinearJSDLoss = original
    assert math.isclose(ours, theirs, rel_tol=1e-5)


def test_liger_transformers_example_runs():
    # the numbers are checked against Liger's own class in tests/compat/test_liger_transformers.py
    loss = _main("liger_transformers_swap")()
    assert math.isfinite(loss) and loss > 0


def test_verl_example_runs():
    pg_loss, kl_loss = _main("verl_custom_loss")()
    assert math.isfinite(pg_loss) and kl_loss > 0


def test_trl_example_trains():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    loss = _main("trl_gkd")(max_steps=1)
    assert math.isfinite(loss) and loss > 0
