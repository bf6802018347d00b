"""Drop-in adapters for other distillation codebases: Liger-Kernel's loss classes and TRL's trainers.

The Liger classes are imported eagerly (they only need torch); ``gopd_fast.compat.liger_transformers`` documents
which Liger name maps to which one here (Liger has two functions called ``liger_fused_linear_jsd``). The TRL
plug-ins import ``trl`` on first use (``from gopd_fast.compat.trl import FusedGKDTrainer``), so
``gopd_fast.compat`` works without TRL installed.
"""
from gopd_fast.compat.liger import LigerFusedLinearJSDLoss, liger_fused_linear_jsd
from gopd_fast.compat.liger_transformers import LigerFusedLinearJSD, liger_fused_linear_jsd_shift_labels

__all__ = ["LigerFusedLinearJSD", "LigerFusedLinearJSDLoss", "liger_fused_linear_jsd",
           "liger_fused_linear_jsd_shift_labels"]
