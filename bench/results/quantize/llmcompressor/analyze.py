"""Zero share of the decompressed block linear weights, saved bytes and config facts of a saved folder.

    OMP_NUM_THREADS=1 venv/bin/python analyze.py FOLDER [FOLDER ...]   -> prints one JSON line per folder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402


def analyze(folder: Path) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    kw = {"quantization_config": CompressedTensorsConfig(run_compressed=False)} if q else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw).eval()
    zeros = total = 0
    nm_ok = nm_groups = 0
    per_layer = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            w = mod.weight.detach()
            z = int((w == 0).sum())
            zeros += z
            total += w.numel()
            per_layer[name] = round(z / w.numel(), 4)
            g = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)  # zeros per group of 4 consecutive inputs
            nm_ok += int((g >= 2).sum())
            nm_groups += g.numel()
    lm_head_zero = float((model.lm_head.weight == 0).float().mean())
    return {
        "folder": str(folder),
        "safetensors_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "zero_share_block_linears": zeros / total,
        "share_of_4groups_with_ge2_zeros": nm_ok / nm_groups,
        "block_linear_params": total,
        "lm_head_zero_share": lm_head_zero,
        "quant_format": q.get("format"),
        "sparsity_config": q.get("sparsity_config", "absent") if q else "no quantization_config",
        "sparsity_config_empty": (not q.get("sparsity_config")) if q else True,
        "per_layer_zero_share": per_layer,
    }


if __name__ == "__main__":
    for f in sys.argv[1:]:
        print(json.dumps(analyze(Path(f))), flush=True)
