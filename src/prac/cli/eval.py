"""``prac eval``: perplexity of a causal LM on a text."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prac import assets
from prac.cli.common import add_common, not_finite, number, positive_int, progress

DESCRIPTION = "Perplexity on non-overlapping seqlen windows, ppl = exp(mean NLL over all predicted tokens)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``prac eval``."""
    p.add_argument("--model", default=str(assets.DEFAULT_MODEL), help="model folder or hub id (default: bundled)")
    p.add_argument("--data", default=None, help="wikitext2 | FILE.txt (default: bundled eval text for the bundled model, else wikitext2)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="window length (default as for prune)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="windows per forward (default: 1)")
    p.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    add_common(p)


def print_summary(summary: dict[str, Any]) -> int:
    """Print the perplexity line (``nan`` when it is missing or not finite); 1 when the status is not "ok"."""
    print(f"perplexity {number(summary.get('ppl'))} over {summary.get('windows')} windows of "
          f"{summary.get('seqlen')} tokens ({summary.get('predicted_tokens')} predicted)")
    status = not_finite(summary)
    if status is not None:
        print(f"prac eval: the result is not usable (status {status})", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the perplexity."""
    from prac.jobs import EvalJob, run_eval

    job = EvalJob(model=args.model, data=args.data, seqlen=args.seqlen, batch_size=args.batch_size,
                  device=args.device, dtype=args.dtype, report=args.report)
    return print_summary(run_eval(job, progress(args))["summary"])
