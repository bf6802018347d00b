"""Multi-turn rollouts with per-turn teacher/student guidance."""
from gopd_fast.rollout.engines import Generation, GenerationEngine, HFEngine, SamplingConfig, VLLMEngine
from gopd_fast.rollout.envs import EnvSlots, ThreadedEnvs
from gopd_fast.rollout.episode import Episode, Role
from gopd_fast.rollout.guidance import ActionParser, GuidanceCoin, ParsedAction
from gopd_fast.rollout.history import ChatFormat, History
from gopd_fast.rollout.rollout import RolloutOptions, RolloutResult, run_rollout

__all__ = [
    "ActionParser", "ChatFormat", "EnvSlots", "Episode", "Generation", "GenerationEngine", "GuidanceCoin",
    "HFEngine", "History", "ParsedAction", "Role", "RolloutOptions", "RolloutResult", "SamplingConfig",
    "ThreadedEnvs", "VLLMEngine", "run_rollout",
]
