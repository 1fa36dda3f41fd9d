"""Concrete evaluation of parts of a lowered graph (masks at compile time, the numerical probe).

``GraphEvaluator(gm, real_inputs)`` evaluates any node on real tensors: placeholders take
the real example inputs Dynamo handed the backend (registered buffers included, so a
sliced ``tril`` buffer is checked by value), SymInt placeholders their concrete values,
get_attr nodes the module's constants. ``substitute`` replaces chosen nodes by given
tensors (the probe feeds fresh q, k, v that way). ``depends_on`` tells whether a value
reads a given set of nodes (a mask that reads an input is not a compile-time constant).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .canonicalize import hint


_SIZE_OPS = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
             torch.ops.aten.sym_storage_offset.default}
# Fills that read only the shape (and dtype, device) of their first argument, never its values:
# ``ones_like(a)`` is a constant whatever ``a`` holds.
_SHAPE_OF_FIRST_ARG = {torch.ops.aten.ones_like.default, torch.ops.aten.zeros_like.default,
                       torch.ops.aten.full_like.default, torch.ops.aten.new_ones.default,
                       torch.ops.aten.new_zeros.default, torch.ops.aten.new_full.default}


class NotConstant(Exception):
    """Raised when a node depends on a tensor the caller declared non-constant."""


class LazyTensor:
    """A random input made only when an evaluation reads it (activations from outside a region)."""

    def __init__(self, shape, dtype, device, seed: int):
        self.shape, self.dtype, self.device, self.seed = shape, dtype, device, seed

    def materialise(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        if self.dtype.is_floating_point:
            x = torch.randn(self.shape, generator=gen, dtype=torch.float64)
        else:
            x = torch.zeros(self.shape, dtype=torch.int64)
        return x.to(device=self.device, dtype=self.dtype)


def _values_read(node: fx.Node):
    """``node`` and every node whose value it is computed from, once each; a size (``sym_size``) or the shape alone
    (``ones_like(a)``, ``a.new_zeros(...)``) of a tensor is not its value, so the walk does not go on through it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        yield n
        if n.op == "call_function" and n.target in _SIZE_OPS:
            continue
        if n.op == "call_function" and n.target in _SHAPE_OF_FIRST_ARG:
            stack.extend(a for a in n.all_input_nodes if a is not n.args[0])
            continue
        stack.extend(n.all_input_nodes)


class GraphEvaluator:
    def __init__(self, gm: fx.GraphModule, real_inputs, *, variable_placeholders=()):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(real_inputs):
            raise ValueError(f"GraphEvaluator: graph has {len(placeholders)} placeholders, "
                             f"got {len(real_inputs)} inputs")
        self.inputs = dict(zip(placeholders, real_inputs))
        self.variable = set(variable_placeholders)

    def evaluate(self, node: fx.Node, substitute: dict | None = None):
        """Value of ``node`` with ``substitute`` (node -> value) taking precedence."""
        env: dict[fx.Node, object] = dict(substitute or {})
        with torch.no_grad():
            return self._eval(node, env)

    def _eval(self, root: fx.Node, env: dict):
        # Iterative post-order so deep graphs do not hit the recursion limit.
        stack = [root]
        while stack:
            node = stack[-1]
            if node in env:
                stack.pop()
                continue
            pending = [a for a in node.all_input_nodes if a not in env]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            env[node] = self._run(node, env)
        return env[root]

    def _run(self, node: fx.Node, env: dict):
        if node.op == "placeholder":
            value = self.inputs[node]
            if isinstance(value, LazyTensor):
                value = self.inputs[node] = value.materialise()
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                return hint(value)           # Dynamo passes sizes as symbols: use the example's value
            return value.detach() if isinstance(value, torch.Tensor) else value
        if node.op == "get_attr":
            obj = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        if node.op == "call_function":
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            return node.target(*args, **kwargs)
        raise NotConstant(f"{node.op} {node.name}")

    def depends_on(self, node: fx.Node, targets: set) -> bool:
        """True when the value of ``node`` reads any node of ``targets`` (transitively).

        Reading only a size (``sym_size``) of a tensor, or only its shape (``ones_like(a)``,
        ``a.new_zeros(...)``), is not reading its value.
        """
        return any(n in targets for n in _values_read(node))

    def symbolic_values_read(self, node: fx.Node) -> list:
        """The symbolic scalars (SymInt / SymFloat: a size under dynamic shapes, ``sym_size``, ``sym_float``, a
        float input) that the value of ``node`` is computed from, reading the same inputs as ``depends_on``
        (a tensor read only for its shape contributes its symbolic sizes). ``evaluate`` reads them at their
        example values: whoever keeps what it computed as a constant must specialise them."""
        found = []
        for n in _values_read(node):
            val = n.meta.get("val", n.meta.get("example_value"))
            if isinstance(val, (torch.SymInt, torch.SymFloat)):
                found.append(val)
            elif isinstance(val, torch.Tensor):
                found.extend(s for s in val.shape if isinstance(s, torch.SymInt))
        return [v for v in found if v.node.expr.free_symbols]

    def placeholders_read(self, node: fx.Node) -> list[fx.Node]:
        seen, stack, found = set(), [node], []
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.op == "placeholder":
                found.append(n)
            stack.extend(n.all_input_nodes)
        return found
