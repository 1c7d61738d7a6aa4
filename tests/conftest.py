"""Shared fixtures: tiny random models of several architectures saved as HF folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The suite runs on 2 cores; one intra-op thread avoids oversubscription with pytest workers.
torch.set_num_threads(max(1, int(os.environ.get("PRAC_TEST_THREADS", "2"))))

from prac.io import assets  # noqa: E402
from prac.jobs.verify import weights_hash as state_hash  # noqa: E402,F401  (bit-identity of a model's weights)

GOLDEN = Path(__file__).parent / "golden"
VOCAB = 4096  # the bundled tokenizer's vocabulary, shared by every tiny model


def _configs():
    from transformers import (
        BertConfig,
        GPT2Config,
        GPTNeoXConfig,
        MistralConfig,
        MixtralConfig,
        OPTConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common = dict(vocab_size=VOCAB)
    moe = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=256, num_experts_per_tok=2, **common)
    return {
        # MoE: transformers 5 stores their experts fused (3-D gate_up_proj / down_proj)
        "mixtral": MixtralConfig(intermediate_size=128, num_local_experts=4, **moe),
        "qwen3_moe": Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=96, num_experts=4, head_dim=16,
                                    norm_topk_prob=True, **moe),
        "qwen2_moe": Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=96, shared_expert_intermediate_size=128,
                                    num_experts=4, **moe),
        "mistral": MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, **common),
        "qwen2": Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common),
        "opt": OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=256, **common),
        "gpt_neox": GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  max_position_embeddings=256, **common),
        "gpt2": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2, **common),
        "bert": BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=256, **common),
    }


def make_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[arch]
    cls = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = cls.from_config(config)
    if arch == "qwen2":  # random init leaves q/k/v biases at zero; make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.1)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _no_dense_cache(tmp_path_factory):
    """Runs compute their dense perplexity (tests that count phases expect it); the cache tests turn
    it back on. Any cache a run does write goes to a temporary folder, never ~/.cache/prac."""
    os.environ["PRAC_CACHE_DIR"] = str(tmp_path_factory.mktemp("prac-cache"))
    os.environ["PRAC_NO_CACHE"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny float64 models: intra-op threads are pure overhead (and thrash on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """``tiny_model_dir(arch)`` → a folder with a saved tiny random model and the bundled tokenizer."""
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            make_tiny_model(arch).save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[arch] = path
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def small_text(tmp_path_factory) -> Path:
    """~60 kB of the bundled evaluation text, enough for small calibration and evaluation runs."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(assets.DEFAULT_EVAL.read_text(encoding="utf-8")[:60000], encoding="utf-8")
    return path


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under ``root`` with its mode and (for files) content hash: "left exactly as it was"."""
    import hashlib

    out = {".": (root.stat().st_mode, "")}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (p.stat().st_mode, digest)
    return out


@pytest.fixture
def no_load(monkeypatch):
    """Any load of model weights fails the test: the refusal must come before it."""

    import prac.jobs.eval
    import prac.jobs.prune
    import prac.model.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model weights were loaded before the input was refused")

    monkeypatch.setattr(prac.jobs.prune, "load_model", refuse)
    monkeypatch.setattr(prac.jobs.eval, "load_model", refuse)
    monkeypatch.setattr(prac.model.loading, "load_model", refuse)
