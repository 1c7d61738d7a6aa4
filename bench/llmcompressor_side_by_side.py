"""One llm-compressor oneshot run on prac's bundled tiny-mistral with prac's golden calibration tokens.

    cd SCRATCH && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 VENV/bin/python /path/to/prac/bench/llmcompressor_side_by_side.py NAME

VENV: a scratch venv outside the repo made with --system-site-packages (torch, transformers,
compressed-tensors and prac from the system) and `pip install llmcompressor --no-deps` (0.14.0.1 was
used on 2026-12-05; it declares transformers<=5.17 and compressed-tensors==0.19.0 but ran on 5.25 /
0.20.1). Outputs go to the current directory. Evaluate each folder with
`prac eval --model out_NAME --data src/prac/assets/pystdlib/eval.txt --seqlen 256`. Results:
bench/results/quantize/llmcompressor/.

NAME: sgpt50_w4a16 | sgpt2of4_w4a16 | w4a16 | sgpt2of4_rtn_w4a16 (extra: RTN W4A16 after 2:4, no GPTQ)
--timing-only: run oneshot again only to time it (wall and process CPU seconds), save nothing.
Writes out_NAME/ (save_compressed=True) and meta_NAME.json (oneshot seconds, recipe, zero share, ...).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.modifiers.pruning import SparseGPTModifier  # noqa: E402
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

HERE = Path.cwd()
ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "src" / "prac" / "assets" / "tiny-mistral"
CALIB = ROOT / "tests" / "golden" / "calib_tokens.safetensors"

# As in llm-compressor's examples: prune/quantize the Linear layers of the decoder blocks, keep lm_head dense.
SGPT_TARGETS = [r"re:model.layers.\d+$"]


def sgpt(mask_structure: str) -> SparseGPTModifier:
    return SparseGPTModifier(sparsity=0.5, mask_structure=mask_structure, targets=SGPT_TARGETS)


def gptq() -> GPTQModifier:
    # W4A16 preset = int4 weights, symmetric, group 128, fp16/32 activations (not quantized)
    return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])


RECIPES = {
    "sgpt50_w4a16": lambda: [sgpt("0:0"), gptq()],
    "sgpt2of4_w4a16": lambda: [sgpt("2:4"), gptq()],
    "w4a16": lambda: [gptq()],
    "sgpt2of4_rtn_w4a16": lambda: [sgpt("2:4"), QuantizationModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])],
}


def main(name: str, timing_only: bool = False) -> None:
    ids = load_file(str(CALIB))["input_ids"]  # int64 [128, 256]
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(MODEL)
    recipe = RECIPES[name]()
    t0, c0 = time.perf_counter(), time.process_time()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
                    max_seq_length=seqlen, shuffle_calibration_samples=False, batch_size=1)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    if timing_only:  # a second run only to time oneshot (nothing saved, meta_NAME.json kept)
        (HERE / f"timing_{name}.json").write_text(json.dumps({"name": name, "oneshot_seconds": seconds,
                                                              "oneshot_cpu_seconds": cpu_seconds}))
        print(name, seconds, cpu_seconds)
        return
    out = HERE / f"out_{name}"
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    meta = {"name": name, "oneshot_seconds": seconds, "oneshot_cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "recipe": [repr(m) for m in recipe],
            "calib": {"file": str(CALIB), "nsamples": n, "seqlen": seqlen}, "out": str(out)}
    (HERE / f"meta_{name}.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({k: v for k, v in meta.items() if k != "recipe"}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], timing_only="--timing-only" in sys.argv[2:])
