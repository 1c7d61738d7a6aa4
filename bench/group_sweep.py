"""SparseGPT of the linears that share one input: one by one vs swept together (``sparsegpt_prune_many``).

Mistral-7B's groups by default: q/k/v (4096, 1024, 1024 rows of in 4096) and gate/up (14336, 14336
rows of in 4096), on one shared factor of a synthetic correlated H (the factorisation is not timed:
both ways share it). Timed alternately (alone, together, alone, together, ...) after a warm-up, the
median of ``--repeats`` each; also checks that both ways give the same masks and weights.

    OMP_NUM_THREADS=1 python bench/group_sweep.py --device cpu --out bench/results/timing/group_sweep_cpu.json
    python bench/group_sweep.py --device cuda --out $OUT/group_sweep.json         # (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prac.methods.patterns import Unstructured, parse_nm  # noqa: E402
from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_factor, sparsegpt_prune, sparsegpt_prune_many  # noqa: E402

GROUPS = {"qkv": [4096, 1024, 1024], "gate_up": [14336, 14336]}


def synced(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in-features", type=int, default=4096)
    p.add_argument("--groups", default="qkv,gate_up", help=f"comma list of {', '.join(GROUPS)} or rows like 512+128+128")
    p.add_argument("--patterns", default="0.5,2:4")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--smoke", action="store_true", help="in 256, groups 256+64+64 and 512+512: seconds on a CPU")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cols = 256 if args.smoke else args.in_features
    groups = "256+64+64,512+512" if args.smoke else args.groups
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * cols, cols // 8, generator=g) @ torch.randn(cols // 8, cols, generator=g)
    x = x + 0.3 * torch.randn(2 * cols, cols, generator=g)
    h = (x.t() @ x).to(device)
    del x
    cfg = SparseGPTConfig()
    factor = sparsegpt_factor(h, cfg, device)
    rows_out = []
    for name in groups.split(","):
        outs = GROUPS.get(name) or [int(r) for r in name.split("+")]
        weights = [torch.randn(o, cols, generator=g).to(device) for o in outs]
        for spec in args.patterns.split(","):
            pattern = parse_nm(spec) if ":" in spec else Unstructured(float(spec))
            alone_fn = lambda: [sparsegpt_prune(w, h, pattern, cfg, factor=factor) for w in weights]  # noqa: E731
            together_fn = lambda: sparsegpt_prune_many(weights, h, [pattern] * len(weights), cfg, factor=factor)  # noqa: E731
            alone, _ = synced(alone_fn, device)  # warm-up
            together, _ = synced(together_fn, device)
            same = all(torch.equal(a.mask, t.mask) and torch.equal(a.weight, t.weight) for a, t in zip(alone, together))
            del alone, together
            ta, tt = [], []
            for _ in range(args.repeats):
                ta.append(synced(alone_fn, device)[1])
                tt.append(synced(together_fn, device)[1])
            row = {"group": name, "rows": outs, "in": cols, "pattern": spec, "alone_s": statistics.median(ta),
                   "together_s": statistics.median(tt), "speedup": statistics.median(ta) / statistics.median(tt),
                   "bit_identical": same, "alone_all": ta, "together_all": tt}
            rows_out.append(row)
            print(f"{name:>10} {spec:>4}: alone {row['alone_s']:.3f}s together {row['together_s']:.3f}s "
                  f"x{row['speedup']:.2f} bit-identical {same}", flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows_out}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
