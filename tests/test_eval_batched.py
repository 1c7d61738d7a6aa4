"""Batched perplexity, the default batch size, C4's protocol and several evaluation sets in one run."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from prac.core.errors import PracError
from prac.io.data import C4_EVAL_DOCS, C4_EVAL_WINDOWS, c4_eval_tokens, eval_windows, load_eval_tokens, split_eval_sets
from prac.parallel.evaluate import default_eval_batch_size, perplexity, window_bytes

from .conftest import VOCAB, make_tiny_model


@pytest.mark.parametrize("arch", ["mistral", "gpt2", "opt"])
def test_batched_perplexity_equals_one_window_at_a_time(arch, one_thread):
    model = make_tiny_model(arch)
    windows = torch.randint(0, VOCAB, (11, 48), generator=torch.Generator().manual_seed(1))
    one = perplexity(model, windows, torch.device("cpu"), batch_size=1)
    for batch in (2, 4, 11, 64):
        many = perplexity(model, windows, torch.device("cpu"), batch_size=batch)
        assert many["ppl"] == pytest.approx(one["ppl"], rel=1e-6)
        assert many["nll_sum"] == pytest.approx(one["nll_sum"], rel=1e-6)
        assert many["predicted_tokens"] == one["predicted_tokens"] == 11 * 47


def test_perplexity_returns_the_nll_sum_and_token_count(one_thread):
    """What a multi-process evaluation sums across ranks: nll_sum / predicted_tokens is mean_nll."""
    model = make_tiny_model("mistral")
    windows = torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(2))
    whole = perplexity(model, windows, torch.device("cpu"), batch_size=4)
    a = perplexity(model, windows[:2], torch.device("cpu"), batch_size=4)
    b = perplexity(model, windows[2:], torch.device("cpu"), batch_size=4)
    assert whole["mean_nll"] == pytest.approx(whole["nll_sum"] / whole["predicted_tokens"], rel=1e-12)
    assert a["nll_sum"] + b["nll_sum"] == pytest.approx(whole["nll_sum"], rel=1e-6)
    assert a["predicted_tokens"] + b["predicted_tokens"] == whole["predicted_tokens"]
    # against a float64 reference computed independently
    with torch.no_grad():
        logits = model(input_ids=windows).logits.double()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    assert whole["mean_nll"] == pytest.approx(float(ref), rel=1e-6)
    assert whole["ppl"] == pytest.approx(math.exp(float(ref)), rel=1e-6)


MISTRAL_7B = SimpleNamespace(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, vocab_size=32768,
                             num_hidden_layers=32)


class _FakeSized(torch.nn.Module):
    """Parameters of a given size without the memory: meta tensors, and a block list for :func:`placed`."""

    def __init__(self, config, dtype=torch.float16):
        super().__init__()
        self.config = config
        h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
        self.embed = torch.nn.Parameter(torch.empty(v, h, device="meta", dtype=dtype))
        self.head = torch.nn.Parameter(torch.empty(v, h, device="meta", dtype=dtype))
        self.layers = torch.nn.ModuleList(_Block(h, f, dtype) for _ in range(config.num_hidden_layers))


class _Block(torch.nn.Module):
    """Mistral-7B's block shapes (GQA 32/8): q, k, v, o and gate, up, down."""

    def __init__(self, h, f, dtype):
        super().__init__()
        kv = h // 4
        kw = dict(bias=False, device="meta", dtype=dtype)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(h, h, **kw), torch.nn.Linear(h, kv, **kw),
                                          torch.nn.Linear(h, kv, **kw), torch.nn.Linear(h, h, **kw))
        self.gate, self.up, self.down = torch.nn.Linear(h, f, **kw), torch.nn.Linear(h, f, **kw), torch.nn.Linear(f, h, **kw)


def test_default_batch_of_a_7b_model_fits_a_24gb_card():
    """The CUDA estimate, from sizes only: a 7B fp16 model at 2048 tokens on a 24 GB card."""
    model = _FakeSized(MISTRAL_7B)
    free = 23_500_000_000  # what mem_get_info reports on a 24 GB card with a CUDA context
    batch = default_eval_batch_size(model, 2048, torch.device("cuda"), free_bytes=free)
    per_window = window_bytes(MISTRAL_7B, 2048, 2)
    assert 1.5e9 < per_window < 2.5e9
    from prac.parallel.evaluate import resident_bytes

    resident = resident_bytes(model, free)
    assert resident < 2e9  # block by block: it is more than half the free memory
    assert batch >= 2
    assert resident + batch * per_window < 0.7 * free
    # on an 80 GB card it is placed whole and still fits
    big = default_eval_batch_size(model, 2048, torch.device("cuda"), free_bytes=80_000_000_000)
    assert resident_bytes(model, 80e9) > 14e9 and 14.5e9 + big * per_window < 0.7 * 80e9 and big > batch


def test_default_batch_on_the_cpu():
    small = make_tiny_model("mistral")
    assert default_eval_batch_size(small, 256, torch.device("cpu")) == 32
    assert default_eval_batch_size(small, 2048, torch.device("cpu")) == 4
    assert default_eval_batch_size(_FakeSized(MISTRAL_7B, torch.float32), 2048, torch.device("cpu")) == 1


def test_split_eval_sets():
    assert split_eval_sets("wikitext2, c4,wikitext2") == ["wikitext2", "c4"]
    assert split_eval_sets("none") == [] and split_eval_sets(None) == []
    with pytest.raises(PracError, match="'none' cannot be combined"):
        split_eval_sets("c4,none")


def test_c4_protocol_joins_the_first_documents_and_keeps_256_windows(tokenizer):
    """SparseGPT's C4 evaluation: ' '.join of the first 1100 documents, the first 256 x seqlen tokens."""
    docs = [f"document {i}: " + f"def f(x):\n    return x + {i}\n" for i in range(C4_EVAL_DOCS + 50)]
    seqlen = 8
    ids = c4_eval_tokens(docs, tokenizer, seqlen)
    expected = tokenizer(" ".join(docs[:C4_EVAL_DOCS]), return_tensors="pt").input_ids[0][: C4_EVAL_WINDOWS * seqlen]
    assert torch.equal(ids, expected) and ids.numel() == C4_EVAL_WINDOWS * seqlen
    assert eval_windows(ids, seqlen).shape == (C4_EVAL_WINDOWS, seqlen)
    short = c4_eval_tokens(docs[:3], tokenizer, 2048)  # shorter text: all of it
    assert torch.equal(short, tokenizer(" ".join(docs[:3]), return_tensors="pt").input_ids[0])


def test_jsonl_evaluation_file_follows_the_c4_protocol(tmp_path, tokenizer):
    docs = [f"import os{i}\nprint({i})" for i in range(40)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    ids, proto = load_eval_tokens(str(path), tokenizer, seqlen=4)
    assert torch.equal(ids, c4_eval_tokens(docs, tokenizer, 4))
    assert proto["protocol"] == "sparsegpt-c4" and proto["file"] == str(path)


def test_several_eval_sets_in_one_prune(tmp_path, tiny_model_dir, small_text, tokenizer, one_thread):
    from prac.jobs.config import PruneJob
    from prac.jobs.prune import run_prune

    other = tmp_path / "other.jsonl"
    text = small_text.read_text(encoding="utf-8")
    other.write_text("".join(json.dumps({"text": text[i:i + 3000]}) + "\n" for i in range(0, 30000, 3000)), encoding="utf-8")
    job = PruneJob(model=str(tiny_model_dir("mistral")), calib=str(small_text), nsamples=4, seqlen=32,
                   eval=f"{small_text},{other}", eval_seqlen=64, eval_batch_size=16, report=str(tmp_path / "r.json"))
    s = run_prune(job)["summary"]
    sets = s["eval_sets"]
    assert list(sets) == [str(small_text), str(other)]
    assert s["ppl"] == sets[str(small_text)]["ppl"] and s["dense_ppl"] == sets[str(small_text)]["dense_ppl"]
    assert all(math.isfinite(r["ppl"]) and math.isfinite(r["dense_ppl"]) for r in sets.values())
    assert sets[str(other)]["ppl"] != sets[str(small_text)]["ppl"]
    written = json.loads((tmp_path / "r.json").read_text())
    assert set(written["config"]["evaluation"]["sets"]) == set(sets) and written["summary"]["status"] == "ok"
    assert written["config"]["evaluation"]["sets"][str(other)]["protocol"] == "sparsegpt-c4"
    # a single-set run of the second file gives the same numbers
    single = run_prune(PruneJob(model=str(tiny_model_dir("mistral")), calib=str(small_text), nsamples=4, seqlen=32,
                                eval=str(other), eval_seqlen=64, eval_batch_size=1))["summary"]
    assert single["ppl"] == pytest.approx(sets[str(other)]["ppl"], rel=1e-6)
    assert single["dense_ppl"] == pytest.approx(sets[str(other)]["dense_ppl"], rel=1e-6)


def test_prac_eval_several_sets_and_default_batch(tiny_model_dir, small_text, tmp_path, one_thread):
    from prac.jobs.config import EvalJob
    from prac.jobs.eval import run_eval

    other = tmp_path / "part.txt"
    other.write_text(small_text.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    report = run_eval(EvalJob(model=str(tiny_model_dir("mistral")), data=f"{small_text},{other}", seqlen=64))
    s = report["summary"]
    assert set(s["eval_sets"]) == {str(small_text), str(other)} and s["ppl"] == s["eval_sets"][str(small_text)]["ppl"]
    assert report["config"]["batch_size_resolved"] == 64  # 8192 // 64 = 128 tokens-wise, capped at 64
    one = run_eval(EvalJob(model=str(tiny_model_dir("mistral")), data=str(other), seqlen=64, batch_size=1))["summary"]
    assert one["ppl"] == pytest.approx(s["eval_sets"][str(other)]["ppl"], rel=1e-6)


def test_c4_offline_is_one_line(monkeypatch, tokenizer):
    """--eval c4 goes through the datasets loader; offline that is one PracError line."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(PracError, match="could not load dataset 'allenai/c4'") as err:
        load_eval_tokens("c4", tokenizer, seqlen=32)
    assert "\n" not in str(err.value)
