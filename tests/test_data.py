"""Calibration sampling and evaluation windows."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from prac.core.errors import PracError
from prac.io import assets
from prac.io.data import eval_windows, load_calibration, load_token_file
from tests.conftest import GOLDEN


def test_stream_sampler_reproduces_the_golden_calibration_tokens(tokenizer):
    ours = load_calibration(str(assets.DEFAULT_CALIB), tokenizer, nsamples=128, seqlen=256, seed=0)
    golden = load_file(str(GOLDEN / "calib_tokens.safetensors"))["input_ids"]
    assert torch.equal(ours.input_ids, golden)
    assert ours.protocol["protocol"] == "stream"


def test_documents_sampler_draws_windows_from_long_documents(tmp_path, tokenizer):
    docs = ["short", "x = 1\n" * 200, "def f():\n    return 2\n" * 100]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    a = load_calibration(str(path), tokenizer, nsamples=6, seqlen=32, seed=1)
    b = load_calibration(str(path), tokenizer, nsamples=6, seqlen=32, seed=1)
    assert a.input_ids.shape == (6, 32) and torch.equal(a.input_ids, b.input_ids)
    assert a.protocol["protocol"] == "documents"
    long_docs = [tokenizer(d, return_tensors="pt").input_ids[0] for d in docs[1:]]
    for row in a.input_ids:
        assert any(_contains(doc, row) for doc in long_docs)


def _contains(seq: torch.Tensor, window: torch.Tensor) -> bool:
    return any(torch.equal(seq[i : i + len(window)], window) for i in range(len(seq) - len(window) + 1))


def test_too_short_text_says_what_it_has_and_needs(small_text, tokenizer):
    with pytest.raises(PracError, match=r"too short: it has \d+ tokens, nsamples x seqlen needs 262145"):
        load_calibration(str(small_text), tokenizer, nsamples=128, seqlen=2048, seed=0)


def test_documents_too_short(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(PracError, match="no document longer than seqlen=64"):
        load_calibration(str(path), tokenizer, nsamples=2, seqlen=64, seed=0)


def test_eval_windows_drop_the_partial_tail():
    w = eval_windows(torch.arange(10), 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(PracError, match="fewer than one window"):
        eval_windows(torch.arange(2), 3)


def test_token_file(tmp_path):
    good = tmp_path / "t.safetensors"
    save_file({"input_ids": torch.arange(12).reshape(3, 4)}, str(good))
    assert load_token_file(good).input_ids.shape == (3, 4)
    bad = tmp_path / "b.safetensors"
    save_file({"ids": torch.zeros(2, 2)}, str(bad))
    with pytest.raises(PracError, match="input_ids"):
        load_token_file(bad)
    with pytest.raises(PracError, match="does not exist"):
        load_token_file(tmp_path / "missing.safetensors")


def test_text_files_must_be_utf8(tmp_path, tokenizer):
    from prac.io.data import load_eval_tokens, read_text_file

    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfhello")
    assert read_text_file(bom) == "hello"
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9")
    with pytest.raises(PracError, match=r"not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_eval_tokens(str(latin), tokenizer)
    with pytest.raises(PracError, match="is a folder"):
        read_text_file(tmp_path)
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_bytes(b'{"text": 1}\n')
    with pytest.raises(PracError, match="not a string"):
        load_calibration(str(jsonl), tokenizer, nsamples=1, seqlen=8, seed=0)


def test_token_ids_are_checked_against_the_vocabulary():
    from prac.io.data import check_token_ids

    check_token_ids(torch.tensor([[0, 9]]), 10, "x")
    with pytest.raises(PracError, match="token id 10 .* vocabulary of 10"):
        check_token_ids(torch.tensor([[0, 10]]), 10, "x")
    with pytest.raises(PracError, match="negative"):
        check_token_ids(torch.tensor([[-3, 1]]), None, "x")
