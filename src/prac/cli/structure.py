"""``prac prune``'s structure options: a smaller dense model with fewer MLP neurons, KV groups or blocks
(:mod:`prac.engine.structure`), named after the config fields they change."""

from __future__ import annotations

import argparse
from typing import Any

from prac.cli.common import positive_int


def add_structure_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structure: a smaller dense model, every block the same shape (docs/structured.md); "
                             "applied first, then --sparsity/--nm on what remains (none unless given)")
    g.add_argument("--intermediate-size", type=positive_int, default=None, metavar="N",
                   help="keep N MLP neurons per block, chosen by the error left after down_proj is refitted on "
                        "them (structured OBS, greedy in groups)")
    g.add_argument("--num-key-value-heads", type=positive_int, default=None, metavar="N",
                   help="keep N KV groups per block, each with its query heads (GQA stays a standard config), "
                        "chosen by the error left after o_proj is refitted on them")
    g.add_argument("--num-hidden-layers", type=positive_int, default=None, metavar="N",
                   help="keep N decoder blocks: drop those whose removal changes the held-out output least "
                        "(greedy in rounds), before any width is chosen")
    g.add_argument("--target-params", type=float, default=None, metavar="F",
                   help="keep the share F of the block parameters, the mix of the three options above chosen by a "
                        "small search scored on the held-out sequences (--num-hidden-layers and "
                        "--num-key-value-heads given with it are kept; --intermediate-size is refused)")
    g.add_argument("--structure-damping", type=float, default=None, metavar="D",
                   help="ridge on the consumer's H in the channel selection and refit, a fraction of its mean "
                        "diagonal (default: 0.01; lower fits the refit closer, and overfits it when there are "
                        "about as few fitted tokens as MLP neurons)")
    g.add_argument("--search-nsamples", type=positive_int, default=None, metavar="N",
                   help="with --target-params: fit each candidate shape on at most N of the fitted calibration "
                        "sequences (default: 32, so the search costs the same whatever --nsamples; every held-out "
                        "sequence judges, and the chosen shape then runs on every sequence)")


def shape_from_args(args: argparse.Namespace):
    from prac.model.shrink import Shape

    return Shape(intermediate_size=args.intermediate_size, num_key_value_heads=args.num_key_value_heads,
                 num_hidden_layers=args.num_hidden_layers, target_params=args.target_params,
                 search_nsamples=args.search_nsamples, damping=args.structure_damping)


def structure_lines(summary: dict[str, Any]) -> list[str]:
    """The printed lines of a structured run: block parameters before and after, the config's changes."""
    s = summary.get("structure")
    if not s:
        return []
    changes = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in s["config_changes"].items())
    lines = [f"structure: block parameters {s['parameters_before']:,} -> {s['parameters_after']:,} "
             f"({s['kept_share']:.1%} kept) in {s['seconds']:.1f}s; config: {changes}"]
    search = s.get("search")
    if search:
        best = min(search["candidates"], key=lambda c: c["heldout_change"])
        lines.append(f"--target-params {search['target_params']}: chose {search['chosen']} of "
                     f"{len(search['candidates'])} candidates (held-out output change {best['heldout_change']:.4g}) "
                     f"in {search['seconds']:.1f}s")
    if s.get("dropped_blocks"):
        lines.append(f"dropped blocks {s['dropped_blocks']} (by the held-out output's change without them)")
    if s.get("reconstruction"):
        r = s["reconstruction"]
        lines.append(f"structure tuning: kept in {r['kept']}/{r['blocks']} blocks")
    return lines
