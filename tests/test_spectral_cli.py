"""``prac spectrum`` (in-process and through ``python -m prac``), the figure, and reproducibility
across processes with different hash salts."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prac.cli import build_parser
from prac.cli.spectrum import run
from prac.core.errors import PracError
from prac.spectral import FisherSpectral, SpectralConfig, SpectralResult
from prac.spectral.plot import draw, heatmap_table, parse_key, save_plot

SRC = str(Path(__file__).resolve().parents[1] / "src")


pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["spectrum", *argv])


def env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
            **extra}


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> str:
    """The start of the bundled text: tokenizing all 1.5 MB would dominate these tests."""
    from prac.io import assets

    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(assets.DEFAULT_EVAL.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return str(path)


def test_cli_writes_json_csv_and_figure(tmp_path, capsys, small_text):
    out = tmp_path / "spectrum.json"
    args = parse(["--data", small_text, "--n-samples", "3", "--seqlen", "16", "--block-structure", "layer_type",
                  "--out", str(out), "--plot", str(tmp_path / "spectrum.png"), "--max-params-per-block", "4000",
                  "--no-progress", "--center"])
    assert args.func is run and run(args) == 0
    report = json.loads(out.read_text())
    m = report["metadata"]
    assert m["n_samples_used"] == 3 and m["n_tokens"] == 3 * 15 and m["sample_unit"] == "sequence"
    assert m["centered"] is True and m["normalization"] == "1/N" and m["data"]["seqlen"] == 16
    assert m["subsampling"]["blocks"]["layer_0.mlp"]["fraction"] == pytest.approx(4000 / 589824)
    assert list(report["blocks"])[:3] == ["embedding", "layer_0.attention", "layer_0.mlp"]
    assert report["blocks"]["layer_3.mlp"]["n_params_used"] == 4000
    rows = list(csv.DictReader((tmp_path / "spectrum.csv").open()))
    assert [r["block"] for r in rows][-1] == "whole_model" and len(rows) == len(report["blocks"]) + 1
    assert (tmp_path / "spectrum.png").stat().st_size > 20_000
    assert "layer_0.attention" in capsys.readouterr().out


def test_cli_rejects_bad_input(tmp_path, small_text):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(PracError, match="is a file, not a folder"):
        run(parse(["--out", str(tmp_path / "a-file" / "s.json")]))
    with pytest.raises(PracError, match="different files"):
        run(parse(["--out", str(tmp_path / "s.json"), "--csv", str(tmp_path / "s.json")]))
    with pytest.raises(PracError, match="must end in"):
        run(parse(["--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.gif")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    with pytest.raises(PracError, match="windows"):
        run(parse(["--data", small_text, "--n-samples", "100", "--seqlen", "256", "--out", str(tmp_path / "s.json")]))
    with pytest.raises(PracError, match="context"):
        run(parse(["--data", small_text, "--seqlen", "5000", "--out", str(tmp_path / "s.json")]))
    with pytest.raises(PracError):
        run(parse(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s.json")]))
    with pytest.raises(SystemExit):
        parse(["--n-samples", "0"])


def test_missing_output_folder_is_created_at_the_end(tmp_path, small_text):
    """Like ``prune --save``: the folder appears with the outputs, all of them together."""
    out = tmp_path / "new" / "deeper" / "s.json"
    assert run(parse(["--data", small_text, "--n-samples", "2", "--seqlen", "8", "--block-structure", "model",
                      "--out", str(out), "--plot", str(tmp_path / "figs" / "s.svg"), "--no-progress"])) == 0
    assert json.loads(out.read_text())["metadata"]["n_samples_used"] == 2
    assert (out.parent / "s.csv").exists() and (tmp_path / "figs" / "s.svg").stat().st_size > 1000
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_nothing_is_written_when_the_run_fails(tmp_path, small_text):
    out = tmp_path / "new" / "s.json"
    with pytest.raises(PracError, match="windows"):
        run(parse(["--data", small_text, "--n-samples", "100", "--seqlen", "256", "--out", str(out)]))
    assert not (tmp_path / "new").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Fisher" in text and "--fisher-type" in text and "examples:" in text


def test_python_m_prac_spectrum(tmp_path, small_text):
    done = subprocess.run([sys.executable, "-m", "prac", "spectrum", "--data", small_text, "--n-samples", "2",
                           "--seqlen", "8", "--block-structure", "layer", "--top-k", "2", "--out", str(tmp_path / "s.json"),
                           "--no-progress"], env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["metadata"]["solver"]["name"] == "svd_lowrank" and report["blocks"]["layer_0"]["condition_number"] is None
    (tmp_path / "a-file").write_text("")
    bad = subprocess.run([sys.executable, "-m", "prac", "spectrum", "--out", str(tmp_path / "a-file" / "s.json")],
                         env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "error" in bad.stderr


REPRO_SCRIPT = r"""
import json, sys, torch
from torch import nn
from prac.spectral import FisherSpectral, SpectralConfig

class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(6, 6)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 6))
    def forward(self, h):
        return h + self.mlp(h + self.attn(h.cumsum(1)))

class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(13, 6)
        self.layers = nn.ModuleList([Layer(), Layer()])
        self.lm_head = nn.Linear(6, 13)
    def forward(self, input_ids, attention_mask=None):
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)

torch.manual_seed(0)
model = LM().double()
ids = torch.randint(0, 13, (9, 6), generator=torch.Generator().manual_seed(1))
cfg = SpectralConfig(max_params_per_block=20, fisher_type="mc", top_k_eigenvalues=4, seed=11)
res = FisherSpectral(cfg).compute_fisher_spectrum(model, ids, block_structure="layer_type", center_gradients=True)
d = res.to_dict()
for k in list(d["metadata"]):
    if k.startswith("seconds"):
        del d["metadata"][k]
print(json.dumps(d, sort_keys=True))
"""


def test_same_seed_is_identical_across_processes_with_different_hash_salts():
    outs = []
    for salt in ("1", "12345"):
        done = subprocess.run([sys.executable, "-c", REPRO_SCRIPT], env=env(PYTHONHASHSEED=salt),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        outs.append(done.stdout)
    assert outs[0] == outs[1]
    report = json.loads(outs[0])
    seeds = {k: v["seed"] for k, v in report["metadata"]["subsampling"]["blocks"].items()}
    assert seeds and len(set(seeds.values())) == len(seeds)  # one seed per block, derived from its key


def _precomputed_result(structure: str) -> SpectralResult:
    gen = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    for i in range(3):
        names += [f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight",
                  f"model.layers.{i}.input_layernorm.weight"]
    grads = {n: torch.randn(6, 5, dtype=torch.float64, generator=gen) * (1 + i) for i, n in enumerate(names)}
    return FisherSpectral(SpectralConfig()).compute_fisher_spectrum(None, precomputed_gradients=grads,
                                                                     block_structure=structure)


@pytest.mark.parametrize("structure", ["layer_type", "layer", "model"])
def test_figure_for_every_block_structure(tmp_path, structure):
    res = _precomputed_result(structure)
    fig = draw(res)
    assert len(fig.axes) >= (3 if structure != "model" else 1)
    path = save_plot(SpectralResult.from_dict(json.loads(json.dumps(res.to_dict()))), tmp_path / "f.pdf")
    assert path.stat().st_size > 1000


def test_heatmap_table_layout():
    res = _precomputed_result("layer_type")
    rows, cols, values = heatmap_table(res, "trace")
    assert rows == ["0", "1", "2"] and cols == ["attention", "mlp"]
    assert values[1, 1] == pytest.approx(res["layer_1.mlp"].trace)
    assert parse_key("decoder.layer_3.mlp") == ("decoder", 3, "mlp") and parse_key("embedding") is None
