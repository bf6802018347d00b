"""Drop-in adapters for other distillation codebases: Liger-Kernel's loss class and TRL's trainers.

``LigerFusedLinearJSDLoss`` is imported eagerly (it only needs torch); the TRL plug-ins import ``trl`` on first
use (``from gopd_fast.compat.trl import FusedGKDTrainer``), so ``gopd_fast.compat`` works without TRL installed.
"""
from gopd_fast.compat.liger import LigerFusedLinearJSDLoss, liger_fused_linear_jsd

__all__ = ["LigerFusedLinearJSDLoss", "liger_fused_linear_jsd"]
