"""The inputs of an attention region of Dynamo's graph, and which of them a rewrite bakes in.

Dynamo's graph inputs are activations, parameters, sizes and registered buffers. Buffers that
do not require grad, and sizes, are compile-time constants for the pass (a mask, a scale);
everything else is a variable. ``region_inputs`` gives the lowered region real values for
both (variables computed outside the region become lazy random tensors of their shape, read
only by the numerical probe). ``baked_buffers`` lists the buffers whose values a rewritten
site took at compile time, for ``buffer_guard`` to watch at run time.
"""
from __future__ import annotations

import re

from dataclasses import dataclass

import torch
import torch.fx as fx

from .candidate import placeholders_between, site_inputs
from .canonicalize import example_value, hint
from .evaluate import GraphEvaluator, LazyTensor
from .inplace import UNKNOWN, storage_key, written_nodes
from .report import source_of


@dataclass
class BakedBuffer:
    """A graph input (registered buffer) read by value at compile time."""

    index: int           # position among the compiled graph's inputs
    name: str            # where it comes from in the model (Dynamo's source name)
    why: str             # what the rewrite took from it


def constant_placeholders(gm: fx.GraphModule, example_inputs) -> list[bool]:
    """Per placeholder: True when it is a registered buffer the graph does not write, an integer tensor kept as a
    plain module attribute that the graph does not write (index tables: zoology's ``self.tril_indices =
    torch.tril_indices(...)``), or a size (compile-time constant). A buffer the graph writes in place (recurrent
    states kept in buffers, ``self.kv.add_(...)``, ``self.kv.copy_(...)``) is the model's state: a variable,
    read as the tensor it is at run time. Floating plain attributes (a scale a schedule replaces) and
    one-element integer ones (a step counter) stay variables. What a rewrite reads of a constant is guarded
    (buffer_guard.py)."""
    written = _written_placeholders(gm)
    flags = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        if not isinstance(value, torch.Tensor):
            flags.append(True)
            continue
        # a module's registered buffer: L['self']._buffers['tril'], L['self']._modules['attn']._buffers['mask']
        # (not any name with the word in it: an argument called ``buffers`` is an input like any other)
        name = source_name(node)
        attribute = _integer_attribute(name, value)
        flags.append(("._buffers[" in name or attribute) and not value.requires_grad and node not in written)
    return flags


_INDEX_DTYPES = (torch.int64, torch.int32)
_ATTRIBUTE = re.compile(r"L\['self'\](?:\._modules\['[^']+'\]|\.[A-Za-z_]\w*)*\.[A-Za-z_]\w*")


def _integer_attribute(name: str, value: torch.Tensor) -> bool:
    """An integer table of more than one element that is a plain attribute of the compiled module or of one
    of its submodules (``L['self'].tril_indices``, ``L['self']._modules['fm'].idx``, ``L['self'].fm.idx``):
    not a parameter, a buffer (read above), an argument or an item of a container. A one-element integer
    (a step counter, an offset a schedule replaces) stays read at run time."""
    return value.dtype in _INDEX_DTYPES and _ATTRIBUTE.fullmatch(name) is not None and int(hint(value.numel())) > 1


def _written_placeholders(gm: fx.GraphModule) -> set[fx.Node]:
    """The placeholders the graph writes in place, directly or through any view (``self.kv.copy_(x)``,
    ``self.kv[:].copy_(x)``, ``self.kv.view(...).add_(x)``): the write's target lives in their storage."""
    keys = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            key = storage_key(node)
            if key is not None:
                keys.setdefault(key, []).append(node)
    written = set()
    for node in gm.graph.nodes:
        for target in written_nodes(node):
            key = storage_key(target)
            if key is UNKNOWN:                    # a write into memory we cannot name: every tensor input
                return {n for group in keys.values() for n in group}
            written.update(keys.get(key, ()))
    return written


def source_name(placeholder: fx.Node) -> str:
    """Where a Dynamo graph input comes from in the user's program (e.g. L['self']._buffers['tril'])."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is not None and grapharg.source is not None:
        return grapharg.source.name               # a property since torch 2.11 (a method before)
    return placeholder.name


def baked_buffers(gm, settled, evaluator: GraphEvaluator, variable: set, to_dynamo: dict,
                  steps=()) -> list[BakedBuffer]:
    """The graph inputs whose values the rewritten sites and recurrent steps took at compile time: tensors the
    replaced part of each site (from its output back to, not through, q, k and v) or step (from its output and
    new states back to q, k, v and its states) reads and that are not variables (registered buffers: a mask, a
    scale, a feature map's constant, an index table)."""
    index_of = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    baked: dict[int, BakedBuffer] = {}
    read = []
    for site in settled:
        m = site.match
        starts = {st.source for st in (m.initial.kv, m.initial.k) if st is not None} if m.initial is not None else set()
        read.append((site_inputs(site.match) - {m.q, m.k, m.v} - _read_through(starts),   # states: read at run time
                     f"site at {source_of(m.anchor)}: {site.spec}"))
    for step in steps:
        inputs = [step.q, step.k, step.v, step.kv_state, step.k_state]
        read.append((placeholders_between([step.output, step.kv_new, step.k_new], inputs) - _read_through(
            [n for n in inputs if n is not None]), f"recurrent step at {source_of(step.anchor)}"))
    for nodes, what in read:
        for node in nodes:
            dynamo = to_dynamo.get(node)
            if (node not in variable and isinstance(evaluator.inputs.get(node), torch.Tensor)
                    and dynamo is not None and dynamo in index_of):
                i = index_of[dynamo]
                baked.setdefault(i, BakedBuffer(i, source_name(dynamo), f"read at compile time by the {what}"))
    return list(baked.values())


def _read_through(nodes) -> set:
    """``nodes`` and what each reads through ops of one tensor input (a slice, a view, a cast, a clone of a
    state buffer: ``self.kv[:b]``): the tensors the operator reads at run time through them."""
    out, stack = set(), list(nodes)
    while stack:
        node = stack.pop()
        if node in out or not isinstance(node, fx.Node):
            continue
        out.add(node)
        if node.op == "call_function":
            tensors = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
            if len(tensors) == 1:
                stack.append(tensors[0])
    return out


def region_inputs(gm, example_inputs, inputs, aten_inputs, constants=None):
    """Real values for the region's inputs, and which of them are not compile-time constants.

    Dynamo placeholders take the real example inputs (buffers are constants); sizes their
    example values; activations computed outside the region random tensors of their shape
    (only the numerical probe reads them, and only through q, k, v or shapes if the site is Based).
    ``constants``: per placeholder of ``gm``, whether it is a compile-time constant (default:
    ``constant_placeholders``; a checkpointed body's come from the arguments of its call).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constant_flags = dict(zip(placeholders, constant_placeholders(gm, example_inputs) if constants is None
                              else constants))
    real_of = dict(zip(placeholders, example_inputs))
    real, variable = [], set()
    for index, (dynamo_node, aten_node) in enumerate(zip(inputs, aten_inputs)):
        if dynamo_node in real_of:
            real.append(real_of[dynamo_node])
            if not constant_flags[dynamo_node]:
                variable.add(aten_node)
            continue
        value = example_value(dynamo_node)
        if isinstance(value, torch.Tensor):
            shape = tuple(int(hint(s)) for s in value.shape)
            real.append(LazyTensor(shape, value.dtype, value.device, seed=index))
            variable.add(aten_node)
        else:
            real.append(hint(value) if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else value)
    return real, variable
