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

This module is the driver: the passes are planned in :mod:`prac.spectral.passes`, the gradients
formed in :mod:`prac.spectral.gradients`, the eigenvalues solved in :mod:`prac.spectral.solvers`,
and the result's metadata written by :mod:`prac.spectral.metadata`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from prac.core.errors import PracError
from prac.spectral import blocks as blk
from prac.spectral import gradients as grd
from prac.spectral import runtime
from prac.spectral import solvers as sol
from prac.spectral.config import SpectralConfig
from prac.spectral.metadata import CENTERED_NOTE, EVAL_NOTE, SUBSAMPLE_NOTE, run_metadata
from prac.spectral.passes import Piece, Plan, plan_block, plan_passes
from prac.spectral.result import BlockSpectrum, SpectralResult

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (samples just processed, total to process)

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
        with runtime.deterministic(self.config.use_deterministic) as cublas, runtime.eval_mode(model):
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
        device = runtime.model_device(model)
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
        engine = grd.EngineState(cfg.gradient_engine)
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
            "per_sample_reduction": (cfg.per_sample_reduction if cfg.sample_unit == "sequence"
                                     else "none (one token per sample)"),
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

    def _gradients(self, model, names, samples: grd.Samples, engine: grd.EngineState) -> dict[str, torch.Tensor]:
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
        stacked = grd.stack_precomputed(grads)
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
        plans = [plan_block(b, cfg) for b in part.blocks]
        width = self._slice_width(n_rows)
        passes = plan_passes(plans, width if cfg.streaming else None)
        last_pass = {p.plan.block.key: i for i, pss in enumerate(passes) for p in pss}
        solve_device = runtime.solve_device(cfg.eigensolve_device)
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
        meta.update(run_metadata(cfg, part, plans, passes, width, center, solve_device, spectra))
        meta["seconds_gradients"] = round(t_grad, 3)
        meta["seconds_solve"] = round(t_solve, 3)
        if center:
            meta["notes"].append(CENTERED_NOTE)
        if any(p.used is not None for p in plans):
            meta["notes"].append(SUBSAMPLE_NOTE)
        return SpectralResult(spectra, whole_spec, meta)

    def _slice_width(self, n_rows: int) -> int:
        return max(1, int(self.config.stream_budget_mb * 2**20 // (8 * max(n_rows, 1))))

    def _fill(self, pieces: Sequence[Piece], n_rows: int, chunks, progress, total) -> list[torch.Tensor]:
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

    def _solve(self, plan: Plan, K: torch.Tensor, trace: float, n_rows: int,
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

    def _whole(self, plans: Sequence[Plan], K: torch.Tensor, trace: float, n_rows: int, device) -> BlockSpectrum:
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
        device = runtime.solve_device(self.config.eigensolve_device)
        meta.update(run_metadata(self.config, part, [], [], None, center, device, {}))
        meta["empty"] = True
        return SpectralResult({}, None, meta)
