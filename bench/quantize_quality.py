"""Sparsity + quantization on the bundled model with the golden calibration tokens (``--wbits``).

Each row is one ``prac prune`` run in its own process, saved with ``--save`` (compressed-tensors'
pack-quantized format for the quantized rows), evaluated by the run itself on the bundled held-out
text (256-token windows). The ``+rtn`` rows are the baseline the joint sweep must beat: the saved
pruned model of the row before, each surviving weight rounded to nearest on the same grid (group min/
max, compressed-tensors' ``calculate_qparams``/``fake_quantize``), zeros kept, evaluated the same way.

    python bench/quantize_quality.py                    # every row (CPU, 1 thread: about 20 minutes)
    python bench/quantize_quality.py --rows sparsegpt_50 sparsegpt_50_w4 --threads 2
    python bench/quantize_quality.py --smoke            # seconds: checks the harness only

Writes ``<out-dir>/quantize.json`` (every row: perplexity, saved weight bytes, prune seconds, the
command) and ``quantize.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"

#: name -> (prac prune options, the row it rounds to nearest instead, or None)
ROWS: dict[str, tuple[list[str], str | None]] = {
    "dense": (["--sparsity", "0", "--method", "magnitude"], None),
    "dense_w4": (["--sparsity", "0", "--method", "sparsegpt", "--wbits", "4"], None),  # plain GPTQ
    "sparsegpt_50": (["--sparsity", "0.5", "--method", "sparsegpt"], None),
    "sparsegpt_50_w4": (["--sparsity", "0.5", "--method", "sparsegpt", "--wbits", "4"], None),
    "sparsegpt_50+rtn": ([], "sparsegpt_50"),
    "sparsegpt_2of4": (["--nm", "2:4", "--method", "sparsegpt"], None),
    "sparsegpt_2of4_w4": (["--nm", "2:4", "--method", "sparsegpt", "--wbits", "4"], None),
    "sparsegpt_2of4+rtn": ([], "sparsegpt_2of4"),
    "sparsegpt_50_w3": (["--sparsity", "0.5", "--method", "sparsegpt", "--wbits", "3"], None),
    "sparsegpt_50+rtn3": ([], "sparsegpt_50"),
    "sparsegpt_2of4_w3": (["--nm", "2:4", "--method", "sparsegpt", "--wbits", "3"], None),
    "sparsegpt_2of4+rtn3": ([], "sparsegpt_2of4"),
    "admm_50_w4": (["--sparsity", "0.5", "--method", "admm", "--wbits", "4"], None),
    "admm_2of4_w4": (["--nm", "2:4", "--method", "admm", "--wbits", "4"], None),
    # GPTQ on a fixed mask (gptq_on_mask) from the other mask sources and after a correction
    "wanda_50_w4": (["--sparsity", "0.5", "--method", "wanda", "--wbits", "4"], None),
    "sparsegpt_50_optimal_w4": (["--sparsity", "0.5", "--method", "sparsegpt", "--correction", "optimal",
                                 "--wbits", "4"], None),
    "wanda_50_w3": (["--sparsity", "0.5", "--method", "wanda", "--wbits", "3"], None),
    "admm_50_w3": (["--sparsity", "0.5", "--method", "admm", "--wbits", "3"], None),
}


def prune(name: str, options: list[str], folder: Path, smoke: bool, threads: int) -> dict:
    cmd = [sys.executable, "-m", "prac", "prune", "--no-progress", *options, "--save", str(folder), "--overwrite"]
    cmd += ["--nsamples", "4", "--seqlen", "64", "--eval", str(smoke_text(folder.parent))] if smoke else \
        ["--calib-tokens", str(GOLDEN / "calib_tokens.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    report = json.loads((folder / "prac_report.json").read_text())
    s = report["summary"]
    return {"row": name, "ppl": s.get("ppl"), "dense_ppl": s.get("dense_ppl"), "prune_seconds": s["prune_seconds"],
            "weight_bytes": report["saved"]["weight_bytes"], "format": report["saved"]["format"],
            "block_weight_sparsity": s.get("block_weight_sparsity"),
            "mean_relative_error": s.get("mean_relative_error"), "quantization": s.get("quantization"),
            "command": "prac " + " ".join(cmd[3:])}


def smoke_text(root: Path) -> Path:
    path = root / "smoke_eval.txt"
    if not path.exists():
        from prac.io import assets

        path.write_text(assets.DEFAULT_EVAL.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return path


def round_to_nearest(name: str, source: Path, smoke: bool, threads: int, bits: int = 4, group: int = 128) -> dict:
    """The saved pruned model's block linears rounded to nearest on the ``bits``/``group`` grid, zeros
    kept, saved beside it (with its report, so ``prac eval`` reuses its evaluation protocol) and evaluated."""
    import shutil

    import torch
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams
    from transformers import AutoModelForCausalLM

    from prac.model.blocks import find_blocks, find_linears

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        for block in find_blocks(model).modules:
            for linear in find_linears(block).values():
                w = linear.weight
                g = w.reshape(w.shape[0], -1, group)
                scale, zero = calculate_qparams(g.amin(dim=2), g.amax(dim=2), args)
                q = fake_quantize(w, scale, zero, args)
                linear.weight.copy_(torch.where(w == 0, 0.0, q))
    folder = source.parent / name
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(folder)
    report = source.parent / f"{name}.eval.json"
    cmd = [sys.executable, "-m", "prac", "eval", "--no-progress", "--model", str(folder), "--report", str(report)]
    if smoke:
        cmd += ["--data", str(smoke_text(source.parent)), "--seqlen", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(report.read_text())["summary"]
    return {"row": name, "ppl": summary.get("ppl"), "weight_bytes": None, "format": "dense, rounded to nearest",
            "note": f"{source.name} rounded to nearest, {bits}-bit groups of {group}, zeros kept",
            "command": "prac " + " ".join(cmd[3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / "quantize"))
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="prac-quant-") as tmp:
        folders: dict[str, Path] = {}
        for name in args.rows:
            options, source = ROWS[name]
            started = time.perf_counter()
            if source is None:
                folders[name] = Path(tmp) / name
                row = prune(name, options, folders[name], args.smoke, args.threads)
            else:
                if source not in folders:
                    folders[source] = Path(tmp) / source
                    prune(source, ROWS[source][0], folders[source], args.smoke, args.threads)
                row = round_to_nearest(name, folders[source], args.smoke, args.threads,
                                       bits=3 if name.endswith("rtn3") else 4)
            row["wall_seconds"] = round(time.perf_counter() - started, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": dt.date.today().isoformat(), "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "smoke": args.smoke}
    (out / "quantize.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["| row | ppl | saved weights (MiB) | prune s | format |", "|---|---|---|---|---|"]
    for r in rows:
        size = "" if r.get("weight_bytes") is None else f"{r['weight_bytes'] / 2**20:.2f}"
        lines.append(f"| {r['row']} | {r['ppl']:.3f} | {size} | {r.get('prune_seconds', '')} | {r['format']} |")
    (out / "quantize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
