"""In-place writes in Dynamo's graph that a rewrite must respect.

The operator replaces a site at its output, so it reads q, k, v (and buffers such as a mask)
as they are there; the user's code read them earlier. ``written_before_output`` finds an
in-place write in between, into the storage of anything the site reads.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .candidate import site_inputs
from .canonicalize import example_value, writes_in_place
from .report import source_of


def storage_key(node: fx.Node):
    value = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata       # the example values (kept in the graph) keep it alive
    except Exception:  # noqa: BLE001 - a tensor without storage (a subclass): treated as unknown
        return _UNKNOWN_STORAGE


_UNKNOWN_STORAGE = "unknown"



def written_before_output(gm: fx.GraphModule, site, to_dynamo: dict) -> str | None:
    """The source of an in-place write, before the site's output in Dynamo's graph, into memory the
    site reads (q, k, v or a buffer such as a mask, through any view of them), or None.

    The operator replaces the site at its output, so it reads q, k, v as they are there; the user's
    code read them earlier. A write in between (``v.mul_(2)`` after ``a @ v``, ``self.mask.fill_(1)``
    before the mask is used, or ``q *= 2`` read through as a scale) would change what is computed."""
    output = to_dynamo[site.match.output]
    read = {storage_key(to_dynamo[n]) for n in site_inputs(site.match) if n in to_dynamo} - {None}
    if not read:
        return None
    for node in gm.graph.nodes:
        if node is output:
            return None
        if writes_in_place(node) and node.args and isinstance(node.args[0], fx.Node):
            key = storage_key(node.args[0])
            if key is not None and (key == _UNKNOWN_STORAGE or key in read or _UNKNOWN_STORAGE in read):
                return source_of(node)
    return None
