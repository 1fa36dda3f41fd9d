"""Taking the only index of a size-1 axis is a view: ``x[:, :, 0]`` of a [B, H, 1, F] tensor is
``x.squeeze(2)``.

Decoding code often applies the feature map to the token's [B, H, 1, D] slice and then takes the
token (``phi(q)[:, :, 0]``, ``phi(q).select(2, -1)``); the readers follow a tensor through views
(``canonicalize.VIEW_OPS``), not through parts of it. ``read_unit_selects(gm)`` rewrites, in the
lowered graph before matching, every ``select`` of index 0 or -1 on an axis whose size is the
constant 1 as the ``squeeze`` of that axis: the same values, the same node (its users and any
mapping to the model's graph are kept), read as a view by everything after. A size that is only 1
at the traced example (a symbolic size) is left as written.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .canonicalize import example_value

aten = torch.ops.aten


def read_unit_selects(gm: fx.GraphModule) -> None:
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.select.int or len(node.args) < 3:
            continue
        x, dim, index = node.args[:3]
        value = example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(value, torch.Tensor) or not isinstance(dim, int) or not isinstance(index, int):
            continue
        size = value.shape[dim]
        if not isinstance(size, int) or size != 1 or index not in (0, -1):
            continue
        node.target = aten.squeeze.dim
        node.args = (x, dim)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
