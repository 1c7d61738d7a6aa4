"""``prac verify``: run the invariant checks of :mod:`prac.jobs.verify` on a model and print the table."""

from __future__ import annotations

import argparse
import sys

from prac.cli.common import (
    add_calibration,
    add_logging_options,
    add_progress_option,
    positive_int,
    quiet_libraries,
    sparsity,
)

DESCRIPTION = """\
Check, on a given model and calibration set, the invariants every run relies on:

  1. Wanda's L2 salience from the running sum of squares equals the one from diag(H)
     (at most 1e-5 relative).
  2. Statistics accumulated batch by batch equal those accumulated in one shot
     (at most 1e-5 relative).
  3. With correction none, every method's collection mode (Hessian, stored samples) yields
     the identical model, bit for bit.
  4. Every corrected layer ends with a lower error than uncorrected (or is reverted to it), on the
     calibration tokens and on the held-out share it was not fitted to (--holdout of prune).
  5. Block-wise reconstruction (--reconstruct of prune; one epoch of block when not given) leaves
     every pruned weight exactly zero.

Under torchrun (torchrun --nproc-per-node N -m prac verify ...) the checks run data-parallel.

Prints one row per check; exit code 0 when all pass, 1 when one fails."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``prac verify``."""
    from prac.methods.registry import METHODS

    add_calibration(p, 16)
    pat = p.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=sparsity, default=None, help="unstructured sparsity in [0, 1) (default: 0.5)")
    pat.add_argument("--nm", default=None, metavar="N:M",
                     help="keep N weights in every M consecutive inputs of a row, e.g. 2:4")
    p.add_argument("--method", choices=list(METHODS), default="wanda", help="mask source (default: wanda)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="sequences per calibration forward (default: 4)")
    p.add_argument("--reconstruct", choices=("block", "sublayer"), default=None,
                   help="the reconstruction mode check 5 runs (default: block, one epoch)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:i (default: auto)")
    add_logging_options(p)
    add_progress_option(p)


def run(args: argparse.Namespace) -> int:
    """Load the model and calibration tokens, run every check, print the table."""
    from prac.correction import CorrectionConfig
    from prac.engine.config import EngineConfig
    from prac.engine.pipeline import PruneConfig
    from prac.jobs.checks import check_sources
    from prac.jobs.config import PruneJob
    from prac.jobs.defaults import calibration_tokens, check_bos_token, resolve
    from prac.jobs.verify import format_table, run_checks
    from prac.methods.patterns import Unstructured, parse_nm
    from prac.model.loading import check_model_source, load_model, load_tokenizer, resolve_device
    from prac.parallel import session as distributed

    if args.no_progress:
        quiet_libraries()
    check_model_source(args.model)
    check_sources(args.calib, args.calib_tokens, None)  # before the load: a missing file is one line at once
    if args.bos == "always" and not args.calib_tokens:  # before the load: a tokenizer without BOS
        check_bos_token(args.model, "always", "always")
    session = distributed.active()  # a rank of `torchrun … prac verify`, or None
    device = session.device if session else resolve_device(args.device)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    pattern = parse_nm(args.nm) if args.nm else Unstructured(0.5 if args.sparsity is None else args.sparsity)
    from prac.engine.reconstruct import ReconstructConfig

    tuning = ReconstructConfig(mode=args.reconstruct, epochs=1, minibatches=1) if args.reconstruct else None
    cfg = PruneConfig(method=args.method, pattern=pattern, engine=EngineConfig(batch_size=args.batch_size),
                      correction=CorrectionConfig(seed=args.seed))
    job = resolve(PruneJob(model=args.model, calib=args.calib, calib_tokens=args.calib_tokens,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, prune=cfg, eval="none",
                           bos=args.bos), model)
    calib = calibration_tokens(job, tokenizer).input_ids

    def announce(name: str) -> None:
        if not args.no_progress:
            print(f"checking {name} ...", file=sys.stderr)

    checks = run_checks(model, calib, cfg, device, announce, session=session, reconstruct=tuning)
    print(format_table(checks))
    return 0 if all(c.passed for c in checks) else 1
