"""End-to-end pruning time and peak GPU memory at a real model size (random weights).

A model with Mistral-7B-v0.3's configuration (32 blocks, hidden 4096, MLP 14336, GQA 32/8, vocab
32768) is built with random bf16 weights — nothing is downloaded; time and memory do not depend on
the values — and pruned end to end with 128 x 2048 random calibration tokens by each method. It
reports wall time per phase and peak GPU memory, then prunes a model twice as deep with Wanda to
show that peak memory is one block plus activations, independent of depth.

    bash bench/gpu.sh                       # on a CUDA machine
    python bench/gpu_prune.py --smoke       # tiny configuration, any device, seconds

Each finished run is written to ``--out`` at once; ``--resume`` keeps the runs already there and
does only the missing ones, so the suite can be split over several shorter sessions (e.g. a
10-minute limit per command: ``--runs wanda sparsegpt --no-depth-check``, then ``--resume``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

from prac.correction.config import CorrectionConfig
from prac.loading import resolve_device
from prac.patterns import Unstructured
from prac.engine import EngineConfig
from prac.pipeline import PruneConfig, prune_model

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6,
                  head_dim=128, sliding_window=None)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, head_dim=16)
RUNS = {"wanda": ("wanda", "none"), "sparsegpt": ("sparsegpt", "none"),
        "wanda+full": ("wanda", "full"), "wanda+optimal": ("wanda", "optimal")}


def build(config: dict, layers: int, dtype: torch.dtype, seed: int = 0):
    """A randomly initialised Mistral on the CPU, built without a slow per-module init."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{**config, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = MistralForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype))
    # inv_freq is a non-persistent buffer computed at construction: build the rotary module for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model


def run(model, calib, name: str, device: torch.device, batch_size: int) -> dict:
    method, correction = RUNS[name]
    cfg = PruneConfig(method=method, pattern=Unstructured(0.5), engine=EngineConfig(batch_size=batch_size),
                      correction=CorrectionConfig.of(correction, exact_errors=False))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outcome = prune_model(model, calib, cfg, device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"run": name, "blocks": len(model.model.layers), "seconds": seconds,
            "phase_seconds": outcome.phase_seconds, "peak_gpu_bytes": peak,
            "activation_device": outcome.activation_device}


def table(rows: list[dict]) -> str:
    phases = ["capture", "transfer", "calibrate", "prune", "propagate"]
    lines = ["| run | blocks | total s | " + " | ".join(f"{p} s" for p in phases) + " | peak GPU GiB |",
             "|---|---|---|" + "---|" * len(phases) + "---|"]
    for r in rows:
        peak = "–" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['run']} | {r['blocks']} | {r['seconds']:.1f} | "
                     + " | ".join(f"{r['phase_seconds'].get(p, 0.0):.1f}" for p in phases) + f" | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (checks the script only)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per calibration forward")
    ap.add_argument("--depth-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also prune a 2x deeper model with wanda and compare peak memory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out; do the missing ones")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    config = SMOKE if args.smoke else MISTRAL_7B
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 4), min(args.seqlen, 32)
    dtype = getattr(torch, args.dtype)
    calib = torch.randint(0, config["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    layers = config["num_hidden_layers"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    meta = {"date": dt.date.today().isoformat(), "device": str(device), "gpu": gpu, "dtype": args.dtype,
            "calibration": f"{args.nsamples} x {args.seqlen} random tokens", "config": config,
            "torch": torch.__version__}
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["run"], r["blocks"]) for r in rows}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps({**meta, "rows": rows}, indent=1))
        tmp.replace(out)

    todo = [name for name in args.runs if (name, layers) not in done]
    if todo:
        model = build(config, layers, dtype)
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        for name in todo:
            model.load_state_dict(pristine)
            rows.append(run(model, calib, name, device, args.batch_size))
            save()
            print(f"{name}: {rows[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
        del model, pristine
    if args.depth_check and ("wanda", 2 * layers) not in done:
        deep = build(config, 2 * layers, dtype)
        rows.append(run(deep, calib, "wanda", device, args.batch_size))
        save()
        del deep
    save()
    print(f"{meta['date']}, {gpu}, {args.dtype}, {meta['calibration']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
