"""Structured pruning against the field's retraining-free baselines, quality and speed (the structured-pruning issue).

Three protocols, each on its own calibration tokens and held-out text:

- ``smollm2``: SmolLM2-135M-Instruct on the Brown corpus, the real-model bench's cache
  (``python bench/real_model.py build`` first): 32 x 512 calibration tokens, 8 held-out files in
  512-token windows;
- ``smollm2-n128``: the same with 128 x 512 calibration tokens (``build`` makes both) for every
  method, and prac's tuning with ``--reconstruct-patience 3``;
- ``bundled``: prac's bundled model (``src/prac/assets/tiny-mistral``) on its own calibration text
  (128 x 256 tokens, seed 0) and evaluation text (256-token windows).

Rows, at a share ``F`` of the block parameters kept (0.75 and 0.5), all on the same tokens:

- ``prac@F``: ``prac prune --target-params F --reconstruct block`` (the shape searched on held-out
  error, channels by the error after the exact refit, every block tuned to the dense output);
- ``prac-refit@F``: the same without the tuning;
- ``minitron@F``: MLP neurons by Minitron's activation importance (mean |activation| of the
  ``down_proj`` input), sliced, nothing refitted;
- ``wanda-sp@F``: MLP neurons by ``‖W_down[:, j]‖ · ‖x_j‖``, sliced;
- ``flap@F``: MLP neurons by FLAP's fluctuation metric (the input's variance over tokens times
  ``‖W_down[:, j]‖²``), sliced, with its bias compensation (the removed neurons' mean contribution
  added to ``down_proj``'s bias; evaluated in memory, as the families here have no MLP bias);
- ``shortgpt@F``: whole blocks by ShortGPT's block influence (1 − mean cosine of a block's input and
  output over the calibration tokens), the lowest dropped;
- ``prac-mlp768`` (smollm2 only): ``--intermediate-size 768 --reconstruct block``, the issue's
  half-the-MLP row.

The baselines choose on the dense model in one pass over the calibration tokens, as their papers
do, and use the MLP width (or the depth) that keeps ``F`` of the block parameters (rounded to the
nearest multiple of 8). ``speed`` times every saved folder against the dense one, both loaded with plain
transformers, alternating, best of ``--repeats``: prefill of 512 tokens at batch 1 and greedy decoding
of 128 tokens.

    python bench/structured.py run --protocol bundled
    python bench/structured.py run --protocol smollm2 --rows 'prac*@0.75,wanda-sp@0.75'
    python bench/structured.py speed --protocol smollm2 --threads 2
    python bench/structured.py table --protocol smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "structured"
SMOLLM2 = Path.home() / ".cache" / "prac-bench" / "smollm2"
SHARES = (0.75, 0.5)
PREFILL, DECODE = 512, 128


def _prac_src() -> None:
    sys.path.insert(0, str(ROOT / "src"))


# --- protocols -------------------------------------------------------------------------------------------


def protocol(name: str, cache: Path) -> dict[str, Any]:
    """Model folder, calibration token file, held-out text and window length of a protocol."""
    _prac_src()
    if name.startswith("smollm2"):
        n128 = name == "smollm2-n128"  # the same model and text, 128 calibration sequences for every method
        paths = {"model": SMOLLM2 / "model", "calib": SMOLLM2 / f"calib-n{128 if n128 else 32}.safetensors",
                 "heldout": SMOLLM2 / "heldout.txt", "seqlen": 512,
                 "reconstruct": ["--batch-size", "2", "--reconstruct-lr", "2e-3",
                                 *(["--reconstruct-patience", "3"] if n128 else [])]}
        missing = [p for k, p in paths.items() if isinstance(p, Path) and not p.exists()]
        if missing:
            sys.exit(f"{missing[0]} is missing: run python bench/real_model.py build first")
        return paths
    from prac.io import assets

    calib = cache / "bundled-calib-n128-s256.safetensors"
    if not calib.is_file():
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        from prac.io.data import load_calibration

        cache.mkdir(parents=True, exist_ok=True)
        tok = AutoTokenizer.from_pretrained(assets.DEFAULT_MODEL)
        ids = load_calibration(str(assets.DEFAULT_CALIB), tok, nsamples=128, seqlen=256, seed=0).input_ids
        save_file({"input_ids": ids.contiguous()}, str(calib))
    return {"model": Path(assets.DEFAULT_MODEL), "calib": calib, "heldout": Path(assets.DEFAULT_EVAL), "seqlen": 256,
            "reconstruct": []}


def rows_for(name: str) -> list[str]:
    rows = ["dense"]
    for share in SHARES:
        rows += [f"{r}@{share}" for r in ("prac", "prac-refit", "minitron", "wanda-sp", "flap", "shortgpt")]
    if name == "smollm2":
        rows.append("prac-mlp768")
    return rows


# --- evaluation and baselines ----------------------------------------------------------------------------


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def heldout_windows(proto: dict[str, Any]):
    from transformers import AutoTokenizer

    from prac.io.data import eval_windows, load_eval_tokens

    tok = AutoTokenizer.from_pretrained(proto["model"])
    tokens, _ = load_eval_tokens(str(proto["heldout"]), tok, proto["seqlen"])
    return eval_windows(tokens, proto["seqlen"])


def perplexity(model, windows) -> float:
    import torch

    from prac.parallel.evaluate import perplexity as ppl

    return float(ppl(model, windows, torch.device("cpu"), batch_size=4)["ppl"])


def calibration(proto: dict[str, Any]):
    from prac.io.data import load_token_file

    return load_token_file(proto["calib"]).input_ids


def mlp_stats(model, calib, batch: int = 4) -> list[dict[str, Any]]:
    """Per block, over every calibration token, of ``down_proj``'s input: mean |x|, Σx², mean and variance."""
    import torch

    stats = [dict(n=0, abs=0.0, sq=0.0, sum=0.0) for _ in model.model.layers]

    def hook(i):
        def fn(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            s = stats[i]
            s["n"] += x.shape[0]
            s["abs"] = s["abs"] + x.abs().sum(0)
            s["sq"] = s["sq"] + x.square().sum(0)
            s["sum"] = s["sum"] + x.sum(0)
        return fn

    handles = [b.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(model.model.layers)]
    with torch.no_grad():
        for ids in calib.split(batch):
            model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    for s in stats:
        s["mean"] = s["sum"] / s["n"]
        s["var"] = s["sq"] / s["n"] - s["mean"].square()
    return stats


def block_influence(model, calib, batch: int = 4) -> list[float]:
    """ShortGPT's BI of each block: 1 − mean over tokens of cos(block input, block output)."""
    import torch

    total = [0.0] * len(model.model.layers)
    count = 0
    with torch.no_grad():
        for ids in calib.split(batch):
            hs = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
            for i in range(len(model.model.layers)):
                # hidden_states[i] is block i's input; the last entry is after the final norm, so the
                # last block's output is taken before it (its input plus its residual updates)
                out = hs[i + 1] if i + 1 < len(model.model.layers) else None
                if out is None:
                    continue
                total[i] += float(torch.nn.functional.cosine_similarity(hs[i], out, dim=-1).sum())
            count += ids.numel()
    bi = [1.0 - t / count for t in total]
    bi[-1] = math.inf  # its output is not exposed before the final norm: never dropped (ShortGPT keeps it too)
    return bi


def mlp_width(model, share: float) -> int:
    """The MLP width that keeps ``share`` of the block parameters (the nearest multiple of 8)."""
    _prac_src()
    from prac.engine.structure_search import BlockBudget

    b = BlockBudget.of(model)
    room = share * b.dense / b.layers - b.rest - b.kv * b.per_group
    return round(room / b.per_neuron / 8) * 8


def baseline(name: str, share: float, proto: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The baseline ``name`` at ``share``: the shrunk model and what it did."""
    import torch

    from prac.model.shrink import block_parameters, drop_layers, shrink_mlp

    model = load(proto["model"])
    calib = calibration(proto)
    before = block_parameters(model)
    info: dict[str, Any] = {}
    if name == "shortgpt":
        bi = block_influence(model, calib)
        per_block = before / len(model.model.layers)
        drop = math.ceil(len(model.model.layers) - share * before / per_block - 1e-9)
        dropped = sorted(sorted(range(len(bi)), key=lambda i: bi[i])[:drop])
        drop_layers(model, [i for i in range(len(bi)) if i not in dropped])
        info = {"dropped_blocks": dropped, "block_influence": [round(b, 6) for b in bi[:-1]]}
    else:
        width = mlp_width(model, share)
        stats = mlp_stats(model, calib)
        for block, s in zip(model.model.layers, stats):
            w = block.mlp.down_proj.weight.detach().double()
            if name == "minitron":
                score = s["abs"] / s["n"]
            elif name == "wanda-sp":
                score = w.norm(dim=0) * s["sq"].sqrt()
            else:  # flap
                score = s["var"] * w.square().sum(0)
            kept = torch.argsort(score, descending=True, stable=True)[:width].sort().values
            removed = torch.ones(w.shape[1], dtype=torch.bool)
            removed[kept] = False
            bias = (w[:, removed] @ s["mean"][removed]).float() if name == "flap" else None
            shrink_mlp(block.mlp, kept)
            if bias is not None:
                down = block.mlp.down_proj
                new = torch.nn.Linear(down.in_features, down.out_features, bias=True)
                new.weight.data.copy_(down.weight.data)
                new.bias.data.copy_(bias)
                block.mlp.down_proj = new
        model.config.intermediate_size = width
        info = {"intermediate_size": width}
    info["kept_share"] = block_parameters(model) / before
    return model, info


# --- rows ------------------------------------------------------------------------------------------------


def run_row(row: str, proto: dict[str, Any], out: Path, threads: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    name, _, share_text = row.partition("@")
    share = float(share_text) if share_text else None
    folder = out / "folders" / row.replace("@", "_")
    if name == "dense":
        return {"row": row, "ppl": perplexity(load(proto["model"]), heldout_windows(proto)), "kept_share": 1.0,
                "seconds": round(time.perf_counter() - started, 1)}
    if name.startswith("prac"):
        flags = {"prac": ["--target-params", str(share), "--reconstruct", "block", *proto["reconstruct"]],
                 "prac-refit": ["--target-params", str(share)],
                 "prac-mlp768": ["--intermediate-size", "768", "--reconstruct", "block", *proto["reconstruct"]]}[name]
        report = out / "reports" / f"{row.replace('@', '_')}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, "-m", "prac", "prune", "--model", str(proto["model"]), "--calib-tokens",
               str(proto["calib"]), "--eval", str(proto["heldout"]), "--seqlen", str(proto["seqlen"]),
               "--no-progress", "--report", str(report), "--save", str(folder), "--overwrite", *flags]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return {"row": row, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                    "flags": flags}
        summary = json.loads(report.read_text())["summary"]
        s = summary["structure"]
        return {"row": row, "ppl": summary["ppl"], "dense_ppl": summary.get("dense_ppl"), "kept_share": s["kept_share"],
                "config_changes": s["config_changes"], "search": s.get("search"), "flags": flags,
                "reconstruction": summary.get("reconstruction"), "seconds": round(time.perf_counter() - started, 1),
                "folder": str(folder)}
    model, info = baseline(name, share, proto)
    ppl = perplexity(model, heldout_windows(proto))
    saved = None
    if name != "flap":  # a bias the family's config cannot express: evaluated in memory only
        from transformers import AutoTokenizer

        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(proto["model"]).save_pretrained(folder)
        saved = str(folder)
    return {"row": row, "ppl": ppl, **info, "seconds": round(time.perf_counter() - started, 1), "folder": saved}


def rows_file(out: Path) -> Path:
    return out / "rows.json"


def load_rows(out: Path) -> list[dict[str, Any]]:
    path = rows_file(out)
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save_row(out: Path, row: dict[str, Any]) -> None:
    rows = [r for r in load_rows(out) if r["row"] != row["row"]] + [row]
    path = rows_file(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=1))
    tmp.replace(path)


def cmd_run(args) -> None:
    proto = protocol(args.protocol, args.cache)
    out = args.results / args.protocol
    wanted = rows_for(args.protocol)
    if args.rows:
        pats = [p.strip() for p in args.rows.split(",")]
        wanted = [r for r in wanted if any(fnmatchcase(r, p) for p in pats)]
    done = {r["row"] for r in load_rows(out) if "error" not in r} if args.resume else set()
    for row in wanted:
        if row in done:
            continue
        print(f"{row}: running", flush=True)
        result = run_row(row, proto, out, args.threads)
        result["load"] = os.getloadavg()[0]
        save_row(out, result)
        print(f"{row}: " + (f"ppl {result['ppl']:.2f}, kept {result.get('kept_share', 1):.3f}, {result['seconds']} s"
                            if "ppl" in result else f"error {result['error']}"), flush=True)


# --- speed -----------------------------------------------------------------------------------------------


def timings(model, ids, decode: int) -> tuple[float, float]:
    import torch

    def sync() -> None:
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)

    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids)
        sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids[:, :8], max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
        sync()
        gen = time.perf_counter() - t0
    return prefill, gen


def cmd_speed(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    proto = protocol(args.protocol, args.cache)
    out = args.results / args.protocol
    device = torch.device(args.device)
    dense = load(proto["model"]).to(device)
    vocab = int(dense.config.vocab_size)
    ids = torch.randint(0, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(0)).to(device)
    for row in load_rows(out):
        if not row.get("folder") or (args.rows and not any(fnmatchcase(row["row"], p) for p in args.rows.split(","))):
            continue
        small = load(Path(row["folder"])).to(device)
        best = {"dense": [math.inf, math.inf], "small": [math.inf, math.inf]}
        timings(dense, ids, 4), timings(small, ids, 4)  # warm-up
        for _ in range(args.repeats):  # alternating
            for key, model in (("dense", dense), ("small", small)):
                p, g = timings(model, ids, DECODE)
                best[key] = [min(best[key][0], p), min(best[key][1], g)]
        row["speed"] = {"device": str(device), "threads": args.threads, "repeats": args.repeats, "load": os.getloadavg()[0],
                        "prefill_s": {"dense": best["dense"][0], "small": best["small"][0]},
                        "decode_s": {"dense": best["dense"][1], "small": best["small"][1]},
                        "prefill_speedup": best["dense"][0] / best["small"][0],
                        "decode_speedup": best["dense"][1] / best["small"][1]}
        save_row(out, row)
        print(f"{row['row']}: prefill {row['speed']['prefill_speedup']:.2f}x, decode {row['speed']['decode_speedup']:.2f}x",
              flush=True)


# --- table -----------------------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], protocol_name: str) -> str:
    dense = next((r["ppl"] for r in rows if r["row"] == "dense"), None)
    lines = [f"Protocol `{protocol_name}`; dense {dense:.2f} ppl." if dense else f"Protocol `{protocol_name}`.", "",
             "| row | block params kept | shape | ppl | + over dense | prefill | decode | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "ppl" not in r:
            lines.append(f"| {r['row']} | | | error: {r.get('error')} | | | | |")
            continue
        shape = ", ".join(f"{k} {a}→{b}" for k, (a, b) in (r.get("config_changes") or {}).items())
        if not shape and r.get("intermediate_size"):
            shape = f"intermediate_size →{r['intermediate_size']}"
        if not shape and r.get("dropped_blocks"):
            shape = f"dropped blocks {r['dropped_blocks']}"
        sp = r.get("speed") or {}
        speed = [f"{sp[k]:.2f}x" if k in sp else "" for k in ("prefill_speedup", "decode_speedup")]
        lines.append(f"| {r['row']} | {r.get('kept_share', 1):.3f} | {shape} | {r['ppl']:.2f} | "
                     f"{(r['ppl'] - dense) if dense else float('nan'):+.2f} | {speed[0]} | {speed[1]} | "
                     f"{r.get('seconds', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "speed", "table"):
        p = sub.add_parser(name)
        p.add_argument("--protocol", choices=("bundled", "smollm2", "smollm2-n128"), default="bundled")
        p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "prac-bench" / "structured")
        p.add_argument("--results", type=Path, default=RESULTS)
        p.add_argument("--rows", help="comma-separated row patterns (default: all)")
        p.add_argument("--threads", type=int, default=1)
    sub.choices["run"].add_argument("--resume", action="store_true", help="skip rows already measured")
    sub.choices["speed"].add_argument("--repeats", type=int, default=3)
    sub.choices["speed"].add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = parser.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "speed":
        cmd_speed(args)
    else:
        order = {name: i for i, name in enumerate(rows_for(args.protocol))}
        rows = sorted(load_rows(args.results / args.protocol), key=lambda r: order.get(r["row"], len(order)))
        print(table(rows, args.protocol))


if __name__ == "__main__":
    main()
