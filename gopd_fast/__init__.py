"""gopd-fast: Guided On-Policy Distillation for multi-turn LLM agents."""
__version__ = "0.1.0"

# Public names are imported on first use (PEP 562), so that torch-free parts such as ``gopd_fast.envs`` (and the
# env pool's worker processes) do not pay for importing torch.
_LAZY = {
    "KLStats": "gopd_fast.loss",
    "fused_linear_kl": "gopd_fast.loss",
    "FusedLinearKL": "gopd_fast.module",
    "fused_linear_logprob": "gopd_fast.ops.token_logprob",
    "fused_linear_topk_kl": "gopd_fast.ops.topk_kl",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gopd_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["FusedLinearKL", "KLStats", "__version__", "fused_linear_kl", "fused_linear_logprob", "fused_linear_topk_kl"]
