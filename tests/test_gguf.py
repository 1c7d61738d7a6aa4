"""``--model FILE.gguf``: prac loads a GGUF file through transformers' own GGUF loader.

The GGUF files are written here, with the ``gguf`` package, from a tiny random Llama and the bundled
tokenizer (byte-level BPE): an F32 file must give the original model's logits exactly, a Q4_1 file
those of the model with its linears rounded the way GGUF rounds them. Skipped without ``gguf``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from prac.cli import main  # noqa: E402
from prac.core.errors import PracError  # noqa: E402
from prac.io import assets  # noqa: E402
from prac.model.loading import check_model_source, load_model, load_tokenizer  # noqa: E402

TEXT = "def main(argv):\n    return sorted(x for x in argv if x)  # a comment\n"
#: transformers' name → llama.cpp's, inside ``model.layers.{i}.``
BLOCK_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def _permute(w, n_head: int):
    """llama.cpp's q/k row order (rotary halves interleaved); transformers' GGUF loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, quant: str = "F32") -> dict[str, torch.Tensor]:
    """``model`` as a llama.cpp GGUF file with the bundled tokenizer. ``quant`` other than F32 stores
    every 2-D linear of the blocks in that type (norms and embeddings stay F32, as llama.cpp keeps
    norms). Returns the state dict the file holds after rounding (transformers' names and order)."""
    import numpy as np

    cfg = model.config
    qtype = gguf.GGMLQuantizationType[quant]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tok = json.loads((Path(assets.DEFAULT_MODEL) / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["id"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(3)
    held = {}
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name in TOP_NAMES:
            gname, sub = TOP_NAMES[name], None
        else:
            _, _, i, *rest = name.split(".")
            sub = ".".join(rest[:-1])
            gname = f"blk.{i}.{BLOCK_NAMES[sub]}.weight"
        stored = _permute(a, cfg.num_attention_heads if sub == "self_attn.q_proj" else cfg.num_key_value_heads) \
            if sub in ("self_attn.q_proj", "self_attn.k_proj") else a
        stored = np.ascontiguousarray(stored)
        if quant != "F32" and sub is not None and a.ndim == 2:
            packed = gguf.quants.quantize(stored, qtype)
            writer.add_tensor(gname, packed, raw_dtype=qtype)
            rounded = gguf.quants.dequantize(packed, qtype)
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):  # back to transformers' row order
                n = cfg.num_attention_heads if sub == "self_attn.q_proj" else cfg.num_key_value_heads
                rounded = rounded.reshape(n, rounded.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
            held[name] = torch.from_numpy(np.ascontiguousarray(rounded))
        else:
            writer.add_tensor(gname, stored)
            held[name] = t.float().clone()
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(model, path of its F32 GGUF file)."""
    model = tiny_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, path)
    return model, path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_f32_gguf_gives_the_original_logits(tiny_gguf, tokenizer, caplog):
    model, path = tiny_gguf
    with caplog.at_level("WARNING", logger="prac"):
        loaded = load_model(str(path))
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    assert loaded.hf_quantizer is None and not hasattr(loaded.config, "quantization_config")
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("prac")]
    assert len(lines) == 1 and "converted from GGUF (F32 x21)" in lines[0] and "float32" in lines[0], lines


def test_gguf_tokenizer_is_the_bundled_one(tiny_gguf, tokenizer):
    loaded = load_tokenizer(str(tiny_gguf[1]))
    assert loaded(TEXT).input_ids == tokenizer(TEXT).input_ids


def test_q4_1_gguf_is_dequantized_as_gguf_rounds(tmp_path, tokenizer, caplog):
    model = tiny_llama()
    held = write_gguf(model, tmp_path / "q.gguf", quant="Q4_1")
    rounded = tiny_llama()
    rounded.load_state_dict(held)
    with caplog.at_level("WARNING", logger="prac"):
        loaded = load_model(str(tmp_path / "q.gguf"))
    assert any("dequantized from GGUF (Q4_1 x14" in r.getMessage() for r in caplog.records), caplog.text
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, held[name]), name  # the very values GGUF's own dequantizer gives
    w = loaded.model.layers[0].mlp.down_proj.weight  # Q4_1: at most 16 distinct values per 32 weights
    assert max(len(set(block.tolist())) for block in w.reshape(-1, 32)) <= 16
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    assert torch.allclose(_logits(loaded, ids), _logits(rounded, ids), rtol=0, atol=1e-5)


def test_prune_saves_a_plain_folder_from_gguf(tiny_gguf, small_text, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", "--no-progress", "--model", str(tiny_gguf[1]), "--calib", str(small_text),
                 "--nsamples", "2", "--seqlen", "32", "--eval", "none", "--sparsity", "0.5", "--save", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "tiny.gguf: weights converted from GGUF (F32 x21) to float32" in err, err
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    again = load_model(str(out))  # a plain folder: no GGUF, no quantizer
    assert getattr(again, "hf_quantizer", None) is None
    assert abs(sum(int((p == 0).sum()) for n, p in again.named_parameters() if "layers" in n and p.ndim == 2)
               / sum(p.numel() for n, p in again.named_parameters() if "layers" in n and p.ndim == 2) - 0.5) < 0.01


@pytest.mark.parametrize("make", ["missing", "not_gguf"])
def test_bad_gguf_is_one_line_exit_2(tmp_path, capsys, make):
    path = tmp_path / "model.gguf"
    if make == "not_gguf":
        path.write_bytes(b"PK\x03\x04 not a gguf file")
    code = main(["prune", "--no-progress", "--model", str(path), "--eval", "none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert ("does not exist" if make == "missing" else "not a GGUF file") in err[0], err[0]


def test_missing_gguf_package_is_one_line(tiny_gguf, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a, **k: False)
    with pytest.raises(PracError, match=r"needs the gguf package .*pip install 'prac\[gguf\]'"):
        check_model_source(str(tiny_gguf[1]))
