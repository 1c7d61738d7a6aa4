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
from prac.engine.config import EngineConfig
from prac.engine.pipeline import PruneConfig, prune_model
from prac.methods.patterns import Unstructured
from prac.model.loading import resolve_device

MISTRAL_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768, rope_theta=1e6,
                  head_dim=128, sliding_window=None)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, head_dim=16)
MIXTRAL_8X7B = dict(MISTRAL_7B, num_local_experts=8, num_experts_per_tok=2)
SMOKE_MOE = dict(SMOKE, num_local_experts=4, num_experts_per_tok=2)
# run name -> (method, correction, engine settings)
RUNS = {"wanda": ("wanda", "none", {}), "sparsegpt": ("sparsegpt", "none", {}),
        "wanda+full": ("wanda", "full", {}), "wanda+optimal": ("wanda", "optimal", {}),
        "admm": ("admm", "none", {"dense_target": True}),
        "sparsegpt+optimal+dt": ("sparsegpt", "optimal", {"dense_target": True}),
        "sparsegpt+reconstruct": ("sparsegpt", "none", {"reconstruct": "block"}),
        "sparsegpt+cache2g": ("sparsegpt", "optimal", {"dense_target": True, "cache_budget": 2.0})}


def build(config: dict, layers: int, dtype: torch.dtype, seed: int = 0, device: torch.device | None = None):
    """A randomly initialised Mistral (or Mixtral, with experts in the config) on the CPU, built
    without a slow per-module init; the random numbers are drawn on ``device`` (fast on a GPU)."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    moe = "num_local_experts" in config
    cfg = (MixtralConfig if moe else MistralConfig)(**{**config, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = (MixtralForCausalLM if moe else MistralForCausalLM)(cfg)
    model = model.to_empty(device="cpu").to(dtype)
    where = device or torch.device("cpu")
    gen = torch.Generator(device=where).manual_seed(seed)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=where).mul_(0.02).to(dtype))
    # inv_freq is a non-persistent buffer computed at construction: build the rotary module for real.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    model.eval().requires_grad_(False)
    model.config.use_cache = False
    return model


def run(model, calib, name: str, device: torch.device, batch_size: int) -> dict:
    from prac.engine.reconstruct import ReconstructConfig

    method, correction, engine = RUNS[name]
    engine = dict(engine)
    if "reconstruct" in engine:
        engine["reconstruct"] = ReconstructConfig(mode=engine["reconstruct"])
    cfg = PruneConfig(method=method, pattern=Unstructured(0.5), engine=EngineConfig(batch_size=batch_size, **engine),
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
            "cache_peak_bytes": outcome.cache_peak_bytes,
            "needed_peak_bytes": None if peak is None else peak - outcome.cache_peak_bytes,
            "weights_resident": outcome.resident, "activation_device": outcome.activation_device,
            "moe": any(r.expert for r in outcome.layers)}


def table(rows: list[dict]) -> str:
    phases = ["capture", "transfer", "calibrate", "prune", "reconstruct", "propagate"]
    lines = ["| run | blocks | total s | " + " | ".join(f"{p} s" for p in phases) + " | peak GPU GiB | of it cache GiB |",
             "|---|---|---|" + "---|" * len(phases) + "---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | {r.get('blocks', '–')} | failed: {r['error'][:80]} |")
            continue
        peak = "–" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**30:.2f}"
        cache = f"{r.get('cache_peak_bytes', 0) / 2**30:.2f}"
        label = r["run"] + (" (MoE)" if r.get("moe") else "")
        lines.append(f"| {label} | {r['blocks']} | {r['seconds']:.1f} | "
                     + " | ".join(f"{r['phase_seconds'].get(p, 0.0):.1f}" for p in phases) + f" | {peak} | {cache} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny configuration (checks the script only)")
    ap.add_argument("--runs", nargs="+", default=["wanda", "sparsegpt", "wanda+full", "wanda+optimal"], choices=list(RUNS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per calibration forward")
    ap.add_argument("--blocks", type=int, default=None, help="build only this many blocks (default: the model's)")
    ap.add_argument("--moe", action="store_true", help="Mixtral-8x7B shapes (8 experts, top-2) instead of Mistral-7B")
    ap.add_argument("--depth-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also prune a 2x deeper model with wanda and compare peak memory")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--resume", action="store_true", help="keep the runs already in --out; do the missing ones")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    config = (SMOKE_MOE if args.moe else SMOKE) if args.smoke else (MIXTRAL_8X7B if args.moe else MISTRAL_7B)
    if args.smoke:
        args.nsamples, args.seqlen = min(args.nsamples, 4), min(args.seqlen, 32)
    dtype = getattr(torch, args.dtype)
    calib = torch.randint(0, config["vocab_size"], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    layers = args.blocks or config["num_hidden_layers"]
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
        model = build(config, layers, dtype, device=device)
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        for name in todo:
            model.load_state_dict(pristine)
            try:
                rows.append(run(model, calib, name, device, args.batch_size))
            except Exception as exc:  # noqa: BLE001 — one failed configuration must not lose the others
                rows.append({"run": name, "blocks": layers, "error": f"{type(exc).__name__}: {exc}"})
            save()
            print(f"{name}: {rows[-1].get('seconds', rows[-1].get('error'))}", file=sys.stderr, flush=True)
        del model, pristine
    if args.depth_check and ("wanda", 2 * layers) not in done:
        deep = build(config, 2 * layers, dtype, device=device)
        rows.append(run(deep, calib, "wanda", device, args.batch_size))
        save()
        del deep
    save()
    print(f"{meta['date']}, {gpu}, {args.dtype}, {meta['calibration']}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
