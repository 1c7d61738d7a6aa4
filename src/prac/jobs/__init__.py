"""What one command does, end to end: the prune and eval jobs, their defaults and pre-flight checks,
allocation plans, verification. May import: prac.io and everything below it (not prac.cli).
"""

import warnings as _warnings


def __getattr__(name: str):
    """Names of the former flat module ``prac.jobs`` (deprecated: import from ``prac.jobs.run``)."""
    import importlib

    module = importlib.import_module("prac.jobs.run")
    try:
        value = getattr(module, name)
    except AttributeError:
        raise AttributeError(f"module 'prac.jobs' has no attribute {name!r}") from None
    _warnings.warn(f"prac.jobs.{name} moved to prac.jobs.run.{name}; the old path goes in the next release",
                   DeprecationWarning, stacklevel=2)
    return value
