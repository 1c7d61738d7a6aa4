"""``prac spectrum``: per-block Fisher spectra of a model on windows of a text.

Every destination (JSON, CSV, figure) is checked before the model is loaded and all of them are
written together at the end (:mod:`prac.io.outputs`); a missing output folder is created then, as
``prune`` does.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from prac.cli.common import add_bos_option, add_logging_options, add_progress_option, positive_int, quiet_libraries
from prac.core.errors import PracError
from prac.io import assets

DESCRIPTION = ("Eigenvalue spectrum of the (empirical or Monte-Carlo) Fisher information, per block of "
               "parameters (layer, attention/MLP, or whole model), from exact per-sample gradients.")

EPILOG = """\
what it computes:
  per-sample gradients g_i of the token-SUM cross-entropy of each window (shifted logits), and per
  block the eigenvalues of F = (1/N) sum_i g_i g_i^T via the N x N Gram matrix, in float64.

outputs (a missing folder is created; nothing is written unless the whole run succeeds):
  --out FILE.json   metadata + per-block eigenvalues and metrics (JSON, NaN written as null);
                    --out DIR/ (a trailing slash, or an existing folder) writes DIR/spectrum.json
  --csv FILE.csv    one row per block (default: the --out path with .csv)
  --plot FILE.png   log-log eigenvalue vs rank per block, and layer x {attention, mlp}
                    heatmaps of the top eigenvalue and the trace

examples:
  prac spectrum                                    # bundled tiny Mistral on its bundled text
  prac spectrum --n-samples 32 --seqlen 256 --block-structure layer_type \\
                --out spectrum.json --plot spectrum.png
  prac spectrum --fisher-type mc --center --max-params-per-block 100000 --streaming

See docs/spectral.md for the mathematics and what is exact.
"""

PLOT_FORMATS = (".png", ".pdf", ".svg")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``prac spectrum``."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=str(assets.DEFAULT_MODEL),
                   help="model folder or hub id (default: the bundled tiny Mistral)")
    g.add_argument("--data", default=str(assets.DEFAULT_EVAL),
                   help="FILE.txt or wikitext2: cut into non-overlapping --seqlen windows (default: the bundled text)")
    g.add_argument("--n-samples", type=positive_int, default=32, help="number of windows (sequences) to use (default: 32)")
    g.add_argument("--seqlen", type=positive_int, default=256, help="tokens per window (default: 256)")
    add_bos_option(g, "the windows", tokens=False)
    g = p.add_argument_group("what is computed")
    g.add_argument("--block-structure", choices=["layer", "layer_type", "model"], default="layer_type",
                   help="layer: layer_i; layer_type: layer_i.{attention,mlp,other}; model: one block (default: layer_type)")
    g.add_argument("--sample-unit", choices=["sequence", "token"], default="sequence",
                   help="one sample per window (default) or per predicted token")
    g.add_argument("--per-sample-reduction", choices=["sum", "mean"], default="sum",
                   help="token-sum (default) or token-mean loss per sequence")
    g.add_argument("--fisher-type", choices=["empirical", "mc"], default="empirical",
                   help="empirical: observed next tokens; mc: targets sampled from the model (true-Fisher estimate)")
    g.add_argument("--center", action="store_true",
                   help="spectrum of the gradient covariance (g_i - mean) instead of the second moment")
    g.add_argument("--max-params-per-block", type=positive_int, default=None,
                   help="subsample at most this many coordinates per block (eigenvalues of a principal submatrix)")
    g.add_argument("--top-k", type=positive_int, default=None,
                   help="only the k largest eigenvalues by seeded randomized SVD (default: all, exact)")
    g.add_argument("--seed", type=int, default=0, help="seed for MC targets, subsampling and randomized SVD (default: 0)")
    g = p.add_argument_group("execution")
    g.add_argument("--engine", choices=["auto", "vmap", "loop"], default="auto",
                   help="per-sample gradients: torch.func vmap, a backward loop, or auto (vmap, else loop)")
    g.add_argument("--chunk-size", type=positive_int, default=8, help="sequences per vectorised backward (default: 8)")
    g.add_argument("--streaming", action="store_true", help="never hold the whole model's gradients (recomputes per slice)")
    g.add_argument("--stream-budget-mb", type=float, default=512.0,
                   help="float64 gradient rows held at once when streaming (default: 512)")
    g.add_argument("--eigensolve-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the Gram eigensolve runs (default: auto)")
    g.add_argument("--deterministic", action="store_true", help="torch deterministic algorithms and CUBLAS_WORKSPACE_CONFIG")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:i (default: auto)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float64", "bfloat16", "float16"],
                   help="model dtype (default: as saved); float64 for reference-grade gradients")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="spectrum.json", metavar="FILE.json",
                   help="JSON report; a folder (trailing / or existing) gets spectrum.json (default: spectrum.json)")
    g.add_argument("--csv", default=None, metavar="FILE.csv", help="per-block metrics (default: --out with .csv; "
                                                                  "a folder gets that name)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace output files that prac did not write (those it wrote are replaced anyway)")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="write the figure (.png, .pdf or .svg; a folder gets --out's name with .png)")
    add_logging_options(g)
    add_progress_option(g)


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    """The run's destinations by role, each checked like a ``--report`` file (before any loading)."""
    from prac.io.outputs import Sources, check_path_given, check_report_path

    for option in ("out", "csv", "plot"):
        check_path_given(getattr(args, option), f"--{option}")
    out = _file_in(args.out, "spectrum.json")
    paths = {"spectrum JSON": out,
             "spectrum CSV": _file_in(args.csv, out.with_suffix(".csv").name) if args.csv else out.with_suffix(".csv")}
    if args.plot:
        figure = _file_in(args.plot, out.with_suffix(".png").name)
        if figure.suffix.lower() not in PLOT_FORMATS:
            raise PracError(f"figure {args.plot!r}: the name must end in {', '.join(PLOT_FORMATS)}")
        paths["figure"] = figure
    sources = Sources(model=str(args.model), files=(str(args.data),))
    resolved = {what: check_report_path(path, sources, what, overwrite=args.overwrite) for what, path in paths.items()}
    if len(set(resolved.values())) < len(resolved):
        raise PracError("--out, --csv and --plot must name different files")
    return paths


def _file_in(value: str, name: str) -> Path:
    """An output option's file: ``value`` itself, or ``value/name`` when ``value`` ends with a slash or
    is an existing folder (``--out results/`` writes ``results/spectrum.json``)."""
    if value.endswith(("/", os.sep)) or Path(value).is_dir():
        return Path(value) / name
    return Path(value)


def run(args: argparse.Namespace) -> int:
    """Check the outputs, load, compute, write JSON/CSV/figure together, print a summary."""
    if args.deterministic:
        # cuBLAS reads this when its first handle is created: set it before anything touches CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    paths = output_paths(args)
    if args.no_progress:
        quiet_libraries()
    from prac.io.data import check_text_source

    check_text_source(args.data, "--data")  # before the load: a missing text is one line at once
    if args.bos == "always":  # before the load: a tokenizer without BOS is one line
        from prac.io.data import bos_token_id
        from prac.model.loading import load_tokenizer

        bos_token_id(load_tokenizer(str(args.model)))

    from prac.io.outputs import Outputs, StagedFile
    from prac.spectral import FisherSpectral, SpectralConfig

    config = SpectralConfig(
        sample_unit=args.sample_unit, per_sample_reduction=args.per_sample_reduction, fisher_type=args.fisher_type,
        max_params_per_block=args.max_params_per_block, top_k_eigenvalues=args.top_k,
        eigensolve_device=args.eigensolve_device, gradient_engine=args.engine, chunk_size=args.chunk_size,
        streaming=args.streaming, stream_budget_mb=args.stream_budget_mb, seed=args.seed,
        use_deterministic=args.deterministic)
    model, windows, data_desc = _load(args)
    bar = _ProgressBar(disabled=args.no_progress)
    try:
        result = FisherSpectral(config).compute_fisher_spectrum(
            model, windows, n_samples=args.n_samples, block_structure=args.block_structure,
            center_gradients=args.center, progress=bar)
    finally:
        bar.close()
    result.metadata["data"] = {**data_desc, "seqlen": args.seqlen, "windows": "first n non-overlapping"}
    result.metadata["model_path"] = str(args.model)
    with Outputs() as outputs:
        outputs.add(StagedFile(paths["spectrum JSON"], result.save_json))
        outputs.add(StagedFile(paths["spectrum CSV"], result.save_csv))
        if "figure" in paths:
            from prac.spectral.plot import save_plot

            figure = paths["figure"]
            outputs.add(StagedFile(figure, lambda tmp: save_plot(result, tmp, format=figure.suffix[1:].lower())))
        outputs.commit()
    _summary(result)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _load(args: argparse.Namespace):
    import torch

    from prac.io.data import bos_mode, bos_protocol, bos_token_id, eval_windows, load_eval_tokens
    from prac.model.loading import load_model, load_tokenizer, resolve_device

    device = resolve_device(args.device)
    model = load_model(str(args.model), "auto" if args.dtype in ("auto", "float64") else args.dtype)
    if args.dtype == "float64":
        model = model.double()
    model.to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seqlen > limit:
        raise PracError(f"--seqlen {args.seqlen} exceeds the model's context of {limit} tokens")
    tokenizer = load_tokenizer(str(args.model))
    tokens, desc = load_eval_tokens(args.data, tokenizer)
    mode = bos_mode(args.bos, model.config)
    bos = bos_token_id(tokenizer, "--bos always" if args.bos == "always" else "--bos auto (here: always)") \
        if mode == "always" else None
    windows = eval_windows(tokens, args.seqlen, bos)
    desc = {**desc, "bos_requested": args.bos, **bos_protocol(bos)}
    if windows.shape[0] < args.n_samples:
        raise PracError(f"{args.data} has only {windows.shape[0]} windows of {args.seqlen} tokens; "
                        f"--n-samples {args.n_samples} needs more text or a shorter --seqlen")
    return model, windows[: args.n_samples].to(torch.int64), desc


class _ProgressBar:
    """tqdm over samples, created on the first callback (when the total is known)."""

    def __init__(self, disabled: bool):
        self.disabled = disabled
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="sample", desc="per-sample gradients", disable=self.disabled)
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _summary(result) -> None:
    m = result.metadata
    print(f"{m.get('fisher_type')} Fisher, N = {m.get('n_samples_used')} {m.get('sample_unit')}(s), "
          f"{m.get('n_tokens')} target tokens, engine {m.get('gradient_engine', {}).get('used')}, "
          f"{m.get('seconds_total')} s")
    head = f"{'block':<24}{'params':>10}{'λmax':>12}{'trace':>12}{'cond':>11}{'erank':>8}"
    print(head)
    rows = list(result.blocks.values()) + ([result.whole_model] if result.whole_model is not None else [])
    for b in rows:
        cond = f"{b.condition_number:.3g}" if b.condition_number == b.condition_number else "-"
        erank = f"{b.effective_rank:.2f}" if b.effective_rank == b.effective_rank else "-"
        print(f"{b.key:<24}{b.n_params:>10}{b.top_eigenvalue:>12.4g}{b.trace:>12.4g}{cond:>11}{erank:>8}")
