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
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx

from .canonicalize import example_value

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


def switch_inside(outputs, inputs) -> fx.Node | None:
    """An autocast switch of Dynamo's graph between the first node computed from ``inputs`` on the way to any of
    ``outputs`` (the output, returned states, a step's state updates) and the last of them: the site's matmuls
    and its results run under different settings (the operator, inserted at one place, would take that
    place's), or None."""
    outputs = [o for o in outputs if o is not None]
    graph = outputs[0].graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    stop = set(inputs)
    seen, stack = set(), list(outputs)
    first, last = min(position[o] for o in outputs), max(position[o] for o in outputs)
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if any(a in stop for a in node.all_input_nodes):
            first = min(first, position[node])
        stack.extend(node.all_input_nodes)
    for node in graph.nodes:
        if first < position[node] < last and _switches_autocast(node):
            return node
    return None


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
