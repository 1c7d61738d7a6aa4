"""Held-out acceptance of corrections (``--holdout``) against judging on the fitted tokens, on the bundled model.

For each calibration size and configuration, one ``prac prune`` per variant (its own process, one
thread), evaluated on the bundled held-out text with 256-token windows:

- ``in-sample``: ``--holdout 0``, every sequence fitted, never-worse judged on the tokens fitted;
- ``held-out``: the default (1/8 of the sequences held out: the masks and the correction are fitted
  on the other 7/8, and a correction failing on the held-out share is retried at 10x, 100x, 1000x
  its damping before it is refused);
- ``no-escalate``: ``--no-holdout-escalate`` (a failing correction is refused at once);
- ``dampings``: ``--holdout-dampings 1e-3,1e-1,1`` (the damping chosen per layer by held-out error).

(Rows of the former ``no-refit`` variant — an accepted correction not solved again on all tokens —
stay in the JSON of earlier runs: since issue 31 that is what ``held-out`` does, and
``--holdout-refit`` has no effect.)

    python bench/holdout.py                       # about 20 minutes on 2 CPU cores
    python bench/holdout.py --sizes 4x64 --jobs 2  # the smallest calibration only

Writes ``bench/results/holdout/holdout.json`` (rows of earlier runs with other keys are kept) and a
markdown table (also printed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "calib_tokens.safetensors"
VARIANTS = {
    "in-sample": ["--holdout", "0"],
    "held-out": [],
    "no-escalate": ["--no-holdout-escalate"],
    "dampings": ["--holdout-dampings", "1e-3,1e-1,1"],
}
CONFIGS = {
    "wanda+optimal 70%": ["--method", "wanda", "--correction", "optimal", "--sparsity", "0.7"],
    "sparsegpt+optimal 2:4": ["--method", "sparsegpt", "--correction", "optimal", "--nm", "2:4"],
    "wanda+full 70%": ["--method", "wanda", "--correction", "full", "--sparsity", "0.7"],
}


def calibration(size: str) -> list[str]:
    if size == "golden":
        return ["--calib-tokens", str(GOLDEN)]
    n, seqlen = size.split("x")
    return ["--nsamples", n, "--seqlen", seqlen]


def run(size: str, config: str, variant: str, out: Path) -> dict:
    report = out / f"{size}_{config.replace(' ', '_').replace('%', '').replace(':', 'of')}_{variant}.json"
    cmd = [sys.executable, "-m", "prac", "prune", "--no-progress", "--no-dense-eval", *CONFIGS[config],
           *calibration(size), *VARIANTS[variant], "--report", str(report)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    s = json.loads(report.read_text())["summary"]
    c = s["correction"]
    return {"size": size, "config": config, "variant": variant, "ppl": s["ppl"], "refused": c.get("refused", 0),
            "layers": c["layers"], "mean_error_after": c["mean_error_after"],
            "mean_heldout_error_before": c.get("mean_heldout_error_before"),
            "mean_heldout_error_after": c.get("mean_heldout_error_after"), "prune_seconds": s["prune_seconds"]}


def table(rows: list[dict]) -> str:
    lines = ["| calibration | configuration | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for size in dict.fromkeys(r["size"] for r in rows):
        for config in dict.fromkeys(r["config"] for r in rows):
            cells = []
            for variant in VARIANTS:
                r = next((r for r in rows if (r["size"], r["config"], r["variant"]) == (size, config, variant)), None)
                cells.append("–" if r is None
                             else f"{r['ppl']:.3f}" + (f" ({r['refused']} refused)" if r["refused"] else ""))
            lines.append(f"| {size} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["4x64", "8x128", "golden"],
                    help="calibration: NxSEQLEN from the bundled text, or golden (128 x 256 tokens)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / "holdout"))
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(s, c, v) for s in args.sizes for c in args.configs for v in args.variants]
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda t: run(*t, out), todo))
    path = out / "holdout.json"
    ident = lambda r: (r["size"], r["config"], r["variant"])  # noqa: E731
    if path.exists():
        fresh = {ident(r) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if ident(r) not in fresh] + rows
        order = {v: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda r: (r["size"] == "golden", r["size"], r["config"], order.get(r["variant"], len(order))))
    path.write_text(json.dumps({"rows": rows}, indent=1))
    text = table(rows)
    (out / "holdout.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
