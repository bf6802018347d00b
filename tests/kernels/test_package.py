"""The repository's kernels/ folder never shadows an installed top-level ``kernels`` distribution (issue #15)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gopd_fast

REPO = Path(gopd_fast.__file__).resolve().parent.parent


def test_installed_kernels_package_wins_from_the_repository_root(tmp_path):
    """A stand-in for Hugging Face's ``kernels`` (which transformers imports) in a site dir after the repository
    root on sys.path, as site-packages is: ``import kernels`` from the root finds it, and gopd_fast.kernels still
    imports from the same process."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("class CUDAProperties:\n    pass\n")
    code = (
        "import sys\n"
        f"sys.path.append({str(site)!r})\n"
        "from kernels import CUDAProperties\n"
        "import kernels\n"
        f"assert kernels.__file__ == {str(site / 'kernels' / '__init__.py')!r}, kernels.__file__\n"
        "from gopd_fast.kernels import tiling, fused_linear_kl\n"
        "assert tiling.__name__ == 'gopd_fast.kernels.tiling'\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_kernels_folder_is_not_a_regular_package():
    """The mechanism: no kernels/__init__.py, so the folder is at most a namespace portion of ``kernels``, which
    Python ranks below any regular package found later on sys.path; gopd_fast.kernels points at the folder."""
    import gopd_fast.kernels

    assert (REPO / "kernels" / "fused_linear_kl.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert [Path(p).resolve() for p in gopd_fast.kernels.__path__] == [(REPO / "kernels").resolve()]
