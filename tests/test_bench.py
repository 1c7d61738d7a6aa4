"""The benchmark scripts run end to end in their smoke modes."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path):
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quality_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "quality.py"), "--smoke", "--out-dir", str(tmp_path), "--methods", "wanda",
                "--corrections", "none", "optimal", "--patterns", "2:4", "--jobs", "2"], tmp_path)
    rows = json.loads((tmp_path / "quality.json").read_text())["rows"]
    assert len(rows) == 2 and all(r["ppl"] > 1 for r in rows)
    assert (tmp_path / "quality.png").stat().st_size > 10_000 and "| 2:4 | wanda | optimal |" in out
    for r in rows:
        if r["correction"] == "optimal":
            # 4 x 64 calibration tokens: the held-out sequence refuses corrections that overfit the other
            # three (fraction 0 for those layers) or has them damped harder (a smaller fraction); the
            # others reach the optimum
            n, refused, escalated = r["corrected_layers"], r["refused"], r["escalated"]
            assert n == 28 and refused is not None and 0 <= refused + escalated < n, (n, refused, escalated)
            assert 0.9 * (n - refused - escalated) / n < r["fraction_of_optimal"] <= 1.01


def test_gpu_script_smoke_on_cpu(tmp_path):
    out = _run([str(ROOT / "bench" / "gpu_prune.py"), "--smoke", "--device", "cpu", "--out", str(tmp_path / "g.json")],
               tmp_path)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["wanda", "sparsegpt", "wanda+full", "wanda+optimal", "wanda"]
    assert rows[-1]["blocks"] == 2 * rows[0]["blocks"] and "| wanda+optimal |" in out


def test_full_kernels_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "full_kernels.py"), "--in", "64", "--k", "8", "--rows", "16", "--out", "16",
                "--device", "cpu"], tmp_path)
    assert "column order" in out and "max difference" in out


def test_gpu_script_resumes_in_parts(tmp_path):
    script, out = str(ROOT / "bench" / "gpu_prune.py"), str(tmp_path / "g.json")
    _run([script, "--smoke", "--device", "cpu", "--out", out, "--runs", "wanda", "--no-depth-check"], tmp_path)
    first = json.loads((tmp_path / "g.json").read_text())["rows"]
    _run([script, "--smoke", "--device", "cpu", "--out", out, "--runs", "wanda", "sparsegpt", "--resume"], tmp_path)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert rows[0] == first[0]  # kept, not re-run
    assert [(r["run"], r["blocks"]) for r in rows] == [("wanda", 2), ("sparsegpt", 2), ("wanda", 4)]


def test_shared_factorisation_and_admm_sweep_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "shared_factorisation.py"), "--in-features", "128", "--tokens", "512",
                "--rounds", "1"], tmp_path)
    assert "weights identical: True" in out
    out = _run([str(ROOT / "bench" / "admm_sweep.py"), "--nsamples", "2", "--sparsity", "2:4",
                "--set", "iterations=2"], tmp_path)
    assert "iterations=2: mean layer error" in out


def test_moe_quality_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "moe_quality.py"), "--smoke", "--out-dir", str(tmp_path), "--methods", "wanda",
                "--patterns", "2:4", "--rounds", "1"], tmp_path)
    data = json.loads((tmp_path / "moe.json").read_text())
    assert len(data["rows"]) == 1 and data["rows"][0]["ppl"] > 1 and data["rows"][0]["topped_up"] > 0
    assert data["timing"][0]["ratio"][0] > 0 and "| 2:4 | wanda | default |" in out


def test_group_sweep_smoke(tmp_path):
    out = _run([str(ROOT / "bench" / "group_sweep.py"), "--smoke", "--device", "cpu", "--repeats", "1",
                "--out", str(tmp_path / "g.json")], tmp_path)
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["bit_identical"] for r in rows), out


def test_structured_baselines_keep_the_share_asked_and_give_standard_shapes(tmp_path):
    """bench/structured.py's baselines on the bundled model: each keeps the share of block parameters
    asked (within the rounding of the MLP width), and the sliced ones match their config."""
    import importlib.util

    import torch

    from prac.model.shrink import shape_mismatches

    spec = importlib.util.spec_from_file_location("structured_bench", ROOT / "bench" / "structured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.set_num_threads(1)
    proto = bench.protocol("bundled", tmp_path)
    calib = bench.calibration(proto)
    proto["calib"] = tmp_path / "few.safetensors"  # 16 of the 128 sequences: enough for a smoke run
    from safetensors.torch import save_file

    save_file({"input_ids": calib[:16].contiguous()}, str(proto["calib"]))
    for name in ("minitron", "wanda-sp", "flap", "shortgpt"):
        model, info = bench.baseline(name, 0.5, proto)
        assert abs(info["kept_share"] - 0.5) < 0.03, (name, info)
        if name != "flap":  # FLAP's bias is not in the family's config
            assert shape_mismatches(model) == []
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=calib[:1, :32]).logits).all()
    table = bench.table([{"row": "dense", "ppl": 61.0}, {"row": "flap@0.5", "ppl": 70.0, "kept_share": 0.5,
                                                        "intermediate_size": 384}], "bundled")
    assert "| flap@0.5 | 0.500 | intermediate_size →384 | 70.00 | +9.00 |" in table
