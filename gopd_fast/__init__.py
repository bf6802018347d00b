"""gopd-fast: Guided On-Policy Distillation for multi-turn LLM agents."""
__version__ = "0.1.0"

from gopd_fast.loss import KLStats, fused_linear_kl
from gopd_fast.module import FusedLinearKL

__all__ = ["FusedLinearKL", "KLStats", "__version__", "fused_linear_kl"]
