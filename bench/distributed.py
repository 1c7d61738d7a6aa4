"""Data-parallel pruning: wall time of the whole prune with 1 and N processes, and the ratio.

Usage::

    python bench/distributed.py                       # CPU: 1 vs 2 processes, one thread each
    python bench/distributed.py --device cuda --nproc 1 2 4 --model PATH --nsamples 128 --seqlen 2048

Each run is ``prac prune`` (``torchrun --standalone --nproc-per-node N -m prac prune …`` for N > 1)
on the bundled model with the golden calibration tokens (128 × 256) unless told otherwise, with
``--eval none`` so the number is the prune alone; the time is the report's ``prune_seconds`` (the
prune phase: capture, calibrate, reduce, prune, exchange, propagate) and the wall time of the whole
command (which adds interpreter start, loading, and the launcher for N > 1). Results go to
``bench/results/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CALIB = ROOT / "tests" / "golden" / "calib_tokens.safetensors"


def run(nproc: int, args: argparse.Namespace, workdir: Path) -> dict:
    report = workdir / f"report-{nproc}.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc > 1 else [sys.executable])
    calib = ["--calib-tokens", str(GOLDEN_CALIB)] if args.model is None else ["--nsamples", str(args.nsamples)]
    cmd = [*launcher, "-m", "prac", "prune", *(["--model", args.model] if args.model else []), *calib,
           *(["--seqlen", str(args.seqlen)] if args.seqlen else []), "--method", args.method, *args.pattern,
           "--eval", "none", "--device", args.device, "--no-progress", "--report", str(report)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(report.read_text())["summary"]
    return {"nproc": nproc, "prune_seconds": summary["prune_seconds"], "command_seconds": round(wall, 3),
            "phase_seconds": summary["phase_seconds"], "sparsity": summary["sparsity"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    p.add_argument("--model", default=None, help="default: the bundled tiny-mistral with the golden tokens")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=None)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--pattern", nargs="+", default=["--sparsity", "0.5"])
    p.add_argument("--repeats", type=int, default=2, help="runs per process count; the fastest is kept")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "distributed.json"))
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for nproc in args.nproc:
            runs = [run(nproc, args, Path(tmp)) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["prune_seconds"])
            best["all_prune_seconds"] = [r["prune_seconds"] for r in runs]
            rows.append(best)
            print(f"{nproc} process(es): prune {best['prune_seconds']:.2f} s, whole command "
                  f"{best['command_seconds']:.2f} s", flush=True)
    base = rows[0]
    for r in rows:
        r["speedup_prune"] = round(base["prune_seconds"] / r["prune_seconds"], 3)
        r["speedup_command"] = round(base["command_seconds"] / r["command_seconds"], 3)
        print(f"{r['nproc']} vs {base['nproc']}: prune x{r['speedup_prune']}, command x{r['speedup_command']}")
    result = {"device": args.device, "threads_per_process": args.threads, "method": args.method,
              "pattern": args.pattern, "model": args.model or "bundled tiny-mistral, golden calibration 128 x 256",
              "cpu_count": os.cpu_count(), "measured": time.strftime("%Y-%m-%d"), "runs": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
