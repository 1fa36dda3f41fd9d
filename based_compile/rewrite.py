"""Graph surgery: replace each settled site's output by a call of the ``based`` operator.

The inserted node calls ``based_attention_call`` with plain arguments (FX prints them as
literals); it builds the BasedSpec and calls ``based_compile.ops.based_attention``, so the
inner compiler traces ``torch.ops.based.attention`` into its graph. Nodes that only fed the
old subgraph are erased.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .canonicalize import example_value
from .spec import BasedSpec
from .verify import Settled

aten = torch.ops.aten


def based_attention_call(q, k, v, layout: str, scale: float, c0: float, c1: float, c2: float, causal: bool,
                         normalize: bool, eps: float, group: int):
    """The rewritten site: o = based_attention(q, k, v, BasedSpec(...)) (q: [B, H, T, Dk] or [B, T, H, Dk])."""
    from .ops import based_attention

    spec = BasedSpec(layout=layout, scale=scale, c0=c0, c1=c1, c2=c2, causal=causal, normalize=normalize,
                     eps=eps, group=group)
    return based_attention(q, k, v, spec)


def rewrite_sites(gm: fx.GraphModule, sites: list[Settled]) -> fx.GraphModule:
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        m, s = site.match, site.spec
        q, k, v = (replaced.get(n, n) for n in (m.q, m.k, m.v))
        with graph.inserting_before(m.output):
            if site.unsqueeze_inputs:
                q, k, v = (graph.call_function(aten.unsqueeze.default, (x, 0)) for x in (q, k, v))
            out = graph.call_function(based_attention_call, (q, k, v, s.layout, float(s.scale), float(s.c0),
                                                             float(s.c1), float(s.c2), bool(s.causal),
                                                             bool(s.normalize), float(s.eps), int(s.group)))
            if site.transpose_out:
                out = graph.call_function(aten.transpose.int, (out, 1, 2))
            if site.flatten_out:
                out = graph.call_function(aten.flatten.using_ints, (out, 0, 1))
            want, have = example_value(m.output), example_value(m.q)
            if isinstance(want, torch.Tensor) and isinstance(have, torch.Tensor) and want.dtype != have.dtype:
                out = graph.call_function(aten._to_copy.default, (out,), {"dtype": want.dtype})
        out.meta["stack_trace"] = m.output.meta.get("stack_trace")
        m.output.replace_all_uses_with(out)
        replaced[m.output] = out
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm
