"""``prac eval``: perplexity of a causal LM on one or more texts, and zero-shot tasks (lm-evaluation-harness)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prac.cli.common import add_bos_option, add_common, non_negative_int, not_finite, number, positive_int, progress
from prac.io import assets

DESCRIPTION = ("Perplexity on non-overlapping seqlen windows, ppl = exp(mean NLL over all predicted tokens); "
               "zero-shot accuracy through lm-evaluation-harness (--tasks). An encoder (no LM head) gets the mean "
               "cosine similarity of its last hidden states to a dense model's (--reference), as prac prune reports.")

EPILOG = """\
examples:
  prac eval --model out/mistral-50 --data wikitext2,c4 --seqlen 2048
  prac eval --model out/mistral-50 --tasks paper7          # BoolQ, RTE, HellaSwag, WinoGrande, ARC-e/c, OBQA
  prac eval --tasks prac_pycode --include-path tests/data/zeroshot   # a local task, offline
  prac eval --model out/minilm-50 --eval notes.txt   # an encoder: cosine to the model it was pruned from
"""


def limit_value(text: str) -> float:
    """argparse type: a document count (>= 1) or a fraction of the documents (0 < x < 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a count >= 1 or a fraction in (0, 1), got {text!r}")
    return value


def add_zeroshot_arguments(g: Any) -> None:
    """``--tasks``, ``--num-fewshot``, ``--limit``, ``--include-path`` (shared with ``prac prune``)."""
    g.add_argument("--tasks", default=None,
                   help="zero-shot tasks of lm-evaluation-harness, comma-separated; 'paper7' = boolq, rte, hellaswag, "
                        "winogrande, arc_easy, arc_challenge, openbookqa (needs pip install 'prac[eval]')")
    g.add_argument("--num-fewshot", type=non_negative_int, default=None,
                   help="few-shot examples per task (default: the task's, else 0)")
    g.add_argument("--limit", type=limit_value, default=None,
                   help="documents per task (a count, or a fraction < 1); for quick checks")
    g.add_argument("--include-path", default=None, metavar="DIR",
                   help="folder of local task YAMLs, as lm-eval's --include_path")


def zeroshot_config(args: argparse.Namespace, batch_size: int | None):
    """The :class:`prac.parallel.harness.ZeroShotConfig` of the arguments, or None without ``--tasks``."""
    from prac.core.errors import PracError

    if args.tasks is None:
        given = [f for f in ("num_fewshot", "limit", "include_path") if getattr(args, f) is not None]
        if given:
            raise PracError(f"{', '.join('--' + f.replace('_', '-') for f in given)} given without --tasks")
        return None
    from prac.parallel.harness import parse_tasks

    return parse_tasks(args.tasks, args.num_fewshot, args.limit, batch_size, args.include_path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``prac eval``."""
    p.add_argument("--model", default=str(assets.DEFAULT_MODEL), help="model folder or hub id (default: bundled)")
    p.add_argument("--data", "--eval", dest="data", default=None,
                   help="wikitext2 | c4 | FILE.txt | FILE.jsonl, comma-separated for several (default: bundled eval "
                        "text for the bundled model, else wikitext2; none with --tasks); --eval as in prac prune")
    p.add_argument("--reference", default=None, metavar="MODEL",
                   help="encoders: the dense model whose last hidden states the model's are compared with (default: "
                        "the source model a folder prac saved names in its report)")
    p.add_argument("--seqlen", type=positive_int, default=None, help="window length (default as for prune)")
    add_bos_option(p, "evaluation windows", tokens=False)
    p.add_argument("--batch-size", "--eval-batch-size", type=positive_int, default=None,
                   help="windows (and harness requests) per forward (default: chosen for the device: "
                        "8192 tokens' worth on the CPU, from free memory on CUDA)")
    p.add_argument("--report", default=None, metavar="FILE", help="write the JSON report here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a --report file that prac did not write (one it wrote is replaced anyway)")
    add_zeroshot_arguments(p.add_argument_group("zero-shot tasks (lm-evaluation-harness)"))
    add_common(p)


def format_perplexity(summary: dict[str, Any]) -> list[str]:
    """One line per evaluation set (the first is the summary's own): perplexity, or an encoder's cosine."""
    sets = summary.get("eval_sets") or {}
    if "cosine_similarity" in summary:
        return [f"cosine similarity of last hidden states to the reference {number(r.get('cosine_similarity'), '.6f')}"
                + (f" on {name}" if name else "") + f" over {r.get('windows')} windows of {r.get('seqlen')} tokens"
                for name, r in (sets or {"": summary}).items()]
    if sets:
        return [f"perplexity {number(r.get('ppl'))} on {name} over {r.get('windows')} windows of {r.get('seqlen')} tokens"
                for name, r in sets.items()]
    if "ppl" not in summary:
        return []
    return [f"perplexity {number(summary.get('ppl'))} over {summary.get('windows')} windows of "
            f"{summary.get('seqlen')} tokens ({summary.get('predicted_tokens')} predicted)"]


def print_summary(summary: dict[str, Any]) -> int:
    """Print the perplexity lines and the zero-shot table (``nan`` for a missing or non-finite number);
    1 when the status is not "ok"."""
    for line in format_perplexity(summary):
        print(line)
    if "zeroshot" in summary:
        from prac.parallel.harness import format_table

        print(format_table(summary["zeroshot"]))
    status = not_finite(summary)
    if status is not None:
        print(f"prac eval: the result is not usable (status {status})", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the perplexity and/or the zero-shot table."""
    from prac.jobs.config import EvalJob
    from prac.jobs.eval import run_eval

    job = EvalJob(model=args.model, data=args.data, reference=args.reference, seqlen=args.seqlen,
                  batch_size=args.batch_size, device=args.device, dtype=args.dtype, report=args.report,
                  overwrite=args.overwrite, tasks=zeroshot_config(args, args.batch_size), bos=args.bos)
    return print_summary(run_eval(job, progress(args))["summary"])
