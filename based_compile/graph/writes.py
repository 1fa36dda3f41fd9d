"""Which of its arguments a graph node writes in place.

Read from what the node is, not from how it is spelled:
  - a method ending in ``_`` (``x.add_(y)``), ``x += y``, ``x[i] = y``: its first argument;
  - an ATen or custom operator: the arguments its schema marks as written (``Tensor(a!)``), so
    ``torch.ops.aten.fill_.Scalar``, ``copy_.default``, ``index_put_.default`` or a
    ``torch.library.custom_op`` with ``mutates_args`` are writes, whatever their names;
  - a higher-order operator (a ``torch.utils.checkpoint`` call, ...) whose body writes one of its
    inputs, or memory the pass cannot name: every tensor it is given (a checkpointed function that
    fills the mask passed to it writes that mask);
  - a function named with a trailing ``_`` (``torch.relu_``, ``torch._foreach_add_``): its first argument,
    or every tensor of it when it is a list (the ``_foreach_`` ops write each tensor of their first list).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                      operator.iand, operator.ior, operator.setitem}


def written_arguments(node: fx.Node) -> list[fx.Node]:
    """The nodes among ``node``'s arguments whose memory it writes (in argument order; [] for none)."""
    if node.op == "call_method":
        writes = node.target.endswith("_") and not node.target.startswith("__")
        return _first(node) if writes else []
    if node.op != "call_function":
        return []
    target = node.target
    if target in INPLACE_OPERATORS:
        return _first(node)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return _operands(node) if _body_writes_an_input(node) else []
    schemas = _schemas(target)
    if schemas:
        return _schema_written(node, schemas)
    name = getattr(target, "__name__", "")
    return _first(node) if name.endswith("_") and not name.startswith("__") else []


def _first(node: fx.Node) -> list[fx.Node]:
    """The first argument, or the tensors of it when it is a list or tuple."""
    if not node.args:
        return []
    first = node.args[0]
    if isinstance(first, (list, tuple)):
        return [x for x in first if isinstance(x, fx.Node)]
    return [first] if isinstance(first, fx.Node) else []


def _schemas(target) -> list:
    if isinstance(target, torch._ops.OpOverload):
        return [target._schema]
    if isinstance(target, torch._ops.OpOverloadPacket):        # any overload's writes count
        return [getattr(target, name)._schema for name in target.overloads()]
    return []


def _schema_written(node: fx.Node, schemas) -> list[fx.Node]:
    found = []
    for schema in schemas:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            for x in (value if isinstance(value, (list, tuple)) else [value]):
                if isinstance(x, fx.Node) and x not in found:
                    found.append(x)
    return found


def _operands(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued nodes a higher-order operator call is given (its bodies excluded)."""
    out = []
    for x in node.all_input_nodes:
        value = x.meta.get("val", x.meta.get("example_value"))
        if x.op != "get_attr" and (value is None or isinstance(value, torch.Tensor)):
            out.append(x)
    return out


def _bodies(node: fx.Node) -> list[fx.GraphModule]:
    owner = node.graph.owning_module
    found = []
    for x in node.all_input_nodes:
        if x.op == "get_attr" and owner is not None:
            body = getattr(owner, x.target, None)
            if isinstance(body, fx.GraphModule):
                found.append(body)
    return found


def _storage(node: fx.Node):
    value = node.meta.get("val", node.meta.get("example_value"))
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata
    except Exception:  # noqa: BLE001 - no nameable storage
        return None


def _body_writes_an_input(node: fx.Node) -> bool:
    """Whether a body of this higher-order operator call writes memory of one of its inputs (through any
    view), or memory the pass cannot name: what it writes may then be an input."""
    for body in _bodies(node):
        inputs = {_storage(p) for p in body.graph.nodes if p.op == "placeholder"}
        for inner in body.graph.nodes:
            for target in written_arguments(inner):
                key = _storage(target)
                if key is None or key in inputs:
                    return True
            out = inner.kwargs.get("out") if inner.op in ("call_function", "call_method") else None
            if isinstance(out, fx.Node) and (_storage(out) is None or _storage(out) in inputs):
                return True
    return False
