"""A copy of a Dynamo graph that an inner compiler takes for the original (to undo a rewrite)."""
from __future__ import annotations

import copy

import torch.fx as fx


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` that an inner compiler takes for the original: nodes with their meta and
    the attributes Dynamo sets on them (``_dynamo_source`` on placeholders)."""
    copied = copy.deepcopy(graph)
    for old, new in zip(graph.nodes, copied.nodes, strict=True):      # graph_copy keeps the order
        for name, value in vars(old).items():
            if name not in vars(new):
                setattr(new, name, value)
    return copied
