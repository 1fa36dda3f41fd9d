"""Graph surgery: replace each settled site's output by a call of the ``based`` operator.

The inserted node calls ``based_attention_call`` with plain arguments (FX prints them as
literals); it builds the BasedSpec and calls ``based_compile.op.custom_op.based_attention``, so the
inner compiler traces ``torch.ops.based.attention`` into its graph.

``rewrite_dynamo_sites`` edits Dynamo's own graph. The sites were found in a functional lowering
of a region of it, in which each Dynamo node maps to the value it had *when it ran*
(``canonicalize._AtTime``; ``to_dynamo`` maps the lowered q, k, v and output back). Everything
about memory is decided by one model of Dynamo's graph (``inplace.Storages``: each node's
position and the storage its fake value lives in, which PyTorch shares exactly between aliases):

1. the operator reads q, k, v at the output's position: no write into their memory in between
   (``inplace.written_before_output``, refused in the driver);
2. the output node is replaced by the operator's fresh tensor; when the output's memory is
   written in place at or after it (``o /= z``, ``o.div_(z)``, a later ``o += x``), later reads
   of that memory through another node of the same geometry are re-pointed to the new tensor,
   reads through a view of another geometry are refused, and a later in-place write makes the
   new tensor a clone (``inplace.plan_output``);
3. dead code: a region node is erased when nothing uses it and, if it writes in place, no
   surviving node reads the written memory after it and that memory is not a graph input's
   (``inplace.erasable``). Nothing else is ever erased.

These rules are about storages and positions, not spellings: ``o /= z``, ``o.div_(z)``,
``o *= z.reciprocal()``, ``a.add_(s)``, ``a[i] = x``, ``a.masked_fill_`` and ``state.add_(o)`` are all "a node that writes the memory of its target", and every read is "a node whose input
lives in that memory".

Why two graphs (match on a functional lowering, edit Dynamo's graph) and not one functional
graph (issue 13, "the design question"). Evaluated: re-trace the whole Dynamo graph with
``make_fx`` + functionalisation under Dynamo's fake mode, match and rewrite there, and hand the
ATen graph to the inner compiler. Findings:
- Grad mode is lost: a plain (non pre-dispatch) ``make_fx`` trace of ``with torch.no_grad(): y =
  x * w`` has no ``_set_grad_enabled`` node, so the inner compiler's AOTAutograd would
  differentiate through it (wrong gradients, checked on torch 2.13). Pre-dispatch tracing keeps
  grad mode, but functionalised pre-dispatch graphs handed to ``compile_fx`` are
  torch.export's territory, not a path ``torch.compile`` backends use or test.
- Input mutations (a state updated in place, a buffer's ``fill_``) come back as extra outputs;
  the graph must then end with ``copy_`` into the inputs, reproducing AOTAutograd's epilogue
  (and its aliasing of inputs and outputs) by hand.
- The inner compiler gets ATen instead of Dynamo's torch-level graph: Inductor's pre-grad passes
  no longer see torch-level ops, Inductor re-traces an already traced graph (a second full
  trace: lowering a 12-layer graph costs about a second), and ``explain``/logging lose
  Dynamo's node names; DDP-split graphs and autocast would each need checking again.
- Symbolic shapes and stack traces would work (``lower_to_aten`` already does both on regions).
Each item is a new way to change what a model computes, in code every model passes through,
for a benefit (one graph) that a correct mapping gives too. So the design keeps Dynamo's
graph for the edit and makes the two graphs agree by construction where they met: the lowering
returns each node's value at its own time (the node the matcher picks is the node that computed
that value), and what may be replaced, re-pointed or erased is decided from storages and
positions as above, whatever the spelling. A rewrite that changes nothing but the site's output
node, and erases only what no surviving node can observe, computes what the user's graph did.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..op.attention_with_state import based_attention_with_state
from ..op.custom_op import based_attention
from ..op.recurrent_step import based_recurrent_step
from ..op.spec import BasedSpec
from .autocast_scope import without_autocast
from .canonicalize import example_value, writes_in_place
from .inplace import Storages, erasable, plan_output
from .verify import Settled

aten = torch.ops.aten


def based_attention_call(q, k, v, layout: str, scale: float, c0: float, c1: float, c2: float, causal: bool,
                         normalize: bool, eps: float, group: int, keep_dtype: bool = False):
    """The rewritten site: o = based_attention(q, k, v, BasedSpec(...)) (q: [B, H, T, Dk] or [B, T, H, Dk]);
    ``keep_dtype``: a site autocast leaves in its inputs' dtype runs with autocast off (``autocast_scope``)."""
    spec = BasedSpec(layout=layout, scale=scale, c0=c0, c1=c1, c2=c2, causal=causal, normalize=normalize,
                     eps=eps, group=group)
    if keep_dtype:
        with without_autocast(q.device.type):
            return based_attention(q, k, v, spec)
    return based_attention(q, k, v, spec)


def based_attention_with_state_call(q, k, v, layout: str, scale: float, c0: float, c1: float, c2: float, causal: bool,
                                    normalize: bool, eps: float, group: int, pieces: list, k_factors: list,
                                    kv0=None, k0=None, keep_dtype: bool = False):
    """The rewritten site of a prefill that returns its final states, or starts from initial states
    ``kv0``, ``k0`` (a continued prefill): (o, kv_state, k_state)."""
    spec = BasedSpec(layout=layout, scale=scale, c0=c0, c1=c1, c2=c2, causal=causal, normalize=normalize,
                     eps=eps, group=group)
    if keep_dtype:
        with without_autocast(q.device.type):
            return based_attention_with_state(q, k, v, spec, pieces, k_factors, kv0, k0)
    return based_attention_with_state(q, k, v, spec, pieces, k_factors, kv0, k0)


def recurrent_step_call(q, k, v, kv_state, k_state, pieces: list, q_factors: list, k_factors: list,
                        normalize: bool, eps: float, keep_dtype: bool = False):
    """The rewritten recurrent step: ``based_recurrent_step``; with ``keep_dtype`` (a step autocast leaves in
    its inputs' dtype in eager, ``autocast_scope``), run with autocast off."""
    if keep_dtype:
        with without_autocast(q.device.type):
            return based_recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)
    return based_recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)


def hint_shape_of(node: fx.Node) -> tuple:
    return tuple(int(x) for x in example_value(node).shape)


def _fake_run(fake_mode, fn, *args, **kwargs):
    with fake_mode:
        return fn(*args, **kwargs)


def _erase_dead(graph: fx.Graph, candidates: set, storages: Storages) -> None:
    """Erase the nodes of the matched regions that are dead (``inplace.erasable``), to a fixpoint."""
    erased: set = set()
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node in candidates and erasable(node, storages, erased):
                graph.erase_node(node)
                candidates.discard(node)
                erased.add(node)
                changed = True


def rewrite_dynamo_sites(gm: fx.GraphModule, sites: list[Settled], to_dynamo: dict,
                         region: list[fx.Node]) -> fx.GraphModule:
    """Replace each site's output in Dynamo's graph; ``to_dynamo``: lowered node -> Dynamo node.

    Only nodes of ``region`` (the lowered neighbourhoods) are erased when left unused."""
    graph = gm.graph
    storages = Storages(gm)           # positions and storages as Dynamo traced them, before any edit
    replaced: dict[fx.Node, fx.Node] = {}
    for site in sites:
        m, s = site.match, site.spec
        q, k, v, output = (to_dynamo[n] for n in (m.q, m.k, m.v, m.output))
        precision = site.precision          # the driver settled it (``autocast_scope.operator_precision``)
        keep_dtype = precision.keep_dtype
        plan = plan_output(gm, output, storages)        # the driver refused the sites it raises for
        q, k, v = (replaced.get(n, n) for n in (q, k, v))
        fakes = [example_value(n) for n in (q, k, v)]
        fake_mode = next(f.fake_mode for f in fakes if isinstance(f, torch._subclasses.FakeTensor))

        at = output

        def add(target, args, kwargs=None, *, method=False):
            node = (graph.call_method if method else graph.call_function)(target, args, kwargs or {})
            values = fx.node.map_arg((args, kwargs or {}), lambda n: example_value(n))
            fn = (lambda x, *a, **kw: getattr(x, target)(*a, **kw)) if method else target
            node.meta["example_value"] = _fake_run(fake_mode, fn, *values[0], **values[1])
            node.meta["stack_trace"] = output.meta.get("stack_trace")
            storages.add(node, before=at)
            return node

        states = site.states
        where = output
        if states is not None:        # the op goes before the first of the output and the states
            where = min([output] + [to_dynamo[r.node] for r in states.reads], key=storages.position.__getitem__)
        at = where
        with graph.inserting_before(where):
            if precision.dtype is not None:     # q, k, v of different dtypes: cast to the one the operator takes
                q, k, v = (x if example_value(x).dtype == precision.dtype else
                           add("to", (x, precision.dtype), method=True) for x in (q, k, v))
            if m.score_scale is not None:       # scores times (or over) a scale read at run time: so is q
                q = m.score_scale.apply(q, add, lambda n: replaced.get(to_dynamo[n], to_dynamo[n]))
            if site.unsqueeze_inputs:
                q, k, v = (add(torch.unsqueeze, (x, 0)) for x in (q, k, v))
            if site.unsqueeze_kv[0]:            # one key/value head without its axis: the op's heads axis
                k = add(torch.unsqueeze, (k, site.head_axis))
            if site.unsqueeze_kv[1]:
                v = add(torch.unsqueeze, (v, site.head_axis))
            spec_args = (q, k, v, s.layout, float(s.scale), float(s.c0), float(s.c1), float(s.c2), bool(s.causal),
                         bool(s.normalize), float(s.eps), int(s.group))
            initial = m.initial
            if states is None and initial is None:
                out = add(based_attention_call, (*spec_args, keep_dtype) if keep_dtype else spec_args)
            else:
                starts = []
                for st in (None, None) if initial is None else (initial.kv, initial.k):
                    if st is None:
                        starts.append(None)
                        continue
                    x = to_dynamo[st.source]
                    x = replaced.get(x, x)
                    if st.squeeze:
                        x = add(torch.squeeze, (x, tuple(st.squeeze)))
                    if tuple(st.perm) != tuple(range(len(st.perm))):
                        x = add(torch.permute, (x, tuple(st.perm)))
                    starts.append(x)
                plan_of = initial if initial is not None else states
                call = add(based_attention_with_state_call,
                           (*spec_args, list(plan_of.pieces), [float(f) for f in plan_of.k_factors], *starts),
                           {"keep_dtype": True} if keep_dtype else None)
                out, kv_new, k_new = (add(operator.getitem, (call, i)) for i in range(3))
                for r in states.reads if states is not None else ():
                    user = to_dynamo[r.node]
                    new = kv_new if r.kind == "kv" else k_new
                    if r.repeat:
                        new = add(torch.repeat_interleave, (new, int(s.group)), {"dim": 1})
                    if r.transpose:
                        new = add(torch.transpose, (new, -2, -1))
                    want_state = example_value(user)
                    have, want_shape = hint_shape_of(new), tuple(int(x) for x in want_state.shape)
                    if have != want_shape:         # they differ by size-1 axes (the probe compared values)
                        ones = [i for i, x in enumerate(have) if x == 1]
                        if ones:
                            new = add(torch.squeeze, (new, tuple(ones)))
                        for i in (i for i, x in enumerate(want_shape) if x == 1):
                            new = add(torch.unsqueeze, (new, i))
                    if not keep_dtype or want_state.dtype != example_value(new).dtype:
                        new = add("to", (new, want_state.dtype), method=True)     # see the output's cast
                    user.replace_all_uses_with(new)
        at = output
        with graph.inserting_before(output):
            if m.out_scale is not None:         # the weights times a scale read at run time: so is the output
                out = m.out_scale.apply(out, add, lambda n: replaced.get(to_dynamo[n], to_dynamo[n]))
            if site.transpose_out:
                out = add(torch.transpose, (out, 1, 2))
            if site.flatten_out:
                out = add(torch.flatten, (out, 0, 1))
            want = example_value(output)
            # cast as a matmul under autocast, the operator returns autocast's dtype at run time while its value
            # here (traced with autocast off) says q's: eager's dtype is set whatever it says (a float32 row sum
            # of bfloat16 weights makes eager's output float32, autocast_scope.operator_precision)
            if not keep_dtype or want.dtype != example_value(out).dtype:
                out = add("to", (out, want.dtype), method=True)
            if plan.clone:
                out = add(torch.clone, (out,))
        output.replace_all_uses_with(out)
        for reader, old in plan.repoint:
            reader.replace_input_with(old, out)
        for node in plan.derived - {output}:           # views of the output now view the new tensor
            storages.key[node] = storages.key[out]
        replaced[output] = out
    _erase_dead(graph, set(region), storages)
    graph.lint()
    gm.recompile()
    return gm


def rewrite_recurrent_steps(gm: fx.GraphModule, steps: list, to_dynamo: dict) -> None:
    """Replace each recurrent step (``recurrent.StepMatch``) by ``based::recurrent_step`` in Dynamo's graph.

    The operator is inserted before the first of the two state updates (so it reads the states as the
    user's code did before updating them); the output and the updated states take its results. An
    update written in place (``kv_state.add_(...)``, ``k_state += ...``) becomes ``state.copy_(new)`` at
    the same place, so the caller's tensors are written exactly where the user's code wrote them.
    Dead nodes are left for ``rewrite_dynamo_sites`` (which runs next) to erase."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    replaced: dict[fx.Node, fx.Node] = {}    # an earlier step's nodes -> what stands for them now
    for m in steps:                          # in graph order: a later step may read an earlier one's states
        q, k, v, kv_state, k_state, output, kv_new, k_new = (
            None if n is None else to_dynamo[n]
            for n in (m.q, m.k, m.v, m.kv_state, m.k_state, m.output, m.kv_new, m.k_new))
        q, k, v, kv_state, k_state = (replaced.get(n, n) for n in (q, k, v, kv_state, k_state))
        updates = [(node, i) for node, i in ((kv_new, 1), (k_new, 2)) if node is not None]
        first_update = min((n for n, _ in updates), key=order.__getitem__)   # the driver checked the reads
        fake_mode = next(f.fake_mode for f in (example_value(n) for n in (q, k, v))
                         if isinstance(f, torch._subclasses.FakeTensor))

        def add(target, args, *, method=False, like=output):
            node = (graph.call_method if method else graph.call_function)(target, args, {})
            values = fx.node.map_arg(args, lambda n: example_value(n))
            fn = (lambda x, *a: getattr(x, target)(*a)) if method else target
            with torch.no_grad():        # the driver refused steps that require grad (the op has no backward)
                node.meta["example_value"] = _fake_run(fake_mode, fn, *values)
            node.meta["stack_trace"] = like.meta.get("stack_trace")
            return node

        with graph.inserting_before(first_update):
            # A functional update promotes a state of a lower dtype (kv_state float32 + a float64 phi(k)^T v
            # is float64) and the readout reads the promoted sum; the operator keeps its states' dtypes,
            # so it gets such a state cast to the dtype the user's update makes.
            promoted = {1: kv_state, 2: k_state}
            for node, i in updates:
                want_dtype = example_value(node).dtype
                if not writes_in_place(node) and example_value(promoted[i]).dtype != want_dtype:
                    promoted[i] = add("to", (promoted[i], want_dtype), method=True)
            kv_state, k_state = promoted[1], promoted[2]
            if m.kv_transposed:         # the user's [.., Dv, F] state: the operator reads and writes [.., F, Dv]
                kv_state = add(torch.transpose, (kv_state, -2, -1))
            # with autocast off always: the operator has no autocast rule (its CPU form would otherwise run
            # under autocast op by op with inner="eager", and not under AOT), and a step's state update is
            # elementwise (float32 in eager) in nearly every spelling; the output is cast to eager's dtype
            step = add(recurrent_step_call, (q, k, v, kv_state, k_state, list(m.pieces), list(m.q_factors),
                                             list(m.k_factors), bool(m.normalize), float(m.eps), True))
            results = [add(operator.getitem, (step, i)) for i in range(3)]
            if m.kv_transposed:         # back in the user's layout
                results[1] = add(torch.transpose, (results[1], -2, -1))
        o = results[0]
        for node, i in updates:
            new = results[i]
            if writes_in_place(node):
                with graph.inserting_before(node):
                    written = add("copy_", (node.args[0], new), method=True, like=node)
                node.replace_all_uses_with(written)
                graph.erase_node(node)
                replaced[node] = written
            else:
                if i == 1 and m.kv_transposed:      # contiguous, as the user's functional update makes it
                    with graph.inserting_before(first_update):
                        new = add("contiguous", (new,), method=True)
                node.replace_all_uses_with(new)
                replaced[node] = new
        want = example_value(output)
        with graph.inserting_before(output):
            if m.reshape_out:
                o = add(torch.reshape, (o, tuple(want.shape)))
            if want.dtype != example_value(o).dtype:
                o = add("to", (o, want.dtype), method=True)
        output.replace_all_uses_with(o)
        replaced[output] = o
