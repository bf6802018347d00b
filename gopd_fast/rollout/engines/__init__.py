"""Generation backends behind one interface (``GenerationEngine``). vLLM is imported only when constructed."""
from gopd_fast.rollout.engines.base import EngineStats, Generation, GenerationEngine, SamplingConfig
from gopd_fast.rollout.engines.hf import HFEngine
from gopd_fast.rollout.engines.hf_cached import CachedHFEngine, load_hf_engine
from gopd_fast.rollout.engines.vllm import VLLMEngine, vllm_available

__all__ = ["CachedHFEngine", "EngineStats", "Generation", "GenerationEngine", "HFEngine", "SamplingConfig",
           "VLLMEngine", "load_hf_engine", "vllm_available"]
