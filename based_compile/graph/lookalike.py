"""Regions that look like attention but that no reader explained: matmul -> elementwise -> matmul.

``explain()`` must give every such region a site or a refusal with a reason, never silence. After
matching, ``unexplained(gm, bmm, to_dynamo)`` looks at a ``bmm`` of the lowered region for which
no reader yielded a site or a refusal: when one of its operands comes, through views and
elementwise ops only (at least one of them not a view), from a square ``[.., T, T]`` product
(scores), it returns why the pass leaves it (the chain's ops, and a random op when the chain
crosses one), else None. Where the region was cut (a dropout with p > 0 in training is random and
never part of a region), the walk goes on in Dynamo's graph.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .canonicalize import VIEW_OPS, hint_shape, identity_dropout

aten = torch.ops.aten

_MAX_NODES = 64
_LOWERED_FOLLOW = {aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tril.default,
                   aten.triu.default}
_DYNAMO_ELEMENTWISE = {
    "mul", "add", "sub", "truediv", "div", "pow", "neg", "square", "addcmul", "addcdiv", "lerp", "where",
    "masked_fill", "masked_fill_", "mul_", "add_", "sub_", "div_", "pow_", "tril", "triu", "float", "double",
    "to", "type_as", "view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "expand",
    "clone", "iadd", "imul", "isub", "itruediv",
}
_DYNAMO_RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
_DYNAMO_MATMUL = {"matmul", "bmm", "einsum", "__matmul__"}


def _name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if t in (operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg):
        return t.__name__
    return getattr(t, "__name__", str(t)).split(".")[-1]


def _is_scores(node: fx.Node) -> bool:
    shape = hint_shape(node)
    return (node.op == "call_function" and node.target is aten.bmm.default and shape is not None
            and len(shape) >= 2 and shape[-1] == shape[-2])


def unexplained(gm: fx.GraphModule, bmm: fx.Node, to_dynamo: dict) -> str | None:
    """Why the pass leaves this matmul of a scores-like chain, or None when it does not look like one."""
    for operand in bmm.args[:2]:
        if not isinstance(operand, fx.Node):
            continue
        found = _walk_lowered(operand, to_dynamo)
        if found is None:
            continue
        ops, random = found
        chain = " -> ".join(dict.fromkeys(ops)) or "views"
        if random:
            return (f"the weights between the two matmuls go through {random} (random: not a function of q.k), "
                    f"chain: matmul -> {chain} -> matmul")
        return (f"matmul -> {chain} -> matmul looks like attention, but the pass could not read the elementwise "
                "chain as keep * P(q.k) (a mask that is a compile-time constant times a polynomial of the "
                "scores)")
    return None


def _walk_lowered(start: fx.Node, to_dynamo: dict):
    """(op names, random op or None) of an elementwise chain from a square bmm to ``start``, or None."""
    stack, seen, ops = [start], set(), []
    pointwise = False
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_scores(node):
            if pointwise:
                return ops, None
            continue
        if node.op == "placeholder":
            dynamo = to_dynamo.get(node)
            found = _walk_dynamo(dynamo) if dynamo is not None else None
            if found is not None:
                return ops + found[0], found[1]
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if target in VIEW_OPS:
            stack.append(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            continue
        if target in _LOWERED_FOLLOW or torch.Tag.pointwise in getattr(target, "tags", ()):
            pointwise = True
            ops.append(str(target.__name__ if hasattr(target, "__name__") else target).split(".")[0])
            stack.extend(node.all_input_nodes)
    return None


def _walk_dynamo(start: fx.Node):
    """The same walk in Dynamo's graph, from where the region was cut."""
    stack, seen, ops, random = [start], set(), [], None
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node in seen or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        name = _name(node)
        if name in _DYNAMO_MATMUL:
            if ops:
                return ops, random
            continue
        if name in _DYNAMO_RANDOM:
            if identity_dropout(node):
                ops.append(name)
            else:
                ops.append(f"{name} (training)")
                random = random or f"{name} with p > 0 in training"
            stack.extend(node.all_input_nodes)
            continue
        if name in _DYNAMO_ELEMENTWISE:
            ops.append(name)
            stack.extend(node.all_input_nodes)
    return None
