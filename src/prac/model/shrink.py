"""Structured shrinking of a decoder: MLP neurons, whole KV groups of attention heads and whole blocks
removed from the weights and the config, so the result is a standard folder of the same family with
nothing but numbers changed (``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``
with an explicit ``head_dim``, ``num_hidden_layers`` and the per-layer lists that depend on it).

The families whose blocks are ``self_attn.{q,k,v,o}_proj`` + ``mlp.{gate,up,down}_proj`` with the config
fields above: Llama, Mistral, Qwen2, Qwen3, Gemma 2/3 text (:data:`SUPPORTED`). Anything else — MoE
models included — is refused with one line by :func:`check_shrinkable`.

Removing the input columns of ``down_proj`` (``o_proj``) that the selection zeroed, with the matching
rows of ``gate_proj``/``up_proj`` (``q_proj`` for the group's query heads, ``k_proj``/``v_proj``), gives
the very outputs the zeroed model gave: a neuron whose ``down_proj`` column is zero contributes nothing
whatever ``gate``/``up`` compute for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prac.core.errors import PracError

#: model_type values whose decoder blocks this module can shrink (dense, gated MLP, GQA attention).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")
#: config fields that hold one entry per decoder block
PER_LAYER_FIELDS = ("layer_types",)


@dataclass(frozen=True)
class Shape:
    """The block shape a run asks for (None: unchanged); ``target_params``: the share of block
    parameters to keep, the three others then chosen by a search (:mod:`prac.engine.structure_search`)."""

    intermediate_size: int | None = None
    num_key_value_heads: int | None = None
    num_hidden_layers: int | None = None
    target_params: float | None = None
    #: ``--search-nsamples``: the fitted sequences each of ``target_params``' candidates is fitted on, at
    #: most (None: :data:`prac.engine.structure_search.SEARCH_SEQUENCES`)
    search_nsamples: int | None = None
    #: ``--structure-damping``: the ridge of the selection and refit, a fraction of H's mean diagonal
    #: (None: :data:`prac.methods.structured.DAMPING`)
    damping: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.intermediate_size, self.num_key_value_heads, self.num_hidden_layers,
                                           self.target_params))

    def to_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def text_config(config):
    """The decoder's config (a multimodal config's ``text_config``, else the config itself)."""
    return getattr(config, "text_config", None) or config


def check_shrinkable(config, shape: Shape) -> None:
    """One-line errors, before any weight is read, for a shape the config cannot express."""
    if shape.search_nsamples is not None and shape.target_params is None:
        raise PracError("--search-nsamples sets --target-params' search: give it with --target-params")
    if shape.damping is not None:
        if not (math.isfinite(shape.damping) and shape.damping > 0):
            raise PracError(f"--structure-damping must be > 0, got {shape.damping}")
        if not shape.active:
            raise PracError("--structure-damping sets the structured selection's ridge: give it with "
                            "--intermediate-size, --num-key-value-heads or --target-params")
    if not shape.active:
        return
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED or any(getattr(cfg, f, None) for f in ("num_local_experts", "num_experts")):
        raise PracError(f"structured shrinking supports {', '.join(SUPPORTED)} (dense decoders); "
                        f"this model is {kind!r}" + (" with MoE experts" if kind in SUPPORTED else ""))
    if shape.target_params is not None:
        if not 0.0 < shape.target_params < 1.0:
            raise PracError(f"--target-params must be in (0, 1): the share of block parameters to keep, "
                            f"got {shape.target_params}")
        if shape.intermediate_size is not None:
            raise PracError("--target-params chooses --intermediate-size itself: give one or the other "
                            "(--num-hidden-layers and --num-key-value-heads may go with it)")
    checks = (("intermediate_size", shape.intermediate_size, "--intermediate-size"),
              ("num_key_value_heads", shape.num_key_value_heads, "--num-key-value-heads"),
              ("num_hidden_layers", shape.num_hidden_layers, "--num-hidden-layers"))
    for field_name, wanted, flag in checks:
        if wanted is None:
            continue
        have = int(getattr(cfg, field_name))
        if not 1 <= wanted <= have:
            raise PracError(f"{flag} {wanted}: the model has {field_name} = {have}; keep between 1 and {have}")
    if shape.num_key_value_heads is not None:
        heads, kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
        if heads % kv:
            raise PracError(f"{heads} attention heads do not split into {kv} KV groups")


def head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new linear holding ``linear``'s kept output rows / input columns (same dtype and device)."""
    w = linear.weight.data
    if rows is not None:
        w = w[rows.to(w.device)]
    if cols is not None:
        w = w[:, cols.to(w.device)]
    bias = linear.bias is not None
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if bias:
        b = linear.bias.data
        out.bias.data.copy_(b[rows.to(b.device)] if rows is not None else b)
    return out


def shrink_mlp(mlp: nn.Module, kept: torch.Tensor) -> None:
    """Keep the neurons ``kept`` (ascending indices) of a gated MLP, in place."""
    kept = kept.sort().values
    mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=kept)
    mlp.up_proj = _slice_linear(mlp.up_proj, rows=kept)
    mlp.down_proj = _slice_linear(mlp.down_proj, cols=kept)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def head_columns(kept_groups: torch.Tensor, heads_per_group: int, dim: int) -> torch.Tensor:
    """The indices of the q rows / o_proj columns of the query heads of the kept KV groups."""
    heads = (kept_groups.sort().values[:, None] * heads_per_group + torch.arange(heads_per_group)).flatten()
    return (heads[:, None] * dim + torch.arange(dim)).flatten()


def shrink_attention(attn: nn.Module, kept_groups: torch.Tensor, heads_per_group: int, dim: int) -> None:
    """Keep the KV groups ``kept_groups`` (with their query heads) of a GQA attention, in place."""
    kept_groups = kept_groups.sort().values
    q = head_columns(kept_groups, heads_per_group, dim)
    kv = (kept_groups[:, None] * dim + torch.arange(dim)).flatten()
    attn.q_proj = _slice_linear(attn.q_proj, rows=q)
    attn.k_proj = _slice_linear(attn.k_proj, rows=kv)
    attn.v_proj = _slice_linear(attn.v_proj, rows=kv)
    attn.o_proj = _slice_linear(attn.o_proj, cols=q)


def drop_layers(model: nn.Module, keep: list[int]) -> None:
    """Keep the decoder blocks ``keep`` (ascending), renumbering their ``layer_idx`` (the KV cache's
    index) and the config's per-layer lists."""
    decoder = model.get_decoder()
    layers = decoder.layers
    decoder.layers = nn.ModuleList([layers[i] for i in keep])
    for new, block in enumerate(decoder.layers):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    cfg = text_config(model.config)
    for name in PER_LAYER_FIELDS:
        values = getattr(cfg, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(layers):
            setattr(cfg, name, [values[i] for i in keep])
    cfg.num_hidden_layers = len(keep)


def config_diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, list[Any]]:
    """``{field: [before, after]}`` for the config fields that changed."""
    return {k: [before.get(k), after.get(k)] for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def block_parameters(model: nn.Module) -> int:
    """Parameters of the decoder blocks (embeddings, final norm and head excluded)."""
    return sum(p.numel() for p in model.get_decoder().layers.parameters())


def shape_mismatches(model: nn.Module) -> list[str]:
    """Where the decoder's weights disagree with its config (``prac verify`` on a shrunk folder): the
    block count, and for the families of :data:`SUPPORTED` every block's q/k/v/o and gate/up/down
    shapes against ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``intermediate_size``
    and ``hidden_size``. Empty when they agree."""
    cfg = text_config(model.config)
    layers = model.get_decoder().layers
    found: list[str] = []
    if getattr(cfg, "num_hidden_layers", None) is not None and len(layers) != int(cfg.num_hidden_layers):
        found.append(f"{len(layers)} blocks, config num_hidden_layers {cfg.num_hidden_layers}")
    if getattr(cfg, "model_type", None) not in SUPPORTED:
        return found
    h, dim, inter = int(cfg.hidden_size), head_dim(cfg), int(cfg.intermediate_size)
    heads, kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    want = {"self_attn.q_proj": (heads * dim, h), "self_attn.k_proj": (kv * dim, h), "self_attn.v_proj": (kv * dim, h),
            "self_attn.o_proj": (h, heads * dim), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
            "mlp.down_proj": (h, inter)}
    for i, block in enumerate(layers):
        for name, shape in want.items():
            weight = block.get_submodule(name).weight
            if tuple(weight.shape) != shape:
                found.append(f"block {i} {name} is {tuple(weight.shape)}, the config gives {shape}")
    return found
