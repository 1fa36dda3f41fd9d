"""Reading a graph compiled inside ``torch.autocast`` as its code is written.

The pass reads and probes Dynamo's graph with autocast off (``autocast_scope.analysis_without_autocast``): the
casts autocast puts before matmuls are not the user's code, and how precisely eager computes under autocast is
judged apart, from the dtypes Dynamo traced (``autocast_scope``). Some graphs exist only under autocast: q and k
from ``nn.Linear`` are bfloat16 there while v is the float32 input (or computed with autocast off), and their
bfloat16 @ float32 matmul is valid only because autocast casts its operands. Lowered with autocast off such a
graph fails; lowered under autocast it holds autocast's casts, which no reader reads through (the pass refused
such sites with misleading reasons, or failed on them). ``lower_region`` lowers it under the autocast it was
traced in, takes autocast's casts out again (``drop_autocast_casts``) and gives every node the dtype it has as
written (``_as_written``): the graph then reads as a graph lowered with autocast off reads.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher

from .canonicalize import example_value, finish_lowering, lower_to_aten, trace_to_aten

log = logging.getLogger("based_compile")

_CASTS = (torch.ops.aten._to_copy.default, torch.ops.prims.convert_element_type.default)


def _under(settings: dict):
    """A context with autocast on as ``settings`` say (its cast cache off: the lowering's fake tensors stay out of
    it)."""
    stack = contextlib.ExitStack()
    for device_type, dtype in settings.items():
        stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
    return stack


_aten = torch.ops.aten
# the ATen matmuls autocast casts the operands of where it runs inside a composite op (an einsum's bmm)
_MATMULS = {_aten.mm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.addmm.default, _aten.addbmm.default,
            _aten.addmv.default, _aten.mv.default, _aten.dot.default, _aten.vdot.default, _aten.matmul.default,
            _aten.linear.default}


def drop_autocast_casts(lowered: fx.GraphModule, region: fx.GraphModule) -> int:
    """Take out of ``lowered`` (``region`` lowered under autocast) the casts autocast put there, and return how many.

    Autocast casts what an op reads to the dtype the op then computes and returns in (a matmul's float32 operand
    to bfloat16, a sum's bfloat16 input to float32 on CUDA) right before the op runs: in the lowering such a cast
    is a node made while lowering that op (its ``from_node``), to the dtype Dynamo traced the op's result in, not
    the op's result itself, of a value of the user's graph the op reads, or (autocast running inside a composite
    op: an einsum's bmm) read by matmuls alone. A cast the user wrote (``v.bfloat16()``, ``x.to(...)``) is its
    node's result and stays; so does a cast a composite op makes to another dtype than its result's or of its own
    values for other ops (a norm's upcast and its cast back). (A reduction's ``dtype=`` is spelled out as a cast
    later, by ``finish_lowering``, on the dtypes as written.) Every reader then reads the region as written, as it
    reads a graph lowered with autocast off."""
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    region_inputs = [n for n in region.graph.nodes if n.op == "placeholder"]
    lowered_out = next(n for n in lowered.graph.nodes if n.op == "output").args[0]
    region_out = next(n for n in region.graph.nodes if n.op == "output").args[0]
    value_of = dict(zip(region_inputs, placeholders))
    value_of.update((r, a) for r, a in zip(region_out, lowered_out) if isinstance(a, fx.Node))
    results = set(value_of.values())
    by_name = {n.name: n for n in region.graph.nodes}
    dropped = 0
    for node in list(lowered.graph.nodes):
        if node.op != "call_function" or node.target not in _CASTS or node in results or not node.args:
            continue
        origin = node.meta.get("from_node") or []
        op = by_name.get(getattr(origin[-1], "name", None)) if origin else None
        if op is None:
            continue
        result, cast = example_value(op), example_value(node)
        if not (isinstance(result, torch.Tensor) and isinstance(cast, torch.Tensor) and result.dtype == cast.dtype):
            continue
        source = node.args[0]
        if source not in {value_of.get(a) for a in op.all_input_nodes} and \
                not (node.users and all(u.op == "call_function" and u.target in _MATMULS for u in node.users)):
            continue
        node.replace_all_uses_with(source)
        lowered.graph.erase_node(node)
        dropped += 1
    if dropped:
        lowered.recompile()
    return dropped


def _as_written(lowered: fx.GraphModule) -> None:
    """Give each node of ``lowered`` (traced under autocast, autocast's casts taken out) the fake value it has as
    the code is written, with autocast off: what it computes in the dtypes type promotion gives (a matmul of a
    bfloat16 and a float32 tensor in float32, as any other op of the two), as a graph lowered with autocast off
    holds. The readers of dtypes (a reduction's ``dtype=``, a user's ``.float()``: a cast or not) then read
    it as they read a graph lowered with autocast off. Left as traced when it cannot be recomputed."""
    placeholders = [n for n in lowered.graph.nodes if n.op == "placeholder"]
    values = [example_value(n) for n in placeholders]
    fake_mode = next((v.fake_mode for v in values if isinstance(v, torch._subclasses.FakeTensor)), None)
    if fake_mode is None:
        return
    computed: dict = {}

    class AsWritten(fx.Interpreter):
        def run_node(self, node):
            if node.op == "get_attr" and example_value(node) is not None:
                return example_value(node)
            result = super().run_node(node)
            computed[node] = result
            return result

        def call_function(self, target, args, kwargs):
            if target in _MATMULS:
                floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
                dtype = floats[0].dtype if floats else None
                for a in floats[1:]:
                    dtype = torch.promote_types(dtype, a.dtype)
                args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            return super().call_function(target, args, kwargs)

    try:
        with fake_mode, enable_python_dispatcher():
            AsWritten(lowered).run(*values)
    except Exception as err:  # noqa: BLE001 - the traced values stay (reasons may then name autocast's dtypes)
        log.debug("based_compile: recomputing the dtypes as written failed (%s: %s)", type(err).__name__, err)
        return
    for node, value in computed.items():
        if node.op not in ("placeholder", "output") and "val" in node.meta:
            node.meta["val"] = value
    for node in list(lowered.graph.nodes):       # x.float() of a float32 x is x itself (no node with autocast off)
        if node.op == "call_function" and node.target in _CASTS and node.args and set(node.kwargs) <= {"dtype"} \
                and isinstance(node.args[0], fx.Node) and _same_dtype(node.args[0], node):
            node.replace_all_uses_with(node.args[0])
            lowered.graph.erase_node(node)
    lowered.recompile()


def _same_dtype(a: fx.Node, b: fx.Node) -> bool:
    x, y = example_value(a), example_value(b)
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype


class _Quiet(logging.Filter):
    """Drops the records of a logger: FakeTensor's ``log.exception`` of a meta kernel that raised, while the pass
    tries a lowering that may fail on purpose."""

    def filter(self, record) -> bool:
        return False


def lower_region(region: fx.GraphModule, settings: dict) -> fx.GraphModule:
    """``region`` lowered to ATen as its code is written: with autocast off; where that fails under the autocast
    its nodes were traced in (``settings``: node name -> settings, ``settings_by_node``; an op reading tensors of
    different floating dtypes, a bfloat16 @ float32 matmul that only autocast makes valid), each node traced under
    its own settings, autocast's casts taken out (``drop_autocast_casts``) and the dtypes read as written
    (``_as_written``). Call it with autocast off."""
    if not any(settings.get(n.name) for n in region.graph.nodes):
        return lower_to_aten(region)
    fake_log, quiet = logging.getLogger("torch._subclasses.fake_tensor"), _Quiet()
    fake_log.addFilter(quiet)
    try:
        return lower_to_aten(region)
    except Exception as err:  # noqa: BLE001 - valid only under autocast: lowered as traced below
        log.debug("based_compile: lowering with autocast off failed (%s: %s); lowered under autocast, its casts "
                  "taken out", type(err).__name__, err)
    finally:
        fake_log.removeFilter(quiet)
    traced = trace_to_aten(region, around=lambda node: _under(settings.get(node.name, {})))
    drop_autocast_casts(traced, region)
    _as_written(traced)
    return finish_lowering(traced)
