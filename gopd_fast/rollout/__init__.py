"""Multi-turn rollouts with per-turn teacher/student guidance."""
from gopd_fast.rollout.episode import Episode, Role

__all__ = ["Episode", "Role"]
