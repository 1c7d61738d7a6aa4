"""The block loop and what runs inside it: capture a block's inputs, collect statistics, choose masks,
correct, reconstruct, quantize, write back, propagate; residency and copies; one memory policy.
May import: prac.methods, prac.quant, prac.correction, prac.model, prac.core.
"""

import warnings as _warnings

#: Names of the former flat module ``prac.engine`` that live outside ``prac.engine.loop`` now.
_MOVED = {
    "EngineConfig": "config", "EngineOutcome": "config", "BlockParallel": "config", "GroupStep": "config",
    "StatsReducer": "config", "StatsFactory": "config",
    "activation_store": "memory", "replay_budget": "memory",
}


def __getattr__(name: str):
    """Names of the former flat module ``prac.engine`` (deprecated: import them from their module)."""
    import importlib

    where = f"prac.engine.{_MOVED.get(name, 'loop')}"
    try:
        value = getattr(importlib.import_module(where), name)
    except AttributeError:
        raise AttributeError(f"module 'prac.engine' has no attribute {name!r}") from None
    _warnings.warn(f"prac.engine.{name} moved to {where}.{name}; the old path goes in the next release",
                   DeprecationWarning, stacklevel=2)
    return value
