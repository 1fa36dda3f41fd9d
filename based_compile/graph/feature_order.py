"""Which feature of x each feature of a feature-map piece holds, proven through the views between them.

The feature-map reader (``feature_map``) reads a piece by its degree in x and its width; that alone does
not say which x_a (or x_a x_b) lands at which feature. Views are the only ops the reader passes, and a
view reorders the features of an axis only by splitting or merging it (``x.unflatten(-1, (2, D // 2))
.transpose(-1, -2).flatten(-2)``: the same width, another order). So a piece is in the order its kind
claims when:

- "linear": x's feature axis reaches the piece's last axis whole (``feature_axis``), x_a at feature a;
- "outer": the piece is, through reshapes (and swaps of the two D axes: the product is symmetric), the
  last two axes of a product of two factors of x (``x.unsqueeze(-1) * x.unsqueeze(-2)``, expanded or not,
  or the bmm of [N, D, 1] by [N, 1, D]) merged row-major, one factor's features on each of those two axes
  and one value along the other: x_a x_b at feature a * D + b (``x.repeat_interleave(D, -1) ** 2`` holds
  x_a^2 there: refused);
- an elementwise square ("pairs" (a, a)): both factors' features on the product's last axis;
- a diagonal or a gather of index pairs of the product ("pairs"): the product, through reshapes that keep
  its last two axes whole and swaps of them, holds x_a x_b at [..., a, b] (``outer_block_in_order``);
- a tensor read through views above the map (a nested ``cat``, a gathered ``x[..., idx]``): the axis it
  contributes reaches the reader's last axis whole.

Everything here returns False when it cannot prove the order: the reader then does not read the piece.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .canonicalize import hint_shape, read_views

aten = torch.ops.aten

# views that keep the row-major order of the elements (a reshape of [.., D, D] to [.., D * D] is a * D + b)
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
             aten.clone.default, aten.contiguous.default, aten.alias.default, aten._to_copy.default,
             aten.lift_fresh_copy.default}


def feature_axis(gm, node: fx.Node, source: fx.Node) -> int | None:
    """Where ``source``'s last axis lands in ``node``, read down through views and same-shape scalar factors
    to ``source``; None when the walk does not reach it or a view splits or merges that axis."""
    chain = read_views(gm, node, until=source, same_shape=True)
    if chain.base is not source:
        return None
    return chain.lands(len(hint_shape(source) or ()) - 1)


def keeps_last_axis(gm, node: fx.Node, below: fx.Node) -> bool:
    """The views (and same-shape scalar factors) from ``node`` down to ``below`` carry ``below``'s last axis,
    whole, to ``node``'s last axis."""
    rank = len(hint_shape(node) or ())
    return rank > 0 and feature_axis(gm, node, below) == rank - 1


def linear_in_order(gm, node: fx.Node, source: fx.Node) -> bool:
    return keeps_last_axis(gm, node, source)


def square_in_order(gm, node: fx.Node, source: fx.Node) -> bool:
    """``node`` (width D) is x * x, x ** 2 or x.square() through views, feature a holding x_a^2."""
    chain = read_views(gm, node, same_shape=True)
    product = chain.base
    if not isinstance(product, fx.Node) or product.op != "call_function" \
            or chain.lands(len(hint_shape(product) or ()) - 1) != len(hint_shape(node)) - 1:
        return False
    if product.target is aten.mul.Tensor:
        factors = product.args[:2]
    elif product.target in (aten.pow.Tensor_Scalar, aten.square.default):
        factors = product.args[:1]
    else:
        return False
    rank = len(hint_shape(product))
    for f in factors:
        if not isinstance(f, fx.Node):
            return False
        axis = feature_axis(gm, f, source)
        if axis is None or axis + rank - len(hint_shape(f)) != rank - 1:
            return False
    return True


def outer_in_order(gm, node: fx.Node, source: fx.Node) -> bool:
    """``node`` (width D^2) is flatten(x (x) x): feature a * D + b holds x_a x_b (or x_b x_a)."""
    d = (hint_shape(source) or (0,))[-1]
    chain = read_views(gm, node, same_shape=True)
    product = chain.base
    if not isinstance(product, fx.Node) or product.op != "call_function" \
            or not all(v.target in _RESHAPES or _swaps_last_two(v, d) for v in chain.views):
        return False
    shape, out = hint_shape(product), hint_shape(node)
    if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (d, d) or out[-1] != d * d \
            or math.prod(shape[:-2]) != math.prod(out[:-1]):
        return False
    return _product_in_order(gm, product, source)


def outer_block_in_order(gm, node: fx.Node, source: fx.Node) -> bool:
    """``node`` (ending in [D, D]) is x (x) x unflattened: x_a x_b at [..., a, b] (or [..., b, a]), through
    same-shape scalar factors, swaps of its last two axes and reshapes that keep the [D, D] block whole (the
    product a diagonal or a gather of index pairs reads)."""
    d = (hint_shape(source) or (0,))[-1]
    chain = read_views(gm, node, same_shape=True)
    product = chain.base
    if not isinstance(product, fx.Node) or product.op != "call_function":
        return False
    for v in chain.views:
        if _swaps_last_two(v, d):
            continue
        shapes = (hint_shape(v.args[0]) or (), hint_shape(v) or ())
        if v.target not in _RESHAPES or any(len(s) < 2 or tuple(s[-2:]) != (d, d) for s in shapes) \
                or math.prod(shapes[0]) != math.prod(shapes[1]):
            return False
    shape, out = hint_shape(product), hint_shape(node)
    if shape is None or out is None or len(shape) < 2 or tuple(shape[-2:]) != (d, d) or tuple(out[-2:]) != (d, d):
        return False
    return _product_in_order(gm, product, source)


def _product_in_order(gm, product: fx.Node, source: fx.Node) -> bool:
    """``product`` (ending in [D, D]) multiplies x's features along its last two axes, one factor's on each,
    within one row of x: x_a x_b at [..., a, b]."""
    rank = len(hint_shape(product))
    if product.target is aten.mul.Tensor:
        a, b = product.args[:2]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            return False
        placed = []
        for f in (a, b):
            axis = feature_axis(gm, f, source)
            if axis is None:
                return False
            placed.append(axis + rank - len(hint_shape(f)))
        if sorted(placed) != [rank - 2, rank - 1]:
            return False
        # each factor holds one value along the other's feature axis (not x broadcast to a square)
        for f, other in ((a, placed[1]), (b, placed[0])):
            at = other - (rank - len(hint_shape(f)))
            if at >= 0 and hint_shape(f)[at] != 1 and not _broadcast_axis(gm, f, source, at):
                return False
        return _same_rows(gm, a, b, source, rank)
    if product.target is aten.bmm.default:
        a, b = product.args[:2]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or hint_shape(a)[-1] != 1:
            return False
        return feature_axis(gm, a, source) == 1 and feature_axis(gm, b, source) == 2 and \
            _same_rows(gm, a, b, source, 3)
    return False


def _swaps_last_two(view: fx.Node, d: int) -> bool:
    """A transpose (or permute) of exactly the last two axes of a tensor that ends in [D, D]: x_a x_b becomes
    x_b x_a, the same product (every reshape around it keeps the row-major order of the D * D block)."""
    shape = hint_shape(view.args[0]) if isinstance(view.args[0], fx.Node) else None
    if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (d, d):
        return False
    r = len(shape)
    if view.target is aten.transpose.int:
        return sorted((view.args[1] % r, view.args[2] % r)) == [r - 2, r - 1]
    if view.target is aten.permute.default:
        return [x % r for x in view.args[1]] == list(range(r - 2)) + [r - 1, r - 2]
    return False


def _broadcast_axis(gm, factor: fx.Node, source: fx.Node, at: int) -> bool:
    """Axis ``at`` of ``factor`` (views of ``source``) is none of x's axes: a unit axis added and expanded
    (``x.unsqueeze(-1).expand(..., D, D)``), along which the factor holds one value. Proven only when every
    axis of x longer than one lands whole in the factor (a merge of two of x's axes lands nowhere)."""
    chain = read_views(gm, factor, until=source, same_shape=True)
    shape = hint_shape(source) or ()
    landed = [chain.lands(axis) for axis in range(len(shape))]
    if any(x is None for x, size in zip(landed, shape) if size != 1):
        return False
    return at not in landed


def _same_rows(gm, a: fx.Node, b: fx.Node, source: fx.Node, rank: int) -> bool:
    """x's other axes (batch, heads, time) land on the same axes of the product in both factors: the product
    multiplies features of one row of x (a view that moves time in one factor only pairs two rows)."""
    chains = [read_views(gm, f, until=source, same_shape=True) for f in (a, b)]
    shift = [rank - len(hint_shape(f)) for f in (a, b)]
    for axis in range(len(hint_shape(source)) - 1):
        landed = [c.lands(axis) for c in chains]
        landed = [None if x is None else x + s for x, s in zip(landed, shift)]
        if landed[0] != landed[1]:
            return False
    return True
