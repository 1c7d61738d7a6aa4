"""Reconstruction correction after pruning: change surviving weights so the layer output stays close.

Every method minimises (exactly or approximately) ``‖X W_origᵀ - X (W_pruned + ΔW)ᵀ‖²`` with ΔW zero
wherever the mask pruned; ``objective.py`` holds the error, ``full.py``, ``diagonal.py``,
``greedy.py``, ``optimal.py`` the methods (each with its settings dataclass and registry entry),
``registry.py`` the list of them, ``apply.py`` the one entry point :func:`correct` (selection,
never-worse, yardstick), ``summary.py`` the report roll-up. Defaults and the measurements behind
them: docs/correction.md.
"""

from prac.correction.apply import correct, stats_spec, yardstick
from prac.correction.base import (
    STRATEGIES,
    YARDSTICK_DAMPING,
    YARDSTICK_MAX_ITER,
    YARDSTICK_TOL,
    CorrectionResult,
    SelectionSettings,
)
from prac.correction.config import CorrectionConfig
from prac.correction.diagonal import DiagonalSettings
from prac.correction.full import FullSettings
from prac.correction.greedy import GreedySettings
from prac.correction.optimal import OptimalSettings
from prac.correction.registry import corrections, get_correction, names
from prac.correction.summary import format_diagnostics, summarize

__all__ = [
    "STRATEGIES", "YARDSTICK_DAMPING", "YARDSTICK_MAX_ITER", "YARDSTICK_TOL",
    "CorrectionConfig", "CorrectionResult", "SelectionSettings",
    "DiagonalSettings", "FullSettings", "GreedySettings", "OptimalSettings",
    "correct", "corrections", "format_diagnostics", "get_correction", "names", "stats_spec", "summarize", "yardstick",
]
