"""Per layer: prac's SparseGPT against the reference implementation (IST-DASLab/sparsegpt), same H.

The reference is not part of prac and is never copied into it: give ``--reference DIR``, a checkout
of https://github.com/IST-DASLab/sparsegpt (its ``sparsegpt.py`` and ``quant.py`` are imported from
there). For each width and pattern one synthetic layer (``bench/layer_speed.py``'s correlated
activations) is pruned by both, each timed on its second call (CUDA synchronised); the table gives
the seconds, the speed-up and both relative output errors ‖X(W−W₀)ᵀ‖²/‖XW₀ᵀ‖².

    python bench/reference_sparsegpt.py --reference /path/to/sparsegpt --device cuda --out r.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    from layer_speed import relative_error, synthetic_layer
    from prac.methods.patterns import NM, Unstructured
    from prac.methods.sparsegpt import SparseGPTConfig, sparsegpt_prune

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="a checkout of IST-DASLab/sparsegpt")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--in-features", default="4096,14336")
    ap.add_argument("--out-features", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.reference)
    reference = importlib.import_module("sparsegpt")
    device = torch.device(args.device)
    rows = []
    for width in (int(w) for w in args.in_features.split(",")):
        x, w0 = synthetic_layer(width, args.out_features, args.tokens, 64, 0, device)
        h = x.T @ x
        del x
        for name, pattern in (("50%", Unstructured(0.5)), ("2:4", NM(2, 4))):
            def ours():
                return sparsegpt_prune(w0, h, pattern, SparseGPTConfig()).weight

            def theirs():
                layer = torch.nn.Linear(width, args.out_features, bias=False, device=device)
                layer.weight.data.copy_(w0)
                pruner = reference.SparseGPT(layer)
                pruner.H = h.clone()
                pruner.nsamples = 1
                n, m = (pattern.n, pattern.m) if isinstance(pattern, NM) else (0, 0)
                sparsity = 0.5 if isinstance(pattern, NM) else pattern.sparsity
                pruner.fasterprune(sparsity, prunen=n, prunem=m, blocksize=128, percdamp=0.01)
                return layer.weight.data.float()

            result = {}
            for label, fn in (("prac", ours), ("reference", theirs)):
                fn()  # warm-up
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                w = fn()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result[label] = (time.perf_counter() - start, relative_error(w.float(), w0, h))
            rows.append({"in": width, "out": args.out_features, "pattern": name,
                         "prac_seconds": result["prac"][0], "reference_seconds": result["reference"][0],
                         "speedup": result["reference"][0] / result["prac"][0],
                         "prac_error": result["prac"][1], "reference_error": result["reference"][1]})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "torch": torch.__version__,
                                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
