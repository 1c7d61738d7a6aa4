"""Data-parallel runs (``prac.parallel.session``) on the CPU with gloo: real processes, spawned by the tests.

The end-to-end tests launch ``python -m torch.distributed.run --nproc-per-node 2 -m prac …`` and the
same command in one process, on the bundled model with the first 32 golden calibration sequences and
a 20 000-character slice of the bundled evaluation text (one thread per process), and compare.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from prac.io import assets
from prac.model.group import InputGroup
from prac.model.stats import InputStats, StatsSpec, holdout_rows
from prac.model.units import Unit
from prac.parallel.data_parallel import DataParallel, assign_owners
from prac.parallel.failures import FailureBoard
from prac.parallel.launch import Launch, split_range
from prac.parallel.session import Session
from tests.conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"prune_seconds", "phase_seconds", "peak_memory_bytes", "peak_memory_by_phase",
               "process_peak_rss_bytes", "seconds"}
SOLVER_SUFFIXES = ("_iterations", "_residual", "_converged", "_fallback")
"""Convergence details of the iterative solvers (PCG/Schur): residuals near the fp32 tolerance, so the
last-bit differences of H between world sizes move them (as another thread count does); compared by type."""


COLLECTIVE_TIMEOUT_S = 900
"""How long a rank waits for the others inside prac: long enough for a busy machine (a test that
proves a failure does not wait for it compares against it), short of the runner's own limit."""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PRAC_DIST_TIMEOUT_S=str(COLLECTIVE_TIMEOUT_S), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _prac(args: list[str], world: int, cwd: Path) -> subprocess.CompletedProcess:
    """``prac`` in ``world`` processes. No time limit of its own: a busy machine makes it slower, not
    red; a rank that stops answering is ended by prac's collective timeout, anything else by the runner's."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
                if world > 1 else [sys.executable])
    return subprocess.run([*launcher, "-m", "prac", *args], cwd=cwd, env=_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dp")
    ids = load_file(str(GOLDEN / "calib_tokens.safetensors"))["input_ids"][:32].contiguous()
    save_file({"input_ids": ids}, str(folder / "calib.safetensors"))
    (folder / "eval.txt").write_text(Path(assets.DEFAULT_EVAL).read_text(encoding="utf-8")[:20000], encoding="utf-8")
    return folder


def _differences(a, b, path: str = "") -> list[str]:
    """Where two reports differ, apart from timings and memory: floats to 5e-3 relative (the layer
    errors move by ~1e-3 with H's last bits), solver convergence details by type, the rest exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        for k in sorted(set(a) & set(b)):
            if k in TIMING_KEYS:
                continue
            if k.endswith(SOLVER_SUFFIXES):
                out += [] if type(a[k]) is type(b[k]) else [f"{path}.{k}: types {type(a[k])} != {type(b[k])}"]
            else:
                out += _differences(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if math.isclose(a, b, rel_tol=5e-3, abs_tol=1e-6) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


CASES = {
    # GPTQ on Wanda's masks, saved compressed: the grids chosen on each rank gathered to rank 0
    "wanda-50-w4": ["--method", "wanda", "--sparsity", "0.5", "--wbits", "4"],
    "sparsegpt-2of4-optimal": ["--method", "sparsegpt", "--nm", "2:4", "--correction", "optimal"],
    "admm-70": ["--method", "admm", "--sparsity", "0.7"],  # its defaults: dense target, sequential, replay
    # each step's gradient summed over 4 batches held by 1, 2 or 3 processes (batches of 4: 8 batches,
    # 3/3/2 per rank at 3), and the judge's errors over all 8: both along the fixed tree
    "sparsegpt-2of4-reconstruct": ["--method", "sparsegpt", "--nm", "2:4", "--batch-size", "4", "--reconstruct",
                                   "block", "--reconstruct-epochs", "2", "--reconstruct-minibatches", "2"],
}


def _saved_hash(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_one_two_and_three_processes_prune_bit_identically(case, inputs, tmp_path):
    """Masks and weights sha256-equal at world sizes 1, 2 and 3: the statistics are summed along one
    fixed tree over the calibration batches (prac.core.treesum), whatever process computed which batch; the
    same report apart from timings and the launch."""
    hashes, reports = {}, {}
    worlds = (1, 2, 3) if case == "wanda-50-w4" else (1, 3)  # 3: an uneven split of the 32 sequences
    for world in worlds:
        cwd = tmp_path / f"w{world}"  # the same relative --save/--report in each: the configs compare equal
        cwd.mkdir()
        args = ["prune", "--calib-tokens", str(inputs / "calib.safetensors"), "--eval", "none", "--no-progress",
                "--save", "out", "--report", "report.json", *CASES[case]]
        proc = _prac(args, world, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("pruned 28 layers") == 1, proc.stdout  # printed by rank 0 only
        hashes[world] = _saved_hash(cwd / "out" / "model.safetensors")
        reports[world] = json.loads((cwd / "report.json").read_text())
    assert len(set(hashes.values())) == 1, hashes
    if "--reconstruct" in CASES[case]:  # not vacuous: the tuned weights were kept (else the pruned ones are saved)
        assert reports[1]["summary"]["reconstruction"]["kept"] > 0, reports[1]["summary"]["reconstruction"]
    if "--wbits" in CASES[case]:
        config = json.loads((tmp_path / "w1" / "out" / "config.json").read_text())
        assert config["quantization_config"]["format"] == "pack-quantized"
    assert [reports[w]["environment"]["world_size"] for w in worlds] == list(worlds)
    for r in reports.values():
        r["environment"].pop("world_size"), r["environment"].pop("backend")
    for world in worlds[1:]:
        assert _differences(*({k: reports[w][k] for k in ("config", "environment", "layers")} for w in (1, world))) == []


@pytest.mark.slow
def test_the_structured_pass_in_one_and_three_processes_saves_the_same_model(inputs, tmp_path):
    """Blocks dropped, KV groups and MLP neurons chosen, every block tuned: sha256-equal folders and the
    same report (apart from timings and the launch) from 1 and 3 processes (3: an uneven split)."""
    hashes, reports = {}, {}
    for world in (1, 3):
        cwd = tmp_path / f"w{world}"
        cwd.mkdir()
        args = ["prune", "--calib-tokens", str(inputs / "calib.safetensors"), "--eval", "none", "--no-progress",
                "--save", "out", "--report", "report.json", "--num-hidden-layers", "3", "--num-key-value-heads", "1",
                "--intermediate-size", "384", "--batch-size", "4", "--reconstruct", "block",
                "--reconstruct-epochs", "2", "--reconstruct-minibatches", "2"]
        proc = _prac(args, world, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("structured only, no sparsity pass") == 1, proc.stdout  # rank 0 only
        hashes[world] = _saved_hash(cwd / "out" / "model.safetensors")
        reports[world] = json.loads((cwd / "report.json").read_text())
    assert hashes[1] == hashes[3]
    s = reports[1]["summary"]["structure"]
    assert s["config_changes"]["intermediate_size"][1] == 384 and len(s["dropped_blocks"]) == 1
    assert len(s["blocks"]) == 6 and reports[1]["summary"]["reconstruction"]["kept"] > 0  # 3 x (attention, mlp); tuned
    for r in reports.values():
        r["environment"].pop("world_size"), r["environment"].pop("backend")
        r["summary"]["reconstruction"].pop("estimated_memory_bytes")  # per process: its own batches per step
    assert _differences(*({k: reports[w][k] for k in ("config", "environment", "summary")} for w in (1, 3))) == []


@pytest.mark.slow
def test_two_processes_prune_and_evaluate_like_one(inputs, tmp_path):
    """The perplexity of a data-parallel prune: the same weights, the NLL summed in another order (1e-12)."""
    ppl = {}
    for world in (1, 2):
        cwd = tmp_path / f"w{world}"
        cwd.mkdir()
        proc = _prac(["prune", "--calib-tokens", str(inputs / "calib.safetensors"), "--eval", str(inputs / "eval.txt"),
                      "--no-dense-eval", "--no-progress", "--report", "report.json", "--sparsity", "0.6"], world, cwd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ppl[world] = json.loads((cwd / "report.json").read_text())["summary"]["ppl"]
    assert abs(ppl[2] / ppl[1] - 1) < 1e-12, ppl


@pytest.mark.slow
def test_two_processes_evaluate_like_one(inputs, tmp_path):
    ppl = {}
    for world in (1, 2):
        report = tmp_path / f"e{world}.json"
        proc = _prac(["eval", "--data", str(inputs / "eval.txt"), "--no-progress", "--report", str(report)],
                     world, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("perplexity") == 1, proc.stdout
        summary = json.loads(report.read_text())["summary"]
        ppl[world] = summary["ppl"]
        assert summary["windows"] > 1 and summary["predicted_tokens"] == summary["windows"] * 255
    assert abs(ppl[2] / ppl[1] - 1) < 1e-6, ppl


@pytest.mark.slow
def test_two_processes_verify_like_one(inputs, tmp_path):
    """`prac verify` data-parallel: every check passes, the table is printed once, with the same checks
    and the same model hash (correction none) as in one process."""
    tables = {}
    for world in (1, 2):
        proc = _prac(["verify", "--calib-tokens", str(inputs / "calib.safetensors"), "--nm", "2:4"], world, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout
        assert proc.stdout.count("passed,") == 1 and "0 failed" in proc.stdout, proc.stdout
        tables[world] = [line.split()[0] for line in proc.stdout.splitlines()[2:-1]]
    assert tables[1] == tables[2] and len(tables[1]) >= 8


FAILING = """
import os, sys
from prac.model import stats
from prac.cli import main

if os.environ["RANK"] == "1":  # rank 1 raises in its third calibration forward; rank 0 is then waiting on it
    calls = [0]
    add_batch = stats.InputStats.add_batch

    def failing(self, x, held=None, route=None):
        calls[0] += 1
        if calls[0] == 9:
            raise RuntimeError("injected failure on one rank")
        add_batch(self, x, held, route)

    stats.InputStats.add_batch = failing
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_and_the_error_is_printed_once(inputs, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), "prune", "--calib-tokens", str(inputs / "calib.safetensors"), "--eval", "none",
                           "--no-progress", "--report", str(tmp_path / "r.json")],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.count("injected failure on one rank") == 1, proc.stderr
    assert "(process 1 of 2)" in proc.stderr
    assert not (tmp_path / "r.json").exists()
    # Rank 0 stopped on the failure's post, with the failing rank's code, 1 (PeerFailed), not on the collective
    # timeout (a PracError: code 2), a collective broken by rank 1's exit (code 2) or torchrun ending it (-15):
    # torchrun's table lists both ranks with exit code 1. (Counted, not timed: a busy machine is slow, not wrong.)
    import re

    codes = {int(rank): int(code) for rank, code in
             re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", proc.stderr)}
    assert codes == {0: 1, 1: 1}, proc.stderr


def test_bad_input_on_every_rank_is_printed_once(tmp_path):
    proc = _prac(["prune", "--model", str(tmp_path / "missing")], 2, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("prac prune: error:") == 1, proc.stderr


# --- the pieces, in-process or in spawned gloo workers ------------------------------------------------

def test_split_range_covers_everything_once():
    for n in range(0, 9):
        for world in range(1, 5):
            parts = [split_range(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(b - a for a, b in parts) - min(b - a for a, b in parts) <= 1


def test_owners_are_balanced_costliest_first():
    assert assign_owners([1.0, 8.0, 3.0, 4.0], 2) == [1, 0, 1, 1]  # 8 | 4+3+1
    assert assign_owners([5.0, 5.0, 5.0], 3) == [0, 1, 2]
    assert assign_owners([2.0, 1.0], 1) == [0, 0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge_worker(rank: int, world: int, port: int, x: torch.Tensor, batch: int, spec: StatsSpec, out: str) -> None:
    torch.set_num_threads(1)
    launch = Launch(rank, world, rank)
    store = torch.distributed.TCPStore("127.0.0.1", port, world, is_master=rank == 0)
    session = Session(launch, torch.device("cpu"), FailureBoard(store, launch), 60.0)
    par = DataParallel(session)
    rows = par.share(x.shape[0], x.shape[1], batch)  # x: [n, seqlen, dim] stands in for the calibration samples
    held = holdout_rows(x.shape[0], spec.holdout, spec.seed)
    stats = par.new_stats(InputStats(x.shape[-1], "cpu", spec))
    first = rows.start // batch
    for j, (b, h) in enumerate(zip(x[rows].split(batch), held[rows].split(batch) if held is not None else [None] * len(x))):
        stats.begin(first + j)  # the engine's fixed-order sums: batch j of this rank is batch first + j of the run
        stats.add_batch(b, held=h)
    group = InputGroup(["layer"], stats)
    par.assign([group], {"layer": Unit("layer", torch.nn.Linear(x.shape[-1], 3))})
    par.reduce(group)
    if par.owns(group):
        ho = stats.heldout
        torch.save({"count": stats.count, "sum": stats.sum, "sumsq": stats.sumsq, "hessian": stats.hessian,
                    "samples": stats.samples, "keys": stats._keys, "sample_held": stats.sample_held,
                    "held": None if ho is None else (ho.count, ho.sum, ho.hessian)}, out)
    session.barrier("done")
    session.close()


@pytest.mark.parametrize("world,holdout", [(2, 0.0), (3, 0.0), (2, 0.3), (3, 0.3)])
def test_reduced_statistics_equal_one_process(world, holdout, tmp_path):
    """Counts, the token sample (with its held-out flags), sums and H bit-identical to one process's
    (the batches summed along one fixed tree, prac.core.treesum); the same for the held-out share's."""
    torch.manual_seed(0)
    x = torch.randn(10, 16, 6)  # 10 samples of 16 tokens, 6 features; batches of 2 -> 5 batches
    spec = StatsSpec(hessian=True, max_samples=40, seed=3, holdout=holdout)
    one = InputStats(6, "cpu", spec)
    held = holdout_rows(10, holdout, 3)
    for j, b in enumerate(x.split(2)):
        one.begin(j)
        one.add_batch(b, held=None if held is None else held[2 * j : 2 * j + 2])
    one.finish()
    out = str(tmp_path / "stats.pt")
    mp.spawn(_merge_worker, args=(world, _free_port(), x, 2, spec, out), nprocs=world, join=True)
    got = torch.load(out)
    assert got["count"] == one.count
    assert torch.equal(got["samples"], one.samples) and torch.equal(got["keys"], one._keys)
    for key, ref in (("sum", one.sum), ("sumsq", one.sumsq), ("hessian", one.hessian)):
        assert torch.equal(got[key], ref), key
    if holdout:
        assert torch.equal(got["sample_held"], one.sample_held) and 0 < int(one.sample_held.sum()) < 40
        count, total, hessian = got["held"]
        assert count == one.heldout.count == 3 * 16
        assert torch.equal(total, one.heldout.sum) and torch.equal(hessian, one.heldout.hessian)
    else:
        assert got["held"] is None and got["sample_held"] is None
