"""Partition of a model's parameters into blocks, and the seeded coordinate subsample of a block.

Layer membership comes from the parameter name: the first ``<container>.<index>.`` component with
container one of ``layers``, ``layer``, ``h``, ``block``, ``blocks`` (``model.layers.N``,
``transformer.h.N``, ``encoder.layer.N``, ``decoder.layers.N``, ``gpt_neox.layers.N``, ``block.N``).
When a model has several such stacks (an encoder and a decoder), keys get the stack as a prefix
(``encoder.layer_0``, ``decoder.layer_0``) so that different layers are never merged.

Inside a layer, attention vs MLP is decided by the *parent modules* of the parameter, walked from
the layer downwards: the first module whose attribute name (or class name, when the model is
given) is an attention or a feed-forward module decides. This is why GPT-2's ``attn.c_proj`` and
``mlp.c_proj`` and BERT's ``attention.output.dense`` and ``output.dense`` land where they belong,
and why LLaMA's ``post_attention_layernorm`` (a norm named after attention) is ``other``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from prac.core.errors import PracError

_LAYER = re.compile(r"(?:^|\.)(?P<container>layers|layer|h|blocks|block)\.(?P<index>\d+)(?=\.|$)")

# Whole attribute names (case-insensitive): substring matching would send
# ``post_attention_layernorm`` to attention.
_ATTN_NAME = re.compile(
    r"^(self_?attn|attn|attention|self_?attention|selfattention|cross_?attn|cross_?attention|"
    r"crossattention|encdecattention|encoder_attn|mha|multihead_attn|multi_head_attention)$", re.I)
_MLP_NAME = re.compile(
    r"^(mlp|ffn|ff|feed_?forward|intermediate|output|densereludense|densegatedactdense|fc1|fc2|fc_in|"
    r"fc_out|c_fc|gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3|experts|block_sparse_moe|moe|"
    r"dense_h_to_4h|dense_4h_to_h)$", re.I)
_ATTN_CLASS = re.compile(r"Attention", re.I)
_MLP_CLASS = re.compile(r"MLP|FeedForward|Intermediate|DenseReluDense|DenseActDense|LayerFF|SparseMoe|MoE|Expert")
_NORM_CLASS = re.compile(r"Norm", re.I)

_HEAD_NAME = re.compile(r"^(lm_head|head|cls|classifier|score|pooler|qa_outputs|embed_out|output_projection)$", re.I)
_EMBED_NAME = re.compile(r"embed|^wte$|^wpe$|^word_embeddings$", re.I)

BlockFn = Callable[[str, torch.Tensor], "str | None"]


@dataclass(frozen=True)
class Block:
    """One block: its parameters (in model order) and their flattened sizes."""

    key: str
    names: tuple[str, ...]
    numels: tuple[int, ...]

    @property
    def n_params(self) -> int:
        return sum(self.numels)


@dataclass(frozen=True)
class Partition:
    """The blocks, the parameters left out (a callable returned None) and tied-parameter aliases."""

    blocks: tuple[Block, ...]
    excluded: tuple[str, ...] = ()
    aliases: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    structure: str = "layer"

    @property
    def names(self) -> list[str]:
        return [n for b in self.blocks for n in b.names]


def stable_hash(text: str) -> int:
    """sha1-based hash, identical in every process (Python's ``hash`` is salted per process)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16) % (10**9 + 7)


def block_seed(seed: int, key: str) -> int:
    return (seed + stable_hash(key)) % (2**31 - 1)


def subsample_indices(n_params: int, max_params: int | None, seed: int) -> torch.Tensor | None:
    """Sorted coordinates S ⊂ {0..n_params-1}, |S| = max_params, uniform without replacement.

    numpy's PCG64 ``choice(replace=False)`` draws without materialising a permutation of all
    coordinates, so this stays cheap for blocks of hundreds of millions of parameters.
    Returns None when every coordinate is kept.
    """
    if max_params is None or n_params <= max_params:
        return None
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = np.sort(rng.choice(n_params, size=max_params, replace=False))
    return torch.from_numpy(idx.astype(np.int64))


def layer_of(name: str) -> tuple[str, int] | None:
    """``(stack, index)`` of the layer holding parameter ``name``, e.g. ``('model.layers', 3)``."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return name[: m.start("index") - 1], int(m.group("index"))


def kind_in_layer(name: str, model: torch.nn.Module | None = None) -> str:
    """``attention``, ``mlp`` or ``other`` for a parameter inside a layer, by its parent modules."""
    m = _LAYER.search(name)
    path = name.split(".")
    start = len(name[: m.end()].split(".")) if m else 0
    modules = path[start:-1]  # the last component is the parameter itself
    prefix = ".".join(path[:start])
    for depth, component in enumerate(modules):
        cls = ""
        if model is not None:
            try:
                cls = type(model.get_submodule(".".join([prefix, *modules[: depth + 1]]).lstrip("."))).__name__
            except AttributeError:
                cls = ""
        if _NORM_CLASS.search(cls):
            return "other"
        if _ATTN_NAME.match(component) or _ATTN_CLASS.search(cls):
            return "attention"
        if _MLP_NAME.match(component) or _MLP_CLASS.search(cls):
            return "mlp"
    return "other"


def outside_kind(name: str, model: torch.nn.Module | None = None) -> str:
    """``embedding``, ``head`` or ``other`` for a parameter outside the layers."""
    owner = name.rsplit(".", 1)[0] if "." in name else ""
    if model is not None:
        module = _get(model, owner)
        out_emb = _call(model, "get_output_embeddings")
        in_emb = _call(model, "get_input_embeddings")
        if module is not None and out_emb is not None and module is out_emb and module is not in_emb:
            return "head"
        if module is not None and (module is in_emb or isinstance(module, torch.nn.Embedding)):
            return "embedding"
    parts = owner.split(".") if owner else []
    if any(_HEAD_NAME.match(p) for p in parts):
        return "head"
    if any(_EMBED_NAME.search(p) for p in parts):
        return "embedding"
    return "other"


def partition(named: Iterable[tuple[str, int]], structure: str | BlockFn = "layer",
              model: torch.nn.Module | None = None, params: Mapping[str, torch.Tensor] | None = None,
              aliases: Mapping[str, tuple[str, ...]] | None = None) -> Partition:
    """Blocks for ``(name, numel)`` pairs under ``structure`` (``layer``, ``layer_type``, ``model``, callable).

    A callable receives ``(name, tensor)`` (``params[name]`` when given) and returns a block key or
    None to leave the parameter out. Built-in structures order blocks as embedding, layers in
    index order, other, head; a callable's blocks keep the order of first appearance.
    """
    named = list(named)
    stacks = {layer_of(n)[0] for n, _ in named if layer_of(n) is not None}
    labels = _stack_labels(stacks)
    keyed: list[tuple[tuple, str, str, int]] = []
    excluded: list[str] = []
    for pos, (name, numel) in enumerate(named):
        if callable(structure):
            tensor = params[name] if params is not None else torch.empty(0)
            key = structure(name, tensor)
            if key is None:
                excluded.append(name)
                continue
            keyed.append(((pos,), str(key), name, numel))
            continue
        if structure == "model":
            keyed.append(((0,), "model", name, numel))
            continue
        if structure not in ("layer", "layer_type"):
            raise PracError(f"block_structure must be layer, layer_type, model or a callable; got {structure!r}")
        keyed.append((*_builtin_key(name, structure, model, labels), name, numel))
    order: dict[str, tuple] = {}
    members: dict[str, list[tuple[str, int]]] = {}
    for sort_key, key, name, numel in keyed:
        order.setdefault(key, sort_key)
        members.setdefault(key, []).append((name, numel))
    keys = sorted(order, key=lambda k: order[k])
    blocks = tuple(Block(k, tuple(n for n, _ in members[k]), tuple(s for _, s in members[k])) for k in keys)
    label = structure if isinstance(structure, str) else f"callable:{getattr(structure, '__qualname__', repr(structure))}"
    return Partition(blocks, tuple(excluded), dict(aliases or {}), label)


def partition_model(model: torch.nn.Module, structure: str | BlockFn = "layer") -> Partition:
    """:func:`partition` over ``model.named_parameters()`` — each tied parameter once, under its first name."""
    params = dict(model.named_parameters())
    aliases: dict[str, list[str]] = {}
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = seen.setdefault(id(p), name)
        if first != name:
            aliases.setdefault(first, []).append(name)
    return partition([(n, p.numel()) for n, p in params.items()], structure, model, params,
                     {k: tuple(v) for k, v in aliases.items()})


_KIND_ORDER = {"attention": 0, "mlp": 1, "other": 2}


def _builtin_key(name: str, structure: str, model, labels: Mapping[str, str]) -> tuple[tuple, str]:
    where = layer_of(name)
    if where is None:
        kind = outside_kind(name, model)
        rank = {"embedding": 0, "other": 2, "head": 3}[kind]
        return (rank, 0, 0, 0), kind
    stack, index = where
    prefix = labels[stack]
    key = f"{prefix}layer_{index}"
    stack_rank = sorted(labels).index(stack)
    if structure == "layer":
        return (1, stack_rank, index, 0), key
    kind = kind_in_layer(name, model)
    return (1, stack_rank, index, _KIND_ORDER[kind]), f"{key}.{kind}"


def _stack_labels(stacks: set[str]) -> dict[str, str]:
    """'' for a single stack; else the shortest distinguishing suffix of each stack's parent path."""
    if len(stacks) <= 1:
        return {s: "" for s in stacks}
    labels = {}
    for s in stacks:
        parent = s.rsplit(".", 1)[0] if "." in s else s
        labels[s] = parent.rsplit(".", 1)[-1]
    if len(set(labels.values())) < len(labels):
        labels = {s: s.rsplit(".", 1)[0] if "." in s else s for s in stacks}
    return {s: f"{v}." for s, v in labels.items()}


def _get(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _call(model, method: str):
    fn = getattr(model, method, None)
    if fn is None:
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError):
        return None
