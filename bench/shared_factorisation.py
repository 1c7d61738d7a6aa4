"""What sharing one factorisation per input group saves: ``optimal`` on Mistral-7B's q/k/v shapes.

q (out 4096), k and v (out 1024) read one 4096-wide input. Corrected one by one with bare
statistics, each linear factorises H twice (its own damped inverse and the yardstick's): 6 per
group. Through one :class:`prac.model.group.InputGroup` they share 2. Prints both times (two rounds)
and checks the weights are bit-identical.

    OMP_NUM_THREADS=1 python bench/shared_factorisation.py          # about 4 minutes on one CPU thread
    python bench/shared_factorisation.py --in-features 512 --tokens 2048   # seconds
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_speed import collect_stats, synthetic_layer  # noqa: E402
from prac.correction import CorrectionConfig, correct  # noqa: E402
from prac.methods.masks import apply_mask, mask_from_scores, wanda_scores  # noqa: E402
from prac.methods.patterns import Unstructured  # noqa: E402
from prac.model.group import InputGroup  # noqa: E402
from prac.model.stats import StatsSpec  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--in-features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    d = args.in_features
    x, wq = synthetic_layer(d, d, args.tokens, 256, 0, torch.device("cpu"))
    stats = collect_stats(x, StatsSpec(hessian=True), 4096)
    del x
    g = torch.Generator().manual_seed(1)
    weights = [wq, torch.randn(d // 4, d, generator=g) / d ** 0.5, torch.randn(d // 4, d, generator=g) / d ** 0.5]
    cfg = CorrectionConfig.of("optimal")

    def run(shared: bool) -> tuple[float, list[torch.Tensor]]:
        group = InputGroup(["q", "k", "v"], stats) if shared else None
        start, out = time.perf_counter(), []
        for w in weights:
            scores = wanda_scores(w, stats.l2)
            mask = mask_from_scores(scores, Unstructured(0.5))
            out.append(correct(w, apply_mask(w, mask), mask, group if shared else stats, scores, cfg).weight)
        return time.perf_counter() - start, out

    for _ in range(args.rounds):
        alone, a = run(False)
        shared, b = run(True)
        same = all(torch.equal(p, q) for p, q in zip(a, b))
        print(f"per linear (6 factorisations): {alone:.1f} s   per group (2): {shared:.1f} s   "
              f"x{alone / shared:.2f}   weights identical: {same}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
