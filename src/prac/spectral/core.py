"""FisherSpectral: per-block spectra of the Fisher F = (1/N) Σᵢ gᵢgᵢᵀ of a model on a batch.

Pipeline: targets (observed, or drawn from the model for the MC Fisher) → per-sample gradients
gᵢ, one sample chunk at a time → the rows of G restricted to each block's (optionally subsampled)
coordinates, in float64 → per block the Gram Kᵦ = Gᵦ Gᵦᵀ / N → eigenvalues and metrics. Because
GGᵀ = Σᵦ GᵦGᵦᵀ, the whole-model Gram is the sum of the block Grams, so the whole-model spectrum
never needs G for the whole model either.

Two ways through the coordinates:
- in memory (default): one pass over the samples; Gᵦ of every block is held at once
  (N × Σᵦ|Sᵦ| float64).
- streaming: the coordinates are cut into slices of at most ``stream_budget_mb`` of float64 rows
  (N × width × 8 bytes); each slice is one pass that recomputes the per-sample gradients of just
  the parameters it touches, adds its rows' Gram to its block's Gram and frees them. Centring is
  per coordinate (gᵢ − ḡ subtracts a per-coordinate mean), so it is exact slice by slice.
  Peak memory: the slice, one sample chunk's gradients of the touched parameters, and N×N Grams.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prac.core.errors import PracError
from prac.spectral import blocks as blk
from prac.spectral import gradients as grd
from prac.spectral import solvers as sol
from prac.spectral.config import SpectralConfig
from prac.spectral.result import BlockSpectrum, SpectralResult

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (samples just processed, total to process)

EVAL_NOTE = ("the model runs in eval() mode (restored afterwards): dropout is off and BatchNorm uses its running "
             "statistics, so gᵢ is the gradient of the deterministic eval-mode network; if your Fisher is defined "
             "with train-mode statistics, compute it with precomputed_gradients")
CENTERED_NOTE = ("centred: the spectrum is that of the gradient covariance C = (1/N) Σ (gᵢ−ḡ)(gᵢ−ḡ)ᵀ = F − ḡḡᵀ; its "
                 "Gram (I−11ᵀ/N)K(I−11ᵀ/N) annihilates the all-ones vector, so it has at least one exact zero "
                 "eigenvalue (rank ≤ N−1); condition numbers use only eigenvalues above tol")
SUBSAMPLE_NOTE = ("a subsampled block reports the eigenvalues of the principal submatrix F[S,S] on its sampled "
                  "coordinates S, not of F: by Cauchy interlacing λ_k(F[S,S]) ≤ λ_k(F), and E[tr F[S,S]] = "
                  "(|S|/P)·tr F under uniform sampling")


@dataclass(frozen=True)
class _Plan:
    """A block with its kept coordinates (None = all) and their count."""

    block: blk.Block
    used: torch.Tensor | None
    seed: int | None

    @property
    def width(self) -> int:
        return self.block.n_params if self.used is None else int(self.used.numel())


@dataclass(frozen=True)
class _Piece:
    """Columns [start, stop) of a block's kept coordinates, and where each parameter's part goes."""

    plan: _Plan
    start: int
    stop: int
    parts: tuple[tuple[str, slice | torch.Tensor, slice], ...]  # (param, its flat coords, piece columns)

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def names(self) -> list[str]:
        return [p[0] for p in self.parts]


class FisherSpectral:
    """Spectra of the (empirical or MC) Fisher, per block of parameters. See :class:`SpectralConfig`."""

    def __init__(self, config: SpectralConfig | None = None):
        self.config = config or SpectralConfig()

    # ------------------------------------------------------------------ entry point
    def compute_fisher_spectrum(self, model: torch.nn.Module | None, batch=None, n_samples: int | None = None,
                                block_structure: str | blk.BlockFn = "layer", center_gradients: bool = False,
                                precomputed_gradients=None, progress: Progress | None = None) -> SpectralResult:
        """Per-block spectra of F = (1/N) Σᵢ gᵢgᵢᵀ (or of the covariance, ``center_gradients=True``).

        Args:
            model: a module returning ``[B, T, V]`` logits (Hugging Face causal/masked LMs do).
                Run in ``eval()`` mode for the computation and restored afterwards: dropout off,
                BatchNorm on running statistics (the Fisher of the deterministic network).
            batch: ``[B, T]`` token ids, or a mapping with ``input_ids`` and optional
                ``attention_mask``/``labels`` (−100 = not a target) and other model inputs.
            n_samples: number of sequences to use (the first ones); None = all. With
                ``sample_unit="token"`` the number of samples N is the number of valid targets.
            block_structure: ``layer`` | ``layer_type`` | ``model`` | ``fn(name, tensor) -> key | None``.
            center_gradients: spectrum of the covariance of the gᵢ instead of their second moment.
            precomputed_gradients: per-sample gradients, either a list of ``{name: tensor}`` (one
                dict per sample) or ``{name: [N, *shape]}``; ``model`` is then optional (it only
                refines the attention/MLP detection) and ``batch`` is ignored.
            progress: called as ``progress(n_done_now, total)`` after each chunk of samples.
        """
        started = time.perf_counter()
        with _deterministic(self.config.use_deterministic) as cublas, _eval_mode(model):
            if precomputed_gradients is not None:
                result = self._precomputed(model, precomputed_gradients, block_structure, center_gradients, progress)
            else:
                if model is None:
                    raise PracError("a model is required unless precomputed_gradients are given")
                result = self._from_model(model, batch, n_samples, block_structure, center_gradients, progress)
        meta = result.metadata
        meta["deterministic"] = self.config.use_deterministic
        meta["cublas_workspace_config"] = cublas
        meta["seconds_total"] = round(time.perf_counter() - started, 3)
        return result

    # ------------------------------------------------------------------ model path
    def _from_model(self, model, batch, n_samples, structure, center, progress) -> SpectralResult:
        cfg = self.config
        device = _model_device(model)
        samples, available = grd.make_samples(batch, n_samples)
        samples = samples.to(device)
        if cfg.fisher_type == "mc":
            samples.labels = grd.sample_mc_labels(model, samples, cfg.shift_labels, cfg.seed, cfg.chunk_size).to(device)
        valid = grd.target_mask(samples.labels, samples.attention_mask, cfg.shift_labels)
        n_tokens = int(valid.sum())
        empty_seqs = int((valid.sum(dim=1) == 0).sum())
        if empty_seqs:
            log.warning("%d sequence(s) have no valid target token: their gradient is zero", empty_seqs)
        n_rows = len(samples) if cfg.sample_unit == "sequence" else n_tokens
        part = blk.partition_model(model, structure)
        if not part.blocks:
            raise PracError("block_structure selected no parameters")
        engine = _EngineState(cfg.gradient_engine)
        seq_step = cfg.chunk_size if cfg.sample_unit == "sequence" else 1

        def chunks(names: Sequence[str]) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
            for start in range(0, len(samples), seq_step):
                part_samples = samples.select(start, start + seq_step)
                yield self._gradients(model, names, part_samples, engine), len(part_samples)

        meta = {
            "gradient_source": "model",
            "n_samples_requested": n_samples, "n_sequences_available": available,
            "n_sequences_used": len(samples), "n_samples_used": n_rows, "n_tokens": n_tokens,
            "n_sequences_without_targets": empty_seqs,
            "sample_unit": cfg.sample_unit,
            "per_sample_reduction": cfg.per_sample_reduction if cfg.sample_unit == "sequence" else "none (one token per sample)",
            "loss": ("cross-entropy per target token (reduction='none', ignore_index=-100), masked by labels != -100 "
                     "and the attention mask" + (", on shifted logits (z_t scores y_{t+1})" if cfg.shift_labels else
                                                 ", unshifted (z_t scores y_t)")),
            "fisher_type": cfg.fisher_type,
            "targets": "observed labels" if cfg.fisher_type == "empirical"
            else f"one draw per position from softmax(logits), seed {cfg.seed} (MC estimate of the true Fisher)",
            "model": {"class": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
                      "device": str(device), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                      "tied_parameters": {k: list(v) for k, v in part.aliases.items()}},
            "gradient_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "notes": [EVAL_NOTE],
        }
        if n_rows == 0:
            log.warning("no samples with a valid target: empty result")
            return self._empty(meta, part, center)
        result = self._run(part, n_rows, chunks, center, progress, len(samples), meta)
        result.metadata["gradient_engine"] = engine.describe()
        return result

    def _gradients(self, model, names, samples: grd.Samples, engine: _EngineState) -> dict[str, torch.Tensor]:
        cfg = self.config
        args = (cfg.sample_unit, cfg.per_sample_reduction, cfg.shift_labels)
        if engine.current != "loop":
            try:
                out = grd.vmap_gradients(model, names, samples, *args, cfg.chunk_size)
                engine.used("vmap")
                return out
            except Exception as exc:  # noqa: BLE001 - re-raised below unless it means "vmap cannot batch this"
                if not grd.is_vmap_unsupported(exc) or engine.vmap_ok:
                    raise  # a genuine error (vmap already worked on earlier chunks, or OOM, ...)
                if engine.current == "vmap":
                    raise PracError(f"vmap cannot differentiate this model ({sol._first_line(exc)}); "
                                    "use gradient_engine='loop' or 'auto'") from exc
                engine.fall_back(exc)
        out = grd.loop_gradients(model, names, samples, *args)
        engine.used("loop")
        return out

    # ------------------------------------------------------------------ precomputed path
    def _precomputed(self, model, grads, structure, center, progress) -> SpectralResult:
        meta = {"gradient_source": "precomputed", "sample_unit": None, "per_sample_reduction": None,
                "fisher_type": None, "n_tokens": None,
                "notes": ["gradients were supplied by the caller: how they were formed (sample unit, loss, targets) "
                          "is not known to this module"]}
        stacked = _stack_precomputed(grads)
        if not stacked:
            log.warning("precomputed_gradients is empty: returning an empty result")
            meta.update(n_samples_requested=0, n_samples_used=0)
            return self._empty(meta, None, center)
        n_rows = next(iter(stacked.values())).shape[0]
        meta.update(n_samples_requested=n_rows, n_samples_used=n_rows)
        part = blk.partition([(n, int(t[0].numel()) if n_rows else 0) for n, t in stacked.items()], structure, model,
                             {n: t[0] for n, t in stacked.items()})
        if not part.blocks:
            raise PracError("block_structure selected no parameters")
        step = self.config.chunk_size

        def chunks(names: Sequence[str]) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
            for start in range(0, n_rows, step):
                yield {n: stacked[n][start:start + step] for n in names}, min(step, n_rows - start)

        meta["gradient_engine"] = {"requested": None, "used": "precomputed"}
        return self._run(part, n_rows, chunks, center, progress, n_rows, meta)

    # ------------------------------------------------------------------ the shared pipeline
    def _run(self, part: blk.Partition, n_rows: int, chunks, center: bool, progress: Progress | None,
             n_units: int, meta: dict) -> SpectralResult:
        cfg = self.config
        plans = [_plan(b, cfg) for b in part.blocks]
        width = self._slice_width(n_rows)
        passes = _passes(plans, width if cfg.streaming else None)
        last_pass = {p.plan.block.key: i for i, pss in enumerate(passes) for p in pss}
        solve_device = _solve_device(cfg.eigensolve_device)
        grams: dict[str, torch.Tensor] = {}
        sumsq: dict[str, float] = {}
        whole = None
        spectra: dict[str, BlockSpectrum] = {}
        t_grad = t_solve = 0.0
        total = n_units * len(passes)
        for index, pieces in enumerate(passes):
            t0 = time.perf_counter()
            buffers = self._fill(pieces, n_rows, chunks, progress, total)
            t_grad += time.perf_counter() - t0
            t0 = time.perf_counter()
            for piece, rows in zip(pieces, buffers):
                key = piece.plan.block.key
                if center:
                    rows -= rows.mean(dim=0, keepdim=True)  # in place: the buffer is ours, and G is the big array
                piece_gram = sol.gram(rows)
                # ‖G‖²_F = tr GGᵀ: read off the Gram instead of squaring G into another N×width array
                sumsq[key] = sumsq.get(key, 0.0) + float(piece_gram.diagonal().sum())
                grams[key] = grams.get(key, 0) + piece_gram
                if last_pass[key] == index:
                    spectra[key] = self._solve(piece.plan, grams[key] / n_rows, sumsq[key] / n_rows, n_rows,
                                               solve_device)
                    whole = grams[key] if whole is None else whole + grams[key]
                    del grams[key]
            del buffers
            t_solve += time.perf_counter() - t0
        t0 = time.perf_counter()
        whole_spec = None
        if cfg.whole_model and whole is not None:
            whole_spec = self._whole(plans, whole / n_rows, sum(s.trace for s in spectra.values()), n_rows, solve_device)
        t_solve += time.perf_counter() - t0
        meta.update(self._metadata(part, plans, passes, width, center, solve_device, spectra))
        meta["seconds_gradients"] = round(t_grad, 3)
        meta["seconds_solve"] = round(t_solve, 3)
        if center:
            meta["notes"].append(CENTERED_NOTE)
        if any(p.used is not None for p in plans):
            meta["notes"].append(SUBSAMPLE_NOTE)
        return SpectralResult(spectra, whole_spec, meta)

    def _slice_width(self, n_rows: int) -> int:
        return max(1, int(self.config.stream_budget_mb * 2**20 // (8 * max(n_rows, 1))))

    def _fill(self, pieces: Sequence[_Piece], n_rows: int, chunks, progress, total) -> list[torch.Tensor]:
        """Rows of G for every piece of one pass (float64 [N, width] each)."""
        names = list(dict.fromkeys(n for p in pieces for n in p.names))
        buffers: list[torch.Tensor] | None = None
        row = 0
        for grads, n_units in chunks(names):
            n = next(iter(grads.values())).shape[0] if grads else 0
            if buffers is None:
                device = next(iter(grads.values())).device if grads else torch.device("cpu")
                buffers = [torch.zeros(n_rows, p.width, dtype=torch.float64, device=device) for p in pieces]
            if row + n > n_rows:
                raise PracError(f"gradient rows exceed the expected N={n_rows}: inconsistent precomputed gradients")
            for piece, buf in zip(pieces, buffers):
                for name, coords, cols in piece.parts:
                    flat = grads[name].reshape(n, -1)
                    buf[row:row + n, cols].copy_(flat[:, coords])  # casts to float64 without a temporary
            row += n
            if progress is not None:
                progress(n_units, total)
        if buffers is None:
            buffers = [torch.zeros(n_rows, p.width, dtype=torch.float64) for p in pieces]
        if row != n_rows:
            raise PracError(f"got {row} gradient rows, expected N={n_rows}")
        return buffers

    def _solve(self, plan: _Plan, K: torch.Tensor, trace: float, n_rows: int,
               device: torch.device | None) -> BlockSpectrum:
        cfg = self.config
        key = plan.block.key
        keep = min(n_rows, plan.width)
        dev = device if device is not None else K.device
        if plan.width == 0:
            log.warning("block %s has no parameters: empty spectrum", key)
        if cfg.top_k_eigenvalues is None:
            values, info = sol.eigvalsh_descending(K, dev, cfg.failure_jitter)
        else:
            # on the N×N Gram, not on G: K is PSD (singular values = eigenvalues), already formed in
            # every path, and N ≪ P makes each subspace iteration O(N²q) instead of O(NPq)
            values, info = sol.topk_svd(K, cfg.top_k_eigenvalues, blk.block_seed(cfg.seed, key + "/svd"),
                                        cfg.svd_oversample, cfg.svd_niter, dev, squared=False)
        values = values[:keep]
        if info.jitter:
            log.warning("block %s: eigvalsh needed a jitter of %.3g", key, info.jitter)
        m = sol.spectrum_metrics(values, trace, n_rows, info.exact, cfg.rank_rtol)
        return BlockSpectrum(key, values, m.top_eigenvalue, m.trace, m.condition_number, m.effective_rank,
                             m.stable_rank, plan.block.n_params, plan.width, m.numerical_rank, m.tol,
                             plan.width / plan.block.n_params if plan.block.n_params else 1.0, plan.seed,
                             "F" if plan.used is None else "principal submatrix F[S,S]", info.to_dict())

    def _whole(self, plans: Sequence[_Plan], K: torch.Tensor, trace: float, n_rows: int, device) -> BlockSpectrum:
        """Whole-model spectrum from Σᵦ Kᵦ (always exact: K is only N×N)."""
        values, info = sol.eigvalsh_descending(K, device if device is not None else K.device, self.config.failure_jitter)
        used = sum(p.width for p in plans)
        total = sum(p.block.n_params for p in plans)
        values = values[:min(n_rows, used)]
        m = sol.spectrum_metrics(values, trace, n_rows, True, self.config.rank_rtol)
        sub = any(p.used is not None for p in plans)
        return BlockSpectrum("whole_model", values, m.top_eigenvalue, m.trace, m.condition_number, m.effective_rank,
                             m.stable_rank, total, used, m.numerical_rank, m.tol, used / total if total else 1.0, None,
                             "principal submatrix F[S,S]" if sub else "F", info.to_dict())

    def _empty(self, meta: dict, part: blk.Partition | None, center: bool) -> SpectralResult:
        meta.update(self._metadata(part, [], [], None, center, _solve_device(self.config.eigensolve_device), {}))
        meta["empty"] = True
        return SpectralResult({}, None, meta)

    def _metadata(self, part, plans, passes, width, center, solve_device, spectra) -> dict:
        cfg = self.config
        solver = "eigvalsh" if cfg.top_k_eigenvalues is None else "svd_lowrank"
        jitters = {k: s.solve.get("jitter", 0.0) for k, s in spectra.items() if s.solve.get("jitter")}
        return {
            "centered": center,
            "normalization": "1/N",
            "fisher": "F = (1/N) Σᵢ gᵢgᵢᵀ" if not center else "C = (1/N) Σᵢ (gᵢ−ḡ)(gᵢ−ḡ)ᵀ",
            "block_structure": part.structure if part else None,
            "blocks": [b.key for b in part.blocks] if part else [],
            "excluded_parameters": list(part.excluded) if part else [],
            "subsampling": {
                "max_params_per_block": cfg.max_params_per_block,
                "method": "uniform without replacement (numpy PCG64), seed = (seed + sha1(block key) mod 1e9+7) mod 2^31-1",
                "blocks": {p.block.key: {"fraction": p.width / p.block.n_params if p.block.n_params else 1.0,
                                         "seed": p.seed, "n_params_used": p.width}
                           for p in plans if p.used is not None},
            },
            "solver": {"name": solver, "exact": solver == "eigvalsh", "top_k": cfg.top_k_eigenvalues,
                       "eigensolve_device": cfg.eigensolve_device,
                       "device_used": sorted({s.solve.get("device", "") for s in spectra.values()}),
                       "rank_tolerance": (f"tol = λmax · {cfg.rank_rtol}" if cfg.rank_rtol is not None
                                          else "tol = λmax · N · eps(float64)")
                       + "; condition_number = λmax / (smallest eigenvalue > tol), numerical_rank = #(λ > tol)",
                       "gram": "N×N Gram GGᵀ/N in float64; reports the min(N, P_used) largest eigenvalues",
                       "jitter_applied": bool(jitters), "jitter": jitters,
                       "cpu_retries": [k for k, s in spectra.items() if s.solve.get("cpu_retry")]},
            "streaming": {"enabled": cfg.streaming, "passes": len(passes),
                          "slice_width": width if cfg.streaming else None, "budget_mb": cfg.stream_budget_mb}
            if cfg.streaming else {"enabled": False, "passes": len(passes)},
            "gram_dtype": "float64",
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "versions": _versions(),
        }


# ---------------------------------------------------------------------- helpers

class _EngineState:
    """Which gradient engine is in use; ``auto`` drops to the loop the first time vmap cannot run."""

    def __init__(self, requested: str):
        self.requested = requested
        self.current = requested
        self.vmap_ok = False
        self.reason: str | None = None
        self.seen: set[str] = set()

    def used(self, name: str) -> None:
        self.seen.add(name)
        if name == "vmap":
            self.vmap_ok = True

    def fall_back(self, exc: BaseException) -> None:
        self.reason = sol._first_line(exc)
        log.warning("vmap cannot differentiate this model (%s): using the per-sample backward loop", self.reason)
        self.current = "loop"

    def describe(self) -> dict:
        used = "vmap" if self.seen == {"vmap"} else "loop" if self.seen == {"loop"} else sorted(self.seen)
        return {"requested": self.requested, "used": used, "fallback_reason": self.reason}


def _plan(block: blk.Block, cfg: SpectralConfig) -> _Plan:
    if cfg.max_params_per_block is None or block.n_params <= cfg.max_params_per_block:
        return _Plan(block, None, None)
    seed = blk.block_seed(cfg.seed, block.key)
    return _Plan(block, blk.subsample_indices(block.n_params, cfg.max_params_per_block, seed), seed)


def _pieces(plan: _Plan, width: int | None) -> list[_Piece]:
    """Cut a block's kept coordinates into pieces of at most ``width`` columns (None: one piece)."""
    total = plan.width
    step = total if width is None else width
    offsets = np.cumsum((0,) + plan.block.numels)
    out = []
    for start in range(0, max(total, 1), max(step, 1)):
        stop = min(start + step, total)
        parts = []
        for j, name in enumerate(plan.block.names):
            lo, hi = int(offsets[j]), int(offsets[j + 1])
            if plan.used is None:
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    parts.append((name, slice(a - lo, b - lo), slice(a - start, b - start)))
            else:
                sel = plan.used[start:stop]
                a = int(torch.searchsorted(sel, lo))
                b = int(torch.searchsorted(sel, hi))
                if a < b:
                    parts.append((name, sel[a:b] - lo, slice(a, b)))
        out.append(_Piece(plan, start, stop, tuple(parts)))
    return out


def _passes(plans: Sequence[_Plan], width: int | None) -> list[list[_Piece]]:
    """In memory: one pass with every block. Streaming: pieces packed into passes of ≤ width columns."""
    if width is None:
        return [[pc for p in plans for pc in _pieces(p, None)]]
    passes: list[list[_Piece]] = []
    current: list[_Piece] = []
    used = 0
    for plan in plans:
        for piece in _pieces(plan, width):
            if current and used + piece.width > width:
                passes.append(current)
                current, used = [], 0
            current.append(piece)
            used += piece.width
    if current:
        passes.append(current)
    return passes


def _stack_precomputed(grads) -> dict[str, torch.Tensor]:
    """``{name: [N, *shape]}`` from a list of per-sample dicts or an already stacked dict."""
    if isinstance(grads, Mapping):
        out = {n: torch.as_tensor(t) for n, t in grads.items()}
        lengths = {t.shape[0] if t.dim() else -1 for t in out.values()}
        if len(lengths) > 1 or -1 in lengths:
            raise PracError("stacked precomputed_gradients need the same leading sample dimension N in every tensor")
        if not out or next(iter(lengths)) == 0:
            return {}
        return out
    grads = list(grads)
    if not grads:
        return {}
    names = list(grads[0])
    for i, g in enumerate(grads):
        if list(g) != names:
            raise PracError(f"precomputed_gradients[{i}] has different parameter names from sample 0")
    try:
        return {n: torch.stack([torch.as_tensor(g[n]) for g in grads]) for n in names}
    except RuntimeError as exc:
        raise PracError(f"precomputed_gradients have inconsistent shapes: {sol._first_line(exc)}") from exc


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise PracError("the model has no parameters") from None


def _solve_device(spec: str) -> torch.device | None:
    if spec == "auto":
        return None  # where the Gram lives, i.e. the gradients' device
    if spec == "cuda" and not torch.cuda.is_available():
        raise PracError("eigensolve_device='cuda' but CUDA is not available")
    return torch.device(spec)


def _versions() -> dict:
    import prac

    out = {"prac": prac.__version__, "torch": torch.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        out["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        out["transformers"] = None
    return out


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Deterministic algorithms (and the cuBLAS workspace they require) for the block, then restore.

    ``CUBLAS_WORKSPACE_CONFIG`` only takes effect if set before cuBLAS is first used in the
    process; the CLI sets it before anything touches CUDA.
    """
    if not enabled:
        yield None
        return
    prev_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield os.environ["CUBLAS_WORKSPACE_CONFIG"]
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        if prev_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = prev_env


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module | None):
    """model.eval() for the computation (see EVAL_NOTE), the previous mode restored afterwards."""
    if model is None:
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
