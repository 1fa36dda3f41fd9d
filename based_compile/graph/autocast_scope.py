"""Whether autocast lowers a site's precision in eager, and running the operator at that precision.

Inside ``torch.autocast``, eager PyTorch runs matmuls, bmm (and an einsum that runs as one) in the autocast
dtype and leaves elementwise products, sums and cumsums in their inputs' dtype. Which nodes did is read off the
dtypes Dynamo traced (a float16/bfloat16 value computed from a wider one), not off the ops' names. The
``based`` operator is matmul-like: under autocast it casts q, k, v to the autocast dtype (``op.custom_op``),
as a site written with matmuls or einsums computes in eager. A site one of whose results is computed in
float32 all the way (``(phi(k)[..., :, None] * v[..., None, :]).cumsum(2)`` and a broadcast readout) keeps
float32 in eager even under autocast, so its rewrite runs the operator with autocast off (``keep_dtype``):
no less precise than the user's code. A site split by an autocast switch is refused (``switch_inside``).
The pass itself reads and probes a graph compiled inside autocast with autocast off
(``analysis_without_autocast``): the casts autocast would insert before matmuls are not the user's code.
A graph only autocast makes valid (q, k from ``nn.Linear`` in bfloat16 against a float32 v) is read as written
too (``autocast_lowering``). Which dtype the operator runs in, for every mix of q, k, v dtypes, is decided in one
place (``operator_precision``).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.fx as fx

from .canonicalize import example_value
from .refusal import Refused

_LOWER = (torch.float16, torch.bfloat16)


def _lowers_precision(node: fx.Node) -> bool:
    """``node`` computes a float16/bfloat16 value from a wider floating input, as Dynamo traced it (under the
    autocast the model runs in): autocast cast it (a matmul, bmm, an einsum that runs as one, linear,
    vecdot, ...), or the user did (``x.to(torch.bfloat16)``); either way the user's code computes there in the
    lower precision, whatever the op is called."""
    out = example_value(node)
    if not isinstance(out, torch.Tensor) or out.dtype not in _LOWER:
        return False
    for arg in node.all_input_nodes:
        value = example_value(arg)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in _LOWER:
            return True
    return False


def casts_under_autocast(output: fx.Node, inputs) -> bool:
    """Some node between ``inputs`` (q, k, v, initial states) and ``output`` in Dynamo's graph lowers the
    precision of what it reads (``_lowers_precision``): the user's code computes this result in float16 or
    bfloat16 somewhere, so the operator may too."""
    stop = set(inputs)
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if node.op in ("call_function", "call_method", "call_module") and _lowers_precision(node):
            return True
        stack.extend(node.all_input_nodes)
    return False


def _switches_autocast(node: fx.Node) -> bool:
    """``torch.autocast(...)`` entered or left in Dynamo's graph (``_enter_autocast`` / ``_exit_autocast``)."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    module = getattr(target, "__module__", "") or ""
    return node.op == "call_function" and "autocast" in name and module.startswith("torch")


def _enters(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return _switches_autocast(node) and "enter" in name


def _blocks_at(graph: fx.Graph) -> dict:
    """Each node of ``graph`` -> the ``torch.autocast`` blocks it runs in (the ``_enter_autocast`` nodes entered
    and not yet left, in order): two nodes run under one setting when they have the same."""
    at, entered = {}, []
    for node in graph.nodes:
        if _switches_autocast(node) and not _enters(node):
            context = node.args[0] if node.args else None
            entered = entered[:entered.index(context)] if context in entered else entered[:-1]
        elif _switches_autocast(node):
            entered = entered + [node]
        at[node] = tuple(entered)
    return at


def traced_settings() -> dict:
    """The autocast settings on now, as Dynamo traced the graph under them: device type -> autocast's dtype there."""
    return {d: torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)}


def settings_by_node(gm: fx.GraphModule, outer: dict) -> dict:
    """The name of each node of Dynamo's graph ``gm`` -> the autocast settings it runs under (device type ->
    dtype): ``outer`` (the caller's, ``traced_settings``) as the ``torch.autocast`` blocks entered inside the
    compiled code (``_enter_autocast(device, dtype, enabled, cache)``) change them."""
    blocks = _blocks_at(gm.graph)
    settings_of: dict = {(): dict(outer)}

    def settings(chain: tuple) -> dict:
        if chain not in settings_of:
            settings_of[chain] = dict(settings(chain[:-1]))
            enter = chain[-1]
            device, dtype, enabled = (list(enter.args) + [None, None, True])[:3]
            if enabled:
                settings_of[chain][device] = dtype if isinstance(dtype, torch.dtype) else \
                    settings_of[chain].get(device, torch.get_autocast_dtype(device))
            else:
                settings_of[chain].pop(device, None)
        return settings_of[chain]

    return {node.name: settings(chain) for node, chain in blocks.items()}


def switch_inside(outputs, inputs) -> fx.Node | None:
    """An autocast switch of Dynamo's graph under which some of the site's nodes run and others not: the nodes
    computed from ``inputs`` on the way to any of ``outputs`` (the output, returned states, a step's state updates)
    do not all run under one setting, so its matmuls and its results run under different ones (the operator,
    inserted at one place, would take that place's); or None. A switch around code the site does not run
    (``v = self.v_proj(x)`` with autocast off, between q's and v's projections) is no switch inside it."""
    outputs = [o for o in outputs if o is not None]
    graph = outputs[0].graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    stop = set(inputs)
    seen, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    site = [n for n in sorted(seen, key=position.__getitem__)]      # those computed from the inputs, in order
    computed = set()
    for node in site:
        if any(a in stop or a in computed for a in node.all_input_nodes):
            computed.add(node)
    site = [n for n in site if n in computed] + [o for o in outputs if o not in computed]
    blocks = _blocks_at(graph)
    if len({blocks[n] for n in site}) <= 1:
        return None
    first, last = min(position[n] for n in site), max(position[n] for n in site)
    return next(n for n in graph.nodes if first < position[n] < last and _switches_autocast(n))


def keeps_dtype(outputs, inputs) -> bool:
    """Whether the operator standing for ``outputs`` (the output, the returned states) runs with autocast off:
    unless the user's code computes every one of them in lower precision somewhere (``casts_under_autocast``),
    the operator cast to autocast's dtype would compute one in lower precision than the user's code does."""
    return not all(casts_under_autocast(o, inputs) for o in outputs)


def widened_after_lowering(outputs, inputs) -> fx.Node | None:
    """A result among ``outputs`` that the user's code computes in lower precision on the way (autocast's matmul,
    ``casts_under_autocast``) and then returns wider (float32 or float64, as Dynamo traced it: a normaliser summed
    with ``dtype=torch.float32`` or after ``.float()`` inside autocast), or None. The operator that would stand
    for it runs at autocast's dtype and returns that (``keeps_dtype``): a narrower result than eager's, rounded
    to float16/bfloat16, so such a site is refused."""
    for out in outputs:
        if out is None:
            continue
        value = example_value(out)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype not in _LOWER \
                and casts_under_autocast(out, inputs):
            return out
    return None


def analysis_without_autocast():
    """A context with autocast off on the CPU and CUDA, for the pass's own tracing and probing: a graph
    compiled inside ``torch.autocast`` is read as the code is written (its matmuls' casts are autocast's,
    not the user's), and the rewrite keeps autocast's casts by the rules above."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def without_autocast(device_type: str):
    """A context with autocast off on ``device_type`` when it is on (else a no-op context)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class OperatorPrecision(NamedTuple):
    """How the operator standing for a site runs (``operator_precision``)."""

    keep_dtype: bool                    # with autocast off (else cast as a matmul: its autocast rule)
    dtype: torch.dtype | None = None    # q, k, v of different dtypes: the one they are cast to first


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def operator_precision(returned, inputs, q: fx.Node, k: fx.Node, v: fx.Node, settings: dict) -> OperatorPrecision:
    """The precision the operator standing for ``returned`` (the output, returned states; Dynamo's nodes) runs at,
    read from ``inputs`` (q, k, v, initial states) as Dynamo traced them under the autocast ``settings``
    (``settings_by_node`` at the output), or ``Refused`` with the reason.

    - Some result computed in lower precision by the user's code and returned wider (``widened_after_lowering``):
      refused, unless the operator keeps its inputs' dtypes anyway.
    - Cast as a matmul (a result computed in autocast's dtype somewhere): q, k, v of different dtypes (bfloat16 q,
      k from ``nn.Linear``, a float32 v) are cast to autocast's dtype on their device, as eager's matmuls cast
      them and as the operator's autocast rule casts q, k, v of one dtype. float64 is not cast by autocast: mixed
      with another dtype it is refused, and so are different dtypes where autocast is off (nothing casts them).
    - Autocast off (``keeps_dtype``): q, k, v of different dtypes (a float32 v against bfloat16 q, k in products
      and sums: type promotion) are cast to the widest of them, and the operator computes in it throughout (its
      results then cast to eager's dtypes, as for q, k, v of one dtype); eager computes none of its results in a
      wider dtype (promotion goes no wider, autocast's matmuls narrower), and one it returns wider is refused."""
    keep = keeps_dtype(returned, inputs)
    wide = widened_after_lowering(returned, inputs)
    output = returned[0]
    if wide is not None and not keep:
        raise Refused("unsupported", f"under torch.autocast the attention computes in lower precision and returns "
                                     f"{wide.name} in {example_value(wide).dtype} (a normaliser or a sum widened after "
                                     "the matmuls): the operator, cast as a matmul is, would return it rounded to "
                                     "autocast's dtype", output)
    values = [example_value(x) for x in (q, k, v)]
    dtypes = [x.dtype for x in values]
    if len(set(dtypes)) == 1:
        return OperatorPrecision(keep)
    mixed = f"q, k, v are {_names(dtypes)}"
    device = values[0].device.type
    if not keep:
        if device not in settings:
            raise Refused("unsupported", f"{mixed} and the attention computes in lower precision with autocast off "
                                         "on their device: nothing casts them to one dtype for the operator", output)
        if any(not x.is_floating_point() or x.dtype == torch.float64 or x.device.type != device for x in values):
            raise Refused("unsupported", f"{mixed}: under torch.autocast the matmuls cast float16, bfloat16 and "
                                         "float32 to autocast's dtype, never float64, so they do not meet in one "
                                         "dtype the operator could take", output)
        return OperatorPrecision(False, settings[device])
    widest = dtypes[0]
    for d in dtypes[1:]:
        widest = torch.promote_types(widest, d)
    for result in returned:
        value = example_value(result)
        if not (isinstance(value, torch.Tensor) and torch.promote_types(value.dtype, widest) == widest):
            raise Refused("unsupported", f"{mixed} and the attention returns {result.name} in "
                                         f"{getattr(value, 'dtype', None)}, wider than all of them: the operator would "
                                         f"compute it in {widest}", output)
    return OperatorPrecision(True, widest)
