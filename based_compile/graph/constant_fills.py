"""Tensors filled with one number, used as that number: ``z + torch.full_like(z, eps)`` is ``z + eps``.

A fill (``full_like(x, c)``, ``ones_like(x)``, ``x.new_full(.., c)``, ``torch.full(.., c)``, through
views) added to, subtracted from, multiplying or dividing a tensor whose shape and dtype the
result keeps computes, element by element, what the same op with the Python number ``c`` does.
``read_constant_fills(gm)`` rewrites those operands, in the lowered graph before matching, as the
number, so that every reader (an eps beside a normaliser, a scale) sees a scalar. The fill itself
is left in place (dead once nothing else reads it); a fill that would broadcast the other operand,
or change its dtype, is left as written; a fill that changes nothing (``x + zeros``, ``x * ones``) is
dropped. The number is what the fill's elements hold: rounded to the
fill's own dtype and to every cast between it and the op (an integer fill of 0.5 is 0). Only fills of a Python number are read: a fill of a
symbolic value would have to be guarded at its traced value.

A matmul by a fill (``a @ torch.ones(T, 1)``, ``a @ torch.ones_like(v)``, einsum ``"bhij,j->bhi"`` with
``torch.ones(T)``: a row sum spelled as a product) is c times the sum of ``a`` over its last axis, in every
column: rewritten as that sum, broadcast to the product's columns (the row sums a normaliser reads).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import example_value, insert_after, strip_views

aten = torch.ops.aten

# The fill ops and their value: a number, or the position of the fill argument.
_FILLS = {aten.ones_like.default: 1.0, aten.ones.default: 1.0, aten.new_ones.default: 1.0,
          aten.zeros_like.default: 0.0, aten.zeros.default: 0.0, aten.new_zeros.default: 0.0,
          aten.full_like.default: 1, aten.full.default: 1, aten.new_full.default: 2}
# Views that read a tensor's elements in order (a matmul's operand flattened to rows).
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Binary ops and the operand positions a fill may take.
_OPS = {aten.add.Tensor: (0, 1), aten.mul.Tensor: (0, 1), aten.sub.Tensor: (1,), aten.div.Tensor: (1,)}


def _fill_number(node) -> float | None:
    """The number every element of ``node`` holds: the fill's, rounded to the fill's own dtype and to every
    cast on the way up (``full_like(z, 0.5, dtype=torch.int64)`` holds 0, a bfloat16 fill of 0.3 holds
    0.30078125); None when ``node`` is not a fill through views or a dtype is not known."""
    base = strip_views(node)
    if not isinstance(base, fx.Node) or base.op != "call_function" or base.target not in _FILLS:
        return None
    where = _FILLS[base.target]
    if isinstance(where, float):
        value = where
    else:
        value = base.args[where] if len(base.args) > where else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
    chain, cur = [], node
    while cur is not base:                         # the views and casts between the fill and node
        if not isinstance(cur, fx.Node) or not cur.args or len(chain) > 64:
            return None
        chain.append(cur)
        cur = cur.args[0]
    for n in (base, *reversed(chain)):
        value = _held(value, n)
        if value is None:
            return None
    return value


def _held(value, node) -> float | None:
    """``value`` as an element of ``node``'s tensor holds it (rounded, truncated or made a bool by its dtype)."""
    dtype = getattr(example_value(node), "dtype", None)
    if dtype is None or dtype.is_complex:
        return None
    if not dtype.is_floating_point and not math.isfinite(value):
        return None
    source = torch.int64 if isinstance(value, int) else torch.float64
    try:
        return float(torch.tensor(value, dtype=source).to(dtype).item())
    except (RuntimeError, OverflowError):
        return None


def _keeps(result, other) -> bool:
    """The op's result has ``other``'s shape and dtype: the fill neither broadcasts nor promotes it."""
    if not isinstance(result, torch.Tensor) or not isinstance(other, torch.Tensor):
        return False
    if result.dtype != other.dtype or result.dim() != other.dim():
        return False
    return all(statically_known_true(a == b) for a, b in zip(result.shape, other.shape))


def _matmul_by_fill(node: fx.Node) -> bool:
    """``mm(a, fill)`` / ``bmm(a, fill)`` -> c * a.sum(-1, keepdim=True), broadcast to the product's columns
    when there are more than one (every column of ``a @ full(T, n, c)`` is c times a's row sums)."""
    if node.op != "call_function" or node.target not in (aten.mm.default, aten.bmm.default):
        return False
    a, fill = node.args[:2]
    if not isinstance(a, fx.Node) or not isinstance(fill, fx.Node):
        return False
    number = _fill_number(fill)
    out, value = example_value(node), example_value(fill)
    mode = getattr(out, "fake_mode", None)
    if number is None or mode is None or not isinstance(value, torch.Tensor) or out.dtype != value.dtype:
        return False
    columns = out.shape[-1]
    # a @ ones(T, n) of a 4-D a is mm(a.view(N, T), ones) (bmm(a.view(N, T, T), ..) for a batched fill) viewed
    # back: sum a itself where each user views the product back to a's rows with the n columns, or without a
    # single column (einsum "bhnm,m->bhn"): the sums keep a's axes for the normaliser's reader
    base = a
    while _keeps_last_axis(base):
        base = base.args[0]
    rows = tuple(example_value(base).shape[:-1])
    views = [u for u in node.users if u.op == "call_function" and u.target in _VIEWS]
    shapes = [(True, (*rows, columns))] + ([(False, rows)] if statically_known_true(columns == 1) else [])
    keepdim = next((k for k, shape in shapes if views and len(views) == len(node.users)
                    and all(_same_shape(example_value(u).shape, shape) for u in views)), None)
    if base is not a and keepdim is not None:
        result = _scaled_row_sums(node, base, keepdim, number, columns, mode)
        for user in list(node.users):
            user.replace_all_uses_with(result)
            node.graph.erase_node(user)
    else:
        result = _scaled_row_sums(node, a, True, number, columns, mode)
        node.replace_all_uses_with(result)
    node.graph.erase_node(node)     # dead: no reader may take it for a product (it would be a second site)
    return True


def _scaled_row_sums(node: fx.Node, a: fx.Node, keepdim: bool, number: float, columns, mode) -> fx.Node:
    """c * a.sum(-1, keepdim), inserted after ``node``; with keepdim, expanded to ``columns`` columns."""
    result = insert_after(node, aten.sum.dim_IntList, (a, [-1], keepdim), mode=mode, source=node)
    if keepdim and not statically_known_true(columns == 1):
        if not isinstance(columns, int):          # a symbolic width: read off the fill, as the graph sized it
            fill = node.args[1]
            columns = insert_after(result, aten.sym_size.int, (fill, example_value(fill).dim() - 1), mode=mode,
                                   source=node)
        rank = example_value(result).dim()
        after = columns if isinstance(columns, fx.Node) else result
        result = insert_after(after, aten.expand.default, (result, [-1] * (rank - 1) + [columns]), mode=mode,
                              source=node)
    if number != 1.0:
        result = insert_after(result, aten.mul.Tensor, (result, number), mode=mode, source=node)
    return result


def _keeps_last_axis(node: fx.Node) -> bool:
    """``node`` is a view, a reshape, an expand to the same shape or a permute in place of a tensor whose last
    axis it keeps as it is: the rows it reads are the tensor's rows, in their order."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = example_value(node.args[0])
    here = example_value(node)
    if not isinstance(source, torch.Tensor) or not isinstance(here, torch.Tensor) or source.dim() == 0:
        return False
    if node.target in _VIEWS:
        return statically_known_true(source.shape[-1] == here.shape[-1])
    if node.target is aten.expand.default:
        return _same_shape(source.shape, here.shape)
    if node.target is aten.permute.default:
        return list(node.args[1]) == list(range(source.dim()))
    return False


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def read_constant_fills(gm: fx.GraphModule) -> None:
    changed = False
    for node in list(gm.graph.nodes):
        if _matmul_by_fill(node):
            changed = True
            continue
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _OPS or len(node.args) < 2:
            continue
        if node.target is aten.add.Tensor or node.target is aten.sub.Tensor:
            if float(node.kwargs.get("alpha", 1)) != 1.0:
                continue
        for i in _OPS[node.target]:
            fill, other = node.args[i], node.args[1 - i]
            if not isinstance(fill, fx.Node) or not isinstance(other, fx.Node):
                continue
            number = _fill_number(fill)
            if number is None or not _keeps(example_value(node), example_value(other)):
                continue
            identity = 0.0 if node.target in (aten.add.Tensor, aten.sub.Tensor) else 1.0
            if number == identity:            # x + zeros (a state started from torch.zeros), x * ones: x
                node.replace_all_uses_with(other)
                gm.graph.erase_node(node)     # no reader may count it as a second user of x
                changed = True
                break
            args = list(node.args)
            args[i] = number
            if i == 0:                        # the number second: what every reader expects of a scalar
                args = [args[1], args[0]]
            node.args = tuple(args)
            changed = True
            break
    if changed:
        gm.graph.lint()
        gm.recompile()
