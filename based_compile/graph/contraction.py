"""A contraction read canonically: which axis of each factor it sums, and where the others go.

``bmm(a, b)`` (a matmul or einsum's lowering), and a product summed over one axis
(``(x[..., :, None] * y[..., None, :]).sum(t)``, a broadcast einsum), are one thing here: two factors,
and for each axis of each factor the output axis it becomes, ``SUMMED``, or ``BROADCAST`` (a size-one
axis against a longer one). With ``read_views`` down each factor to the tensor it reads (``axes_of``:
the same for each axis of that tensor), a reader asks "which axis of phi(k) does this sum", "where do
v's features go", whatever the spelling: matmul or einsum, either operand order, transposed,
broadcast (the non-causal state product, ``linear_form``; the initial states read by phi(q) beside a
quadratic form, ``state_readout``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .canonicalize import hint_shape

aten = torch.ops.aten

SUMMED, BROADCAST = "summed", "broadcast"


@dataclass(frozen=True)
class Contraction:
    """A ``bmm`` or a product summed over one axis: its two factors, and for each axis of each factor
    the output axis it becomes, ``SUMMED``, or ``BROADCAST`` (a size-one axis against a longer one)."""

    node: fx.Node
    factors: tuple
    where: tuple


def contraction(node) -> Contraction | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.bmm.default and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return Contraction(node, tuple(node.args[:2]), ((0, 1, SUMMED), (0, SUMMED, 2)))
    if node.target is not aten.sum.dim_IntList or len(node.args) < 2 or node.args[1] is None \
            or len(node.args[1]) != 1:
        return None
    prod = node.args[0]
    if not isinstance(prod, fx.Node) or prod.op != "call_function" or prod.target is not aten.mul.Tensor \
            or not all(isinstance(a, fx.Node) for a in prod.args[:2]):
        return None
    out = hint_shape(prod)
    rank = len(out)
    dim = node.args[1][0] % rank
    keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    where = []
    for factor in prod.args[:2]:
        shape = hint_shape(factor)
        shift = rank - len(shape)
        axes = []
        for i, size in enumerate(shape):
            m = i + shift
            if size == 1 and out[m] > 1:
                axes.append(BROADCAST)
            elif m == dim:
                axes.append(SUMMED)
            else:
                axes.append(m if keepdim or m < dim else m - 1)
        where.append(tuple(axes))
    return Contraction(node, tuple(prod.args[:2]), tuple(where))


def axes_of(chain, where: tuple, rank: int) -> list:
    """For each axis of ``chain``'s base (of rank ``rank``): what the contraction does with it
    (``Contraction.where`` of the factor the chain starts at), or None where a view merges or splits it."""
    out = []
    for axis in range(rank):
        at = chain.lands(axis)
        out.append(None if at is None else where[at])
    return out
