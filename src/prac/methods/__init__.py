"""Mask sources: sparsity patterns, the method registry, Wanda/magnitude scores, SparseGPT and ADMM,
each a pure function of (weight, input statistics, pattern, settings).
May import: prac.correction (the exact masked solve), prac.model, prac.core.
"""

import warnings as _warnings


def __getattr__(name: str):
    """Names of the former flat module ``prac.methods`` (deprecated: import from ``prac.methods.registry``)."""
    import importlib

    module = importlib.import_module("prac.methods.registry")
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'prac.methods' has no attribute {name!r}") from None
    _warnings.warn(f"prac.methods.{name} moved to prac.methods.registry.{name}; the old path goes in the next release",
                   DeprecationWarning, stacklevel=2)
    return value
