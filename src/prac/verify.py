"""``prac verify``: the invariants every run relies on, checked on a given model and calibration set.

1. Wanda's L2 salience from the running sum of squares equals the one from diag(H) (≤ 1e-5 relative).
2. Statistics accumulated batch by batch equal those accumulated in one shot (≤ 1e-5 relative).
3. With correction ``none`` every method's collection mode (Hessian, stored samples) yields the
   identical model, bit for bit.
4. Every corrected layer ends with a lower error than uncorrected (or is reverted to it).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from prac import correction
from prac.blocks import capture_block_inputs, find_blocks, find_linears, group_by_input, in_features, run_block
from prac.correction.base import CorrectionConfig
from prac.pipeline import PruneConfig, prune_model
from prac.stats import InputStats, StatsSpec

TOLERANCE = 1e-5
CORRECTIONS = ("full", "diagonal", "greedy", "optimal")


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def weights_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_l2_salience(model, calib, cfg: PruneConfig, device) -> Check:
    worst = [0.0, ""]

    def observe(group: list[str], st: InputStats) -> None:
        rel = float((st.l2.double() - st.hessian.diagonal().clamp_min(0).sqrt().double()).abs().max()
                    / st.l2.double().max().clamp_min(1e-30))
        if rel >= worst[0]:
            worst[:] = [rel, group[0]]

    prune_model(copy.deepcopy(model), calib, replace(cfg, collect=StatsSpec(hessian=True)), device, observer=observe)
    return Check("L2 salience: sum of squares vs diag(H)", worst[0] <= TOLERANCE,
                 f"max relative difference {worst[0]:.2e} ({worst[1]})")


def check_incremental(model, calib, cfg: PruneConfig, device) -> Check:
    """Block 0's linear inputs, accumulated per batch vs in one ``add_batch`` of all tokens."""
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, calib.split(cfg.batch_size), device, device)
    block = blocks.modules[0].to(device)
    linears = find_linears(block, blocks.name(0), cfg.ignore)
    groups = group_by_input(block, linears, inputs, device)
    spec = StatsSpec(hessian=True)
    incremental = [InputStats(in_features(linears[g[0]]), device, spec) for g in groups]
    seen: list[list[torch.Tensor]] = [[] for _ in groups]
    handles = []
    for k, g in enumerate(groups):
        def hook(_m, args, _k=k):
            incremental[_k].add_batch(args[0])
            seen[_k].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        handles.append(linears[g[0]].register_forward_pre_hook(hook))
    with torch.no_grad():
        for j in range(len(inputs)):
            run_block(block, inputs, j, device)
    for h in handles:
        h.remove()
    block.to("cpu")
    worst = 0.0
    for st, rows in zip(incremental, seen):
        one = InputStats(st.dim, device, spec)
        one.add_batch(torch.cat(rows))
        worst = max(worst, _rel(st.sum, one.sum), _rel(st.sumsq, one.sumsq), _rel(st.hessian, one.hessian))
        if st.count != one.count:
            worst = float("inf")
    return Check("incremental vs one-shot statistics", worst <= TOLERANCE,
                 f"max relative difference {worst:.2e} over {len(groups)} inputs of block 0")


def check_none_identical(model, calib, cfg: PruneConfig, device) -> Check:
    base_cfg = replace(cfg, correction=replace(cfg.correction, method="none"), collect=None)
    reference = copy.deepcopy(model)
    prune_model(reference, calib, base_cfg, device)
    ref_hash = weights_hash(reference)
    differing = []
    for method in CORRECTIONS:
        spec = correction.stats_spec(replace(cfg.correction, method=method))
        candidate = copy.deepcopy(model)
        prune_model(candidate, calib, replace(base_cfg, collect=spec), device)
        if weights_hash(candidate) != ref_hash:
            differing.append(method)
    return Check("correction none: identical model in every collection mode", not differing,
                 f"sha256 {ref_hash[:12]} for none/" + "/".join(CORRECTIONS) if not differing
                 else f"differs under the statistics of: {', '.join(differing)}")


def check_corrections_lower_error(model, calib, cfg: PruneConfig, device) -> list[Check]:
    out = []
    for method in CORRECTIONS:
        run_cfg = replace(cfg, correction=replace(cfg.correction, method=method))
        layers = prune_model(copy.deepcopy(model), calib, run_cfg, device).layers
        diags = [l["correction"] for l in layers]
        worse = [l["name"] for l, d in zip(layers, diags) if not d["error_after"] <= d["error_before"]]
        accepted = sum(1 for d in diags if d["status"] == "accepted")
        strict = all(d["error_after"] < d["error_before"] for d in diags if d["status"] == "accepted")
        out.append(Check(f"{method}: corrected layers have lower error", not worse and strict,
                         f"{accepted}/{len(diags)} accepted, {sum(d['reverted'] for d in diags)} reverted"
                         + (f"; worse: {', '.join(worse)}" if worse else "")))
    return out


def run_checks(model: nn.Module, calib: torch.Tensor, cfg: PruneConfig, device: torch.device,
               progress: Callable[[str], None] = lambda name: None) -> list[Check]:
    """Run every check on copies of ``model`` (the model itself is left untouched)."""
    checks = []
    for name, fn in (("l2", check_l2_salience), ("incremental", check_incremental), ("none", check_none_identical)):
        progress(name)
        checks.append(fn(model, calib, cfg, device))
    progress("corrections")
    checks.extend(check_corrections_lower_error(model, calib, cfg, device))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.passed else 'FAIL':<6}  {c.detail}" for c in checks]
    passed = sum(c.passed for c in checks)
    lines.append(f"{passed} passed, {len(checks) - passed} failed")
    return "\n".join(lines)


def add_parser(sub) -> None:
    from prac import assets

    p = sub.add_parser("verify", help="check the statistics and correction invariants on a model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(assets.DEFAULT_MODEL), help="model folder or hub id (default: bundled)")
    p.add_argument("--calib", default=None, help="c4 | wikitext2 | FILE.txt | FILE.jsonl (default as for prune)")
    p.add_argument("--calib-tokens", default=None, metavar="FILE", help="safetensors file with input_ids [n, seqlen]")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences (default: 16)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration length (default as for prune)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity (default 0.5)")
    p.add_argument("--nm", default=None, metavar="N:M", help="N:M pattern instead of --sparsity")
    p.add_argument("--method", default="wanda", help="mask source (default: wanda)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per calibration forward (default 4)")
    p.add_argument("--device", default="auto")
    p.add_argument("--debug", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from prac.jobs import PruneJob, calibration_tokens, resolve
    from prac.loading import check_model_source, load_model, load_tokenizer, resolve_device
    from prac.patterns import Unstructured, parse_nm

    check_model_source(args.model)
    device = resolve_device(args.device)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    pattern = parse_nm(args.nm) if args.nm else Unstructured(args.sparsity)
    cfg = PruneConfig(method=args.method, pattern=pattern, batch_size=args.batch_size,
                      correction=CorrectionConfig(seed=args.seed))
    job = resolve(PruneJob(model=args.model, calib=args.calib, calib_tokens=args.calib_tokens,
                           nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, prune=cfg, eval="none"), model)
    calib = calibration_tokens(job, tokenizer).input_ids
    checks = run_checks(model, calib, cfg, device, lambda name: print(f"checking {name} ...", file=sys.stderr))
    print(format_table(checks))
    return 0 if all(c.passed for c in checks) else 1
