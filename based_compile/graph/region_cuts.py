"""Ops of Dynamo's graph that cut an attention region and that no reader reads through.

An attention region (``canonicalize.attention_region``) stops at ops that may not join it: a custom
``torch.autograd.Function`` (Dynamo's ``autograd_function_apply``), a tensor hook
(``Tensor.register_hook``: Dynamo's ``register_hook``), any other higher-order operator, and calls
the region leaves out by name (``F.normalize`` other than with p=1, ...). Between the scores and the
weights' matmul with v, such an op splits the attention in two: the lowered region then sees
weights that come from nowhere, and no reader could say why. ``lookalike`` walks on through these
ops in Dynamo's graph (``inputs_through``) and names them in its refusal (``describe``). A region input that
such an op computes (q' and k' of a feature map written as a custom Function) is marked on the lowered
placeholder (``mark_inputs``), so that a reader that cannot read it says what computed it (``computed_by``).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .canonicalize import example_value, hint_shape
from .report import source_of


def _hop(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)


def _element_of_hop(node: fx.Node) -> bool:
    """``getitem`` of what a higher-order operator returns (a custom Function's outputs)."""
    return (node.op == "call_function" and node.target is operator.getitem and bool(node.args)
            and isinstance(node.args[0], fx.Node) and _hop(node.args[0]))


def inputs_through(node: fx.Node) -> list[fx.Node] | None:
    """The tensors of Dynamo's graph that ``node`` carries on, when it is an op that cuts a region and keeps
    a tensor's shape: a higher-order operator's tensor operands (not its bodies), the operator of an element
    it returns, or the operands of the same shape as its output of any other call; else None."""
    if node.op not in ("call_function", "call_method"):
        return None
    if _element_of_hop(node):
        return [node.args[0]]
    if _hop(node):
        return [a for a in node.all_input_nodes if a.op != "get_attr"]
    name = _name(node)
    if name != "normalize" and any(word in name.lower() for word in _PROJECTIONS):
        return None
    value = example_value(node)
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point:
        return None                         # a mask (bool), an index: not what the weights are
    shape = hint_shape(node)
    same = [a for a in node.all_input_nodes if hint_shape(a) == shape]
    return same or None


# calls that make a new tensor of their input (a projection, a layer norm) rather than carry it on: a walk
# through them would reach another block's attention
_PROJECTIONS = ("linear", "conv", "embedding", "norm", "lstm", "gru", "rnn", "attention")


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def describe(node: fx.Node) -> str | None:
    """What a cutting op (``inputs_through``) is, in words, with the user's line; None for the element of a
    higher-order operator's result (its operator is described)."""
    if _element_of_hop(node):
        return None
    where = source_of(node)
    if _hop(node):
        name = node.target.name()
        if name == "autograd_function_apply":
            return (f"a custom torch.autograd.Function ({where}): its backward is its own, and based::attention "
                    "would differentiate what its forward computes instead; the pass does not read through it")
        if name == "register_hook":
            return (f"a tensor hook (Tensor.register_hook, {where}): based::attention never forms that tensor, so "
                    "the hook would not run in the backward")
        return f"the higher-order operator {name} ({where}), which the pass does not read through"
    name = _name(node)
    if name == "normalize":
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 2.0)
        return (f"F.normalize with p={p} ({where}): each row divided by its {p}-norm; the pass reads F.normalize "
                "only with p=1 (the row sums of weights that are never negative)")
    return f"{name} ({where}), an operation the pass does not read"


_CUT = "based_compile.computed_by"


def mark_inputs(dynamo_inputs, lowered_placeholders) -> None:
    """Mark each lowered placeholder whose Dynamo node a higher-order operator computes (an element of a custom
    Function's outputs, a hooked tensor) with what computed it."""
    for dynamo, placeholder in zip(dynamo_inputs, lowered_placeholders):
        hop = dynamo.args[0] if _element_of_hop(dynamo) else dynamo if _hop(dynamo) else None
        if hop is not None:
            placeholder.meta[_CUT] = describe(hop)


def computed_by(node) -> str | None:
    """What computed a lowered placeholder ``mark_inputs`` marked, in words, else None."""
    return node.meta.get(_CUT) if isinstance(node, fx.Node) and node.op == "placeholder" else None
