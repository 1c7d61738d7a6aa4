"""The dense-perplexity cache: a hit gives the same number and is reported; a changed weight, other
tokens or another protocol miss; --no-cache and unreadable entries recompute."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from prac.io.cache import PplCache, ppl_key, tokens_hash, weights_hash

from .conftest import make_tiny_model


@pytest.fixture
def cache_on(tmp_path, monkeypatch):
    """The cache enabled (the suite disables it) in a fresh folder."""
    monkeypatch.delenv("PRAC_NO_CACHE", raising=False)
    monkeypatch.setenv("PRAC_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "dense_ppl"


def _job(model_dir, text, **kw):
    from prac.jobs.config import PruneJob

    return PruneJob(model=str(model_dir), calib=str(text), nsamples=4, seqlen=32, eval=str(text), eval_seqlen=64,
                    eval_batch_size=16, **kw)


def _labels():
    seen: list[str] = []

    def progress(it, desc, total):
        seen.append(desc)
        return it

    return seen, progress


def test_cache_hit_gives_the_same_number_and_says_so(cache_on, tiny_model_dir, small_text, one_thread):
    from prac.jobs.prune import run_prune

    model = tiny_model_dir("mistral")
    first_labels, progress = _labels()
    first = run_prune(_job(model, small_text), progress)
    assert first["summary"]["dense_ppl_cached"] is False and "dense eval" in first_labels
    assert len(list(cache_on.glob("*.json"))) == 1
    second_labels, progress = _labels()
    second = run_prune(_job(model, small_text), progress)
    assert second["summary"]["dense_ppl_cached"] is True and "dense eval" not in second_labels
    assert second["summary"]["dense_ppl"] == first["summary"]["dense_ppl"]
    assert second["summary"]["ppl"] == first["summary"]["ppl"]
    assert second["config"]["evaluation"]["dense_cache"]["enabled"] is True
    # --no-cache computes it again (and agrees)
    third_labels, progress = _labels()
    third = run_prune(_job(model, small_text, cache=False), progress)
    assert third["summary"]["dense_ppl_cached"] is False and "dense eval" in third_labels
    assert third["summary"]["dense_ppl"] == pytest.approx(first["summary"]["dense_ppl"], rel=1e-6)
    assert third["config"]["evaluation"]["dense_cache"] == {"enabled": False}


def test_a_changed_weight_invalidates(cache_on, tmp_path, tiny_model_dir, small_text, one_thread):
    import shutil

    from prac.jobs.prune import run_prune

    base = tiny_model_dir("mistral")
    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    tensors = load_file(str(changed / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] += 0.5
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})

    first = run_prune(_job(base, small_text))["summary"]
    other = run_prune(_job(changed, small_text))["summary"]
    assert first["dense_ppl_cached"] is False and other["dense_ppl_cached"] is False
    assert other["dense_ppl"] != first["dense_ppl"]
    assert len(list(cache_on.glob("*.json"))) == 2
    again = run_prune(_job(changed, small_text))["summary"]
    assert again["dense_ppl_cached"] is True and again["dense_ppl"] == other["dense_ppl"]


def test_key_depends_on_weights_tokens_and_protocol():
    model = make_tiny_model("mistral")
    w = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    key = ppl_key(model, w, cpu)
    assert ppl_key(model, w.clone(), cpu).digest() == key.digest()
    assert ppl_key(model, w.reshape(8, 8), cpu).digest() != key.digest()  # same tokens, other windows
    w2 = w.clone()
    w2[0, 0] += 1
    assert tokens_hash(w2) != tokens_hash(w) and ppl_key(model, w2, cpu).digest() != key.digest()
    before = weights_hash(model)
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight[3, 5] += 1e-6
    assert weights_hash(model) != before and ppl_key(model, w, cpu).digest() != key.digest()
    assert ppl_key(model.double(), w, cpu).digest() != ppl_key(model.float(), w, cpu).digest()  # dtype


def test_unreadable_entries_are_misses(tmp_path):
    cache = PplCache(tmp_path)
    model = make_tiny_model("gpt2")
    key = ppl_key(model, torch.zeros(2, 8, dtype=torch.int64), torch.device("cpu"))
    assert cache.get(key) is None
    path = cache.put(key, {"ppl": 12.5, "finite": True})
    assert path is not None and cache.get(key) == {"ppl": 12.5, "finite": True}
    entry = json.loads(path.read_text())
    assert entry["key"] == key.digest() and entry["protocol"]["seqlen"] == 8
    path.write_text("{ not json")
    assert cache.get(key) is None
    path.write_text(json.dumps({**entry, "key": "another"}))
    assert cache.get(key) is None
    assert cache.put(key, {"ppl": float("nan"), "finite": False}) is None  # a NaN baseline is not kept
    assert not list(tmp_path.glob("dense_ppl/.*tmp*"))  # nothing half-written left behind


def test_cli_no_cache_and_cached_line(cache_on, tiny_model_dir, small_text, capsys, one_thread):
    from prac.cli import main

    argv = ["prune", "--model", str(tiny_model_dir("mistral")), "--calib", str(small_text), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(small_text), "--eval-seqlen", "64", "--no-progress"]
    assert main(argv) == 0
    assert "(cached)" not in capsys.readouterr().out
    assert main(argv) == 0
    assert "(cached) -> pruned" in capsys.readouterr().out
    assert main(argv + ["--no-cache"]) == 0
    assert "(cached)" not in capsys.readouterr().out
