"""gopd-fast: fused on-policy distillation for multi-turn LLM agents.

The Triton kernels live in the top-level ``kernels/`` folder of the source tree and are installed as the
subpackage ``gopd_fast.kernels`` (a top-level ``kernels`` package would collide with an existing PyPI package).
The folder has no ``__init__.py``, so from the repository root it can never shadow an installed ``kernels``
distribution; ``gopd_fast/kernels.py`` is the package module and points its ``__path__`` at the folder (source
tree, editable install) or at the installed ``gopd_fast/kernels/`` (wheel).
Metadata is in pyproject.toml; this file only declares that mapping, which pyproject cannot express for a subpackage.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["gopd_fast", "gopd_fast.*"])
packages += ["gopd_fast.kernels"] + [
    "gopd_fast.kernels." + p for p in find_packages(where="kernels")
]

setup(
    packages=packages,
    package_dir={"gopd_fast": "gopd_fast", "gopd_fast.kernels": "kernels"},
    package_data={"gopd_fast": ["py.typed", "configs/*.toml", "assets/**/*"]},
)
