"""The dense model's stream beside the pruned one (``--dense-target``, ``--reconstruct``).

Before a block is calibrated, the still dense block runs once over the dense stream
(:func:`dense_pass`): every input group's dense input is kept per batch (:class:`DenseInputs`; with
``--dense-target``, for the drift statistics), and the dense sublayers' outputs (``--reconstruct
sublayer``, their targets); the stream is replaced by the block's output, the next block's dense input.
:func:`drift_projection` says how a group's drift is accumulated.
"""

from __future__ import annotations

import torch

from prac.core.errors import PracError
from prac.engine.memory import dense_inputs_store
from prac.engine.reconstruct import sublayers_of
from prac.model.blocks import BlockInputs, block_output, input_recorder, pre_hooks, run_block
from prac.model.experts import Route, dense_gate_weights, gated
from prac.model.group import InputGroup
from prac.model.units import Unit


class DenseInputs:
    """A block's inputs in the dense stream, per calibration batch: ``plain`` per group (its first
    linear's name), ``moe`` per experts module (its input, every token, with the experts' dense gate/up
    weights kept before any is pruned). :meth:`input` gives a unit's dense input for a batch, for an
    expert on the tokens of its route."""

    def __init__(self, plain: dict[str, list[torch.Tensor]], slots: dict, device: torch.device):
        self.plain, self.slots, self.device = plain, slots, device
        self.sublayers: dict[str, list[torch.Tensor]] | None = None  # dense sublayer outputs (reconstruction)
        self.moe: dict[str, list[torch.Tensor]] = {path: [] for path in slots}
        self._weights = {path: dense_gate_weights(slot.module, slot.layout) for path, slot in slots.items()}

    def input(self, unit: Unit, batch: int, route: Route | None) -> torch.Tensor:
        slot = unit.expert
        if slot is None:
            return self.plain[unit.name][batch]
        kept = self.moe[slot.experts][batch]
        x = kept[route.tokens.to(kept.device)].to(self.device)
        if slot.reads_block_input:
            return x
        parts = [torch.nn.functional.linear(x, w, b) for w, b in self._weights[slot.experts][slot.index]]
        return gated(slot.module, slot.layout, parts)


def dense_pass(block, units: dict[str, Unit], dense: BlockInputs, grouping, device: torch.device,
               keep_inputs: bool, sublayers: bool) -> DenseInputs:
    """The dense stream through the (still dense) block: with ``keep_inputs`` every group's input per
    batch, kept beside the activations when they fit (:func:`prac.engine.memory.dense_inputs_store`);
    with ``sublayers`` the block's sublayers' outputs; the block's outputs become the stream's next
    inputs. For MoE experts the experts module's input (every token) is kept instead, with the
    experts' dense gate/up weights: the tokens an expert gets in the pruned model are not those the
    dense model routes to it, so its dense inputs are computed for the tokens it gets there
    (:meth:`DenseInputs.input`)."""
    names, calls = grouping
    firsts = [group[0] for group in names]
    repeated = [n for n in units if calls.get(n, 0) > 1]
    if repeated:
        raise PracError(f"--dense-target needs every linear to run once per block forward; {repeated[0]} runs "
                        f"{calls[repeated[0]]} times (use --no-dense-target)")
    plain = [n for n in firsts if units[n].expert is None] if keep_inputs else []
    slots = ({units[n].expert.experts: units[n].expert for n in firsts if units[n].expert is not None}
             if keep_inputs else {})
    cached = DenseInputs({name: [] for name in plain}, slots, device)
    tokens = sum(h.shape[0] * h.shape[1] for h in dense.hidden)  # every group's inputs at once
    width = sum(units[n].in_features for n in plain) + dense.hidden[0].shape[-1] * len(slots)
    store = dense_inputs_store(tokens * width * dense.hidden[0].element_size(), dense.hidden[0].device)
    hooks = {units[n].module: input_recorder(lambda x, _n=n: cached.plain[_n].append(x.detach().to(store)))
             for n in plain}
    hooks.update({slot.module: input_recorder(lambda x, _p=path: cached.moe[_p].append(x.detach().to(store)))
                  for path, slot in slots.items()})
    taps = []
    if sublayers:  # the dense sublayers' outputs: their targets
        modules = {id(m): n for n, m in block.named_modules()}
        heads = sublayers_of(block, [modules[id(u.module)] for u in units.values()])
        cached.sublayers = {h: [] for h in heads}
        for h in heads:
            taps.append(block.get_submodule(h).register_forward_hook(
                lambda _m, _a, out, _h=h: cached.sublayers[_h].append(block_output(out).detach().to(store))))
    try:
        with pre_hooks(hooks), torch.no_grad():
            for j in range(len(dense)):
                dense.hidden[j] = run_block(block, dense, j, device).to(dense.hidden[j].device)
    finally:
        for t in taps:
            t.remove()
    return cached


def drift_projection(group: InputGroup, units: dict[str, Unit], device: torch.device) -> dict[str, torch.Tensor] | None:
    """The dense weights of a group whose linears have fewer outputs in all than inputs (down_proj):
    its drift is then kept as W₀ D per linear, out × in instead of in × in per token."""
    outs = {n: units[n].out_features for n in group.names}
    if sum(outs.values()) >= group.stats.dim:
        return None
    group.stats.drift_per_linear(outs)
    return {n: units[n].read().to(device) for n in group.names}
