"""Scores written with ``torch.baddbmm``: read as the matmul they are, where that is exact.

``torch.baddbmm(input, q, kT, beta=b, alpha=a)`` computes ``b * input + a * (q @ kT)``. With
``beta=0`` the input is ignored (PyTorch does not propagate a NaN or inf in it), and an input that
is a constant zero fill (``torch.zeros``, ``zeros_like``, ``new_zeros``, ``full(.., 0)``, through
views) adds ``b * 0 = 0`` for a finite ``b``: in both cases the scores are ``a * (q @ kT)``
exactly. ``read_baddbmm_scores(gm)`` rewrites those, in the lowered graph before matching, as a
``bmm`` times ``a`` (every other reader then sees the ordinary scores; the user's ``baddbmm`` is
left dead in the copy and removed with the site's other nodes). Any other input (a bias, a
relative-position term, ``0 * x``, which is NaN where x is not finite) is left as written: the
lookalike report names it (``lookalike.py``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .canonicalize import example_value, insert_after, scalar_value, strip_views

aten = torch.ops.aten

_ZERO_FILLS = {aten.zeros.default: None, aten.zeros_like.default: None, aten.new_zeros.default: None,
               aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}


def _zero_fill(gm: fx.GraphModule, node) -> bool:
    """``node`` is, through views, a tensor filled with the constant 0 (not ``0 * x``)."""
    node = strip_views(node)
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _ZERO_FILLS:
        return False
    where = _ZERO_FILLS[node.target]
    return where is None or (len(node.args) > where and scalar_value(gm, node.args[where]) == 0.0)


def read_baddbmm_scores(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.baddbmm.default:
            continue
        inp, b1, b2 = node.args[:3]
        beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in (beta, alpha)):
            continue
        if not (beta == 0 or _zero_fill(gm, inp)):
            continue
        val = example_value(node)
        mode = getattr(val, "fake_mode", None)
        if mode is None:
            continue
        product = scaled = insert_after(node, aten.bmm.default, (b1, b2), mode=mode, source=node)
        if alpha != 1:
            scaled = insert_after(product, aten.mul.Tensor, (product, alpha), mode=mode, source=node)
        node.replace_all_uses_with(scaled, delete_user_cb=lambda user: user not in (product, scaled))
    graph.lint()
    gm.recompile()
