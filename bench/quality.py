"""Quality matrix on the bundled tiny-mistral model with the golden calibration tokens.

Each configuration is one ``prac prune`` run in its own process (so peak memory is its own),
evaluated on the bundled held-out text with 256-token windows; results land in
``bench/results/<key>.json`` (the run's full report), then a markdown table and a plot.

    python bench/quality.py                                   # the whole matrix (CPU: about an hour)
    python bench/quality.py --methods wanda magnitude --corrections none --patterns 50 2:4
    python bench/quality.py --smoke                           # seconds: tiny calibration, a few windows
    python bench/quality.py --methods admm admm@row sparsegpt --corrections none optimal \
        --allocations uniform owl error --patterns 70 --out-dir bench/results/joint

A method may carry variants after ``@``, joined by ``,`` (``admm@row``: ``--scope row``;
``admm@seq``: ``--sequential``; ``admm@dt``/``admm@nodt``: ``--dense-target``/``--no-dense-target``;
``admm@row,seq``: both; ``admm@blocks``: ``--admm-sweep blocks``; ``admm@blocks,nofinal``: that with
``--admm-final none``). Allocations other than
``uniform`` are skipped for N:M patterns, where they do not apply.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
PATTERNS = ["50", "60", "70", "80", "2:4", "4:8"]
ALLOCATIONS = ["uniform", "owl", "error"]
VARIANTS = {"row": ["--scope", "row"], "layer": ["--scope", "layer"], "seq": ["--sequential"], "dt": ["--dense-target"],
            "nodt": ["--no-dense-target"], "blocks": ["--admm-sweep", "blocks"], "nofinal": ["--admm-final", "none"]}
CORRECTIONS = ["none", "full", "diagonal", "greedy", "optimal"]


def pattern_args(p: str) -> list[str]:
    return ["--nm", p] if ":" in p else ["--sparsity", str(int(p) / 100)]


def configs(methods, corrections, patterns, allocations=("uniform",)) -> list[tuple[str, str, str, str]]:
    out = []
    for p in patterns:
        for m in methods:
            for c in corrections:
                if m == "magnitude" and c != "none":
                    continue
                for a in allocations:
                    if a != "uniform" and ":" in p:
                        continue
                    out.append((m, c, p, a))
    return out


def key(method: str, correction: str, pattern: str, allocation: str = "uniform") -> str:
    alloc = "" if allocation == "uniform" else f"+{allocation}"
    return f"{method.replace('@', '-').replace(',', '-')}+{correction}{alloc}_{pattern.replace(':', 'of')}"


def method_args(method: str) -> list[str]:
    name, _, variants = method.partition("@")
    return ["--method", name, *(arg for v in variants.split(",") if v for arg in VARIANTS[v])]


def run_one(method, correction, pattern, allocation, out_dir: Path, smoke: bool, threads: int,
            extra: list[str]) -> dict:
    report = out_dir / f"{key(method, correction, pattern, allocation)}.json"
    cmd = [sys.executable, "-m", "prac", "prune", "--no-progress", *method_args(method), "--correction", correction,
           "--allocation", allocation, "--measure", "--no-dense-eval", "--report", str(report), *pattern_args(pattern),
           *extra]
    if smoke:
        cmd += ["--nsamples", "4", "--seqlen", "64", "--eval", str(out_dir / "smoke_eval.txt")]
    else:
        cmd += ["--calib-tokens", str(GOLDEN / "calib_tokens.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text())


def row(method, correction, pattern, allocation, rep) -> dict:
    s = rep["summary"]
    c = s.get("correction", {})
    return {"method": method, "correction": correction, "pattern": pattern, "allocation": allocation, "ppl": s.get("ppl"),
            "sparsity": s["sparsity"], "mean_relative_error": s.get("mean_relative_error"),
            "fraction_of_optimal": c.get("mean_fraction_of_optimal"), "reverted": c.get("reverted"),
            "refused": c.get("refused"), "escalated": c.get("damping_escalated"), "corrected_layers": c.get("layers"),
            "prune_seconds": s["prune_seconds"], "peak_memory_mb": s["peak_memory_bytes"] / 2**20}


def reference_name(method: str) -> str:
    """The reference implementation a row compares to: the method itself, whatever its objective variants
    (dense target, sequential), but not with another scope."""
    name, _, variants = method.partition("@")
    return name if set(filter(None, variants.split(","))) <= {"dt", "nodt", "seq"} else method


def markdown(rows: list[dict], reference: dict) -> str:
    lines = ["| pattern | method | correction | allocation | ppl | reference ppl | sparsity | mean rel. layer error "
             "| of optimum | prune s | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        uniform = r.get("allocation", "uniform") == "uniform"
        ref = (reference.get(f"{reference_name(r['method'])}_{r['pattern'].replace(':', 'of')}", {}).get("ppl")
               if r["correction"] == "none" and uniform else None)
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {r['pattern']} | {r['method']} | {r['correction']} | {r.get('allocation', 'uniform')} | "
                     f"{fmt(r['ppl'], '.3f')} | {fmt(ref, '.3f')} | "
                     f"{r['sparsity']:.4f} | {fmt(r['mean_relative_error'], '.5f')} | "
                     f"{fmt(r['fraction_of_optimal'], '.3f')} | "
                     f"{r['prune_seconds']:.1f} | {r['peak_memory_mb']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], dense_ppl: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        label = f"{r['method']}+{r['correction']}" if r["correction"] != "none" else r["method"]
        if r.get("allocation", "uniform") != "uniform":
            label += f" ({r['allocation']})"
        series.setdefault(label, []).append(r)
    colors = plt.cm.tab20.colors
    for k, (label, rs) in enumerate(sorted(series.items())):
        un = sorted((r for r in rs if ":" not in r["pattern"]), key=lambda r: r["sparsity"])
        style = "--" if label.startswith("sparsegpt") else "-"
        line, = ax.plot([r["sparsity"] for r in un], [r["ppl"] for r in un], marker="o", ls=style,
                        color=colors[(2 * k) % 20 if k < 10 else (2 * k + 1) % 20], label=label)
        for r in rs:
            if ":" in r["pattern"]:
                ax.scatter([0.5 + (0.01 if r["pattern"] == "4:8" else 0.02)], [r["ppl"]],
                           marker="s" if r["pattern"] == "2:4" else "^", color=line.get_color())
    if dense_ppl:
        ax.axhline(dense_ppl, color="black", lw=0.8, ls=":", label="dense")
        ax.set_ylim(bottom=min(dense_ppl, ax.get_ylim()[0]) - 0.5)
    ax.set_xlabel("sparsity (squares: 2:4, triangles: 4:8, drawn just right of 0.5)")
    ax.set_ylabel("perplexity (bundled eval text, 256-token windows)")
    ax.set_title("tiny-mistral: perplexity vs sparsity")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    ap.add_argument("--corrections", nargs="+", default=CORRECTIONS)
    ap.add_argument("--patterns", nargs="+", default=PATTERNS)
    ap.add_argument("--allocations", nargs="+", default=["uniform"], choices=ALLOCATIONS)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--jobs", type=int, default=1, help="configurations run at once (threads are split between them)")
    ap.add_argument("--threads", type=int, default=None, help="threads per configuration (default: CPUs / jobs)")
    ap.add_argument("--smoke", action="store_true", help="tiny calibration and evaluation: checks the harness only")
    ap.add_argument("--resume", action="store_true", help="reuse the reports of configurations already in --out-dir")
    ap.add_argument("--collect-only", action="store_true", help="only build the table and plot from existing reports")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for every prac prune")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from prac.io import assets

        (out / "smoke_eval.txt").write_text(assets.DEFAULT_EVAL.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    todo = configs(args.methods, args.corrections, args.patterns, args.allocations)
    rows = []
    if args.resume or args.collect_only:
        for c in list(todo):
            path = out / f"{key(*c)}.json"
            if path.exists():
                rows.append(row(*c, json.loads(path.read_text())))
                todo.remove(c)
        if args.collect_only:
            todo = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, *c, out, args.smoke, threads, args.extra): c for c in todo}
        for fut in cf.as_completed(futures):
            m, c, p, a = futures[fut]
            rows.append(row(m, c, p, a, fut.result()))
            print(f"done {key(m, c, p, a)}: ppl {rows[-1]['ppl']:.3f}", file=sys.stderr, flush=True)
    order = {p: i for i, p in enumerate(PATTERNS)}
    rows.sort(key=lambda r: (order.get(r["pattern"], 99), args.methods.index(r["method"]),
                             CORRECTIONS.index(r["correction"]), ALLOCATIONS.index(r.get("allocation", "uniform"))))
    reference = json.loads((GOLDEN / "reference.json").read_text())["results"]
    table = markdown(rows, reference)
    stamp = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
             "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    header = (f"Measured {stamp['date']} on {stamp['machine']}; `{stamp['command'].strip()}`. "
              f"Dense ppl {reference['dense']['ppl']:.3f}.\n\n")
    (out / "quality.md").write_text(header + table + "\n")
    (out / "quality.json").write_text(json.dumps({**stamp, "rows": rows}, indent=1))
    plot(rows, reference["dense"]["ppl"], out / "quality.png")
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
