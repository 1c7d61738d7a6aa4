"""Train the bundled MoE fixture: a small Mixtral-architecture model on the CPython standard library.

The dense fixture (``src/prac/assets/tiny-mistral``) was trained on the same corpus with the same
tokenizer; this one keeps its data, tokenizer and recipe (AdamW, warmup + cosine, random 256-token
windows, fp32 on the CPU) and swaps the MLP for 8 experts with top-2 routing, trained with Mixtral's
load-balancing loss so every expert is used. The result, ``src/prac/assets/tiny-mixtral``, is what
``bench/moe_quality.py`` prunes.

Usage (from the repository root; the train split is rebuilt from the running CPython 3.11's stdlib,
by the split rule of the dense fixture: md5 of the relative path mod 100 < 94):

    python tools/train_moe_fixture.py --minutes 40 --out src/prac/assets/tiny-mixtral
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DENSE = REPO / "src/prac/assets/tiny-mistral"
EVAL = REPO / "src/prac/assets/pystdlib/eval.txt"

CONFIG = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
              max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5, sliding_window=None,
              router_aux_loss_coef=0.02, output_router_logits=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
TRAIN = dict(seq_len=256, batch_size=16, lr=3e-3, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1,
             betas=(0.9, 0.95), grad_clip=1.0, seed=0)


def train_text() -> str:
    """The dense fixture's train split: every UTF-8 .py file of the stdlib outside site-packages whose
    md5(relative path) mod 100 is below 94, sorted by path, stripped, joined by a blank line."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("the corpus was defined on CPython 3.11")
    lib = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for p in sorted(p for p in lib.rglob("*.py") if p.is_file() and "site-packages" not in p.relative_to(lib).parts):
        rel = p.relative_to(lib).as_posix()
        if int(hashlib.md5(rel.encode("utf-8")).hexdigest(), 16) % 100 >= 94:
            continue
        try:
            text = p.read_bytes().decode("utf-8").replace("\r\n", "\n").rstrip() + "\n"
        except UnicodeDecodeError:
            continue
        if text.strip():
            parts.append(text)
    return "\n\n".join(parts)


def lr_at(step: int, progress: float) -> float:
    if step < TRAIN["warmup_steps"]:
        return TRAIN["lr"] * (step + 1) / TRAIN["warmup_steps"]
    low = TRAIN["lr"] * TRAIN["min_lr_ratio"]
    return low + 0.5 * (TRAIN["lr"] - low) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seq_len: int = 256, batch: int = 16) -> float:
    model.eval()
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        b = windows[i:i + batch]
        logits = model(input_ids=b).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                         b[:, 1:].reshape(-1), reduction="sum"))
        count += b[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget of the cosine schedule")
    ap.add_argument("--steps", type=int, default=3000, help="planned steps (the schedule ends at whichever comes first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "src/prac/assets/tiny-mixtral"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(DENSE)
    ids = torch.tensor(tokenizer(train_text(), add_special_tokens=False)["input_ids"], dtype=torch.int64)
    held = torch.tensor(tokenizer(EVAL.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    torch.manual_seed(TRAIN["seed"])
    config = MixtralConfig(**CONFIG)
    model = MixtralForCausalLM(config).float().train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=TRAIN["betas"])
    gen = torch.Generator().manual_seed(TRAIN["seed"])
    L, B = TRAIN["seq_len"], TRAIN["batch_size"]
    start, step, warm_at = time.time(), 0, None
    budget = args.minutes * 60
    print(f"params {sum(p.numel() for p in model.parameters())}, train tokens {len(ids)}", flush=True)
    while True:
        elapsed = time.time() - start
        if step >= TRAIN["warmup_steps"] and warm_at is None:
            warm_at = elapsed
        progress = 0.0 if warm_at is None else max((step - TRAIN["warmup_steps"]) / (args.steps - TRAIN["warmup_steps"]),
                                                   (elapsed - warm_at) / max(budget - warm_at, 1.0))
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress)
        starts = torch.randint(0, len(ids) - L - 1, (B,), generator=gen)
        x = torch.stack([ids[s:s + L] for s in starts.tolist()])
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} loss {out.loss.item():.4f} aux {float(out.aux_loss):.4f} lr {lr_at(step, progress):.2e} "
                  f"progress {progress:.3f} {elapsed / 60:.1f} min", flush=True)
        step += 1
    model.config.output_router_logits = False
    ppl = perplexity(model, held)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 3
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(DENSE / name, out_dir / name)
    summary = {"steps": step, "minutes": round((time.time() - start) / 60, 1), "tokens_seen": step * B * L,
               "params": sum(p.numel() for p in model.parameters()), "eval_ppl_256": ppl,
               "config": {k: v for k, v in CONFIG.items()}, "train": {k: list(v) if isinstance(v, tuple) else v
                                                                     for k, v in TRAIN.items()}}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
