"""The block loop and what runs inside it: capture a block's inputs, collect statistics, choose masks,
correct, reconstruct, quantize, write back, propagate; residency and copies; one memory policy.
May import: prac.methods, prac.quant, prac.correction, prac.model, prac.core.
"""

import warnings as _warnings


def __getattr__(name: str):
    """Names of the former flat module ``prac.engine`` (deprecated: import from ``prac.engine.loop``)."""
    import importlib

    module = importlib.import_module("prac.engine.loop")
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'prac.engine' has no attribute {name!r}") from None
    _warnings.warn(f"prac.engine.{name} moved to prac.engine.loop.{name}; the old path goes in the next release",
                   DeprecationWarning, stacklevel=2)
    return value
