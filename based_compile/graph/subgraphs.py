"""Attention the pass does not look into: the bodies of higher-order operators, and functorch transforms.

Dynamo turns ``torch.utils.checkpoint.checkpoint(fn, ...)`` inside a compiled model into a
higher-order operator (``tag_activation_checkpoint``) whose body is a separate graph module. The
driver runs the pass on the bodies of the checkpoints of the top-level graph (a site there is
rewritten inside the body, which stays checkpointed); attention in any other body (another
higher-order operator, a checkpoint nested in a checkpoint) is left as written. That must not be
silent: ``explain()`` reports it, and under ``based_compile.context_parallel`` the backend raises
for a graph with a refusal instead of attending within the shard.

``hidden_attention(gm, read)`` returns one refusal per body not in ``read`` (searched recursively) that holds a
sequence mixer of the kinds the pass rewrites: a matmul (``matmul``, ``bmm``, ``einsum``, ``@``)
with an operand computed from another matmul (scores times values), or a ``cumsum`` (the linear
form's running sums). A body with projections only (``linear``) is not reported.

``transformed_attention(gm)`` does the same for mixing Dynamo traced inside ``torch.vmap`` or another
``torch.func`` transform: its tensors are the transform's (``canonicalize.under_transform``), which the pass
cannot lower or evaluate outside it (it failed with an internal error), so no region holds them.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .canonicalize import example_value, under_transform
from .report import Refusal, source_of

_MATMUL = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__"}
_RUNNING = {"cumsum", "cumsum_"}


def _name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.target is operator.matmul:
        return "matmul"
    return getattr(node.target, "__name__", str(node.target)).split(".")[-1]


def _bodies(gm: fx.GraphModule, node: fx.Node):
    """The graph modules a higher-order operator node calls (its get_attr arguments)."""
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            body = getattr(gm, str(arg.target), None)
            if isinstance(body, fx.GraphModule):
                yield body


def _mixer(nodes) -> fx.Node | None:
    """The first matmul of a matmul chain or cumsum among ``nodes`` (a body's, not its own bodies'), or None."""
    from_matmul: set[fx.Node] = set()
    for node in nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        name = _name(node)
        if name in _RUNNING:
            return node
        inputs = node.all_input_nodes
        if name in _MATMUL:
            if any(a in from_matmul for a in inputs):
                return node
            from_matmul.add(node)
        elif any(a in from_matmul for a in inputs):
            from_matmul.add(node)
    return None


def hidden_attention(gm: fx.GraphModule, read=frozenset()) -> list[Refusal]:
    """A refusal for each higher-order operator body of ``gm`` (recursively) that holds attention-like
    sequence mixing the pass leaves as written; bodies in ``read`` the pass ran on (the driver reads
    ``torch.utils.checkpoint`` bodies: their sites and refusals are reported) are skipped."""
    refusals = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
            continue
        for body in _bodies(gm, node):
            mixer = None if body in read else _mixer(body.graph.nodes)
            if mixer is not None:
                refusals.append(Refusal(
                    source_of(mixer), "unsupported",
                    f"inside a higher-order operator ({node.target.name()}, e.g. torch.utils.checkpoint in the "
                    f"compiled code): the pass does not look into its body, so this {_name(mixer)} is left as "
                    "written (to have it rewritten, call torch.utils.checkpoint outside the compiled function, "
                    "around a compiled block)"))
            refusals.extend(hidden_attention(body, read))
    return refusals


def transformed_attention(gm: fx.GraphModule) -> list[Refusal]:
    """A refusal for the attention-like sequence mixing (as ``hidden_attention``'s) that ``gm`` computes inside a
    functorch transform Dynamo traced into the graph (``torch.vmap(attn)(q, k, v)``, ``torch.func.grad``): its
    tensors are the transform's (``canonicalize.under_transform``), never part of a region, so it is left as
    written. One refusal, at the first such mixer."""
    inside = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and under_transform(n)]
    mixer = _mixer(inside)
    if mixer is None:
        return []
    batched = any(isinstance(example_value(n), torch.Tensor) and torch._C._functorch.is_batchedtensor(example_value(n))
                  for n in inside)
    what = "torch.vmap" if batched else "a torch.func transform (grad, jvp, jacrev, ...)"
    hint = " (to have it rewritten, write the attention for the whole batch, without vmap)" if batched else ""
    return [Refusal(source_of(mixer), "unsupported",
                    f"inside {what}, which Dynamo traced into the graph: the pass does not read the transform's "
                    f"tensors (one example's shape, batched or differentiated by the transform), so this "
                    f"{_name(mixer)} is left as written{hint}")]
