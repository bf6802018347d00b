"""Text environments behind one protocol: ``gopd_fast.envs.make(name, **options)``."""
from __future__ import annotations

import importlib

from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv, make, register, registered
from gopd_fast.envs.evaluate import ORACLE, EvalReport, evaluate
from gopd_fast.envs.pool import EnvPool, PoolStats

# name -> module that registers it; imported lazily so optional packages are only needed when used.
_BUILTIN = {
    "household": "gopd_fast.envs.household",
    "scienceworld": "gopd_fast.envs.scienceworld",
    "alfworld": "gopd_fast.envs.alfworld",
    "webshop": "gopd_fast.envs.webshop",
    "textworld-express": "gopd_fast.envs.textworld_express",
}


def _load_builtin(name: str) -> None:
    from gopd_fast.envs.base import _REGISTRY

    if name in _BUILTIN and name not in _REGISTRY:
        importlib.import_module(_BUILTIN[name])


__all__ = [
    "ORACLE", "EnvError", "EnvPool", "EvalReport", "PoolStats", "Reset", "StepResult", "TextEnv", "evaluate", "make",
    "register", "registered",
]
