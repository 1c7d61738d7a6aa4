"""Speed and memory of the Fisher spectral module.

Measures
  1. per-sample gradient throughput (samples/s) and peak memory of the two engines (torch.func
     vmap, per-sample backward loop) on the bundled tiny Mistral and on a larger random Mistral;
  2. peak memory of a full ``compute_fisher_spectrum`` as the number of samples grows, in memory
     (holds G: N × P float64) vs streaming (holds at most ``--stream-budget-mb`` of G).

Peak memory: CUDA ``max_memory_allocated`` on a GPU; on the CPU the peak resident set size above
the level just before the measurement (``VmHWM`` after resetting it through
``/proc/self/clear_refs``, else a 1 ms RSS sampler). ``tracemalloc`` is not used: it does not see
PyTorch's allocations. Each measurement runs in a fresh process unless ``--in-process``.

    python bench/spectral_speed.py --smoke           # seconds: tiny sizes, in-process
    python bench/spectral_speed.py                   # the tables in docs/spectral.md
    python bench/spectral_speed.py --device cuda --out out/spectral_speed_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
LARGER = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)


# ---------------------------------------------------------------------------- memory probes

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMemory:
    """Peak memory (bytes) above the level at entry, for the block it wraps."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "cuda max_memory_allocated"
            return self
        self.base = _status_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM after clear_refs (RSS)"
            self.sampler = None
        except OSError:
            self.method = "RSS sampled every 1 ms"
            self.stop = threading.Event()
            self.sampled = self.base
            self.sampler = threading.Thread(target=self._sample, daemon=True)
            self.sampler.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.sampled = max(self.sampled, _status_kb("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self.base
        elif self.sampler is None:
            self.peak_bytes = _status_kb("VmHWM") * 1024 - self.base
        else:
            self.stop.set()
            self.sampler.join()
            self.peak_bytes = self.sampled - self.base
        return False


# ---------------------------------------------------------------------------- workloads

def _model(which: str, device: str):
    import torch

    if which == "bundled":
        from prac.io.assets import DEFAULT_MODEL
        from prac.model.loading import load_model

        model = load_model(str(DEFAULT_MODEL))
    else:
        import transformers
        from transformers import MistralConfig, MistralForCausalLM

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(**(LARGER if which == "larger" else TINY))).eval()
    return model.to(device)


def _tokens(model, n: int, seqlen: int, device: str):
    import torch

    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0)).to(device)


def measure_gradients(job: dict) -> dict:
    """Per-sample gradients of every parameter for ``n`` sequences, in chunks; results discarded."""
    import torch

    from prac.spectral import gradients as grd

    model = _model(job["model"], job["device"])
    ids = _tokens(model, job["n"], job["seqlen"], job["device"])
    samples, _ = grd.make_samples(ids)
    names = [n for n, _ in model.named_parameters()]
    chunk = job["chunk"]

    def run_chunk(part):
        if job["engine"] == "vmap":
            return grd.vmap_gradients(model, names, part, "sequence", "sum", True, chunk)
        return grd.loop_gradients(model, names, part, "sequence", "sum", True)

    run_chunk(samples.select(0, min(chunk, job["n"])))  # warm-up: vmap tracing, allocator pools
    with PeakMemory(job["device"]) as mem:
        start = time.perf_counter()
        for s in range(0, job["n"], chunk):
            out = run_chunk(samples.select(s, s + chunk))
            del out
        if job["device"].startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {**job, "params": sum(p.numel() for p in model.parameters()), "seconds": seconds,
            "samples_per_s": job["n"] / seconds, "peak_mb": mem.peak_bytes / 2**20, "memory_method": mem.method}


def measure_spectrum(job: dict) -> dict:
    """A full compute_fisher_spectrum, in memory or streaming."""
    from prac.spectral import FisherSpectral, SpectralConfig

    model = _model(job["model"], job["device"])
    ids = _tokens(model, job["n"], job["seqlen"], job["device"])
    cfg = SpectralConfig(streaming=job["streaming"], stream_budget_mb=job["budget_mb"], chunk_size=job["chunk"],
                         gradient_engine="vmap")
    FisherSpectral(cfg).compute_fisher_spectrum(model, ids[:1], block_structure="model")  # warm-up
    with PeakMemory(job["device"]) as mem:
        start = time.perf_counter()
        res = FisherSpectral(cfg).compute_fisher_spectrum(model, ids, block_structure=job["blocks"])
        seconds = time.perf_counter() - start
    return {**job, "seconds": seconds, "peak_mb": mem.peak_bytes / 2**20, "memory_method": mem.method,
            "passes": res.metadata["streaming"]["passes"], "top_eigenvalue": res.whole_model.top_eigenvalue,
            "g_in_memory_mb": job["n"] * sum(b.n_params_used for b in res.blocks.values()) * 8 / 2**20}


WORKERS = {"gradients": measure_gradients, "spectrum": measure_spectrum}


def run_job(job: dict) -> dict:
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    return WORKERS[job["kind"]](job)


def dispatch(job: dict, in_process: bool) -> dict:
    if in_process:
        return run_job(job)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"worker failed for {job}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- plans and tables

def plan(args) -> tuple[list[dict], list[dict]]:
    dev = args.device
    if args.smoke:
        grads = [dict(kind="gradients", model="bundled", engine=e, n=2, seqlen=16, chunk=2, device=dev)
                 for e in ("vmap", "loop")]
        stream = [dict(kind="spectrum", model="tiny", n=n, seqlen=8, chunk=4, blocks="layer", streaming=s,
                       budget_mb=1.0, device=dev) for n in (4, 8) for s in (False, True)]
        return grads, stream
    grads = [dict(kind="gradients", model=m, engine=e, n=n, seqlen=128, chunk=4, device=dev)
             for m, n in (("bundled", 16), ("larger", 8)) for e in ("vmap", "loop")]
    stream = [dict(kind="spectrum", model="bundled", n=n, seqlen=32, chunk=8, blocks="layer", streaming=s,
                   budget_mb=args.stream_budget_mb, device=dev) for n in args.stream_ns for s in (False, True)]
    return grads, stream


def tables(grads: list[dict], stream: list[dict]) -> str:
    lines = ["| model | params | seqlen | engine | samples | s | samples/s | peak MB |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in grads:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['seqlen']} | {r['engine']} | {r['n']} | "
                     f"{r['seconds']:.2f} | {r['samples_per_s']:.2f} | {r['peak_mb']:.0f} |")
    model = stream[0]["model"] if stream else ""
    lines += ["", f"Full compute_fisher_spectrum, {model} model, blocks=layer, streaming budget "
                  f"{stream[0]['budget_mb'] if stream else 0} MB:", "",
              "| n_samples | G in memory (MB) | in-memory peak MB | in-memory s | streaming peak MB | "
              "streaming s | streaming passes |", "|---:|---:|---:|---:|---:|---:|---:|"]
    by_n: dict[int, dict] = {}
    for r in stream:
        by_n.setdefault(r["n"], {})["stream" if r["streaming"] else "mem"] = r
    for n, pair in sorted(by_n.items()):
        m, s = pair["mem"], pair["stream"]
        lines.append(f"| {n} | {m['g_in_memory_mb']:.0f} | {m['peak_mb']:.0f} | {m['seconds']:.1f} | {s['peak_mb']:.0f} | "
                     f"{s['seconds']:.1f} | {s['passes']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, in-process, one thread: finishes in seconds")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--stream-ns", type=int, nargs="+", default=[8, 16, 32, 64], help="n_samples for the memory table")
    p.add_argument("--stream-budget-mb", type=float, default=128.0, help="streaming budget (default: 128)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--in-process", action="store_true", help="no worker processes (less isolated memory numbers)")
    p.add_argument("--out", default=str(ROOT / "out" / "spectral_speed.json"), help="JSON results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_job(json.loads(args.worker))))
        return 0
    import torch

    in_process = args.in_process or args.smoke
    threads = args.threads or (1 if args.smoke else None)  # tiny smoke shapes: threads only add synchronisation
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    grad_jobs, stream_jobs = plan(args)
    for job in grad_jobs + stream_jobs:
        job["threads"] = threads
    grads = [dispatch(j, in_process) for j in grad_jobs]
    stream = [dispatch(j, in_process) for j in stream_jobs]
    text = tables(grads, stream)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "device": args.device, "smoke": args.smoke, "in_process": in_process,
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "seconds": round(time.perf_counter() - started, 1), "larger_model": LARGER}
    print(text)
    print(f"\n{env['cpus']} CPUs, {env['threads']} torch threads, load average {load_before[0]:.1f} -> "
          f"{env['loadavg_after'][0]:.1f}, {env['seconds']} s in all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "gradients": grads, "streaming": stream, "table": text}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
