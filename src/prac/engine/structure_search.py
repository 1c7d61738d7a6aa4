"""``--target-params F``: which homogeneous shape keeps the share ``F`` of the block parameters with the
least damage, chosen by measured held-out error (a small search, as Minitron's, scored without
distillation or tuning).

Candidates: up to three depths (none; half and all of what depth alone would need, ``⌊L(1 − F)⌋``
blocks) times two attention widths (every KV group; one fewer) — or only the depth and KV count the
user gave with it —, and for each the MLP width that brings
the block parameters to at most ``F`` of the dense model's, rounded down to a multiple of 64 (8 for
MLPs under 1024 neurons). Each candidate shrinks a copy of the model with the structured pass
(:func:`prac.engine.structure.shrink_model`, the refit but no tuning) on the fitted sequences; its
score is the mean per-token relative change of the final norm's output on the held-out sequences
(:func:`prac.engine.depth.output_change`). The lowest score wins; its shape is then run for real (with
the tuning, when asked).

The parameter count of a shape is exact: per block ``c + kv · a + i · b``, with ``a`` the parameters of
one KV group and its query heads (their rows of q/k/v, columns of o), ``b`` of one MLP neuron, and
``c`` the rest (norms), read off the model's first block.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prac.core.errors import PracError
from prac.core.progress import Progress, no_progress
from prac.engine.config import EngineConfig
from prac.engine.depth import final_outputs, output_change
from prac.engine.reconstruct import ReconstructConfig
from prac.model.shrink import Shape, text_config
from prac.model.stats import holdout_rows

log = logging.getLogger(__name__)
#: how far over ``F`` a candidate may land when its MLP width is rounded to the nearest multiple
TOLERANCE = 0.005
#: the fitted sequences each candidate is fitted on, at most, unless ``--search-nsamples`` says otherwise:
#: the search then costs the same whatever ``--nsamples`` (the shape chosen is then run on them all)
SEARCH_SEQUENCES = 32


@dataclass(frozen=True)
class BlockBudget:
    """Parameters of one block as ``c + kv · a + i · b`` (module docstring) and the dense shape."""

    per_group: int
    per_neuron: int
    rest: int
    layers: int
    kv: int
    intermediate: int
    query_width: int = 1  # o_proj inputs per KV group (query heads per group x head_dim)

    @classmethod
    def of(cls, model: nn.Module) -> BlockBudget:
        cfg = text_config(model.config)
        block = model.get_decoder().layers[0]
        kv, inter = int(cfg.num_key_value_heads), int(cfg.intermediate_size)
        attn = sum(p.numel() for m in ("q_proj", "k_proj", "v_proj", "o_proj")
                   for p in getattr(block.self_attn, m).parameters())
        mlp = sum(p.numel() for m in ("gate_proj", "up_proj", "down_proj") for p in getattr(block.mlp, m).parameters())
        o_bias = block.self_attn.o_proj.bias.numel() if block.self_attn.o_proj.bias is not None else 0
        d_bias = block.mlp.down_proj.bias.numel() if block.mlp.down_proj.bias is not None else 0
        total = sum(p.numel() for p in block.parameters())
        per_group, per_neuron = (attn - o_bias) // kv, (mlp - d_bias) // inter
        return cls(per_group, per_neuron, total - kv * per_group - inter * per_neuron, int(cfg.num_hidden_layers),
                   kv, inter, block.self_attn.o_proj.in_features // kv)

    def params(self, layers: int, kv: int, intermediate: int) -> int:
        return layers * (self.rest + kv * self.per_group + intermediate * self.per_neuron)

    @property
    def dense(self) -> int:
        return self.params(self.layers, self.kv, self.intermediate)


def candidate_shapes(budget: BlockBudget, share: float, width_multiple: int = 1, layers_fixed: int | None = None,
                     kv_fixed: int | None = None) -> list[Shape]:
    """The candidates of the module docstring that keep ``share`` of the block parameters (within
    :data:`TOLERANCE` above); ``width_multiple``: the MLP width is also a multiple of it (``--wbits``'
    group size), and so are the attention widths tried (else that KV count is not tried);
    ``layers_fixed``/``kv_fixed``: the depth or KV count the user gave, the only one tried."""
    if not 0.0 < share < 1.0:
        raise PracError(f"--target-params must be in (0, 1), got {share}")
    target = share * budget.dense
    full_depth = math.floor(budget.layers * (1.0 - share) + 1e-9)
    multiple = math.lcm(64 if budget.intermediate >= 1024 else 8, max(1, width_multiple))
    shapes: list[Shape] = []
    drops = {0, full_depth // 2, full_depth} if layers_fixed is None else {budget.layers - layers_fixed}
    kvs = {budget.kv, max(1, budget.kv - 1)} if kv_fixed is None else {kv_fixed}
    for drop in sorted(drops):
        layers = budget.layers - drop
        if layers < 1:
            continue
        for kv in sorted(kvs, reverse=True):
            if kv < budget.kv and (kv * budget.query_width) % max(1, width_multiple):
                continue
            room = target / layers - budget.rest - kv * budget.per_group
            inter = min(budget.intermediate, round(room / budget.per_neuron / multiple) * multiple)
            if budget.params(layers, kv, inter) > target * (1 + TOLERANCE):  # the nearest is too far over: below
                inter = min(budget.intermediate, math.floor(room / budget.per_neuron / multiple) * multiple)
            if inter < max(1, budget.intermediate // 8) or budget.params(layers, kv, inter) > target * (1 + TOLERANCE):
                continue
            shape = Shape(intermediate_size=inter if inter < budget.intermediate else None,
                          num_key_value_heads=kv if kv < budget.kv or kv_fixed is not None else None,
                          num_hidden_layers=layers if drop or layers_fixed is not None else None)
            if shape.active and shape not in shapes:
                shapes.append(shape)
    if not shapes:
        raise PracError(f"--target-params {share}: no shape of this model keeps that share"
                        + (" with the blocks or KV groups given" if layers_fixed or kv_fixed else "")
                        + f" (MLP widths under an eighth of {budget.intermediate} are not tried)")
    return shapes


@dataclass
class SearchOutcome:
    """The candidates tried (shape, share of block parameters, held-out score, seconds), the chosen, and
    the sequences each candidate was fitted and judged on."""

    share: float
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: Shape | None = None
    seconds: float = 0.0
    fitted_sequences: int = 0  # what each candidate was fitted on
    held_out_sequences: int = 0  # what each candidate was judged on

    def to_dict(self) -> dict[str, Any]:
        return {"target_params": self.share, "fitted_sequences": self.fitted_sequences,
                "held_out_sequences": self.held_out_sequences, "candidates": self.candidates,
                "chosen": self.chosen.to_dict() if self.chosen else None, "seconds": round(self.seconds, 3)}


def search_shape(model: nn.Module, calib: torch.Tensor, share: float, engine: EngineConfig, device: torch.device,
                 holdout: float, seed: int, progress: Progress = no_progress, width_multiple: int = 1,
                 fixed: Shape = Shape(), max_fitted: int | None = None,  # noqa: B008 (frozen)
                 damping: float | None = None) -> SearchOutcome:
    """Choose the shape for ``--target-params share`` (module docstring), keeping ``fixed``'s
    ``num_hidden_layers``/``num_key_value_heads`` when given; ``model`` is left as it was.
    ``max_fitted``: each candidate is fitted on at most this many of the fitted sequences (the first
    ones; None: all), and judged on every held-out one; ``damping``: the selection's ridge (None: its default)."""
    from prac.engine.structure import shrink_model  # the pass this search scores (same layer)

    started = time.perf_counter()
    budget = BlockBudget.of(model)
    holdout = holdout if holdout > 0 else 0.125  # the search always judges on sequences it did not fit
    held = holdout_rows(calib.shape[0], holdout, seed)
    if held is None:  # a single sequence: nothing to hold out, it judges what it fitted
        held = torch.zeros(calib.shape[0], dtype=torch.bool)
    judge = calib[held] if bool(held.any()) else calib
    fitted = (~held).nonzero().flatten()
    if max_fitted is not None:
        fitted = fitted[:max(1, max_fitted)]
    rows = torch.cat([fitted, held.nonzero().flatten()]).sort().values
    trial_calib, trial_held = calib[rows], held[rows]  # the candidates' sequences: the fitted subset, every held one
    ref = final_outputs(model, judge, engine.batch_size, device)
    plain = dataclasses.replace(engine, dense_target=False, reconstruct=ReconstructConfig())
    outcome = SearchOutcome(share, fitted_sequences=len(fitted), held_out_sequences=int(held.sum()))
    best = math.inf
    for shape in candidate_shapes(budget, share, width_multiple, fixed.num_hidden_layers, fixed.num_key_value_heads):
        t0 = time.perf_counter()
        trial = copy.deepcopy(model)
        shrink_model(trial, trial_calib, dataclasses.replace(shape, damping=damping), plain, device, progress,
                     holdout=holdout, seed=seed, held=trial_held)
        score = output_change(final_outputs(trial, judge, engine.batch_size, device), ref)
        kept = budget.params(shape.num_hidden_layers or budget.layers, shape.num_key_value_heads or budget.kv,
                             shape.intermediate_size or budget.intermediate) / budget.dense
        outcome.candidates.append({**shape.to_dict(), "kept_share": round(kept, 6), "heldout_change": score,
                                   "seconds": round(time.perf_counter() - t0, 3)})
        log.info("--target-params %s: candidate %s keeps %.4f, held-out output change %.5g", share, shape.to_dict(),
                 kept, score)
        if score < best:
            best, outcome.chosen = score, shape
        del trial
    outcome.seconds = time.perf_counter() - started
    return outcome
