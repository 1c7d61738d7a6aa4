"""Model plumbing: find the repeated blocks, their prunable linears, and the inputs they receive.

Nothing here knows an architecture by name. Blocks are the model's longest ``nn.ModuleList`` of
identical modules (preferring classes in ``_no_split_modules``); prunable layers are every
``nn.Linear`` and HF ``Conv1D`` inside a block; block inputs are captured with a forward
pre-hook that records *every* positional and keyword argument the model passes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prac.core.errors import PracError
from prac.model.experts import ExpertLinear

try:  # HF's transposed linear used by GPT-2
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment]

#: Module types whose ``weight`` prac prunes; :class:`prac.model.experts.ExpertLinear` exists only while
#: :func:`prac.model.experts.expert_views` presents a block's fused experts as linears.
PRUNABLE = (nn.Linear, Conv1D, ExpertLinear) if Conv1D else (nn.Linear, ExpertLinear)


@dataclass
class Blocks:
    path: str
    modules: nn.ModuleList

    def __len__(self) -> int:
        return len(self.modules)

    def name(self, index: int) -> str:
        return f"{self.path}.{index}"


def find_blocks(model: nn.Module) -> Blocks:
    """The model's repeated blocks: the longest ModuleList of identical, prunable-layer-holding modules."""
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    seen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(m).__name__ for m in module}
        seen.append(f"{name or '<root>'}[{len(module)} x {'/'.join(sorted(classes))}]")
        if len(classes) != 1 or not any(isinstance(m, PRUNABLE) for m in module[0].modules()):
            continue
        preferred = next(iter(classes)) in no_split
        candidates.append((preferred, len(module), -len(candidates), name, module))
    if not candidates:
        found = ", ".join(seen) if seen else "no ModuleList at all"
        raise PracError(
            f"unknown architecture {type(model).__name__}: no repeated blocks of linear layers found "
            f"(ModuleLists: {found}; _no_split_modules: {sorted(no_split) or 'none'})"
        )
    _, _, _, name, module = max(candidates, key=lambda c: c[:3])
    return Blocks(name, module)


def find_linears(block: nn.Module, prefix: str = "", ignore: str | None = None) -> dict[str, nn.Module]:
    """Prunable layers of ``block`` by full name, minus those whose full name matches ``ignore`` and
    minus the routers of MoE blocks (:func:`prac.model.experts.routers`). A block's fused experts appear
    here only inside :func:`prac.model.experts.expert_views`."""
    from prac.model.experts import routers

    pattern = re.compile(ignore) if ignore else None
    skip = {id(m) for m in routers(block).values()}
    out = {}
    for name, module in block.named_modules():
        if isinstance(module, PRUNABLE) and id(module) not in skip:
            full = f"{prefix}.{name}" if prefix else name
            if pattern is None or not pattern.search(full):
                out[full] = module
    return out


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if _transposed(module) else module.weight.shape[1]


def _transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as fp32 ``[out_features, in_features]`` (a copy)."""
    w = module.weight.detach()
    return (w.T if _transposed(module) else w).to(torch.float32).clone()


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` fp32 weight back in the module's own layout and dtype."""
    w = weight.T if _transposed(module) else weight
    module.weight.data.copy_(w.to(module.weight.dtype))


@contextlib.contextmanager
def pre_hooks(hooks: dict[nn.Module, Callable], with_kwargs: bool = False) -> Iterator[None]:
    """Register a forward pre-hook on each module for the duration of the block, then remove them all."""
    handles = [m.register_forward_pre_hook(fn, with_kwargs=with_kwargs) for m, fn in hooks.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def input_recorder(sink: Callable[..., None], routed: bool = False) -> Callable:
    """A pre-hook that hands the module's first positional input to ``sink``; with ``routed``, also
    the :class:`prac.model.experts.Route` an expert linear was called with (None for other modules)."""

    def hook(_module, args):
        if routed:
            sink(args[0], args[1] if len(args) > 1 else None)
        else:
            sink(args[0])

    return hook


class _StopForward(Exception):
    """Raised by a hook so the forward does not run past the point it needs (the first block's
    input at capture; the last recorded layer input of a calibration chunk)."""


StopForward = _StopForward


def stopping(hook: Callable) -> Callable:
    """The pre-hook ``hook``, then stop the forward: nothing after this module is needed."""

    def stop(module, args):
        hook(module, args)
        raise _StopForward

    return stop


def run_block_until(block: nn.Module, inputs: BlockInputs, index: int, device: torch.device) -> None:
    """:func:`run_block` for its hooks only: a :func:`stopping` hook may end it early."""
    try:
        run_block(block, inputs, index, device)
    except _StopForward:
        pass


@dataclass
class BlockInputs:
    """What the model passes to its first block, one entry per calibration batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)  # positional arguments after hidden_states
    kwargs: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def move_outside_blocks(model: nn.Module, blocks: Blocks, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the blocks (embeddings, rotary, norms, head)."""
    inside = {id(p) for p in blocks.modules.parameters()} | {id(b) for b in blocks.modules.buffers()}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in inside and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and id(buf) not in inside and buf.device != device:
                module._buffers[key] = buf.to(device)


def capture_block_inputs(
    model: nn.Module, blocks: Blocks, batches: Iterator[torch.Tensor], device: torch.device, store: torch.device
) -> BlockInputs:
    """Run the model up to its first block for each batch of token ids; keep the block's inputs on ``store``."""
    captured = BlockInputs()

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        captured.hidden.append(hidden.detach().to(store))
        captured.args.append(_to(tuple(args[1:]), store))
        captured.kwargs.append(_to(kwargs, store))
        raise _StopForward

    move_outside_blocks(model, blocks, device)
    try:
        with pre_hooks({blocks.modules[0]: hook}, with_kwargs=True), torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), **_forward_flags(model))
                except _StopForward:
                    pass
    finally:
        move_outside_blocks(model, blocks, torch.device("cpu"))
    return captured


def _forward_flags(model: nn.Module) -> dict[str, Any]:
    return {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned (a tensor, or the first element of a tuple/ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    raise TypeError(f"cannot read hidden states from a block output of type {type(out).__name__}")


def run_block(block: nn.Module, inputs: BlockInputs, index: int, device: torch.device) -> torch.Tensor:
    """Forward one captured batch through ``block`` on ``device``."""
    hidden = inputs.hidden[index].to(device)
    args = _to(inputs.args[index], device)
    kwargs = _to(inputs.kwargs[index], device)
    return block_output(block(hidden, *args, **kwargs))


def group_by_input(block: nn.Module, linears: dict[str, nn.Module], inputs: BlockInputs, device: torch.device,
                   calls: dict[str, int] | None = None) -> list[list[str]]:
    """Group linears that read the very same input tensor (q/k/v, gate/up), in forward order.

    One probe forward on the first batch records which tensor object each linear received (and,
    into ``calls``, how many times each linear was called).
    """
    seen: dict[str, torch.Tensor] = {}
    counts = calls if calls is not None else {}

    def record(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x)
        counts[name] = counts.get(name, 0) + 1

    hooks = {module: input_recorder(lambda x, _name=name: record(_name, x)) for name, module in linears.items()}
    with pre_hooks(hooks), torch.no_grad():
        run_block(block, inputs, 0, device)
    groups: list[list[str]] = []
    owners: list[torch.Tensor] = []
    for name in seen:  # dict order = call order
        for g, tensor in zip(groups, owners):
            if seen[name] is tensor:
                g.append(name)
                break
        else:
            groups.append([name])
            owners.append(seen[name])
    unused = [n for n in linears if n not in seen]
    return groups + [[n] for n in unused]
