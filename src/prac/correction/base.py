"""The contract between the pruning pipeline and the correction methods.

A correction method is one registry entry (``registry.py``): a settings dataclass (its defaults and
validation), the statistics it needs, and a pure function

    propose(problem: LayerProblem, settings) -> Proposal

that returns a change δ of the selected survivors; :func:`prac.correction.apply.correct` does the
rest for every method (selection, never-worse, yardstick, diagnostics). This module is the contract
alone (the problem, the proposal, the entry type, the shared settings); the registry
(``registry.py``) imports the methods, and :class:`prac.correction.config.CorrectionConfig` the registry.

- ``w_orig``   fp32 [out, in]: the dense weight.
- ``w_pruned`` fp32 [out, in]: the weight the mask source produced (zeros where ``mask``).
- ``mask``     bool [out, in]: True = pruned. Pruned entries stay exactly zero; the mask never changes.
- ``group``    :class:`prac.model.group.InputGroup` of the layer's input: its statistics, and the H and
               factorisations every linear reading that input shares.
- ``scores``   fp32 [out, in]: Wanda scores |W|·||X||₂ used to rank survivors for selection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prac.core.errors import PracError
from prac.model.stats import StatsSpec

STRATEGIES = ("top", "moderate", "weakest", "kneedle", "all")

#: The yardstick is the (nearly) undamped optimum: λ only keeps dead input features solvable ...
YARDSTICK_DAMPING = 1e-6
#: ... solved tightly whatever the method's own tolerance (relative residual of each row's system).
YARDSTICK_TOL = 1e-4
#: ... with at most this many CG iterations (unless the method is ``optimal`` with its own limit).
YARDSTICK_MAX_ITER = 200


def invalid(what: str) -> PracError:
    return PracError(f"invalid correction setting: {what}")


# Flags that the settings of several corrections share, as field metadata (:mod:`prac.cli.settings_flags`):
# a method that redefines such a field (to give it its own default) passes the same metadata.
SELECTION_STRATEGY = {"flag": "--selection-strategy", "choices": STRATEGIES, "help": "which survivors to correct"}
PERCENT_CHANGE = {"flag": "--percent-change", "help": "fraction of each row's survivors to correct"}
DAMPING = {"flag": "--damping", "help": "damping, relative to mean diag(H)"}
MAX_CORRECTION_MAGNITUDE = {"flag": "--max-correction-magnitude", "help": "clamp |δ| <= this × |w_orig|"}
MAX_ACTIVATION_SAMPLES = {"flag": "--max-activation-samples", "min": 1,
                          "help": "tokens stored per distinct layer input for greedy (and diagonal with --no-exact-errors); "
                                  "costs this × in × 4 B each, 128 MiB at in=4096"}


@dataclass(frozen=True)
class SelectionSettings:
    """Which survivors of each row a method may change (see ``selection.py``)."""

    selection_strategy: str = field(default="all", metadata=SELECTION_STRATEGY)
    percent_change: float = field(default=0.05, metadata=PERCENT_CHANGE)

    def __post_init__(self) -> None:
        if self.selection_strategy not in STRATEGIES:
            raise invalid(f"selection strategy {self.selection_strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not (0.0 < self.percent_change <= 1.0):
            raise invalid(f"percent-change must be in (0, 1], got {self.percent_change}")


def check_damping(damping: float) -> None:
    if not (math.isfinite(damping) and damping >= 0.0):
        raise invalid(f"damping must be a finite number >= 0, got {damping}")


def check_clamp(bound: float) -> None:
    if not bound > 0.0:
        raise invalid(f"max-correction-magnitude must be > 0 (inf: no clamp), got {bound}")


#: Share of the calibration sequences a correction does not fit, and is judged on (``Holdout.share``).
DEFAULT_HOLDOUT = 0.125


@dataclass(frozen=True)
class Holdout:
    """Corrections judged on data they did not fit (docs/correction.md, "Held-out acceptance").

    ``share`` of the calibration sequences (a seeded draw, :func:`prac.model.stats.holdout_rows`) is kept
    apart: the mask and the correction are fitted on the rest (the held-out rows enter no statistic
    anything is fitted on), and the correction is kept only if it lowers the layer's error on the
    held-out share too. ``dampings``: for methods with a ``damping``, the candidates tried (each fitted
    on the rest, the one with the lowest held-out error wins); empty: the method's own damping only.
    ``escalate``: where the damping matters — a correction that fails on the held-out share — the
    damping is raised 10×, 100×, 1000× (each fitted on the rest) before the correction is refused.
    ``refit``: no effect (kept so that old configurations load): it once solved an accepted correction
    again on all tokens, held-out ones included, which the share's later judges (the next layers',
    ``--reconstruct``'s) would then have seen fitted.
    ``share`` 0 turns all of this off (never-worse on the tokens fitted, as before).
    """

    share: float = DEFAULT_HOLDOUT
    refit: bool = True
    dampings: tuple[float, ...] = ()
    escalate: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.share) and 0.0 <= self.share < 1.0):
            raise invalid(f"holdout must be in [0, 1), got {self.share}")
        object.__setattr__(self, "dampings", tuple(float(d) for d in self.dampings))
        for d in self.dampings:
            check_damping(d)

    @property
    def active(self) -> bool:
        return self.share > 0.0


@dataclass
class LayerProblem:
    """One pruned linear handed to a method's ``propose``."""

    w_orig: torch.Tensor
    w_pruned: torch.Tensor
    mask: torch.Tensor
    selected: torch.Tensor
    scores: torch.Tensor
    group: Any  # prac.model.group.InputGroup
    meter: Any  # prac.correction.objective.LayerError on the error matrix
    error_source: str  # "hessian" (the full H) or "samples" (the stored token sample)


@dataclass
class Proposal:
    """A method's change before the never-worse check: δ, ``δᵢᵀ H δᵢ`` per row (H: the error matrix),
    method-specific diagnostics, and the optimum it solved for (``optimal``: reused as the yardstick)."""

    delta: torch.Tensor
    quad: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    optimum: Any = None  # prac.correction.optimal.PCGOutcome


@dataclass
class CorrectionResult:
    weight: torch.Tensor  # fp32 [out, in], zeros where mask
    diagnostics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Correction:
    """``settings``: the method's settings dataclass (defaults and validation inside it);
    ``stats``: ``stats(settings, exact_errors, seed) -> StatsSpec``, what the accumulators must hold;
    ``propose``: the method; ``clamps``: whether it bounds |δ| (reported as clamp counts)."""

    name: str
    settings: type
    stats: Callable[[Any, bool, int], StatsSpec]
    propose: Callable[[LayerProblem, Any], Proposal]
    description: str
    clamps: bool = False
