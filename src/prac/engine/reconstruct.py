"""Block-wise reconstruction: after a block is pruned, tune its surviving weights (masks fixed) so its
output on the calibration tokens matches the dense model's (``--reconstruct``).

Every mask source and correction minimises each linear's own output error. The user judges the
model's output. Here the pruned block's output — or, with ``sublayer``, the attention's and the
MLP's outputs each — is fitted to the dense model's on the same tokens, with a first-order optimiser
over the block's pruned linears (SAFE+/Wanda++/"A Free Lunch", arXiv 2506.06866, 2503.04992,
2510.14444). The target is the dense model's stream (the dense model's input to this block, through
the dense block), so a block also takes up what the blocks before it lost.

- **Objective.** ``block``: the mean over the fitted tokens ``t`` of ``‖f(x_t) − y_t‖² / ‖y_t‖²``
  (``loss="token"``, the default), ``f`` the pruned block, ``x_t`` its input in the pruned model,
  ``y_t`` the dense model's block output; ``loss="total"``: ``Σ‖f(X) − Y_d‖² / Σ‖Y_d‖²`` over all
  fitted tokens at once. ``sublayer``: the same for each direct child of the block that holds pruned
  linears (attention, MLP), each on its own input in the pruned model, detached (so each sublayer is
  fitted to its own target alone), the relative errors summed. Why per token: the next block (and the
  head) reads its input through an RMSNorm, so what reaches it is each token's direction, whatever
  its scale; and real models carry "massive activations" — on SmolLM2-135M the first token of every
  window holds 98% of the residual stream's energy from block 11 on — so the ``total`` objective
  (and its judge) sees little but that one token.
- **Masks fixed.** The weights are fp32 copies (the model may be bf16); after every step the pruned
  entries are multiplied by zero again, so they stay exactly zero (and N:M stays N:M).
- **Minibatches.** An epoch makes ``minibatches`` steps (at most one per calibration batch); step
  ``k`` sums the gradient of every calibration batch whose global index ``g`` is ``k`` modulo
  ``minibatches``. The minibatches are thus the same whatever process holds which batch.
- **Summed in one fixed order** (:mod:`prac.core.treesum`), so any number of processes takes the very steps
  of one, bit for bit. Each batch's gradient is computed on its own and is a leaf of the step's tree,
  indexed ``g // minibatches`` (a process's batches of one step are then a contiguous run of leaves);
  the errors and target energies that scale the loss and judge the epochs are leaves indexed ``g``.
  A process pushes its leaves (:func:`prac.core.treesum.push`); ``combine`` hands every process's stack
  to every process and adds them as one process adds its own (:meth:`prac.parallel.data_parallel.DataParallel.sum_tree`).
- **Judged on data it did not fit.** The sequences of ``--holdout`` are never fitted. After every
  epoch their output error is measured; tuning stops when it has not reached a new best for ``patience``
  epochs in a row (1: at the first that is not better), and the best epoch's weights are
  kept. A block whose held-out error did not drop keeps its pre-tuning weights (``kept: false``).
  Without a held-out share the fitted error decides.
- **Memory.** One block: its fp32 weights, the optimiser's state, their gradients (up to
  ``log2(batches per step) + 1`` at once on the tree's stack; one with the defaults, one batch per
  step), and one calibration batch's activations for the backward pass. Estimated before tuning
  starts (:func:`prac.engine.memory.reconstruct_bytes`, the record's ``estimated_memory_bytes``); on
  a GPU that has less free the run stops with a one-line error instead of running out midway.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from prac.core.digest import digest
from prac.core.errors import PracError
from prac.core.treesum import Node, combine, push
from prac.engine.memory import check_reconstruct_fits, reconstruct_bytes
from prac.model.blocks import BlockInputs, _to, block_output

MODES = ("none", "block", "sublayer")
LOSSES = ("token", "total")
OPTIMIZERS = ("adam", "rmsprop", "sgd")


@dataclass(frozen=True)
class ReconstructConfig:
    """``mode``: none | block | sublayer; ``epochs``: passes over the fitted sequences; ``minibatches``:
    steps per epoch (see the module docstring); ``lr`` and ``optimizer`` (adam | rmsprop | sgd) of
    the first-order optimiser; ``holdout``: the share of calibration sequences it is judged on (the
    same draw as a correction's). Defaults measured on the bundled model (docs/reconstruct.md)."""

    mode: str = "none"
    epochs: int = 8
    minibatches: int = 16
    lr: float = 1e-3
    optimizer: str = "adam"
    holdout: float = 0.125  # share of the calibration sequences never fitted (prac.model.stats.holdout_rows)
    schedule: str = "cosine"  # constant | cosine: linear warm-up over the first epoch, then cosine to zero
    loss: str = "token"  # token | total: the relative error of each token averaged, or of all tokens at once
    patience: int = 1  # epochs in a row without a new best held-out error before tuning stops

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PracError(f"--reconstruct must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.patience < 1:
            raise PracError(f"reconstruct patience must be >= 1, got {self.patience}")
        if self.epochs < 1 or self.minibatches < 1:
            raise PracError(f"reconstruct epochs and minibatches must be >= 1, got {self.epochs} and {self.minibatches}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise PracError(f"reconstruct learning rate must be > 0, got {self.lr}")
        if not (math.isfinite(self.holdout) and 0.0 <= self.holdout < 1.0):
            raise PracError(f"holdout must be in [0, 1), got {self.holdout}")
        if self.schedule not in ("constant", "cosine"):
            raise PracError(f"reconstruct schedule must be constant or cosine, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise PracError(f"reconstruct loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise PracError(f"reconstruct optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")

    @property
    def active(self) -> bool:
        return self.mode != "none"


@dataclass
class ReconstructRecord:
    """What tuning one block did: output errors (relative, see the module docstring) before and after
    tuning (of the best epoch's weights, whether kept or not) on the fitted and the held-out sequences,
    steps, epochs run, seconds, whether the tuned weights were kept (else the block keeps its
    pre-tuning weights), the peak memory of the tuning (CUDA allocated; None on the CPU) and the
    memory estimated before it (:func:`prac.engine.memory.reconstruct_bytes`)."""

    block: str
    mode: str
    fit_before: float
    fit_after: float
    heldout_before: float | None
    heldout_after: float | None
    steps: int
    epochs: int
    seconds: float
    kept: bool
    stopped_early: bool = False
    masks_kept: bool = True
    peak_memory_bytes: int | None = None
    sublayers: list[str] = field(default_factory=list)
    #: the epoch whose weights were the candidate judged (0: none improved); ``digests``: of the tuned
    #: weights before tuning and after each epoch (:func:`prac.core.digest.digest`), what the judge chose among
    best_epoch: int = 0
    digests: list[str] = field(default_factory=list)
    estimated_memory_bytes: int | None = None
    loss: str = "token"  # the objective the errors above are measured in (ReconstructConfig.loss)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


GradReducer = Callable[[list[torch.Tensor]], None]
"""Sums tensors over the processes of a data-parallel run, in place. Used for counts only (integers
held in floats: exact in any order); everything else goes through a :data:`TreeCombiner`."""

TreeCombiner = Callable[[list[Node], dict[str, torch.Tensor], str], dict[str, torch.Tensor]]
"""``combine(stack, template, what)``: the total of one fixed summation tree (:mod:`prac.core.treesum`) whose
leaves are spread over the processes, on every process; ``stack`` is this process's part (its
leaves pushed, in order; maybe empty), ``template`` the fields' shapes and dtypes."""


def local_tree(stack: list[Node], template: dict[str, torch.Tensor], what: str = "") -> dict[str, torch.Tensor]:
    """:data:`TreeCombiner` of one process: the stack folded (zeros when empty)."""
    total = combine([stack])
    return total if total is not None else {k: torch.zeros_like(v) for k, v in template.items()}


def sublayers_of(block: nn.Module, names: list[str]) -> list[str]:
    """The direct children of ``block`` that hold some of the linears ``names`` (relative names), in order."""
    heads = []
    for name in names:
        head = name.split(".", 1)[0]
        if "." in name and head not in heads:
            heads.append(head)
    return heads


@contextlib.contextmanager
def _sublayer_taps(block: nn.Module, heads: list[str], detach: bool) -> Iterator[dict[str, torch.Tensor]]:
    """While inside, each named child's output lands in the yielded dict; with ``detach`` its tensor
    inputs are cut from the graph (each sublayer then fits its own target alone)."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for head in heads:
        module = block.get_submodule(head)

        def pre(_m, args, kwargs):
            cut = lambda t: t.detach() if isinstance(t, torch.Tensor) and t.requires_grad else t  # noqa: E731
            return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

        def post(_m, _args, out, _head=head):
            outputs[_head] = block_output(out)

        if detach:
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class _Problem:
    """The block, its tuned weights and the data: errors and gradients per calibration batch."""

    def __init__(self, block: nn.Module, weights: dict[str, torch.Tensor], transposed: set[str],
                 inputs: BlockInputs, targets: list[torch.Tensor], sub_targets: dict[str, list[torch.Tensor]],
                 held: list[torch.Tensor | None], device: torch.device, loss: str = "token"):
        self.block, self.weights, self.transposed, self.tokenwise = block, weights, transposed, loss == "token"
        self.inputs, self.targets, self.sub_targets, self.held, self.device = inputs, targets, sub_targets, held, device
        self.dtype = next(block.parameters()).dtype

    def _params(self) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": (w.T if name in self.transposed else w).to(self.dtype)
                for name, w in self.weights.items()}

    def _rows(self, j: int, fit: bool) -> torch.Tensor | None:
        """Per-sequence weights of batch ``j``: 1 for the sequences of the share asked, 0 elsewhere."""
        held = self.held[j] if self.held else None
        n = self.inputs.hidden[j].shape[0]
        if held is None:
            return None if fit else torch.zeros(n, device=self.device)
        held = held.to(self.device)
        return (~held).float() if fit else held.float()

    def fit_energy(self, j: int) -> torch.Tensor:
        """The target energy of batch ``j``'s fitted sequences (no forward needed)."""
        target = self.targets[j].to(self.device).float()
        return (self._norms(target)[1] * self.rows(j, True)).sum()

    def _norms(self, target: torch.Tensor, pred: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Per sequence: the squared error of ``pred`` (None without) and the loss's normaliser — the
        target's energy (``total``), or its token count with each token's error divided by the
        token's own energy (``token``; :data:`LOSSES`)."""
        n = target.shape[0]
        diff = None if pred is None else (pred.reshape(target.shape).float() - target).square()
        if not self.tokenwise:
            err = None if diff is None else diff.reshape(n, -1).sum(dim=1)
            return err, target.square().reshape(n, -1).sum(dim=1)
        energy = target.square().sum(dim=-1).clamp_min(1e-30)  # per token
        err = None if diff is None else (diff.sum(dim=-1) / energy).reshape(n, -1).sum(dim=1)
        return err, torch.full((n,), float(energy[0].numel()), device=target.device)

    def rows(self, j: int, fit: bool) -> torch.Tensor:
        """Per-sequence weights of batch ``j``: 1 for the sequences of the share asked, 0 elsewhere."""
        rows = self._rows(j, fit)
        return torch.ones(self.inputs.hidden[j].shape[0], device=self.device) if rows is None else rows

    def batch(self, j: int, heads: list[str], detach: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple]]:
        """Per sequence of batch ``j``: the squared error of the block's output and its target energy
        and, per sublayer, the same for its output; differentiable. One forward."""
        hidden = self.inputs.hidden[j].to(self.device)
        args, kwargs = _to(self.inputs.args[j], self.device), _to(self.inputs.kwargs[j], self.device)
        with _sublayer_taps(self.block, heads, detach) as taps:
            out = block_output(functional_call(self.block, self._params(), (hidden, *args), kwargs, strict=False))

        def per_sequence(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._norms(target.to(self.device).float(), pred)

        err, energy = per_sequence(out, self.targets[j])
        subs = {head: per_sequence(taps[head], self.sub_targets[head][j]) for head in heads}
        return err, energy, subs


def _cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at ``step``: linear warm-up over ``warmup`` steps, then a cosine to 0."""
    if step < warmup and total > warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span)) if total > warmup else 1.0


def _optimizer(cfg: ReconstructConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def reconstruct_block(block: nn.Module, name: str, units: dict[str, Any], inputs: BlockInputs,
                      targets: list[torch.Tensor], held: list[torch.Tensor | None] | None, cfg: ReconstructConfig,
                      device: torch.device, sub_targets: dict[str, list[torch.Tensor]] | None = None,
                      first_batch: int = 0, reduce: GradReducer | None = None,
                      combine_tree: TreeCombiner | None = None) -> ReconstructRecord:
    """Tune the surviving weights of ``units`` (the block's pruned :class:`prac.model.units.Unit`\\ s, full
    names under ``name``) so that ``block`` reproduces ``targets`` (the dense model's block outputs
    per calibration batch; ``sub_targets``: per sublayer, for ``sublayer``) from ``inputs``; write
    them into the units when they lower the held-out (else the fitted) error. ``first_batch``: the
    global index of the first batch (data-parallel); ``reduce`` sums counts across processes,
    ``combine_tree`` adds every process's part of a fixed summation tree (gradients, errors)."""
    started = time.perf_counter()
    tokens = max((h.numel() // h.shape[-1] for h in inputs.hidden), default=0)  # of the largest batch
    need = reconstruct_bytes(units.values(), tokens, next(block.parameters()).element_size(), cfg.optimizer,
                             math.ceil(len(inputs) / cfg.minibatches))
    check_reconstruct_fits(need, device, name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefix = name + "."
    weights = {u.name[len(prefix):]: u.read().to(device).requires_grad_(True) for u in units.values()}
    transposed = {u.name[len(prefix):] for u in units.values() if u.kind == "conv1d"}
    keep = {k: (w != 0) for k, w in weights.items()}
    heads = sublayers_of(block, list(weights)) if cfg.mode == "sublayer" else []
    problem = _Problem(block, weights, transposed, inputs, targets, sub_targets or {}, held or [], device, cfg.loss)

    def reduced(values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Counts summed over the processes (exact: integers)."""
        if reduce is not None:
            reduce(values)
        return values

    tree = combine_tree or local_tree

    def tree_sum(leaves: Iterator[tuple[int, torch.Tensor]], width: int, what: str) -> torch.Tensor:
        """The per-batch vectors ``(global batch index, values of length width)`` of every process,
        added along the tree (a process may have none: the held-out errors)."""
        stack: list[Node] = []
        for leaf, values in leaves:
            push(stack, Node(leaf, 1, {"v": values}))
        return tree(stack, {"v": torch.zeros(width, device=device)}, what)["v"]

    held_here = sum(int(h.sum()) for h in (held or []) if h is not None)
    has_held = float(reduced([torch.tensor(float(held_here), device=device)])[0]) > 0  # on any process

    def errors(held_only: bool = False) -> tuple[float, float | None]:
        """(fitted, held-out) relative block output errors in one pass (``held_only``: the batches
        holding held-out sequences alone; the fitted error is then not measured)."""
        def leaves() -> Iterator[tuple[int, torch.Tensor]]:
            for j in range(len(inputs)):
                if held_only and not (held and held[j] is not None and bool(held[j].any())):
                    continue
                e, n, _ = problem.batch(j, [], False)
                fit, out = problem.rows(j, True), problem.rows(j, False)
                yield first_batch + j, torch.stack([(e * fit).sum(), (n * fit).sum(), (e * out).sum(), (n * out).sum()])

        with torch.no_grad():
            fe, fn, he, hn = tree_sum(leaves(), 4, "errors").tolist()
            return (fe / max(fn, 1e-30) if not held_only else math.nan), (he / max(hn, 1e-30) if has_held else None)

    def energies() -> dict[str, torch.Tensor]:
        """The fitted target energy of each sublayer's output (the loss's scales in ``sublayer`` mode)."""
        def leaves() -> Iterator[tuple[int, torch.Tensor]]:
            for j in range(len(inputs)):
                _, _, subs = problem.batch(j, heads, False)
                fit = problem.rows(j, True)
                yield first_batch + j, torch.stack([(subs[h][1] * fit).sum() for h in heads])

        with torch.no_grad():
            values = tree_sum(leaves(), len(heads), "sublayer energies")
            return {h: values[i].clamp_min(1e-30) for i, h in enumerate(heads)}

    fit_before, held_before = errors()
    scale = energies() if heads else {}
    with torch.no_grad():
        scale[""] = tree_sum(((first_batch + j, problem.fit_energy(j).reshape(1)) for j in range(len(inputs))),
                             1, "target energy")[0].clamp_min(1e-30)
    best = (held_before if has_held else fit_before, {k: w.detach().clone() for k, w in weights.items()}, 0)
    digests = [digest(w.detach() for w in weights.values())]
    opt = _optimizer(cfg, list(weights.values()))
    # no more minibatches than calibration batches over every process: an empty step would still move
    # the weights (the optimiser's momentum)
    batches = int(float(reduced([torch.tensor(float(len(inputs)), device=device)])[0]))
    minibatches = max(1, min(cfg.minibatches, batches))
    total_steps = cfg.epochs * minibatches
    steps, stopped, epochs, worse = 0, False, 0, 0
    params = list(weights.values())
    with torch.enable_grad():
        for epoch in range(cfg.epochs):
            for k in range(minibatches):
                mine = [j for j in range(len(inputs)) if (first_batch + j) % minibatches == k]
                # each batch's gradient on its own, a leaf of step k's tree (leaf: its place in the step)
                stack: list[Node] = []
                for j in mine:
                    err, _, subs = problem.batch(j, heads, detach=True)
                    fit = problem.rows(j, True)
                    loss = (sum((subs[h][0] * fit).sum() / scale[h] for h in heads) if heads
                            else (err * fit).sum() / scale[""])
                    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
                    push(stack, Node((first_batch + j) // minibatches, 1, dict(zip(weights, grads))))
                    del err, subs, loss, grads
                total = tree(stack, {key: w.detach() for key, w in weights.items()}, "gradients")
                for key, w in weights.items():
                    w.grad = total[key]
                if cfg.schedule == "cosine":
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * _cosine(steps, minibatches, total_steps)
                opt.step()
                with torch.no_grad():
                    for key, w in weights.items():
                        w.mul_(keep[key])  # pruned entries exactly zero again
                steps += 1
            epochs = epoch + 1
            digests.append(digest(w.detach() for w in weights.values()))
            fit_now, held_now = errors(held_only=has_held)
            now = held_now if has_held else fit_now
            if now < best[0]:
                best = (now, {k: w.detach().clone() for k, w in weights.items()}, epochs)
                worse = 0
            elif has_held:
                worse += 1
                if worse >= cfg.patience:
                    stopped = True
                    break
    with torch.no_grad():
        for key, w in weights.items():
            w.copy_(best[1][key])
    fit_after, held_after = errors()
    kept = best[2] > 0 and (held_after < held_before if has_held else fit_after < fit_before)
    masks_kept = all(bool((w[~keep[k]] == 0).all()) for k, w in weights.items())
    if not masks_kept:
        raise RuntimeError(f"internal error: reconstruction of {name} moved a pruned weight")
    if kept:
        for unit in units.values():
            unit.write(weights[unit.name[len(prefix):]].detach())
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return ReconstructRecord(block=name, mode=cfg.mode, fit_before=fit_before, fit_after=fit_after,
                             heldout_before=held_before, heldout_after=held_after,
                             steps=steps, epochs=epochs, seconds=round(time.perf_counter() - started, 3), kept=kept,
                             stopped_early=stopped, masks_kept=masks_kept, peak_memory_bytes=peak, sublayers=heads,
                             best_epoch=best[2], digests=digests, estimated_memory_bytes=need, loss=cfg.loss)


def summarize(records: list[ReconstructRecord]) -> dict[str, Any]:
    """The summary's ``reconstruction``: blocks tuned and kept, the mean block output error before and
    after (of the weights the model ends with), steps, seconds, the largest peak memory and the
    largest estimate (:func:`prac.engine.memory.reconstruct_bytes`)."""
    final_fit = [r.fit_after if r.kept else r.fit_before for r in records]
    held = [(r.heldout_before, r.heldout_after if r.kept else r.heldout_before) for r in records
            if r.heldout_before is not None]
    peaks = [r.peak_memory_bytes for r in records if r.peak_memory_bytes is not None]
    out: dict[str, Any] = {"mode": records[0].mode, "loss": records[0].loss, "blocks": len(records),
                           "kept": sum(r.kept for r in records),
                           "mean_fit_error_before": sum(r.fit_before for r in records) / len(records),
                           "mean_fit_error_after": sum(final_fit) / len(records),
                           "steps": sum(r.steps for r in records),
                           "seconds": round(sum(r.seconds for r in records), 3)}
    if held:
        out["mean_heldout_error_before"] = sum(b for b, _ in held) / len(held)
        out["mean_heldout_error_after"] = sum(a for _, a in held) / len(held)
    if peaks:
        out["peak_memory_bytes"] = max(peaks)
    out["estimated_memory_bytes"] = max((r.estimated_memory_bytes or 0) for r in records)
    return out
