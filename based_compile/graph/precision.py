"""Casts inside a site: a round trip through a lower precision is not a no-op.

The operator computes a site in the dtype of its output (q, k, v cast to it). A cast written
inside the attention that rounds to a lower precision and comes back (``s.float().double()``,
``a.bfloat16().to(q.dtype)``) rounds every score: the user's program computes a different
function, by the cast dtype's rounding (2e-9 for a float32 trip in float64, 4e-3 for bfloat16),
which a numerical probe at its tolerance may not see. ``lossy_round_trip`` finds such a cast
structurally, on the lowered site (from its output back to q, k, v), so it is refused at any size.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .candidate import Match
from .canonicalize import example_value

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
