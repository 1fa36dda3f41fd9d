"""Graph surgery: replace each settled site's output by a call of the ``based`` operator.

The inserted node calls ``based_attention_call`` with plain arguments (FX prints them as
literals); it builds the BasedSpec and calls ``based_compile.op.custom_op.based_attention``, so the
inner compiler traces ``torch.ops.based.attention`` into its graph. Nodes that only fed the
old subgraph are erased.

``rewrite_dynamo_sites`` edits Dynamo's own graph (the sites were found in a lowered copy of
a region of it; ``to_dynamo`` maps the lowered q, k, v and output back to Dynamo's nodes), so
the inner compiler gets Dynamo's graph with only the attention replaced.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..op.custom_op import based_attention
from ..op.spec import BasedSpec
from .canonicalize import INPLACE_OPERATORS, example_value
from .verify import Settled

aten = torch.ops.aten


def based_attention_call(q, k, v, layout: str, scale: float, c0: float, c1: float, c2: float, causal: bool,
                         normalize: bool, eps: float, group: int):
    """The rewritten site: o = based_attention(q, k, v, BasedSpec(...)) (q: [B, H, T, Dk] or [B, T, H, Dk])."""
    spec = BasedSpec(layout=layout, scale=scale, c0=c0, c1=c1, c2=c2, causal=causal, normalize=normalize,
                     eps=eps, group=group)
    return based_attention(q, k, v, spec)


def _fake_run(fake_mode, fn, *args, **kwargs):
    with fake_mode:
        return fn(*args, **kwargs)


def _mutates(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (node.target in INPLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
                or node.is_impure())
    return node.op != "get_attr"


_VIEW_NAMES = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "flatten", "getitem",
               "contiguous", "t", "narrow", "select", "as_strided", "unflatten", "split", "chunk", "unbind",
               "detach", "view_as", "expand_as", "movedim", "swapaxes", "__getitem__", "alias"}


def _mutates_only_a_temporary(node: fx.Node, candidates: set) -> bool:
    """An in-place op on a tensor the region itself allocated (``a.masked_fill_(...)`` on the
    weights): dead once nothing reads that tensor."""
    base = node.args[0] if node.args else None
    if not isinstance(base, fx.Node) or base not in candidates:
        return False
    name = base.target if isinstance(base.target, str) else getattr(base.target, "__name__", "")
    return base.op in ("call_function", "call_method") and name not in _VIEW_NAMES \
        and all(user is node or user in candidates for user in base.users)


def _erase_dead(graph: fx.Graph, candidates: set) -> None:
    """Erase the nodes of the matched regions that nothing uses any more. A mutation stays
    unless it updates a temporary of the region (Dynamo's graph keeps in-place updates of
    buffers that no node reads)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and not node.users and (
                    not _mutates(node) or _mutates_only_a_temporary(node, candidates)):
                graph.erase_node(node)
                candidates.discard(node)
                changed = True


def rewrite_dynamo_sites(gm: fx.GraphModule, sites: list[Settled], to_dynamo: dict,
                         region: list[fx.Node]) -> fx.GraphModule:
    """Replace each site's output in Dynamo's graph; ``to_dynamo``: lowered node -> Dynamo node.

    Only nodes of ``region`` (the lowered neighbourhoods) are erased when left unused."""
    graph = gm.graph
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        m, s = site.match, site.spec
        q, k, v, output = (to_dynamo[n] for n in (m.q, m.k, m.v, m.output))
        q, k, v = (replaced.get(n, n) for n in (q, k, v))
        fakes = [example_value(n) for n in (q, k, v)]
        fake_mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))

        def add(target, args, kwargs=None, *, method=False):
            node = (graph.call_method if method else graph.call_function)(target, args, kwargs or {})
            values = fx.node.map_arg((args, kwargs or {}), lambda n: example_value(n))
            fn = (lambda x, *a, **kw: getattr(x, target)(*a, **kw)) if method else target
            node.meta["example_value"] = _fake_run(fake_mode, fn, *values[0], **values[1])
            node.meta["stack_trace"] = output.meta.get("stack_trace")
            return node

        with graph.inserting_before(output):
            if site.unsqueeze_inputs:
                q, k, v = (add(torch.unsqueeze, (x, 0)) for x in (q, k, v))
            out = add(based_attention_call, (q, k, v, s.layout, float(s.scale), float(s.c0), float(s.c1),
                                             float(s.c2), bool(s.causal), bool(s.normalize), float(s.eps),
                                             int(s.group)))
            if site.transpose_out:
                out = add(torch.transpose, (out, 1, 2))
            if site.flatten_out:
                out = add(torch.flatten, (out, 0, 1))
            want = example_value(output)
            if want.dtype != example_value(out).dtype:
                out = add("to", (out, want.dtype), method=True)
        output.replace_all_uses_with(out)
        replaced[output] = out
    _erase_dead(graph, set(region))
    graph.lint()
    gm.recompile()
    return gm
