"""Mixture-of-experts plumbing: the fused experts of transformers 5 presented as prunable linears.

transformers 5 stores the experts of an MoE block fused, as 3-D parameters of one module
(``MixtralExperts.gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``; the same in Qwen2/3-MoE,
OLMoE, DeepSeek-V2/V3, ...), and declares the layout on the module (``use_experts_implementation``:
``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``, ``has_post_expert_norm``, and the
module's own ``_apply_gate``). Nothing there is an ``nn.Linear``, so a prune of linears alone would
leave about 96% of a Mixtral block dense.

While a block is being processed, :func:`expert_views` gives each experts module ``E`` children
``"0" … "E-1"`` (:class:`ExpertMLP`), each holding :class:`ExpertLinear` ``gate_proj``/``up_proj``/
``down_proj`` whose weights are *views* into the fused parameters (so a pruned weight written into a
view lands in the fused tensor, in transformers' own layout), and replaces the module's forward by
:func:`routed_forward`: the eager computation of transformers, token gathering per expert included,
but calling those linears with a :class:`Route` (which tokens, with which routing weight). Every
expert is called on every forward, with an empty batch when the router sent it nothing, so hooks,
grouping (gate/up of one expert read one tensor) and call counts are the same in every batch and on
every process. The full names are ``<experts>.<e>.gate_proj`` etc., the names of the unfused
checkpoints, which is what ``--ignore`` matches.

The reading of a layout is checked, not assumed: :func:`check_experts` runs the module's own forward
and :func:`routed_forward` on random tokens and routing, and a layout that does not reproduce the
module is a one-line error naming the parameter.

Routers (``mlp.gate``, ``shared_expert_gate``, any weight of the MoE block outside the experts whose
output has at most ``E`` rows) are never pruned: :func:`routers` names them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from prac.core.errors import PracError


@dataclass(frozen=True)
class Route:
    """Which tokens an expert gets in one forward: ``tokens`` (indices into the ``total`` flattened
    tokens of the batch, ascending) with their routing ``weight`` (how much of the expert's output
    reaches the block's output)."""

    tokens: torch.Tensor
    weight: torch.Tensor
    total: int


@dataclass(frozen=True)
class ExpertSlot:
    """Where an expert projection lives: the experts module (``experts``: its full name), the expert
    ``index`` and the ``projection`` (``gate_proj``, ``up_proj`` or ``down_proj``)."""

    experts: str
    index: int
    projection: str
    module: nn.Module = field(compare=False, repr=False)
    layout: Layout = field(compare=False, repr=False)

    @property
    def reads_block_input(self) -> bool:
        """gate/up read the tokens routed to the expert; down reads the expert's own hidden state."""
        return self.projection != "down_proj"


@dataclass(frozen=True)
class Layout:
    """How a fused experts module stores its weights (transformers' own flags, with their defaults)."""

    num_experts: int
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True
    has_post_expert_norm: bool = False

    @property
    def projections(self) -> tuple[str, ...]:
        return ("gate_proj", "up_proj", "down_proj") if self.has_gate else ("up_proj", "down_proj")


def read_layout(module: nn.Module) -> Layout | None:
    """The layout of a fused experts module, or None when ``module`` is not one (no 3-D ``down_proj``
    next to a 3-D ``gate_up_proj`` or ``up_proj``)."""
    params = module._parameters
    down = params.get("down_proj")
    up = params.get("gate_up_proj") if "gate_up_proj" in params else params.get("up_proj")
    if down is None or up is None or down.dim() != 3 or up.dim() != 3:
        return None
    return Layout(num_experts=int(down.shape[0]), has_gate="gate_up_proj" in params,
                  has_bias=bool(getattr(module, "has_bias", False)),
                  is_transposed=bool(getattr(module, "is_transposed", False)),
                  is_concatenated=bool(getattr(module, "is_concatenated", True)),
                  has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)))


class ExpertLinear(nn.Module):
    """One projection of one expert: ``weight`` ``[out, in]`` (and ``bias``) are views into the fused
    parameters; ``forward(x, route)`` is ``F.linear`` (the route is for the hooks that record inputs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = int(weight.shape[1]), int(weight.shape[0])

    def forward(self, x: torch.Tensor, route: Route | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fused view"


class ExpertMLP(nn.Module):
    """Expert ``index`` of a fused experts module as linears (views)."""

    def __init__(self, index: int, projections: dict[str, ExpertLinear]):
        super().__init__()
        self.index = index
        for name, linear in projections.items():
            self.add_module(name, linear)


def _halves(t: torch.Tensor, concatenated: bool, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up parts of a fused gate/up tensor along ``dim`` (concatenated or interleaved)."""
    n = t.shape[dim]
    if concatenated:
        return t.narrow(dim, 0, n // 2), t.narrow(dim, n // 2, n // 2)
    index = [slice(None)] * t.dim()
    gate, up = list(index), list(index)
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return t[tuple(gate)], t[tuple(up)]


def _expert_mlp(module: nn.Module, layout: Layout, e: int) -> ExpertMLP:
    """Views of expert ``e``'s weights as ``[out, in]`` matrices."""
    p = module._parameters

    def oriented(w: torch.Tensor) -> torch.Tensor:  # [in, out] when transposed
        return w.T if layout.is_transposed else w

    out_dim = 1 if layout.is_transposed else 0  # the output axis of one expert's 2-D slice
    projections: dict[str, ExpertLinear] = {}
    if layout.has_gate:
        gate_w, up_w = _halves(p["gate_up_proj"].data[e], layout.is_concatenated, out_dim)
        bias = p.get("gate_up_proj_bias") if layout.has_bias else None
        gate_b, up_b = _halves(bias.data[e], layout.is_concatenated, 0) if bias is not None else (None, None)
        projections["gate_proj"] = ExpertLinear(oriented(gate_w), gate_b)
        projections["up_proj"] = ExpertLinear(oriented(up_w), up_b)
    else:
        bias = p.get("up_proj_bias") if layout.has_bias else None
        projections["up_proj"] = ExpertLinear(oriented(p["up_proj"].data[e]), bias.data[e] if bias is not None else None)
    bias = p.get("down_proj_bias") if layout.has_bias else None
    projections["down_proj"] = ExpertLinear(oriented(p["down_proj"].data[e]), bias.data[e] if bias is not None else None)
    return ExpertMLP(e, projections)


def gated(module: nn.Module, layout: Layout, parts: list[torch.Tensor]) -> torch.Tensor:
    """The expert's hidden state from its projections' outputs (``[gate, up]``, or ``[up]`` without a
    gate): the module's own ``_apply_gate`` on them in its concatenated or interleaved order, or its
    activation."""
    if not layout.has_gate:
        return module.act_fn(parts[0])
    gate, up = parts
    fused = torch.cat([gate, up], dim=-1) if layout.is_concatenated else torch.stack([gate, up], dim=-1).flatten(-2)
    return module._apply_gate(fused) if hasattr(module, "_apply_gate") else module.act_fn(gate) * up


def expert_hidden(module: nn.Module, layout: Layout, mlp: ExpertMLP, x: torch.Tensor,
                  route: Route | None = None) -> torch.Tensor:
    """The input of the expert's down projection for tokens ``x``."""
    parts = [mlp.gate_proj(x, route), mlp.up_proj(x, route)] if layout.has_gate else [mlp.up_proj(x, route)]
    return gated(module, layout, parts)


def dense_gate_weights(module: nn.Module, layout: Layout) -> list[list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Per expert, copies of the ``(weight, bias)`` of its gate/up projections (inside :func:`expert_views`)."""
    out = []
    for e in range(layout.num_experts):
        mlp = module._modules[str(e)]
        linears = (mlp.gate_proj, mlp.up_proj) if layout.has_gate else (mlp.up_proj,)
        out.append([(lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
                    for lin in linears])
    return out


def routed_forward(module: nn.Module, layout: Layout, experts: list[ExpertMLP]):
    """The experts module's forward over the linears of ``experts`` (transformers' eager computation:
    each expert on the tokens routed to it, its output scaled by the routing weight and summed per
    token, in fp32), calling every expert — on an empty batch when it gets no token."""

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        total, k = hidden_states.shape[0], top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # pairs grouped by expert, tokens ascending in each
        counts = torch.bincount(flat, minlength=layout.num_experts)[: layout.num_experts].tolist()
        tokens, weights = order // k, top_k_weights.reshape(-1)[order]
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        start = 0
        for mlp, count in zip(experts, counts):
            route = Route(tokens[start:start + count], weights[start:start + count], total)
            start += count
            x = hidden_states[route.tokens]
            y = mlp.down_proj(expert_hidden(module, layout, mlp, x, route), route)
            if layout.has_post_expert_norm:
                y = module.post_expert_norm(y)
            out.index_add_(0, route.tokens, y.float() * route.weight.float().unsqueeze(-1))
        return out.to(hidden_states.dtype)

    return forward


def find_experts(root: nn.Module) -> dict[str, tuple[nn.Module, Layout]]:
    """Every fused experts module under ``root`` by its name (relative to ``root``)."""
    out = {}
    for name, module in root.named_modules():
        layout = read_layout(module)
        if layout is not None:
            out[name] = (module, layout)
    return out


def left_dense(module: nn.Module, layout: Layout, full: str, ignore: str | None) -> bool:
    """Whether ``--ignore`` leaves the experts module ``full`` dense: it matches one of its fused
    parameters' names, or the name of every one of its expert projections."""
    if not ignore:
        return False
    pattern = re.compile(ignore)
    if any(pattern.search(f"{full}.{name}") for name, p in module._parameters.items() if p is not None and p.dim() == 3):
        return True
    return all(pattern.search(f"{full}.{e}.{proj}") for e in range(layout.num_experts) for proj in layout.projections)


@contextlib.contextmanager
def expert_views(root: nn.Module, prefix: str = "", ignore: str | None = None) -> Iterator[dict[str, nn.Module]]:
    """While inside: every fused experts module under ``root`` (but those ``ignore`` leaves dense, see
    :func:`left_dense`; names are ``prefix``-relative) has children ``"0" … "E-1"`` whose linears are
    views into its parameters, and runs :func:`routed_forward` over them. Yields the experts modules
    by name. ``root`` must not be moved to another device while inside (views would be copied apart
    from the fused tensor); the children and the forward are removed on exit."""
    installed: list[tuple[nn.Module, list[str], object]] = []
    found = {path: (module, layout) for path, (module, layout) in find_experts(root).items()
             if not left_dense(module, layout, ".".join(p for p in (prefix, path) if p), ignore)}
    try:
        for module, layout in found.values():
            experts = [_expert_mlp(module, layout, e) for e in range(layout.num_experts)]
            for mlp in experts:
                module.add_module(str(mlp.index), mlp)
            original = module.__dict__.get("forward")
            module.forward = routed_forward(module, layout, experts)
            installed.append((module, [str(m.index) for m in experts], original))
        yield {name: module for name, (module, _) in found.items()}
    finally:
        for module, names, original in installed:
            for name in names:
                del module._modules[name]
            if original is None:
                del module.forward
            else:
                module.forward = original


def expert_of(name: str, experts: dict[str, tuple[nn.Module, Layout]], prefix: str = "") -> ExpertSlot | None:
    """The :class:`ExpertSlot` of an expert linear by its full name (``experts``: :func:`find_experts`
    of the block whose name is ``prefix``), or None."""
    for path, (module, layout) in experts.items():
        full = f"{prefix}.{path}" if prefix else path
        if name.startswith(full + "."):
            rest = name[len(full) + 1:].split(".")
            if len(rest) == 2 and rest[0].isdigit():
                return ExpertSlot(full, int(rest[0]), rest[1], module, layout)
    return None


def routers(root: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """The routers of every MoE block under ``root`` (full name of the module -> module): inside the
    parent of an experts module, outside the experts, a module whose 2-D weight has at most ``E``
    output rows (``mlp.gate``, ``shared_expert_gate``, top-k routers of any class)."""
    out: dict[str, nn.Module] = {}
    names = dict(root.named_modules())
    for path, (experts, layout) in find_experts(root).items():
        parent_path = path.rpartition(".")[0]
        parent = names[parent_path] if parent_path else root
        for sub, module in parent.named_modules():
            full = ".".join(p for p in (parent_path, sub) if p)
            if module is experts or full.startswith(path + ".") or module is parent:
                continue
            weight = module._parameters.get("weight")
            if weight is not None and weight.dim() == 2 and weight.shape[0] <= layout.num_experts:
                out[".".join(p for p in (prefix, full) if p)] = module
    return out


def check_experts(root: nn.Module, prefix: str = "", samples: int = 24, seed: int = 0) -> None:
    """Fail with one line, naming the parameter, when prac's reading of an experts module's layout does
    not reproduce the module's own forward on random tokens and routing (a layout prac does not know)."""
    generator = torch.Generator().manual_seed(seed)
    for path, (module, layout) in find_experts(root).items():
        param = next(n for n in ("gate_up_proj", "up_proj") if n in module._parameters)
        full = ".".join(p for p in (prefix, path, param) if p)
        dtype = module._parameters[param].dtype
        device = module._parameters[param].device
        if device.type == "meta":  # a skeleton without weights (prac.model.loading.model_skeleton): checked once loaded
            continue
        hidden = int(module._parameters["down_proj"].shape[2 if layout.is_transposed else 1])
        k = min(2, layout.num_experts)
        x = torch.randn(samples, hidden, generator=generator).to(device=device, dtype=dtype)
        index = torch.stack([torch.randperm(layout.num_experts, generator=generator)[:k] for _ in range(samples)])
        weights = torch.rand(samples, k, generator=generator).to(device=device, dtype=dtype)
        index = index.to(device)
        try:
            with torch.no_grad():
                expected = module(x, index, weights)
                with expert_views(module):
                    got = module(x, index, weights)
        except Exception as exc:  # noqa: BLE001 — any failure means the layout is not understood
            raise PracError(f"cannot prune {full}: prac cannot run {type(module).__name__}'s fused experts "
                            f"({type(exc).__name__}: {exc}); --ignore it to leave the experts dense") from exc
        scale = float(expected.float().abs().max().clamp_min(1e-6))
        tolerance = 1e-4 if dtype == torch.float32 or dtype == torch.float64 else 3e-2
        if got.shape != expected.shape or float((got.float() - expected.float()).abs().max()) > tolerance * scale:
            raise PracError(f"cannot prune {full}: its fused layout ({type(module).__name__}) is one prac does not "
                            f"know (its reading does not reproduce the module's forward); --ignore it to leave the "
                            f"experts dense")
