"""Sums of per-batch terms in one fixed order, whatever the number of processes that computed them.

Float addition is not associative: a sum of calibration statistics accumulated batch after batch in
one process, and the same sum made of two partial sums from two processes, differ in the last bits
— enough for SparseGPT's column sweep to flip near-ties. Here every term belongs to a *leaf*, the
global index of its calibration batch, and leaves are added along one fixed binary tree over those
indices: node ``[a, a + 2^k)`` (``a`` a multiple of ``2^k``) is the sum of its two halves, left + right.

A process pushes its leaves in order onto a stack and merges the top two entries whenever they are
siblings (a binary counter): what remains is the decomposition of its contiguous run of leaves into
maximal aligned nodes (at most two per level). Pushing the stacks of several processes, in the
order of their runs, onto one stack performs exactly the merges that pushing every leaf in one
process does, so each node has the same value, bit for bit; the remaining nodes (those of the binary
decomposition of ``[0, n)``) are folded right to left. So the total is the same for any split of the
leaves into contiguous runs — 1, 2 or 3 processes — and the stack holds at most ``log2(n) + 1`` terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Node:
    """The sum of the leaves ``[start, start + size)``: one tensor per field (the same fields in every node)."""

    start: int
    size: int
    tensors: dict[str, torch.Tensor]

    def sibling_of(self, left: Node) -> bool:
        """Whether ``left`` and this node are the two halves of one node of the tree."""
        return (left.size == self.size and left.start % (2 * self.size) == 0
                and self.start == left.start + left.size)


def _add_into(into: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> None:
    for key, value in other.items():
        into[key].add_(value.to(into[key].device))


def push(stack: list[Node], node: Node) -> None:
    """Put ``node`` (the next run of leaves, right after the stack's last) on ``stack`` and merge siblings."""
    stack.append(node)
    while len(stack) >= 2 and stack[-1].sibling_of(stack[-2]):
        right = stack.pop()
        left = stack[-1]
        _add_into(left.tensors, right.tensors)  # left + right, in place (IEEE addition commutes)
        left.size *= 2


def fold(stack: list[Node]) -> dict[str, torch.Tensor] | None:
    """The total of a stack: its nodes added right to left (None for an empty stack)."""
    if not stack:
        return None
    total = stack[-1].tensors
    for node in reversed(stack[:-1]):
        _add_into(node.tensors, total)  # node + (everything to its right)
        total = node.tensors
    return total


def combine(runs: list[list[Node]]) -> dict[str, torch.Tensor] | None:
    """The total of several processes' stacks, given in the order of their runs of leaves."""
    stack: list[Node] = []
    for nodes in runs:
        for node in nodes:
            push(stack, node)
    return fold(stack)
