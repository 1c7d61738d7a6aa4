"""What one command does, end to end: the prune and eval jobs, their defaults and pre-flight checks,
allocation plans, verification. May import: prac.io and everything below it (not prac.cli).
"""

import warnings as _warnings

#: Where the names of the former flat module ``prac.jobs`` live now, searched in this order (a module
#: before those that import from it, so a name is found where it is defined).
_MODULES = ("config", "defaults", "results", "checks", "evaluator", "prune", "eval")


def __getattr__(name: str):
    """Names of the former flat module ``prac.jobs`` (deprecated: import from the module named in the warning)."""
    import importlib

    for module_name in _MODULES:
        module = importlib.import_module(f"prac.jobs.{module_name}")
        if hasattr(module, name):
            break
    else:
        raise AttributeError(f"module 'prac.jobs' has no attribute {name!r}")
    _warnings.warn(f"prac.jobs.{name} moved to prac.jobs.{module_name}.{name}; the old path goes in the next release",
                   DeprecationWarning, stacklevel=2)
    return getattr(module, name)
