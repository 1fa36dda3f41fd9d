"""A constant pad of the last axis is a cat: ``F.pad(x, (l, r), value=c)`` is ``torch.cat([c] * l + [x] + [c] * r,
-1)`` with each c a column of c's.

The Taylor feature map's ones column is written that way too (``F.pad(x / d ** 0.25, (1, 0), value=1.0)``, or the
whole map padded, ``F.pad(torch.cat([x, x2], -1), (1, 0), value=1.0)``); the feature-map reader reads a ``cat``.
``read_constant_pads(gm)`` rewrites, in the lowered graph before matching, every ``constant_pad_nd`` of a floating
tensor that pads only its last axis, by widths that are not negative, with a number, as that ``cat`` (the columns
``full_like`` of a one-column slice of x, as ``torch.ones_like(x[..., :1])`` spells the ones column): the same
values and gradients, the same node (its users and any mapping to the model's graph are kept). Pads of another
axis (a token shifted in time), a crop (a negative width) and symbolic widths are left as written; the other
modes (``replicate``, ``reflect``) are other ops.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .canonicalize import example_value

aten = torch.ops.aten


def _widths(node: fx.Node):
    """(left, right) of a constant pad of the last axis alone, else None."""
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pad, (list, tuple)) or len(pad) < 2 or len(pad) % 2:
        return None
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in pad):
        return None
    left, right = pad[0], pad[1]
    if left < 0 or right < 0 or left + right == 0 or any(p != 0 for p in pad[2:]):
        return None
    return left, right


def read_constant_pads(gm: fx.GraphModule) -> None:
    graph, changed = gm.graph, False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.constant_pad_nd.default:
            continue
        x = node.args[0]
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        x_value = example_value(x) if isinstance(x, fx.Node) else None
        widths = _widths(node)
        mode = getattr(x_value, "fake_mode", None)
        if widths is None or mode is None or x_value.dim() == 0 or not x_value.dtype.is_floating_point \
                or not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            continue
        with graph.inserting_before(node):
            column = graph.call_function(aten.slice.Tensor, (x, -1, 0, 1))
            fill = graph.call_function(aten.full_like.default, (column, value))
        with mode:
            column.meta["val"] = aten.slice.Tensor(x_value, -1, 0, 1)
            fill.meta["val"] = aten.full_like.default(column.meta["val"], value)
        for new in (column, fill):
            new.meta["stack_trace"] = node.meta.get("stack_trace")
        left, right = widths
        node.target = aten.cat.default
        node.args = ([fill] * left + [x] + [fill] * right, -1)
        node.kwargs = {}
        changed = True
    if changed:
        graph.lint()
        gm.recompile()
