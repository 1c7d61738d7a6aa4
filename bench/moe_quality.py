"""Quality and time of pruning the bundled MoE fixture (tiny-mixtral: 4 blocks, 8 experts, top-2).

Quality: each configuration is one ``prac prune`` of ``src/prac/assets/tiny-mixtral`` in its own
process, one thread, on the golden calibration tokens (128 x 256 of the bundled calibration text, the
dense fixture's tokenizer), evaluated on the bundled held-out text in 256-token windows; reports in
``bench/results/moe/``, a markdown table in ``moe.md``.

Time: the same prune of the MoE fixture next to a dense Mistral with the same *active* parameters
per token (its MLP width = top-k x the expert width, random weights: time does not depend on them),
``--eval none``, alternating MoE / dense for ``--rounds`` rounds.

    python bench/moe_quality.py                      # quality table + timing (CPU: about 15 minutes)
    python bench/moe_quality.py --smoke              # seconds: a few sequences, the harness only
    python bench/moe_quality.py --skip-timing --methods wanda --patterns 50
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
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOE = ROOT / "src" / "prac" / "assets" / "tiny-mixtral"
CALIB = ROOT / "tests" / "golden" / "calib_tokens.safetensors"
VARIANTS = {"": [], "width": ["--expert-min-tokens", "width"]}


def pattern_args(p: str) -> list[str]:
    return ["--nm", p] if ":" in p else ["--sparsity", str(int(p) / 100)]


def prune(model: Path, args: list[str], report: Path, threads: int, smoke: bool) -> dict:
    cmd = [sys.executable, "-m", "prac", "prune", "--model", str(model), "--no-progress", "--report", str(report), *args]
    cmd += ["--nsamples", "4", "--seqlen", "64", "--calib", str(ROOT / "src/prac/assets/pystdlib/calib.txt")] \
        if smoke else ["--calib-tokens", str(CALIB)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(report.read_text())


def quality_row(method: str, variant: str, pattern: str, out: Path, smoke: bool) -> dict:
    key = f"{method}{'-' + variant if variant else ''}_{pattern.replace(':', 'of')}"
    eval_args = ["--eval", str(out / "smoke_eval.txt")] if smoke else []
    rep = prune(MOE, ["--method", method, *pattern_args(pattern), "--measure", "--no-dense-eval", *VARIANTS[variant],
                      *eval_args], out / f"{key}.json", 1, smoke)
    s = rep["summary"]
    experts = [layer for layer in rep["layers"] if layer.get("expert")]
    err = [layer["relative_error"] for layer in experts if layer.get("relative_error") is not None]
    return {"key": key, "method": method, "variant": variant or "default", "pattern": pattern, "ppl": s.get("ppl"),
            "sparsity": s["sparsity"], "block_weight_sparsity": s.get("block_weight_sparsity"),
            "expert_error": sum(err) / len(err) if err else None, "mean_relative_error": s.get("mean_relative_error"),
            "topped_up": len(s.get("experts", {}).get("topped_up", [])), "prune_seconds": s["prune_seconds"]}


def dense_twin(folder: Path) -> Path:
    """A random MistralForCausalLM with the fixture's attention and its active MLP width."""
    import torch
    from transformers import AutoConfig, MistralConfig, MistralForCausalLM

    moe = AutoConfig.from_pretrained(MOE).to_dict()
    keep = {k: moe[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")}
    config = MistralConfig(**keep, intermediate_size=moe["intermediate_size"] * moe["num_experts_per_tok"],
                           sliding_window=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((MOE / name).read_bytes())
    return folder


def timing(methods: list[str], rounds: int, out: Path, smoke: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = dense_twin(Path(tmp) / "dense")
        for method in methods:
            seconds: dict[str, list[float]] = {"moe": [], "dense": []}
            for _round in range(rounds):
                for name, model in (("moe", MOE), ("dense", dense)):
                    rep = prune(model, ["--method", method, "--sparsity", "0.5", "--eval", "none"],
                                Path(tmp) / f"{name}.json", 1, smoke)
                    seconds[name].append(rep["summary"]["prune_seconds"])
            rows.append({"method": method, "moe_seconds": seconds["moe"], "dense_seconds": seconds["dense"],
                         "ratio": [m / d for m, d in zip(seconds["moe"], seconds["dense"])]})
            print(f"timing {method}: moe {seconds['moe']} dense {seconds['dense']}", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "admm"])
    ap.add_argument("--patterns", nargs="+", default=["50", "70", "2:4"])
    ap.add_argument("--variants", nargs="+", default=[""], choices=list(VARIANTS),
                    help="'' = defaults (only experts without a token calibrated on the block's tokens); "
                         "width = --expert-min-tokens width (every expert topped up to its input width)")
    ap.add_argument("--jobs", type=int, default=2, help="configurations run at once (one thread each)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating MoE / dense timing rounds")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results" / "moe"))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        from prac.io import assets

        (out / "smoke_eval.txt").write_text(assets.DEFAULT_EVAL.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    todo = [(m, v, p) for p in args.patterns for m in args.methods for v in args.variants]
    rows = []
    with cf.ThreadPoolExecutor(args.jobs) as pool:
        for r in pool.map(lambda c: quality_row(*c, out, args.smoke), todo):
            rows.append(r)
            print(f"done {r['key']}: ppl {r['ppl']:.3f}", file=sys.stderr, flush=True)
    times = [] if args.skip_timing else timing(args.methods, args.rounds, out, args.smoke)
    dense_ppl = None
    if not args.smoke:
        from prac.jobs.config import EvalJob
        from prac.jobs.eval import run_eval

        dense_ppl = run_eval(EvalJob(model=str(MOE)))["summary"]["ppl"]
    stamp = {"date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
             "command": "python bench/moe_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "dense_ppl": dense_ppl}
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    lines = [f"Measured {stamp['date']} on {stamp['machine']}, one thread per run; `{stamp['command'].strip()}`. "
             f"tiny-mixtral dense ppl {fmt(dense_ppl, '.3f')}.", "",
             "| pattern | method | statistics | ppl | sparsity (pruned) | all block weights zero "
             "| mean expert layer error | topped up | prune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['method']} | {r['variant']} | {fmt(r['ppl'], '.3f')} | {r['sparsity']:.4f} | "
                     f"{fmt(r['block_weight_sparsity'], '.4f')} | {fmt(r['expert_error'], '.5f')} | {r['topped_up']} | "
                     f"{r['prune_seconds']:.1f} |")
    if times:
        lines += ["", "| method | MoE prune s | dense twin prune s | MoE / dense |", "|---|---|---|---|"]
        for t in times:
            lines.append(f"| {t['method']} | {' / '.join(f'{s:.1f}' for s in t['moe_seconds'])} | "
                         f"{' / '.join(f'{s:.1f}' for s in t['dense_seconds'])} | "
                         f"{' / '.join(f'{x:.2f}' for x in t['ratio'])} |")
    (out / "moe.md").write_text("\n".join(lines) + "\n")
    (out / "moe.json").write_text(json.dumps({**stamp, "rows": rows, "timing": times}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
