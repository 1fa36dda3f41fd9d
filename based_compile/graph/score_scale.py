"""A scale of the raw scores read at run time: one-element tensors the scores are multiplied or divided by.

``(q @ k.mT) * c`` and ``(q @ k.mT) / c`` with ``c`` a one-element tensor that is not a compile-time
constant (a learnable ``nn.Parameter``, ``1 / self.temperature``, a scale computed from the inputs) are
``P(sigma (c q) . k)`` and ``P(sigma (q / c) . k)``: the operator reads q times (or divided by) the
same tensor, computed by the graph as written, so the value and the gradient of ``c`` are the
model's. Division by a one-element tensor is multiplication by its reciprocal, whatever it is
computed from; the matcher (``match._read_scaled``) checks that it is one element, of q's dtype, not
a function of the scores themselves, and applied to the raw scores (before the polynomial; a mask that
fills zeros before it commutes with it). Applied to the weights after the polynomial it is a scale of
an unnormalised output instead ((c P(s)) @ v = c (P(s) @ v): the match's ``out_scale``, the same record,
which the rewrite multiplies the operator's output by). ``ScoreScale`` records the factors (node, power
+1 or -1), builds their product where the rewrite needs it, evaluates it for the numerical probe (on
the probe's own q, k and v: a scale computed from q follows q) and says what it is for explain().
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class ScoreScale:
    """The product of ``node ** power`` over ``factors`` (power 1: the scores are multiplied by the node,
    -1: divided by it), nodes of the lowered graph."""

    factors: tuple = ()

    def times(self, node: fx.Node, power: int) -> "ScoreScale":
        return ScoreScale(self.factors + ((node, power),))

    @property
    def nodes(self) -> list[fx.Node]:
        return [node for node, _ in self.factors]

    def value(self, evaluate) -> torch.Tensor:
        """The scale as a 0-d float64 tensor; ``evaluate(node)`` gives a node's value (the probe
        evaluates with its substituted q, k, v: a scale computed from them is computed from those)."""
        value = torch.ones((), dtype=torch.float64)
        for node, power in self.factors:
            x = evaluate(node).to(torch.float64).reshape(())
            value = value * x if power == 1 else value / x
        return value

    def apply(self, q, add, lookup):
        """``q`` times the scale in the rewritten graph: ``add(target, args)`` inserts a node,
        ``lookup(node)`` gives the rewritten graph's node for a lowered one."""
        for node, power in self.factors:
            q = add(operator.mul if power == 1 else operator.truediv, (q, lookup(node)))
        return q

    def describe(self, name_of) -> str:
        """What the scale is, for the spec's ``s = scale * ... * q.k``: ``name_of(placeholder)`` names a
        graph input (``self.temperature``); what else it is computed from is written out where it is
        a few reciprocals, products, roots or sums, else said to be computed at run time."""
        parts = []
        for node, power in self.factors:
            text = _expression(node, name_of, 4)
            parts.append(text if power == 1 else f"1 / {_bracket(text)}")
        text = " * ".join(_bracket(p) for p in parts) if len(parts) > 1 else parts[0]
        return f"({text})"


_COMPUTED = "a one-element tensor computed at run time"
_VIEWS = {aten.view.default, aten.reshape.default, aten.expand.default, aten.squeeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.alias.default,
          aten.clone.default, aten._to_copy.default}
_UNARY = {aten.sqrt.default: "sqrt", aten.abs.default: "abs", aten.exp.default: "exp", aten.log.default: "log",
          aten.rsqrt.default: "rsqrt"}
_BINARY = {aten.mul.Tensor: "*", aten.mul.Scalar: "*", aten.div.Tensor: "/", aten.div.Scalar: "/",
           aten.add.Tensor: "+", aten.add.Scalar: "+", aten.sub.Tensor: "-", aten.sub.Scalar: "-"}


def _expression(node, name_of, depth: int) -> str:
    if not isinstance(node, fx.Node):
        return f"{node:g}" if isinstance(node, (int, float)) else _COMPUTED
    while node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    if node.op == "placeholder":
        return name_of(node) or _COMPUTED
    if depth == 0 or node.op != "call_function":
        return _COMPUTED
    if node.target is aten.reciprocal.default:
        return f"1 / {_bracket(_expression(node.args[0], name_of, depth - 1))}"
    if node.target is aten.neg.default:
        return f"-{_bracket(_expression(node.args[0], name_of, depth - 1))}"
    if node.target in _UNARY:
        return f"{_UNARY[node.target]}({_expression(node.args[0], name_of, depth - 1)})"
    if node.target is aten.pow.Tensor_Scalar and isinstance(node.args[1], (int, float)):
        return f"{_bracket(_expression(node.args[0], name_of, depth - 1))} ** {node.args[1]:g}"
    if node.target in _BINARY and len(node.args) == 2 and float(node.kwargs.get("alpha", 1)) == 1.0:
        x, y = node.args
        if isinstance(y, (int, float)) and y == (0 if node.target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
                                                                      aten.sub.Scalar) else 1):
            return _expression(x, name_of, depth)            # x * 1, x / 1, x + 0: x
        a, b = (_expression(x, name_of, depth - 1) for x in node.args)
        if _COMPUTED in (a, b):
            return _COMPUTED
        return f"{_bracket(a)} {_BINARY[node.target]} {_bracket(b)}"
    return _COMPUTED


def _bracket(text: str) -> str:
    return f"({text})" if " " in text and not _wrapped(text) else text


def _wrapped(text: str) -> bool:
    """``text`` is one bracketed group: ``(a * b)``, not ``(a) * (b)``."""
    if not (text.startswith("(") and text.endswith(")")):
        return False
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(text) - 1:
            return False
    return True


_SOURCE_PARTS = re.compile(r"\._(?:parameters|buffers|modules)\['([^']+)'\]")
_LOCAL = re.compile(r"^L\['([^']+)'\]")


def readable_source(name: str) -> str:
    """A Dynamo source name as the user wrote it: ``L['self']._parameters['temperature']`` -> ``self.temperature``."""
    return _SOURCE_PARTS.sub(r".\1", _LOCAL.sub(r"\1", name))
