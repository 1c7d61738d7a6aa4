"""ADMM settings on the bundled model: mean relative layer error over the 28 linears per setting.

How docs/admm.md's table of defaults was measured: the golden calibration (first ``--nsamples``
rows), one prune per setting, no evaluation. Each ``--set`` is a comma list of ADMMSettings fields.

    OMP_NUM_THREADS=1 python bench/admm_sweep.py --sparsity 0.7 --nsamples 32 \\
        --set penalty=0.1,penalty_growth=1.2 --set penalty=0.1,penalty_growth=1.1 --set penalty=1.0
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path

import torch

from prac.engine.pipeline import PruneConfig, prune_model
from prac.io import assets
from prac.io.data import load_token_file
from prac.methods.admm import ADMMSettings
from prac.methods.patterns import Unstructured, parse_nm
from prac.model.loading import load_model

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden"


def parse_set(text: str) -> dict:
    fields = {f.name: f.type for f in dataclasses.fields(ADMMSettings)}
    out = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        kind = fields[key]
        out[key] = value if "str" in str(kind) else (int(value) if "int" in str(kind) else float(value))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0.7", help="unstructured fraction or N:M")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--set", action="append", default=[], help="ADMMSettings fields, e.g. penalty=0.1,gradual=0")
    args = ap.parse_args(argv)
    pattern = parse_nm(args.sparsity) if ":" in args.sparsity else Unstructured(float(args.sparsity))
    model = load_model(str(assets.DEFAULT_MODEL))
    calib = load_token_file(GOLDEN / "calib_tokens.safetensors").input_ids[: args.nsamples]
    for text in args.set or [""]:
        settings = ADMMSettings(**parse_set(text))
        start = time.perf_counter()
        outcome = prune_model(copy.deepcopy(model), calib, PruneConfig(method="admm", pattern=pattern, settings=settings),
                              torch.device("cpu"))
        errors = [r.relative_error for r in outcome.layers]
        print(f"{text or 'defaults'}: mean layer error {sum(errors) / len(errors):.5f} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
