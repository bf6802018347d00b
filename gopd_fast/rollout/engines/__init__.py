"""Generation backends behind one interface (``GenerationEngine``). vLLM is imported only when constructed."""
from gopd_fast.rollout.engines.base import EngineStats, Generation, GenerationEngine, SamplingConfig
from gopd_fast.rollout.engines.hf import HFEngine
from gopd_fast.rollout.engines.vllm import VLLMEngine, vllm_available

__all__ = ["EngineStats", "Generation", "GenerationEngine", "HFEngine", "SamplingConfig", "VLLMEngine",
           "vllm_available"]
