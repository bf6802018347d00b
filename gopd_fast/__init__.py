"""gopd-fast: Guided On-Policy Distillation for multi-turn LLM agents."""
__version__ = "0.1.0"
