"""The ``prac`` command: ``prune``, ``eval``, ``verify``, ``spectrum``.

This is the only module that parses arguments; it fills the library's configuration
dataclasses and turns :class:`prac.errors.PracError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Sequence

from prac import assets

EXIT_USAGE = 2

PRUNE_EPILOG = """\
examples:
  prac prune                                   # bundled tiny Mistral, 50%% Wanda, dense vs pruned ppl
  prac prune --nm 2:4 --correction full        # 2:4 Wanda with full-Hessian correction
  prac prune --model mistralai/Mistral-7B-v0.3 --calib c4 --nsamples 128 --seqlen 2048 \\
             --sparsity 0.5 --eval wikitext2 --save out/mistral-50 --report run.json

calibration protocols: .txt and wikitext2 are one token stream with random window starts
(random.seed(seed)); .jsonl (field "text") and c4 draw documents longer than seqlen and a random
window in each. Evaluation: non-overlapping seqlen windows, ppl = exp(mean NLL).
"""


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity must be a number in [0, 1), got {text!r}")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1), got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:i (default: auto)")
    p.add_argument("--dtype", default="auto", help="model dtype: auto (as saved), float32, float16, bfloat16")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details (INFO)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_prune(sub) -> None:
    from prac.correction.base import METHODS as CORRECTIONS, STRATEGIES, CorrectionConfig
    from prac.methods import METHODS

    p = sub.add_parser("prune", help="prune a model block by block (Wanda, magnitude, SparseGPT) with optional correction",
                       description="Prune every Linear/Conv1D inside the model's repeated blocks, sequentially: "
                       "block k is calibrated on the outputs of the already pruned blocks before it.",
                       epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=str(assets.DEFAULT_MODEL), help="model folder or hub id (default: the bundled tiny Mistral)")
    g.add_argument("--calib", default=None, help="c4 | wikitext2 | FILE.txt | FILE.jsonl (default: bundled text for the bundled model, else c4)")
    g.add_argument("--calib-tokens", default=None, metavar="FILE", help="safetensors file with integer input_ids [n, seqlen]: use exactly these tokens")
    g.add_argument("--nsamples", type=positive_int, default=128, help="calibration sequences (default: 128)")
    g.add_argument("--seqlen", type=positive_int, default=None, help="calibration length (default: 2048 capped at the model's context; 256 for the bundled model)")
    g.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and stored-token samples (default: 0)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="sequences per calibration forward (default: 8)")
    g.add_argument("--offload", choices=["auto", "device", "cpu"], default="auto", help="where calibration activations live (default: auto = device if they fit)")
    g = p.add_argument_group("pruning")
    pat = g.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=_sparsity, default=None, help="unstructured sparsity in [0, 1) (default: 0.5)")
    pat.add_argument("--nm", default=None, metavar="N:M", help="keep N weights in every M consecutive inputs of a row, e.g. 2:4")
    g.add_argument("--method", choices=list(METHODS), default="wanda", help="mask source (default: wanda)")
    g.add_argument("--scope", choices=["row", "layer"], default="row", help="comparison group for unstructured masks (default: row)")
    g.add_argument("--ignore", default=None, metavar="REGEX", help="skip layers whose full name matches this regex")
    g.add_argument("--blocksize", type=positive_int, default=128, help="SparseGPT column block (default: 128)")
    g.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT damping, fraction of mean diag(H) (default: 0.01)")
    g = p.add_argument_group("correction (see docs/correction.md)")
    g.add_argument("--correction", choices=list(CORRECTIONS), default="none", help="weight correction after pruning (default: none)")
    g.add_argument("--no-correction", action="store_true", help="same as --correction none")
    g.add_argument("--selection-strategy", choices=list(STRATEGIES), default=None, help="which survivors to correct (default: the method's own)")
    g.add_argument("--percent-change", type=float, default=None, help="fraction of each row's survivors to correct (default: full 0.2, others 0.05)")
    g.add_argument("--damping", type=float, default=None, help="damping, relative to mean diag(H) (default: the method's own)")
    g.add_argument("--max-correction-magnitude", type=float, default=None, help="clamp |δ| <= this × |w_orig| (default: full 0.2, diagonal 0.05)")
    g.add_argument("--no-clamp", action="store_true", help="do not clamp corrections")
    g.add_argument("--correction-magnitude", type=float, default=0.01, help="greedy step, fraction of |w_orig| (default 0.01)")
    g.add_argument("--max-activation-samples", type=positive_int, default=8192, help="tokens stored per input for greedy (default 8192)")
    g.add_argument("--patience", type=positive_int, default=None, help="greedy: stop a row after this many rejections in a row")
    g.add_argument("--optimal-tol", type=float, default=CorrectionConfig.optimal_tol, help=f"optimal: relative residual at which a row's solve stops (default {CorrectionConfig.optimal_tol:g}: the same fraction of the optimum as 1e-4 to 3 digits, in 30-40%% less time)")
    g.add_argument("--layer-batch-size", type=int, default=0, help="distinct layer inputs whose statistics are held at once (0 = all of a block)")
    g.add_argument("--no-measure", action="store_true", help="correction: do not collect H for exact errors and the optimal yardstick when the method itself does not need it")
    g.add_argument("--measure", action="store_true", help="collect H for every layer to report its exact relative reconstruction error (any method)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval", default=None, help="wikitext2 | FILE.txt | none (default: bundled text for the bundled model, else none)")
    g.add_argument("--eval-seqlen", type=positive_int, default=None, help="evaluation window (default: --seqlen)")
    g.add_argument("--eval-batch-size", type=positive_int, default=1, help="windows per evaluation forward (default: 1)")
    g.add_argument("--no-dense-eval", action="store_true", help="evaluate only the pruned model (skip the dense baseline)")
    g.add_argument("--save", default=None, metavar="OUT_DIR", help="write the pruned model (safetensors), tokenizer and prac_report.json")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    g.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    _add_common(p)
    p.set_defaults(func=_cmd_prune)


def prune_job_from_args(args: argparse.Namespace):
    """Fill the job dataclass from parsed arguments."""
    from prac.correction.base import CorrectionConfig
    from prac.jobs import PruneJob
    from prac.methods import MethodSettings
    from prac.patterns import Unstructured, parse_nm
    from prac.pipeline import PruneConfig
    from prac.stats import StatsSpec

    pattern = parse_nm(args.nm) if args.nm else Unstructured(0.5 if args.sparsity is None else args.sparsity)
    correction = CorrectionConfig(
        method="none" if args.no_correction else args.correction,
        selection_strategy=args.selection_strategy, percent_change=args.percent_change, damping=args.damping,
        max_correction_magnitude=math.inf if args.no_clamp else args.max_correction_magnitude,
        correction_magnitude=args.correction_magnitude, max_activation_samples=args.max_activation_samples,
        layer_batch_size=args.layer_batch_size, measure=not args.no_measure, seed=args.seed,
        optimal_tol=args.optimal_tol,
        **({"patience": args.patience} if args.patience else {}),
    )
    if correction.method != "none":
        from prac import correction as correction_mod

        correction = correction_mod.resolve(correction)
    prune = PruneConfig(method=args.method, pattern=pattern,
                        settings=MethodSettings(scope=args.scope, blocksize=args.blocksize, percdamp=args.percdamp),
                        correction=correction, ignore=args.ignore, batch_size=args.batch_size, offload=args.offload,
                        collect=StatsSpec(hessian=True) if args.measure else None)
    return PruneJob(model=args.model, calib=args.calib, calib_tokens=args.calib_tokens, nsamples=args.nsamples,
                    seqlen=args.seqlen, seed=args.seed, prune=prune, eval=args.eval, eval_seqlen=args.eval_seqlen,
                    eval_batch_size=args.eval_batch_size, dense_eval=not args.no_dense_eval, save=args.save, overwrite=args.overwrite,
                    report=args.report, device=args.device, dtype=args.dtype)


def _progress(args):
    from prac.progress import no_progress, tqdm_progress

    if args.no_progress:
        _quiet_libraries()
    return no_progress if args.no_progress else tqdm_progress


def _quiet_libraries() -> None:
    """--no-progress also hides transformers' and the hub's own loading/writing bars."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def _cmd_prune(args: argparse.Namespace) -> int:
    from prac.jobs import run_prune

    report = run_prune(prune_job_from_args(args), _progress(args))
    s = report["summary"]
    lines = [f"pruned {s['pruned_layers']} layers in {report['config']['blocks']}: sparsity {s['sparsity']:.4f} "
             f"in {s['prune_seconds']:.1f}s (peak memory {s['peak_memory_bytes'] / 2**20:.0f} MiB)"]
    if "dense_ppl" in s:
        lines.append(f"perplexity: dense {s['dense_ppl']:.4f} -> pruned {s['ppl']:.4f}")
    elif "ppl" in s:
        lines.append(f"perplexity: pruned {s['ppl']:.4f}")
    if "cosine_similarity" in s:
        lines.append(f"cosine similarity of last hidden states to dense: {s['cosine_similarity']:.6f}")
    if "mean_relative_error" in s:
        lines.append(f"mean relative layer error: {s['mean_relative_error']:.6f}")
    if "correction" in s:
        c = s["correction"]
        lines.append("correction: " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in c.items()))
    if args.save:
        lines.append(f"saved to {args.save}")
    if args.report:
        lines.append(f"report written to {args.report}")
    print("\n".join(lines))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a causal LM on a text",
                       description="Perplexity on non-overlapping seqlen windows, ppl = exp(mean NLL over all predicted tokens).")
    p.add_argument("--model", default=str(assets.DEFAULT_MODEL), help="model folder or hub id (default: bundled)")
    p.add_argument("--data", default=None, help="wikitext2 | FILE.txt (default: bundled eval text for the bundled model, else wikitext2)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="window length (default as for prune)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward (default: 1)")
    p.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    _add_common(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from prac.jobs import EvalJob, run_eval

    job = EvalJob(model=args.model, data=args.data, seqlen=args.seqlen, batch_size=args.batch_size,
                  device=args.device, dtype=args.dtype, report=args.report)
    s = run_eval(job, _progress(args))["summary"]
    print(f"perplexity {s['ppl']:.4f} over {s['windows']} windows of {s['seqlen']} tokens ({s['predicted_tokens']} predicted)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prac", description="Post-training pruning with reconstruction correction, and Fisher-spectrum analysis.")
    from prac import __version__

    parser.add_argument("--version", action="version", version=f"prac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_prune(sub)
    _add_eval(sub)
    from prac import verify
    from prac.spectral import cli as spectral_cli

    verify.add_parser(sub)
    spectral_cli.add_parser(sub)
    return parser




def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from prac.errors import PracError
    from prac.outputs import Terminated, install_signal_handlers

    install_signal_handlers()
    try:
        return args.func(args)
    except PracError as exc:
        if args.debug:
            raise
        print(f"prac {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated: nothing was written", file=sys.stderr)
        return 143


if __name__ == "__main__":
    raise SystemExit(main())
