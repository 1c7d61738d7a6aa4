"""``prac prune``: arguments, the job they describe, and the summary printed at the end."""

from __future__ import annotations

import argparse
import math
import sys

from prac.cli import settings_flags
from prac.cli.common import add_calibration, add_common, positive_int, progress, sparsity
from prac.cli.eval import add_zeroshot_arguments, zeroshot_config
from prac.cli.prune_summary import print_summary
from prac.cli.structure import add_structure_arguments, shape_from_args
from prac.core.errors import PracError

DESCRIPTION = ("Prune every Linear/Conv1D inside the model's repeated blocks, sequentially: "
               "block k is calibrated on the outputs of the already pruned blocks before it.")

EPILOG = """\
examples:
  prac prune                                   # bundled tiny Mistral, 50% Wanda, dense vs pruned ppl
  prac prune --nm 2:4 --correction full        # 2:4 Wanda with full-Hessian correction
  prac prune --model mistralai/Mistral-7B-v0.3 --calib c4 --nsamples 128 --seqlen 2048 \\
             --sparsity 0.5 --eval wikitext2 --save out/mistral-50 --report run.json

calibration protocols: .txt and wikitext2 are one token stream with random window starts
(random.seed(seed)); .jsonl (field "text") and c4 draw documents longer than seqlen and a random
window in each. Evaluation: non-overlapping seqlen windows, ppl = exp(mean NLL).

memory of the statistics (per distinct layer input of the block being pruned; q/k/v share one,
gate/up share one): H is in x in fp32, e.g. 4096^2 x 4 B = 64 MiB for a 4096-wide input and
14336^2 x 4 B = 784 MiB for Mistral's down_proj input; a token sample is
max-activation-samples x in x 4 B (8192 x 4096 x 4 B = 128 MiB). H is held when the method or
the correction needs it (sparsegpt, full, optimal), with --exact-errors (the default) for every
corrected layer, and with --measure for every layer. --layer-batch-size bounds how many inputs
are held at once. --dense-target (the default for admm) adds a second in x in matrix per input
(C = X_dense^T X), a second copy of the calibration activations and of the current block.
"""

_H_COST = "one fp32 in x in H per distinct layer input of the current block (64 MiB at in=4096, 784 MiB at in=14336)"


def _dense_target(args: argparse.Namespace) -> bool:
    """``--dense-target``, else the method's own default (:attr:`prac.methods.registry.Method.dense_target_by_default`)."""
    from prac.methods.registry import get_method

    return get_method(args.method).dense_target_by_default if args.dense_target is None else bool(args.dense_target)


class _DeprecatedNoMeasure(argparse.Action):
    """``--no-measure``: the old name of ``--no-exact-errors``; says so once on stderr."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: warning: --no-measure is deprecated; use --no-exact-errors", file=sys.stderr)
        setattr(namespace, self.dest, False)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``prac prune``."""
    from prac.correction import corrections, names
    from prac.correction.base import DEFAULT_HOLDOUT
    from prac.engine.reconstruct import ReconstructConfig
    from prac.methods.registry import METHODS

    own = [name for name, method in METHODS.items() if method.dense_target_by_default]
    g = p.add_argument_group("model and data")
    add_calibration(g, 128)
    g.add_argument("--batch-size", type=positive_int, default=8, help="sequences per calibration forward (default: 8)")
    g.add_argument("--offload", choices=["auto", "device", "cpu"], default="auto",
                   help="where calibration activations live (default: auto = device if they fit)")
    g = p.add_argument_group("pruning")
    pat = g.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=sparsity, default=None, help="unstructured sparsity in [0, 1) (default: 0.5)")
    pat.add_argument("--nm", default=None, metavar="N:M",
                     help="keep N weights in every M consecutive inputs of a row, e.g. 2:4")
    g.add_argument("--method", choices=list(METHODS), default="wanda", help="mask source (default: wanda)")
    g.add_argument("--ignore", default=None, metavar="REGEX", help="skip layers whose full name matches this regex")
    settings_flags.add_flags(g, METHODS)
    g.add_argument("--allocation", choices=["uniform", "owl", "error"], default="uniform",
                   help="per-layer sparsities at the same total, from a dense scan: uniform (default), owl (outlier "
                        "ratio, Yin et al. 2024), error (measured layer error at trial sparsities); unstructured only")
    g.add_argument("--owl-lambda", type=float, default=None, help="owl: half-width λ of the sparsity range (default: 0.08)")
    g.add_argument("--owl-m", type=float, default=None, help="owl: outlier threshold M, times the mean score (default: 5)")
    g.add_argument("--allocation-samples", type=int, default=None, metavar="N",
                   help="calibration sequences the allocation's dense scan reads, the first N (0: all; "
                        "default: 16 for error, all for owl)")
    g.add_argument("--plot", default=None, metavar="FILE.png",
                   help="write the allocation plan's figure (sparsity per block and projection)")
    add_structure_arguments(p)
    g = p.add_argument_group("correction (see docs/correction.md); a setting the chosen method does not have is an error")
    g.add_argument("--correction", choices=list(names()), default="none",
                   help="weight correction after pruning (default: none)")
    g.add_argument("--no-correction", action="store_true", help="same as --correction none")
    settings_flags.add_flags(g, corrections())
    g.add_argument("--no-clamp", action="store_true", help="do not clamp corrections")
    g.add_argument("--holdout", type=float, default=None, metavar="SHARE",
                   help="share of the calibration sequences (a seeded draw) held out: masks, the correction and "
                        "--reconstruct are fitted on the rest, and a correction (a tuned block) is kept only if the "
                        "error on the held-out share drops too; 0 = fit on every sequence, judge "
                        f"on the fitted tokens (default: {DEFAULT_HOLDOUT})")
    g.add_argument("--holdout-dampings", default=None, metavar="D1,D2,...",
                   help="candidate dampings, each fitted on the rest; the lowest held-out error wins, per layer "
                        "(methods with --damping; needs --holdout > 0; default: the method's damping only)")
    g.add_argument("--holdout-escalate", action=argparse.BooleanOptionalAction, default=None,
                   help="a correction that fails on the held-out share is tried at 10x, 100x, 1000x its damping "
                        "before it is refused (methods with --damping; default: on)")
    g.add_argument("--holdout-refit", action=argparse.BooleanOptionalAction, default=None,
                   help="no effect, kept for old command lines: the held-out sequences are never fitted, so an "
                        "accepted correction stays the one fitted on the rest")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=False,
                   help="calibrate each distinct layer input of a block on the block with its earlier linears "
                        "already pruned (q/k/v, then o, then gate/up, then down: one forward each; SparseGPT's "
                        "true-sequential); overrides --layer-batch-size (default: off, one forward per block)")
    g.add_argument("--dense-target", action=argparse.BooleanOptionalAction, default=None,
                   help="every layer reconstructs the dense model's output (its inputs in the dense model times "
                        "its dense weights) from its inputs in the pruned model, so it also makes up for the "
                        "layers before it; runs a dense copy of the hidden states beside the pruned one (twice "
                        "the activations and calibration forwards; adds H to the statistics; implies "
                        f"--sequential). Default: on for {', '.join(own)}, off for the methods that reproduce a "
                        f"reference implementation ({', '.join(n for n in METHODS if n not in own)})")
    g.add_argument("--dense-target-damping", type=float, default=1e-2,
                   help="relative ridge λ/mean(diag H) pulling the dense target towards the layer's own weights "
                        "(with --dense-target; default: 0.01)")
    g.add_argument("--replay", action=argparse.BooleanOptionalAction, default=True,
                   help="in a sequential calibration, reuse the outputs of the submodules that are already final "
                        "(attention once q/k/v/o are pruned, gate/up once pruned) in the block's later forwards, on "
                        "equal inputs: the same result, less work; keeps up to a quarter of the free memory where "
                        "activations live (default: on)")
    g.add_argument("--cache-budget", type=float, default=None, metavar="GIB",
                   help="GiB that --replay's kept outputs may take (default: a quarter of the free memory where "
                        "activations live); the report's cache_peak_bytes is what they took, part of the peak")
    g.add_argument("--layer-batch-size", type=int, default=0,
                   help="distinct layer inputs whose statistics are held at once (0 = all of a block); fewer = less "
                        "memory, one more calibration forward per chunk")
    g.add_argument("--reconstruct", choices=("none", "block", "sublayer"), default="none",
                   help="after a block is pruned, tune the surviving weights of its pruned linears (masks fixed) so "
                        "its output on the calibration tokens matches the dense model's (block), or its attention's "
                        "and MLP's outputs each match theirs (sublayer); judged on the --holdout sequences, a block "
                        "whose held-out error does not drop keeps its weights; runs the dense stream beside the "
                        "pruned one (docs/reconstruct.md; default: none)")
    g.add_argument("--reconstruct-epochs", type=positive_int, default=None, metavar="N",
                   help=f"passes over the fitted sequences (default: {ReconstructConfig.epochs})")
    g.add_argument("--reconstruct-minibatches", type=positive_int, default=None, metavar="N",
                   help=f"optimiser steps per epoch; step k sums every N-th calibration batch from k "
                        f"(default: {ReconstructConfig.minibatches})")
    g.add_argument("--reconstruct-lr", type=float, default=None, metavar="LR",
                   help=f"learning rate (default: {ReconstructConfig.lr})")
    g.add_argument("--reconstruct-optimizer", choices=("adam", "rmsprop", "sgd"), default=None,
                   help=f"first-order optimiser (default: {ReconstructConfig.optimizer})")
    g.add_argument("--reconstruct-patience", type=positive_int, default=None, metavar="N",
                   help="stop after N epochs in a row without a new best held-out error (the best epoch is kept "
                        f"whatever N; default: {ReconstructConfig.patience}, stop at the first that is not better)")
    g.add_argument("--reconstruct-loss", choices=("token", "total"), default=None,
                   help="token: each token's relative output error, averaged (what the next block's RMSNorm "
                        "passes on; not swamped by massive activations); total: all tokens' error over all "
                        f"tokens' energy (default: {ReconstructConfig.loss})")
    g.add_argument("--expert-min-tokens", type=_min_tokens, default=0, metavar="N|width",
                   help="MoE: an expert projection whose input got fewer routed calibration tokens than N has its "
                        "statistics topped up to N with those of all the block's tokens run through that expert; "
                        "an expert that got none is always pruned from those alone (default: 0, only those: "
                        "topping up to the input width measured no better, docs/moe.md); 'width': each projection's "
                        "number of inputs, below which its own H is singular")
    g.add_argument("--exact-errors", dest="exact_errors", action=argparse.BooleanOptionalAction, default=True,
                   help="correction: exact before/after error of every corrected layer and the optimal yardstick "
                        f"(fraction_of_optimal), also for diagonal/greedy, which do not need H themselves; costs {_H_COST}. "
                        "--no-exact-errors keeps diagonal at O(in) and greedy at O(samples × in), with errors measured "
                        "on the token sample (default: on)")
    g.add_argument("--no-measure", dest="exact_errors", action=_DeprecatedNoMeasure,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    g.add_argument("--measure", action="store_true",
                   help=f"layer errors of uncorrected methods too: collect H for every layer (any method) to report "
                        f"its exact relative reconstruction error; costs {_H_COST}")
    g = p.add_argument_group("quantization (see docs/quantize.md)")
    g.add_argument("--wbits", type=int, choices=(2, 3, 4, 8), default=None, metavar="{2,3,4,8}",
                   help="round the surviving weights to a BITS-bit integer grid: in SparseGPT's own sweep (--method "
                        "sparsegpt, no correction), else a GPTQ pass on the final mask (pruned weights stay zero); "
                        "with --sparsity 0 it is plain GPTQ")
    g.add_argument("--groupsize", type=int, default=None, metavar="G",
                   help="inputs per scale (default: 128; -1: one scale per output channel)")
    g.add_argument("--asym", action="store_true",
                   help="asymmetric grid (an integer zero point per group); default symmetric")
    g.add_argument("--save-format", choices=("auto", "dense", "compressed"), default="auto",
                   help="--save writes dense weights (zeros stored, quantized values as floats) or, for --wbits, "
                        "compressed-tensors' pack-quantized integers that vLLM and transformers load "
                        "(default: auto = compressed with --wbits, else dense; dense, said in one line, where "
                        "the format cannot hold the quantized layers: fused MoE experts, or --asym)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval", default=None,
                   help="wikitext2 | c4 | FILE.txt | FILE.jsonl | none, comma-separated for several; the first is the "
                        "summary's ppl (default: bundled text for the bundled model, else none)")
    g.add_argument("--eval-seqlen", type=positive_int, default=None, help="evaluation window (default: --seqlen)")
    g.add_argument("--eval-batch-size", type=positive_int, default=None,
                   help="windows (and harness requests) per evaluation forward (default: chosen for the device: "
                        "8192 tokens' worth on the CPU, from free memory on CUDA)")
    g.add_argument("--no-dense-eval", action="store_true", help="evaluate only the pruned model (skip the dense baseline)")
    g.add_argument("--no-cache", action="store_true",
                   help="compute the dense perplexity even when the cache has it ($PRAC_CACHE_DIR, else ~/.cache/prac)")
    add_zeroshot_arguments(g)
    g.add_argument("--save", default=None, metavar="OUT_DIR",
                   help="write the pruned model (safetensors), tokenizer and prac_report.json")
    g.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR when it holds only a previous prac save, and --report/--plot files "
                        "that prac did not write (files prac wrote are replaced anyway)")
    g.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    add_common(p)


def _holdout_from_args(args: argparse.Namespace, settings_type: type):
    """The correction's :class:`Holdout` from ``--holdout``, ``--holdout-dampings``, ``--holdout-refit``."""
    import dataclasses

    from prac.core.errors import PracError
    from prac.correction.base import DEFAULT_HOLDOUT, Holdout

    share = DEFAULT_HOLDOUT if args.holdout is None else args.holdout
    dampings: tuple[float, ...] = ()
    if args.holdout_dampings is not None:
        try:
            dampings = tuple(float(x) for x in args.holdout_dampings.split(",") if x.strip())
        except ValueError:
            raise PracError(f"--holdout-dampings must be comma-separated numbers, got {args.holdout_dampings!r}") from None
        if not dampings:
            raise PracError("--holdout-dampings names no damping")
        if "damping" not in {f.name for f in dataclasses.fields(settings_type)}:
            raise PracError(f"--holdout-dampings: correction {args.correction!r} has no damping")
        if share <= 0:
            raise PracError("--holdout-dampings needs --holdout > 0 (the dampings are chosen on the held-out share)")
    for flag in ("refit", "escalate"):
        if getattr(args, f"holdout_{flag}") is not None and share <= 0:
            raise PracError(f"--holdout-{flag} needs --holdout > 0")
    return Holdout(share=share, refit=True if args.holdout_refit is None else args.holdout_refit, dampings=dampings,
                   escalate=True if args.holdout_escalate is None else args.holdout_escalate)


def prune_job_from_args(args: argparse.Namespace):
    """Fill the job dataclasses from parsed arguments (each method gets only its own settings)."""
    from prac.core.errors import PracError
    from prac.correction import CorrectionConfig, corrections, get_correction
    from prac.engine.config import EngineConfig
    from prac.engine.pipeline import PruneConfig
    from prac.jobs.config import PruneJob
    from prac.methods.patterns import Unstructured, parse_nm
    from prac.methods.registry import METHODS
    from prac.model.stats import StatsSpec

    shape = shape_from_args(args)
    default = 0.0 if shape.active else 0.5  # structure alone unless a sparsity is asked for
    pattern = parse_nm(args.nm) if args.nm else Unstructured(default if args.sparsity is None else args.sparsity)
    method = "none" if args.no_correction else args.correction
    given = settings_flags.given(args, corrections())
    if args.no_clamp:
        given["max_correction_magnitude"] = math.inf
    entry = get_correction(method)
    held = {k: v for k, v in (("holdout", args.holdout), ("holdout_dampings", args.holdout_dampings),
                              ("holdout_refit", args.holdout_refit), ("holdout_escalate", args.holdout_escalate))
            if v is not None}
    if entry is None:
        if args.reconstruct != "none":
            held.pop("holdout", None)  # the share reconstruction is judged on
        if given or held:
            raise PracError(f"correction settings given without a correction: "
                            f"{', '.join('--' + k.replace('_', '-') for k in sorted({**given, **held}))}")
        correction = CorrectionConfig(seed=args.seed, exact_errors=args.exact_errors)
    else:
        correction = CorrectionConfig(method, settings_flags.settings_for(method, corrections(), given),
                                      args.exact_errors, args.seed, _holdout_from_args(args, entry.settings))
    settings = settings_flags.settings_for(args.method, METHODS, settings_flags.given(args, METHODS))
    prune = PruneConfig(method=args.method, pattern=pattern, settings=settings,
                        correction=correction, ignore=args.ignore,
                        engine=EngineConfig(batch_size=args.batch_size, offload=args.offload,
                                            layer_batch_size=args.layer_batch_size, sequential=args.sequential,
                                            dense_target=_dense_target(args), replay=args.replay,
                                            expert_min_tokens=args.expert_min_tokens,
                                            reconstruct=_reconstruct_from_args(args), cache_budget=args.cache_budget),
                        collect=StatsSpec(hessian=True) if args.measure else None,
                        dense_target_damping=args.dense_target_damping, quant=_quant_from_args(args))
    from prac.jobs.allocation import AllocationConfig

    owl = {k: v for k, v in (("owl_lambda", args.owl_lambda), ("owl_m", args.owl_m)) if v is not None}
    if owl and args.allocation != "owl":
        raise PracError("--owl-lambda/--owl-m need --allocation owl")
    if args.allocation_samples is not None:
        if args.allocation == "uniform":
            raise PracError("--allocation-samples needs --allocation owl or error (uniform needs no scan)")
        owl["scan_samples"] = args.allocation_samples
    allocation = AllocationConfig(method=args.allocation, **owl)
    allocation.check(pattern)
    return PruneJob(allocation=allocation, plot=args.plot, shape=shape,
                    model=args.model, calib=args.calib, calib_tokens=args.calib_tokens, nsamples=args.nsamples,
                    seqlen=args.seqlen, seed=args.seed, prune=prune, eval=args.eval, eval_seqlen=args.eval_seqlen,
                    eval_batch_size=args.eval_batch_size, dense_eval=not args.no_dense_eval, cache=not args.no_cache,
                    tasks=zeroshot_config(args, args.eval_batch_size), save=args.save, overwrite=args.overwrite,
                    save_format=_save_format(args), bos=args.bos,
                    report=args.report, device=args.device, dtype=args.dtype)


def _quant_from_args(args: argparse.Namespace):
    """``--wbits``, ``--groupsize``, ``--asym``: the grid, or no quantization without ``--wbits``."""
    from prac.quant.gptq import QuantConfig

    if args.wbits is None:
        given = [flag for flag, v in (("--groupsize", args.groupsize), ("--asym", args.asym or None)) if v is not None]
        if given:
            raise PracError(f"{', '.join(given)} given without --wbits")
        return QuantConfig()
    return QuantConfig(bits=args.wbits, group_size=128 if args.groupsize is None else args.groupsize,
                       symmetric=not args.asym)


def _save_format(args: argparse.Namespace) -> str:
    """``--save-format``: ``auto`` is settled once the model's layers are known
    (:func:`prac.jobs.defaults.resolve_save_format`: compressed for a quantized model the format can hold, dense
    otherwise, e.g. fused MoE experts)."""
    fmt = args.save_format
    if fmt == "auto":
        return "auto"
    if fmt == "compressed" and args.save is None:
        raise PracError("--save-format compressed given without --save")
    if fmt == "compressed":
        from prac.quant.formats.compressed import check_compressed

        check_compressed(_quant_from_args(args), {})
    return fmt


def _reconstruct_from_args(args: argparse.Namespace):
    """``--reconstruct*``: the mode and the settings given (the others at their defaults)."""
    from prac.engine.reconstruct import ReconstructConfig

    given = {k: v for k, v in (("epochs", args.reconstruct_epochs), ("minibatches", args.reconstruct_minibatches),
                               ("lr", args.reconstruct_lr), ("optimizer", args.reconstruct_optimizer),
                               ("loss", args.reconstruct_loss), ("patience", args.reconstruct_patience))
             if v is not None}
    if given and args.reconstruct == "none":  # (--holdout alone belongs to a correction too)
        raise PracError(f"{', '.join('--reconstruct-' + k for k in given)} given without --reconstruct block|sublayer")
    if args.holdout is not None:
        given["holdout"] = args.holdout
    return ReconstructConfig(mode=args.reconstruct, **given)


def _min_tokens(text: str) -> int | None:
    """``--expert-min-tokens``: a count, or ``width`` (None: each projection's number of inputs)."""
    if text == "width":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens or 'width', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    """Run the prune job the arguments describe and print its summary."""
    from prac.jobs.prune import run_prune

    report = run_prune(prune_job_from_args(args), progress(args))
    return print_summary(report, args.save, args.report)
