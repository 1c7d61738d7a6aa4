"""Calibration statistics of one layer input, accumulated incrementally on the device.

One :class:`InputStats` serves every linear that reads the same input tensor (q/k/v share
one, gate/up share one). Everything is fp32 and stays on the device it was created on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from prac.core.errors import PracError
from prac.core.treesum import Node, combine, push

if TYPE_CHECKING:
    from prac.model.experts import Route


@dataclass(frozen=True)
class StatsSpec:
    """What to collect beyond the always-on token count, sum and sum of squares."""

    hessian: bool = False
    max_samples: int = 0
    seed: int = 0
    #: share of the calibration *sequences* whose rows are kept apart (``InputStats.heldout``): they
    #: enter no statistic that anything is fitted on, only the held-out share's, which judges it
    holdout: float = 0.0
    #: also Σ (x_dense − x) xᵀ, how the inputs the layer gets in the dense model differ from those it
    #: gets in the model being pruned, against the latter (``InputStats.drift``, for ``--dense-target``)
    drift: bool = False
    #: which sequences are held out, given explicitly (one flag per calibration sequence) instead of
    #: drawn from ``holdout`` and ``seed``: a caller that fits on a subset of a run's sequences keeps
    #: the run's held-out ones (``--target-params``' search)
    held: tuple[bool, ...] | None = None

    def union(self, other: StatsSpec) -> StatsSpec:
        return StatsSpec(
            hessian=self.hessian or other.hessian,
            max_samples=max(self.max_samples, other.max_samples),
            seed=self.seed,
            holdout=max(self.holdout, other.holdout),
            drift=self.drift or other.drift,
            held=self.held if self.held is not None else other.held,
        )

    def held_rows(self, n: int) -> torch.Tensor | None:
        """The held-out sequences of ``n`` (bool ``[n]``): ``held`` if given, else the draw of
        :func:`holdout_rows`; None when none."""
        if self.held is None:
            return holdout_rows(n, self.holdout, self.seed)
        if len(self.held) != n:
            raise ValueError(f"held-out flags for {len(self.held)} sequences, calibration has {n}")
        return torch.tensor(self.held, dtype=torch.bool) if any(self.held) else None


def holdout_rows(n: int, share: float, seed: int) -> torch.Tensor | None:
    """Which of ``n`` calibration sequences are held out: ``round(share · n)`` of them (at least one,
    and one fewer than ``n`` at most), drawn by a permutation seeded with ``seed``; bool ``[n]``.

    None when nothing is held out (``share`` 0, or a single sequence). Whole sequences, not tokens:
    the tokens of one sequence are correlated, so a token-level split would leak into the held-out share.
    The draw depends only on ``(n, share, seed)``, never on batching or the number of processes.
    """
    if share <= 0.0 or n < 2:
        return None
    k = min(max(int(round(share * n)), 1), n - 1)
    generator = torch.Generator().manual_seed(int(seed) + 0x5EED)
    held = torch.zeros(n, dtype=torch.bool)
    held[torch.randperm(n, generator=generator)[:k]] = True
    return held


class InputStats:
    """Running statistics of the rows of X (tokens x features).

    - ``count``: tokens seen; ``sum``: Σ x; ``sumsq``: Σ x² (Wanda's L2 salience).
    - ``hessian`` (optional): Σ x xᵀ, unnormalised, fp32.
    - ``samples`` (optional): a seeded uniform sample without replacement of at most
      ``max_samples`` token rows, kept by their largest random keys (top-k) so it is independent of batching.
    - ``heldout`` (when ``spec.holdout`` > 0): the count, sums and H of the rows of held-out sequences
      (``add_batch(x, held=...)``), which are *not* in the statistics above: these are then the fit
      share's alone, so every mask source, correction and dense target fits on rows the held-out share
      (which judges them) never entered. :meth:`split` gives (these, the held-out share's). The
      sums of each share are accumulated apart (never a total minus a part). The token sample is
      drawn over the rows of both shares (``sample_pool``, its random keys and ``sample_held``, which
      flags the rows of held-out sequences): ``samples`` is its fit share's rows, the held-out
      share's are in :meth:`split`'s second part. ``held_count``: the tokens held out (0 without).
    - ``drift`` (when ``spec.drift``): Σ (x_d − x) xᵀ, with x_d the same token's input in the *dense*
      model and x its input here, unnormalised, fp32 (:meth:`add_drift`; the fit share's rows). The
      difference is taken per token before the product, so the small drift is not the cancellation of
      two nearly equal sums (Σ x_d xᵀ − Σ x xᵀ would amplify the last bits of the summation order).
      With ``project`` (the dense weights W₀ of the group's linears), :meth:`add_drift` keeps instead
      ``drift_out[name]`` = Σ W₀ (x_d − x) xᵀ, ``[out, in]`` per linear: all the dense target needs,
      and cheaper when the linears' outputs are fewer than their inputs (down_proj).
    - Routed inputs (a projection of an MoE expert, ``add_batch(x, route=...)``): each row is the
      token's input scaled by its routing weight r, so every statistic above is of the rows r·x —
      ``H = Σ r² x xᵀ``, the weighting under which a change of the expert's output reaches the block's
      output (docs/moe.md). ``count`` counts the tokens routed here and ``route_sq`` sums r².
    - ``prior_tokens``: set by :meth:`with_prior` on statistics topped up with prior rows.

    Order of the sums: by default rows are added to the totals as they come. The engine instead
    calls :meth:`begin` with the global index of each calibration batch; every summed statistic is
    then accumulated per batch and the batches added along one fixed tree (:mod:`prac.core.treesum`), the
    totals appearing at :meth:`finish` — bit-identical whether one process saw every batch or several
    processes each a contiguous run of them (:meth:`nodes` hands a process's part to the reduction).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", spec: StatsSpec = StatsSpec()):
        self.dim = dim
        self.spec = spec
        self.device = torch.device(device)
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float32, device=self.device)
        self.sumsq = torch.zeros(dim, dtype=torch.float32, device=self.device)
        self.hessian = (
            torch.zeros(dim, dim, dtype=torch.float32, device=self.device) if spec.hessian else None
        )
        self.drift = torch.zeros(dim, dim, dtype=torch.float32, device=self.device) if spec.drift else None
        self.drift_out: dict[str, torch.Tensor] | None = None
        self.sample_pool: torch.Tensor | None = None  # the token sample over both shares (see samples)
        self._keys: torch.Tensor | None = None
        self._fit_samples: torch.Tensor | None = None  # samples, cut from the pool once
        self._generator: torch.Generator | None = None
        self.heldout: InputStats | None = None
        self.sample_held: torch.Tensor | None = None
        self.route_sq = torch.zeros((), dtype=torch.float32, device=self.device)
        self.prior_tokens = 0
        self._leaf: int | None = None  # the batch being accumulated (ordered sums, see begin)
        self._stack: list[Node] | None = None
        if spec.holdout > 0:
            self.heldout = InputStats(dim, self.device, StatsSpec(hessian=spec.hessian))
        if spec.max_samples > 0:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(spec.seed)

    # --- the order of the sums ---------------------------------------------------------------------

    def _fields(self) -> dict[str, torch.Tensor]:
        """Every summed statistic by name (what a tree node holds)."""
        out = {"sum": self.sum, "sumsq": self.sumsq, "route_sq": self.route_sq}
        if self.hessian is not None:
            out["hessian"] = self.hessian
        if self.drift is not None:
            out["drift"] = self.drift
        for name, t in (self.drift_out or {}).items():
            out[f"drift_out:{name}"] = t
        return out

    def _set_fields(self, fields: dict[str, torch.Tensor]) -> None:
        self.sum, self.sumsq, self.route_sq = fields["sum"], fields["sumsq"], fields["route_sq"]
        if "hessian" in fields:
            self.hessian = fields["hessian"]
        if "drift" in fields:
            self.drift = fields["drift"]
        if self.drift_out is not None:
            self.drift_out = {name: fields[f"drift_out:{name}"] for name in self.drift_out}

    def begin(self, index: int) -> None:
        """The rows added from now on belong to calibration batch ``index`` (its global index, the same
        in every process): the batches are summed along a fixed tree (:mod:`prac.core.treesum`)."""
        if self._stack is None:
            self._stack = []
            if any(bool(t.any()) for t in self._fields().values()):
                raise RuntimeError("ordered sums must begin before any row is added")
        elif self._leaf is not None:
            self._close_leaf(fresh=True)
        self._leaf = int(index)
        if self.heldout is not None:
            self.heldout.begin(index)

    def _close_leaf(self, fresh: bool) -> None:
        """Push the batch being accumulated onto the stack; ``fresh``: zeroed statistics for the next
        (else the fields keep pointing at the pushed node's tensors until :meth:`finish`)."""
        fields = self._fields()
        push(self._stack, Node(self._leaf, 1, fields))
        if fresh:
            self._set_fields({k: torch.zeros_like(v) for k, v in fields.items()})
        self._leaf = None

    @property
    def ordered(self) -> bool:
        """Whether the sums run along the fixed tree (:meth:`begin` was called) and wait for :meth:`finish`."""
        return self._stack is not None

    def nodes(self) -> list[Node]:
        """This accumulator's part of the tree (its batches merged as far as they go), taken out; the
        summed statistics are undefined until :meth:`finish` is given every process's part."""
        if self._stack is None:
            raise RuntimeError("nodes() needs ordered sums (begin)")
        if self._leaf is not None:
            self._close_leaf(fresh=False)
        nodes, self._stack = self._stack, []
        return nodes

    def finish(self, runs: list[list[Node]] | None = None) -> None:
        """Set the totals: the fixed-tree sum of this accumulator's batches (and of its held-out
        share's), or with ``runs``, every process's :meth:`nodes` in the order of their batches, of
        this accumulator alone (fields the nodes lack stay as they are). Nothing to do for statistics
        summed as they came."""
        if self._stack is None:
            return
        local = runs is None
        total = combine([self.nodes()] if local else runs)
        if total is not None:
            self._set_fields({**self._fields(), **total})
        self._stack, self._leaf = None, None
        if local and self.heldout is not None:
            self.heldout.finish()

    # --- adding rows ---------------------------------------------------------------------------------

    def _rows(self, x: torch.Tensor, route: Route | None) -> torch.Tensor:
        rows = x.reshape(-1, self.dim).to(device=self.device, dtype=torch.float32)
        if route is not None:
            rows = rows * route.weight.reshape(-1, 1).to(device=self.device, dtype=torch.float32)
        return rows

    def add_batch(self, x: torch.Tensor, held: torch.Tensor | None = None, route: Route | None = None) -> None:
        """Add the token rows of ``x`` (any leading shape, last dim = features).

        ``held`` (bool, one flag per sequence of the batch): which sequences are held out; their rows
        go to :attr:`heldout` instead of these statistics (with a held-out share; without one they
        are ignored). The rows are ``x``'s first dimension's sequences, or, with ``route`` (an MoE
        expert's input, :class:`prac.model.experts.Route`), the batch's tokens ``route.tokens``, each
        scaled by its routing weight.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"input has {x.shape[-1]} features, statistics expect {self.dim}")
        rows = self._rows(x, route)
        weight = route.weight if route is not None else None
        flags = None
        if self.heldout is not None:
            flags = self._row_flags(x, held, rows.shape[0], route)
        if flags is not None and bool(flags.any()):
            fit = ~flags
            each = weight.reshape(-1) if weight is not None else None
            self._accumulate(rows[fit], each[fit.to(each.device)] if each is not None else None)
            self.heldout._accumulate(rows[flags], each[flags.to(each.device)] if each is not None else None)
        else:
            self._accumulate(rows, weight)
        if self._generator is not None:
            self._add_samples(rows, flags)

    def _accumulate(self, rows: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Add ``rows`` (fp32, on the device) to the count and sums (``weight``: their routing weights)."""
        self.count += rows.shape[0]
        self.sum += rows.sum(dim=0)
        self.sumsq += rows.square().sum(dim=0)
        if weight is not None:
            self.route_sq += weight.to(device=self.device, dtype=torch.float32).square().sum()
        if self.hessian is not None:
            self.hessian.addmm_(rows.T, rows)

    @property
    def held_count(self) -> int:
        """Tokens of held-out sequences seen (in :attr:`heldout`, not in :attr:`count`)."""
        return self.heldout.count if self.heldout is not None else 0

    def add_drift(self, dense: torch.Tensor, x: torch.Tensor, project: dict[str, torch.Tensor] | None = None,
                  route: Route | None = None, held: torch.Tensor | None = None) -> None:
        """Add Σ (x_d − x) xᵀ over the token rows of ``dense`` (the input in the dense model) and ``x``
        (the same tokens' input here; add it with :meth:`add_batch` as well); with ``project`` (fp32
        ``[out, in]`` weights by linear name) Σ W (x_d − x) xᵀ per linear instead, in :attr:`drift_out`
        (the same ``project`` for every batch). With ``route`` both are scaled by the routing weight.
        ``held``: as in :meth:`add_batch`; the rows of held-out sequences are left out (the drift is
        fitted on, never judged with)."""
        if self.drift is None and self.drift_out is None:
            raise RuntimeError("drift statistics were not requested for this input")
        if dense.shape != x.shape:
            raise ValueError(f"dense input of shape {tuple(dense.shape)} does not match {tuple(x.shape)}")
        rows = self._rows(x, route)
        delta = self._rows(dense, route) - rows
        if self.heldout is not None:
            flags = self._row_flags(x, held, rows.shape[0], route)
            if bool(flags.any()):
                rows, delta = rows[~flags], delta[~flags]
        if project is None:
            self.drift.addmm_(delta.T, rows)
            return
        if self.drift_out is None or self.drift_out.keys() != project.keys():
            raise RuntimeError("per-linear drift products were not set up for these linears (drift_per_linear)")
        for name, w in project.items():
            self.drift_out[name].addmm_((delta @ w.T).T, rows)

    def drift_per_linear(self, out_features: dict[str, int]) -> None:
        """Keep the drift as Σ W (x_d − x) xᵀ per linear (``out_features`` by name) instead of Σ (x_d − x) xᵀ."""
        if self.drift is None:
            raise RuntimeError("drift statistics were not requested for this input")
        self.drift_out = {name: torch.zeros(out, self.dim, dtype=torch.float32, device=self.device)
                          for name, out in out_features.items()}
        self.drift = None

    def _row_flags(self, x: torch.Tensor, held: torch.Tensor | None, n_rows: int,
                   route: Route | None = None) -> torch.Tensor:
        if held is None:
            return torch.zeros(n_rows, dtype=torch.bool, device=self.device)
        if route is not None:  # the batch's tokens are its sequences one after the other
            per_seq = max(route.total // held.numel(), 1)
            return held.to(self.device)[route.tokens.to(self.device) // per_seq]
        # rows are [sequences, tokens] (or those flattened, as an MoE block's shared expert reads them)
        if x.dim() < 2 or (x.shape[0] != held.numel() and (x.dim() != 2 or n_rows % held.numel())):
            raise PracError(f"cannot hold out calibration sequences: a layer input of shape {tuple(x.shape)} does "
                            f"not start with the {held.numel()} sequences of its batch (use --holdout 0)")
        per_seq = n_rows // held.numel()
        return held.to(self.device).repeat_interleave(per_seq)

    def _add_samples(self, rows: torch.Tensor, flags: torch.Tensor | None = None) -> None:
        keys = torch.rand(rows.shape[0], generator=self._generator, device=self.device)
        if self.sample_pool is not None:
            rows = torch.cat([self.sample_pool, rows])
            keys = torch.cat([self._keys, keys])
            if flags is not None:
                flags = torch.cat([self.sample_held, flags])
        if rows.shape[0] > self.spec.max_samples:
            keep = torch.topk(keys, self.spec.max_samples, sorted=False).indices.sort().values
            rows, keys = rows[keep], keys[keep]
            if flags is not None:
                flags = flags[keep]
        self.set_sample_pool(rows.contiguous(), keys, flags)

    def set_sample_pool(self, rows: torch.Tensor | None, keys: torch.Tensor | None,
                        held: torch.Tensor | None) -> None:
        """The token sample over both shares: its rows, their random keys and which come from held-out
        sequences (None: none do)."""
        self.sample_pool, self._keys, self.sample_held = rows, keys, held
        self._fit_samples = None

    @property
    def samples(self) -> torch.Tensor | None:
        """The token sample's rows of the fit share (all of them without a held-out share)."""
        if self.sample_pool is None or self.sample_held is None:
            return self.sample_pool
        if self._fit_samples is None:
            self._fit_samples = self.sample_pool[~self.sample_held]
        return self._fit_samples

    @samples.setter
    def samples(self, rows: torch.Tensor | None) -> None:
        self.set_sample_pool(rows, None, None)

    def split(self) -> tuple[InputStats, InputStats] | None:
        """(fit, held-out): these statistics themselves (the fit share's, see the class docstring) and
        those of the held-out sequences' rows as a bare accumulator (its samples the held-out rows of
        the token sample). None when nothing is held out or either share is empty (then a
        correction can only be judged in-sample)."""
        ho = self.heldout
        if ho is None or ho.count == 0 or self.count == 0:
            return None
        held = InputStats(self.dim, self.device, StatsSpec())
        held.count, held.sum, held.sumsq, held.hessian = ho.count, ho.sum, ho.sumsq, ho.hessian
        held.route_sq = ho.route_sq
        if self.sample_pool is not None and self.sample_held is not None:
            held.samples = self.sample_pool[self.sample_held]
        return self, held

    def with_prior(self, prior: InputStats, scale: float, tokens: int) -> InputStats:
        """These (routed) statistics topped up to ``tokens`` rows with the mean row statistics of
        ``prior`` (the same input over *all* the block's tokens, unweighted), each prior row counted
        with weight ``scale`` (the mean r² of routed rows, so both parts are on one scale):
        ``H = H_routed + (tokens − count) · scale · H_prior / prior.count``, likewise Σx (with √scale)
        and Σx²; the drift stays that of the routed rows (the prior rows carry none). The held-out
        split is dropped (a topped-up input is judged in-sample); the token sample gets the prior's
        sample rows in the prior's share. :attr:`prior_tokens` records the rows added. Both are the fit
        share's statistics when a share is held out (its rows are in neither)."""
        add = max(tokens - self.count, 0)
        out = InputStats(self.dim, self.device, StatsSpec())
        out.spec = self.spec
        out.count, out.prior_tokens, out.route_sq = self.count + add, add, self.route_sq
        w = add / prior.count if prior.count > 0 else 0.0
        out.sum = self.sum + prior.sum * (w * math.sqrt(scale))
        out.sumsq = self.sumsq + prior.sumsq * (w * scale)
        if self.hessian is not None and prior.hessian is not None:
            out.hessian = self.hessian + prior.hessian * (w * scale)
        out.drift, out.drift_out = self.drift, self.drift_out
        parts = [] if self.samples is None else [self.samples]
        if prior.samples is not None and prior.samples.shape[0] > 0 and add > 0:
            share = max(1, round(prior.samples.shape[0] * add / out.count))
            parts.append(prior.samples[:share] * math.sqrt(scale))
        out.samples = torch.cat(parts) if parts else None
        return out

    @property
    def l2(self) -> torch.Tensor:
        """||X_j||_2 over the tokens of these statistics, per input feature."""
        return self.sumsq.sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    def normalized_hessian(self) -> torch.Tensor:
        """H = XᵀX / N."""
        if self.hessian is None:
            raise RuntimeError("the Hessian was not collected for this input")
        return self.hessian / max(self.count, 1)

    def check_finite(self, name: str) -> None:
        """Raise a one-line :class:`PracError` naming ``name`` if any statistic is NaN/Inf."""
        tensors = {"sum": self.sum, "sum of squares": self.sumsq}
        if self.hessian is not None:
            tensors["Hessian"] = self.hessian
        if self.drift is not None:
            tensors["dense-input drift"] = self.drift
        for linear, t in (self.drift_out or {}).items():
            tensors[f"dense-input drift through {linear}"] = t
        for what, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise PracError(f"NaN/Inf in the calibration statistics ({what}) of the input to {name}")

    def nbytes(self) -> int:
        total = self.sum.nbytes + self.sumsq.nbytes + self.route_sq.nbytes
        if self.hessian is not None:
            total += self.hessian.nbytes
        if self.drift is not None:
            total += self.drift.nbytes
        total += sum(t.nbytes for t in (self.drift_out or {}).values())
        if self.sample_pool is not None:
            total += self.sample_pool.nbytes
        if self.heldout is not None:
            total += self.heldout.nbytes()
        return total
