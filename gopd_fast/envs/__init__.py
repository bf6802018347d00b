"""Text environments behind one protocol: ``gopd_fast.envs.make(name, **options)``."""
from __future__ import annotations

import importlib

from gopd_fast.envs.base import EnvError, Reset, StepResult, TextEnv, make, register, registered

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


# Imported on first use, so ``python -m gopd_fast.envs.evaluate`` does not import its own module twice.
_LAZY = {
    "ORACLE": "gopd_fast.envs.evaluate", "EvalReport": "gopd_fast.envs.evaluate", "evaluate": "gopd_fast.envs.evaluate",
    "EnvPool": "gopd_fast.envs.pool", "PoolStats": "gopd_fast.envs.pool",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gopd_fast.envs' has no attribute {name!r}")


__all__ = [
    "ORACLE", "EnvError", "EnvPool", "EvalReport", "PoolStats", "Reset", "StepResult", "TextEnv", "evaluate", "make",
    "register", "registered",
]
