"""Casts inside a site: a round trip through a lower precision is not a no-op.

The operator computes a site in the dtype of its output (q, k, v cast to it). A cast written
inside the attention that rounds to a lower precision and comes back (``s.float().double()``,
``a.bfloat16().to(q.dtype)``) rounds every score: the user's program computes a different
function, by the cast dtype's rounding (2e-9 for a float32 trip in float64, 4e-3 for bfloat16),
which a numerical probe at its tolerance may not see. ``lossy_round_trip`` finds such a cast
structurally, on the lowered site (from its output back to q, k, v), so it is refused at any size.

A sum or running sum written with ``dtype=`` casts its input before it reduces; the lowering spells that cast
out (``canonicalize.split_reduction_dtypes``), so it is judged here like any ``.to()``. ``reduction_dtype_note``
names such a reduction in a refusal it precedes: no reader reads through its cast, and the reader's own reason
(a normaliser "not a sum of phi(k)", a chain "through convert_element_type") would not say why.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .candidate import Match
from .canonicalize import REDUCTION_DTYPE, example_value
from .refusal import Refused
from .report import source_of

aten = torch.ops.aten

_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}


def _eps(dtype: torch.dtype) -> float | None:
    return torch.finfo(dtype).eps if dtype.is_floating_point else None


def _dtype(node) -> torch.dtype | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def site_nodes(match: Match) -> list[fx.Node]:
    """The lowered nodes of a site: from its output back to, not through, q, k and v."""
    stop, seen, stack = {match.q, match.k, match.v}, [], [match.output]
    while stack:
        node = stack.pop()
        if node in stop or node in seen or node.op == "placeholder":
            continue
        seen.append(node)
        stack.extend(node.all_input_nodes)
    return seen


def cast_dtypes(match: Match) -> set:
    """The floating dtypes the casts inside a site cast to (``a.float()`` of bfloat16 weights: float32)."""
    return {_dtype(n) for n in site_nodes(match) if n.op == "call_function" and n.target in _CASTS
            and _dtype(n) is not None and _dtype(n).is_floating_point}


def lossy_round_trip(match: Match) -> fx.Node | None:
    """A cast inside the site to a floating dtype less precise than both its input and the site's
    output (a round trip through lower precision), or None."""
    out_eps = _eps(_dtype(match.output)) if _dtype(match.output) is not None else None
    if out_eps is None:
        return None
    for node in site_nodes(match):
        if node.op != "call_function" or node.target not in _CASTS:
            continue
        src, dst = (_dtype(node.args[0]) if node.args else None), _dtype(node)
        if src is None or dst is None or _eps(src) is None or _eps(dst) is None:
            continue
        if _eps(dst) > _eps(src) and _eps(dst) > out_eps:
            return node
    return None


def describe_cast(cast: fx.Node, at: fx.Node | None = None) -> str:
    """The user's line of a cast and what it does, for a refusal: an explicit cast, or a reduction's ``dtype=``
    (the line not repeated when it is ``at``'s, the refused node's)."""
    src, dst = _dtype(cast.args[0]) if cast.args else None, _dtype(cast)
    reduction = cast.meta.get(REDUCTION_DTYPE)
    if reduction is None:
        return f"{source_of(cast)} casts to {dst}"
    name = "running sum" if reduction.target is aten.cumsum.default else "sum"
    where = "this line" if at is not None and source_of(at) == source_of(reduction) else source_of(reduction)
    return f"the {name} with dtype={dst} of a {src} tensor at {where} (its input cast to {dst} first)"


def _narrows(cast: fx.Node) -> bool:
    src, dst = _dtype(cast.args[0]) if cast.args else None, _dtype(cast)
    return None not in (src, dst) and None not in (_eps(src), _eps(dst)) and _eps(dst) > _eps(src)


def reduction_dtype_note(refusal: Refused) -> Refused:
    """``refusal`` with its reason led by the reductions with a ``dtype=`` other than their input's that the
    refused node reads (a narrowing first: it rounds what the operator would not); as it was when there is none."""
    node = refusal.node
    if not isinstance(node, fx.Node):
        return refusal
    casts, seen, stack = [], set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.meta.get(REDUCTION_DTYPE) is not None:
            casts.append(current)
        stack.extend(current.all_input_nodes)
    if not casts:
        return refusal
    cast = next((c for c in casts if _narrows(c)), casts[0])
    if _narrows(cast):
        why = (f"{describe_cast(cast, node)}: it rounds every element to {_dtype(cast)} before summing, a rounding the "
               "Based operator does not do, so no reader reads it as the operator's sum")
    else:
        why = (f"{describe_cast(cast, node)}: a widening cast inside the attention, read as an explicit "
               f".to({_dtype(cast)}) there")
    return Refused(refusal.category, f"{why} ({refusal.reason})", refusal.node)


_MATMULS = {aten.bmm.default, aten.mm.default, aten.baddbmm.default, aten.addmm.default}


def _reads_a_matmul(node: fx.Node) -> bool:
    """``node`` is computed from a matmul's result (scores, weights), not from constants alone (a mask's cast)."""
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_function" and current.target in _MATMULS:
            return True
        stack.extend(current.all_input_nodes)
    return False


def weights_cast_note(refusal: Refused) -> Refused:
    """``refusal`` with its reason led by an explicit narrowing cast between floating dtypes (``a.half()`` of float32
    weights) of what the refused node computes from the last matmuls (scores, weights, a normaliser) where there is
    one: it rounds every element, no reader reads through it, and the reader's own reason would not say why; as it
    was when there is none. A widening cast of the weights is read through (``match``: exact, zeros stay zeros);
    whether eager then returns wider than the operator would is ``autocast_scope.operator_precision``'s."""
    node = refusal.node
    if not isinstance(node, fx.Node):
        return refusal
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_function" and current.target in _MATMULS:
            continue
        if current.op == "call_function" and current.target in _CASTS and current.meta.get(REDUCTION_DTYPE) is None \
                and _reads_a_matmul(current):
            src = _dtype(current.args[0]) if current.args else None
            dst = _dtype(current)
            if src is not None and dst is not None and src.is_floating_point and dst.is_floating_point \
                    and _narrows(current):
                why = (f"{describe_cast(current)} from {src}: a narrowing cast: it rounds every element inside the "
                       "attention, which no reader reads through")
                return Refused(refusal.category, f"{why} ({refusal.reason})", refusal.node)
        stack.extend(current.all_input_nodes)
    return refusal
