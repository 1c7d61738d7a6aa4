"""Mask sources: the registry of pluggable functions ``(weight, group, pattern, settings) -> MaskResult``.

Each takes the dense fp32 weight ``[out, in]`` and the :class:`prac.model.group.InputGroup` of its input
and returns the pruned weight (exact zeros where the mask is True) — SparseGPT also updates the
survivors. An entry holds the method's settings dataclass (defaults and validation inside it) and
what statistics it needs. Adding a method = a function (or module) + one line in ``METHODS``: its CLI
flags come from its settings' field metadata (:mod:`prac.cli.settings_flags`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from prac.core.errors import PracError
from prac.methods.admm import ADMMSettings, admm_prune
from prac.methods.masks import SCOPE, SCOPES, MaskResult, apply_mask, magnitude_scores, mask_from_scores, wanda_scores
from prac.methods.patterns import Pattern
from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_factor, sparsegpt_prune, sparsegpt_prune_many, worth_joining
from prac.model.group import InputGroup
from prac.model.stats import StatsSpec


@dataclass(frozen=True)
class ScoreSettings:
    """Score-based mask sources: ``scope`` is the comparison group of unstructured masks
    (``row``: each output row keeps its share; ``layer``: one budget for the whole matrix)."""

    scope: str = field(default="row", metadata=SCOPE)

    def __post_init__(self) -> None:
        if self.scope not in SCOPES:
            raise PracError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")


MaskFn = Callable[[torch.Tensor, "InputGroup | None", Pattern, Any], MaskResult]


@dataclass(frozen=True)
class Method:
    """``stats``: what the input statistics must hold (None: no calibration pass at all);
    ``quantizes``: ``fn`` takes ``quant=`` (a :class:`prac.quant.gptq.ColumnQuantizer`) and prunes and
    quantizes in one sweep (else quantization is a GPTQ pass on its mask); ``many``: prunes the
    linears of one input group together, ``(weights, group, patterns, settings) -> [MaskResult]``,
    with the results ``fn`` gives one by one, where ``joinable(patterns, rows, device)`` says it pays;
    ``dense_target_by_default``: every layer reconstructs the dense model's output unless told otherwise
    (``--dense-target``): prac's own methods, while the others keep the reference implementations'
    objective (and masks); ``column_blocks``: the settings have a ``blocksize`` and a ``sweeps_blocks``
    property (see :meth:`sweep_blocksize`, :meth:`sweeps_blocks`)."""

    fn: MaskFn
    settings: type
    stats: StatsSpec | None
    description: str
    quantizes: bool = False
    many: Callable[..., list[MaskResult]] | None = None
    joinable: Callable[[list[Pattern], list[int], torch.device], bool] | None = None
    dense_target_by_default: bool = False
    column_blocks: bool = False

    def sweep_blocksize(self, settings: Any) -> int:
        """The column block of a quantizing sweep on this method's masks (its own, or the GPTQ pass after
        it): the settings' ``blocksize``, else 128."""
        return settings.blocksize if self.column_blocks else 128

    def sweeps_blocks(self, settings: Any) -> bool:
        """Whether this run sweeps the columns in blocks of ``blocksize`` (an N:M pattern's M must divide it)."""
        return self.column_blocks and settings.sweeps_blocks


def magnitude(weight: torch.Tensor, group: InputGroup | None, pattern: Pattern, settings: ScoreSettings) -> MaskResult:
    mask = mask_from_scores(magnitude_scores(weight), pattern, settings.scope)
    return MaskResult(apply_mask(weight, mask), mask)


def wanda(weight: torch.Tensor, group: InputGroup | None, pattern: Pattern, settings: ScoreSettings) -> MaskResult:
    if group is None or group.stats is None:
        raise RuntimeError("wanda needs input statistics")
    mask = mask_from_scores(wanda_scores(weight, group.stats.l2), pattern, settings.scope)
    return MaskResult(apply_mask(weight, mask), mask)


def sparsegpt(weight: torch.Tensor, group: InputGroup | None, pattern: Pattern, settings: SparseGPTConfig,
              quant=None) -> MaskResult:
    """SparseGPT with one factorisation of the group's H shared by every linear reading it; with
    ``quant``, its survivors quantized in the same sweep."""
    if group is None or group.stats is None or group.stats.hessian is None:
        raise RuntimeError("sparsegpt needs the input Hessian")
    hessian = group.stats.hessian
    factor = None
    if pattern.target_sparsity > 0 or quant is not None:  # sparsity 0 alone is a no-op: nothing to factorise
        factor = shared_factor(group, settings, weight.device)
    result = sparsegpt_prune(weight, hessian, pattern, settings, factor=factor, quant=quant)
    return MaskResult(result.weight, result.mask, dict(result.diagnostics))


def sparsegpt_many(weights: list[torch.Tensor], group: InputGroup, patterns: list[Pattern],
                   settings: SparseGPTConfig) -> list[MaskResult]:
    """The linears of one input group in one SparseGPT sweep (:func:`prac.methods.sparsegpt.sparsegpt_prune_many`),
    on the group's shared factor."""
    if group is None or group.stats is None or group.stats.hessian is None:
        raise RuntimeError("sparsegpt needs the input Hessian")
    factor = shared_factor(group, settings, weights[0].device)
    results = sparsegpt_prune_many(weights, group.stats.hessian, patterns, settings, factor=factor)
    return [MaskResult(r.weight, r.mask, dict(r.diagnostics)) for r in results]


def shared_factor(group: InputGroup, settings: SparseGPTConfig | None = None, device=None):
    """The group's SparseGPT factor ((H + λI)⁻¹ = UᵀU), built once for every linear that reads it."""
    settings = SparseGPTConfig() if settings is None else settings
    hessian = group.stats.hessian
    return group.factor(("sparsegpt", settings.percdamp, settings.damping_retries, settings.damping_growth),
                        lambda: sparsegpt_factor(hessian, settings, device or hessian.device))


def admm(weight: torch.Tensor, group: InputGroup | None, pattern: Pattern, settings: ADMMSettings) -> MaskResult:
    """Mask and weights chosen together by ADMM on the group's H (see ``admm.py``)."""
    return admm_prune(weight, group, pattern, settings)


METHODS: dict[str, Method] = {
    "magnitude": Method(magnitude, ScoreSettings, None, "|W|, per row (or per layer with --scope layer)"),
    "wanda": Method(wanda, ScoreSettings, StatsSpec(), "|W|·||X||₂ compared within each output row"),
    "sparsegpt": Method(sparsegpt, SparseGPTConfig, StatsSpec(hessian=True),
                        "OBS-style pruning with weight updates (Frantar & Alistarh 2023)", quantizes=True,
                        many=sparsegpt_many, joinable=worth_joining, column_blocks=True),
    "admm": Method(admm, ADMMSettings, StatsSpec(hessian=True),
                   "mask and weights chosen jointly by ADMM on the layer objective, then solved exactly",
                   dense_target_by_default=True, column_blocks=True),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise PracError(f"unknown pruning method {name!r}: choose from {', '.join(METHODS)}")
    return METHODS[name]
