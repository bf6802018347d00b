"""rollout/envs.py: env_slots builds threads or an EnvPool over the same env options; pool_counts reports the pool's
failure counts (and nothing for threads)."""
from __future__ import annotations

from gopd_fast import envs
from gopd_fast.envs.pool import EnvPool
from gopd_fast.rollout.envs import ThreadedEnvs, env_slots, pool_counts

OPTIONS = {"seed": 3, "max_turns": 5, "difficulty": "easy"}


def test_threads_and_pool_serve_the_same_env():
    reference = envs.make("household", **OPTIONS).reset("household/eval/2").observation
    for pool in (False, True):
        slots = env_slots("household", OPTIONS, pool=pool, pool_workers=1, step_timeout_s=60.0, threads=2)
        try:
            assert isinstance(slots, EnvPool if pool else ThreadedEnvs)
            assert slots.reset(0, "household/eval/2").result(timeout=120).observation == reference
            assert slots.step(0, "look").result(timeout=60).observation
            counts = pool_counts(slots)
            if pool:
                assert counts == {"env_restarts": 0.0, "env_crashes": 0.0, "env_hangs": 0.0, "env_replays": 0.0,
                                  "env_episodes_failed": 0.0}
            else:
                assert counts == {}
        finally:
            slots.close()
