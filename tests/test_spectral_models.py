"""The spectral module on tiny random Hugging Face transformers (float64, CPU): block detection for
LLaMA/Mistral, GPT-2 and BERT layouts, tied embeddings, and spectra against a dense reference."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from prac.core.errors import PracError  # noqa: E402
from prac.spectral import FisherSpectral, SpectralConfig  # noqa: E402
from prac.spectral import blocks as blk  # noqa: E402

V = 32


pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()


def mistral(attn: str = "sdpa", seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = MistralConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, attn_implementation=attn)
    return MistralForCausalLM(cfg).double().eval()


def llama_tied() -> LlamaForCausalLM:
    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).double().eval()


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(2)
    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=V, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).double().eval()


def bert_config() -> BertConfig:
    return BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                      vocab_size=V, max_position_embeddings=32)


def ids_(n: int, t: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def reference_rows(model, ids, mask=None) -> torch.Tensor:
    """One backward per sequence of Σ_t −log p(y_{t+1} | ≤t), masked positions dropped."""
    mask = torch.ones_like(ids) if mask is None else mask
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    rows = []
    for i in range(ids.shape[0]):
        model.zero_grad()
        logits = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0, :-1]
        logp = torch.log_softmax(logits, dim=-1)
        keep = mask[i, 1:].bool()
        (-logp[torch.arange(logits.shape[0])[keep], ids[i, 1:][keep]].sum()).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
    model.zero_grad()
    return torch.stack(rows)


def block_cols(model, key: str, structure: str = "layer_type") -> torch.Tensor:
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = (start, start + p.numel())
        start += p.numel()
    block = next(b for b in blk.partition_model(model, structure).blocks if b.key == key)
    return torch.cat([torch.arange(*offsets[n]) for n in block.names])


def dense(G: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(G.T @ G / G.shape[0]).flip(0)


def test_mistral_blocks_match_dense_fisher():
    model, ids = mistral(), ids_(12)
    res = FisherSpectral().compute_fisher_spectrum(model, ids, block_structure="layer_type")
    assert list(res.blocks) == ["embedding", "layer_0.attention", "layer_0.mlp", "layer_0.other", "layer_1.attention",
                                "layer_1.mlp", "layer_1.other", "other", "head"]
    assert res.metadata["gradient_engine"]["used"] == "vmap"
    G = reference_rows(model, ids)
    for key, b in res.blocks.items():
        Gb = G[:, block_cols(model, key)]
        ref = dense(Gb)
        k = min(10, b.eigenvalues.numel())
        torch.testing.assert_close(b.eigenvalues[:k], ref[:k], rtol=1e-8, atol=1e-13 * float(ref[0]))
        assert b.trace == pytest.approx(float((Gb * Gb).sum()) / 12, rel=1e-8)
    assert res.whole_model.trace == pytest.approx(float((G * G).sum()) / 12, rel=1e-8)


def test_padding_mask_with_sdpa_falls_back_to_the_loop_and_agrees(caplog):
    ids = ids_(4)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding (left padding gives SDPA fully masked rows, hence NaN gradients)
    sdpa, eager = mistral("sdpa"), mistral("eager")
    batch = {"input_ids": ids, "attention_mask": mask}
    with caplog.at_level(logging.WARNING):
        auto = FisherSpectral().compute_fisher_spectrum(sdpa, batch, block_structure="layer")
    engine = auto.metadata["gradient_engine"]
    assert engine["used"] == "loop" and engine["fallback_reason"] and "vmap" in caplog.text
    with pytest.raises(PracError, match="vmap cannot"):
        FisherSpectral(SpectralConfig(gradient_engine="vmap")).compute_fisher_spectrum(sdpa, batch, block_structure="layer")
    vm = FisherSpectral(SpectralConfig(gradient_engine="vmap")).compute_fisher_spectrum(eager, batch,
                                                                                        block_structure="layer")
    assert vm.metadata["gradient_engine"]["used"] == "vmap"
    # each against its own reference: HF's eager attention takes the softmax in float32, so the two
    # attention implementations differ at ~1e-7 even in a float64 model
    for model, res in [(sdpa, auto), (eager, vm)]:
        G = reference_rows(model, ids, mask)
        for key in res.blocks:
            ref = dense(G[:, block_cols(model, key, "layer")])
            torch.testing.assert_close(res[key].eigenvalues, ref[:4], rtol=1e-8, atol=1e-13 * float(ref[0]))
    assert auto.metadata["n_tokens"] == 4 * 7 - 3


def test_tied_embeddings_are_one_parameter_reported_once():
    model, ids = llama_tied(), ids_(5)
    part = blk.partition_model(model, "layer_type")
    assert part.aliases == {"model.embed_tokens.weight": ("lm_head.weight",)}
    keys = [b.key for b in part.blocks]
    assert "head" not in keys and keys[0] == "embedding"
    names = {n: b.key for b in part.blocks for n in b.names}
    assert names["model.layers.0.mlp.gate_proj.weight"] == "layer_0.mlp"
    assert names["model.layers.0.mlp.down_proj.weight"] == "layer_0.mlp"
    assert names["model.layers.1.self_attn.o_proj.weight"] == "layer_1.attention"
    assert names["model.layers.0.post_attention_layernorm.weight"] == "layer_0.other"
    assert names["model.norm.weight"] == "other"
    res = FisherSpectral().compute_fisher_spectrum(model, ids, block_structure="layer_type")
    assert res.metadata["model"]["tied_parameters"] == {"model.embed_tokens.weight": ["lm_head.weight"]}
    assert sum(b.n_params for b in res.blocks.values()) == sum(p.numel() for p in model.parameters())
    # the tied gradient has both the embedding and the head contribution, like autograd's
    G = reference_rows(model, ids)
    ref = dense(G[:, block_cols(model, "embedding")])
    torch.testing.assert_close(res["embedding"].eigenvalues, ref[:5], rtol=1e-8, atol=1e-13 * float(ref[0]))
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum").backward()
    assert res.whole_model.trace == pytest.approx(float((G * G).sum()) / 5, rel=1e-8)
    torch.testing.assert_close(G.sum(0), torch.cat([p.grad.reshape(-1) for p in model.parameters()]), rtol=1e-9, atol=1e-11)


def test_gpt2_blocks_by_parent_module():
    model = gpt2()
    part = blk.partition_model(model, "layer_type")
    names = {n: b.key for b in part.blocks for n in b.names}
    assert names["transformer.h.0.attn.c_proj.weight"] == "layer_0.attention"
    assert names["transformer.h.0.attn.c_attn.weight"] == "layer_0.attention"
    assert names["transformer.h.0.mlp.c_proj.weight"] == "layer_0.mlp"
    assert names["transformer.h.1.mlp.c_fc.bias"] == "layer_1.mlp"
    assert names["transformer.h.1.ln_2.weight"] == "layer_1.other"
    assert names["transformer.wte.weight"] == names["transformer.wpe.weight"] == "embedding"
    assert names["transformer.ln_f.weight"] == "other"
    assert "lm_head.weight" not in names and part.aliases == {"transformer.wte.weight": ("lm_head.weight",)}
    res = FisherSpectral().compute_fisher_spectrum(model, ids_(3), block_structure="layer")
    assert list(res.blocks) == ["embedding", "layer_0", "layer_1", "other"]
    assert sum(b.trace for b in res.blocks.values()) == pytest.approx(res.whole_model.trace, rel=1e-12)


def test_bert_blocks_by_parent_module():
    torch.manual_seed(4)
    mlm = BertForMaskedLM(bert_config()).double().eval()
    names = {n: b.key for b in blk.partition_model(mlm, "layer_type").blocks for n in b.names}
    assert names["bert.encoder.layer.0.attention.output.dense.weight"] == "layer_0.attention"
    assert names["bert.encoder.layer.0.attention.self.query.weight"] == "layer_0.attention"
    assert names["bert.encoder.layer.0.attention.output.LayerNorm.weight"] == "layer_0.attention"
    assert names["bert.encoder.layer.1.intermediate.dense.weight"] == "layer_1.mlp"
    assert names["bert.encoder.layer.1.output.dense.weight"] == "layer_1.mlp"
    assert names["bert.embeddings.LayerNorm.weight"] == names["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert names["cls.predictions.transform.dense.weight"] == names["cls.predictions.bias"] == "head"
    res = FisherSpectral(SpectralConfig(shift_labels=False)).compute_fisher_spectrum(mlm, ids_(3),
                                                                                     block_structure="layer_type")
    assert res.metadata["n_tokens"] == 3 * 8 and "unshifted" in res.metadata["loss"]
    torch.manual_seed(4)
    encoder = BertModel(bert_config(), add_pooling_layer=True).double().eval()
    enc_names = {n: b.key for b in blk.partition_model(encoder, "layer").blocks for n in b.names}
    assert enc_names["pooler.dense.weight"] == "head" and enc_names["encoder.layer.1.output.dense.bias"] == "layer_1"
    with pytest.raises(PracError, match="logits"):
        FisherSpectral().compute_fisher_spectrum(encoder, ids_(2))


def test_layer_detection_from_names_alone():
    named = [("encoder.block.0.layer.0.SelfAttention.q.weight", 4), ("encoder.block.0.layer.1.DenseReluDense.wi.weight", 4),
             ("decoder.block.0.layer.0.SelfAttention.q.weight", 4), ("decoder.block.1.layer.0.layer_norm.weight", 2),
             ("shared.weight", 8), ("lm_head.weight", 8)]
    keys = {n: b.key for b in blk.partition(named, "layer_type").blocks for n in b.names}
    assert keys["encoder.block.0.layer.0.SelfAttention.q.weight"] == "encoder.layer_0.attention"
    assert keys["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == "encoder.layer_0.mlp"
    assert keys["decoder.block.0.layer.0.SelfAttention.q.weight"] == "decoder.layer_0.attention"
    assert keys["decoder.block.1.layer.0.layer_norm.weight"] == "decoder.layer_1.other"
    assert keys["lm_head.weight"] == "head"
    for name, where in [("gpt_neox.layers.3.attention.query_key_value.weight", ("gpt_neox.layers", 3)),
                        ("model.decoder.layers.5.fc1.weight", ("model.decoder.layers", 5)),
                        ("transformer.h.11.mlp.c_fc.weight", ("transformer.h", 11)),
                        ("encoder.layer.12.output.dense.weight", ("encoder.layer", 12)), ("block.2.ff.w", ("block", 2)),
                        ("model.embed_tokens.weight", None), ("heads.weight", None)]:
        assert blk.layer_of(name) == where
    assert blk.kind_in_layer("gpt_neox.layers.3.attention.query_key_value.weight") == "attention"
    assert blk.kind_in_layer("gpt_neox.layers.3.mlp.dense_h_to_4h.weight") == "mlp"
    assert blk.kind_in_layer("model.decoder.layers.5.fc1.weight") == "mlp"
    assert blk.kind_in_layer("model.layers.0.post_attention_layernorm.weight") == "other"
    assert blk.outside_kind("gpt_neox.embed_out.weight") == "head"
    assert blk.outside_kind("gpt_neox.embed_in.weight") == "embedding"
