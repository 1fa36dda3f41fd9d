"""The pass driver: one Dynamo graph in, its Based attention sites found, verified and rewritten.

``run_pass(gm, example_inputs, rewrite=..., verify=..., report=...)``: finds the attention
region (``canonicalize.attention_region``), lowers it to ATen, matches candidates
(``match``), settles each with the numerical probe (``verify``), refuses what the operator
cannot run or what in-place writes would make wrong (``inplace``), reports every site and
refusal to ``report`` and the log, and rewrites Dynamo's graph (``rewrite``). A defect of the
pass never stops a model from compiling: the graph is then left unchanged, with a warning.
"""
from __future__ import annotations

import logging
import operator
import time
from typing import NamedTuple

import torch
import torch.fx as fx

from ..op import policy
from ..op.custom_op import unsupported_reason
from ..op.recurrent_step import describe_step
from .baddbmm import read_baddbmm_scores
from .autocast_lowering import lower_region
from .autocast_scope import (analysis_without_autocast, operator_precision, settings_by_node, switch_inside,
                             traced_settings)
from .canonicalize import (attention_region, declare_buffer_values, declare_outer_operands, example_value,
                           extract_region, hint, hint_shape, same_value_source)
from .checkpoint_operands import Splice, splice
from .constant_fills import read_constant_fills
from .constant_pad import read_constant_pads
from .evaluate import GraphEvaluator, LazyTensor
from .final_state import find_states, settle_states
from .folded_rows import unfold_folded_rows
from .graph_copy import copy_graph
from .initial_state import split_prepended_states
from .inplace import OutputAliased, Storages, copies_over, first_write_between, plan_output, written_before_output
from .lookalike import covered_by, unexplained
from .inputs import BakedBuffer, baked_buffers, constant_placeholders, region_inputs, source_name
from .match import Matcher, find_matches
from .precision import describe_cast, lossy_round_trip, reduction_dtype_note, weights_cast_note
from .recurrent import find_steps, settle_step, spec_of
from .refusal import Refused
from .region_cuts import mark_inputs
from .report import Explanation, Refusal, Site, source_of
from .rewrite import (based_attention_call, based_attention_with_state_call, rewrite_dynamo_sites,
                      rewrite_recurrent_steps)
from .score_scale import readable_source
from .subgraphs import hidden_attention, transformed_attention
from .verify import settle
from .unit_select import read_unit_selects

log = logging.getLogger("based_compile")

# Seconds spent in the pass itself (lowering, matching, probing, rewriting), for benchmarks.
pass_seconds = 0.0

# Sites whose rewritten graph the inner compiler rejected (source -> reason): the backend compiled
# those graphs unrewritten (``backend.py``); later passes refuse these sites with the reason, so
# explain() reports them and a recompilation does not try again.
REJECTED_BY_INNER: dict[str, str] = {}


class Rewritten(NamedTuple):
    """What ``run_pass`` returns when it rewrote sites."""

    gm: fx.GraphModule                  # Dynamo's graph module, rewritten in place
    baked: list[BakedBuffer]            # buffers whose values the rewrite relied on (buffer_guard)
    original: fx.Graph                  # a copy of Dynamo's graph before the rewrite
    sources: list[str]                  # the user's lines of the rewritten sites
    # checkpointed bodies (torch.utils.checkpoint) rewritten in place: ((body, its graph before), ...)
    bodies: tuple = ()


def restore(result: Rewritten) -> None:
    """Undo the rewrite: Dynamo's graph and every rewritten checkpointed body as they were."""
    for body, original in [(result.gm, result.original)] + list(result.bodies):
        body.graph = original
        body.recompile()


def reject_sites(sources: list[str], reason: str) -> None:
    """Record that the inner compiler rejected the graph with these sites rewritten."""
    for source in sources:
        REJECTED_BY_INNER[source] = reason


def _kernel_description(spec, q_node, k_node, v_node, dynamo_nodes=()) -> str:
    """The kernel the policy will pick for a site, as it decides at run time: training when grad mode is
    enabled and any of q, k, v requires grad. The lowered region's q, k, v are computed outside it and
    do not carry requires_grad; the model's graph's (``dynamo_nodes``, Dynamo's example values, which
    follow the parameters and inputs the graph is guarded on) do. Where those are missing, both
    choices are listed."""
    try:
        fakes = [example_value(n) for n in (q_node, k_node, v_node)]
        reals = [torch.empty((), dtype=f.dtype, device=f.device).expand(hint_shape(n))
                 for f, n in zip(fakes, (q_node, k_node, v_node))]
        if reals[0].dim() == 3:               # [B*H, T, D] (heads folded): the operator reads [1, B*H, T, D]
            reals = [r.unsqueeze(0) for r in reals]
        head = 1 if spec.layout == "BHTD" else 2
        reals = [r if r.dim() == 4 else r.unsqueeze(head) for r in reals]     # one key/value head, no axis
        traced = [example_value(n) for n in dynamo_nodes]
        if len(traced) != 3 or not all(isinstance(t, torch.Tensor) for t in traced):
            if not torch.is_grad_enabled():
                return policy.describe(spec, *reals, False)
            return (f"{policy.describe(spec, *reals, True)} if q, k or v requires grad at run time, else "
                    f"{policy.describe(spec, *reals, False)}")
        training = torch.is_grad_enabled() and any(t.requires_grad for t in traced)
        return policy.describe(spec, *reals, training)
    except Exception as err:                  # explain() must still report the site
        return f"auto (the policy could not decide at compile time: {type(err).__name__}: {err})"


def _unsupported_reason(site) -> str | None:
    """Why the operator could not run on the site's q, k, v, or None. q, k, v of different dtypes are read as the
    operator will get them, cast to one (``site.precision``, settled first): to its dtype, or by autocast."""
    nodes = (site.match.q, site.match.k, site.match.v)
    values = [example_value(n) for n in nodes]
    if not all(isinstance(x, torch.Tensor) for x in values):
        return None
    if site.precision is not None and site.precision.dtype is not None or len({x.dtype for x in values}) > 1:
        if site.precision is None:
            return None                 # settled later (``_settle_precision``), with the states
        values = [torch.empty((), dtype=site.precision.dtype, device=x.device).expand(hint_shape(n))
                  for x, n in zip(values, nodes)]
    return unsupported_reason(*values)


def run_pass(gm: fx.GraphModule, example_inputs, *, rewrite: bool, verify: bool,
             report: Explanation | None = None) -> Rewritten | None:
    """Find, verify and (if ``rewrite``) rewrite Based attention in Dynamo's graph ``gm``.

    Returns ``gm`` rewritten in place with the graph inputs (registered buffers) whose values the
    rewrite relied on (``buffer_guard``) and a copy of the graph before the rewrite (``Rewritten``),
    or None when nothing was rewritten.

    The pass traces and runs parts of the graph under grad mode; its saved tensors go to identity
    hooks, not to hooks the user's code has active (a non-reentrant ``torch.utils.checkpoint``
    around a compiled block counts what is saved, and the pass, which runs only on the first
    call, would make the forward save more than its recomputation).
    """
    with torch.autograd.graph.saved_tensors_hooks(_same, _same):
        return _run_pass(gm, example_inputs, rewrite=rewrite, verify=verify, report=report)


def _same(x):
    return x


def _settle_precision(settled: list, to_dynamo, settings: dict, report: Explanation | None) -> list:
    """Give each site of ``settled`` the precision its operator runs at (``autocast_scope.operator_precision``: cast
    as a matmul under autocast, or with autocast off, q, k, v cast to one dtype where they differ or the user's
    code computes wider), weighed over every
    result the rewrite replaces (the output and returned states), and check the operator runs at the dtype q, k,
    v then have (``unsupported_reason``); drop (refused, with the reason) each site that cannot. ``settings``: node
    name -> the autocast settings it was traced in. Returns the refused sites' outputs."""
    dropped = []
    for site in list(settled):
        m = site.match
        returned = [to_dynamo[m.output]] + ([to_dynamo[r.node] for r in site.states.reads]
                                            if site.states is not None else [])
        q, k, v = (to_dynamo[n] for n in (m.q, m.k, m.v))
        try:
            site.precision = operator_precision(returned, q, k, v, settings.get(to_dynamo[m.output].name, {}))
            reason = _unsupported_reason(site) if site.precision.dtype is not None else None
            if reason is not None:
                raise Refused("unsupported", f"{reason}: left to the inner compiler", m.output)
        except Refused as refusal:
            settled.remove(site)
            if report is not None:
                report.sites[:] = [e for e in report.sites if e.nodes.get("output") != to_dynamo[m.output].name]
            _refuse(refusal, report)
            dropped.append(m.output)
            continue
        if site.precision.dtype is not None and report is not None:     # explain() says what the operator takes
            entry = next((e for e in report.sites if e.nodes.get("output") == to_dynamo[m.output].name), None)
            if entry is not None:
                dtypes = ", ".join(str(example_value(x).dtype).replace("torch.", "") for x in (q, k, v))
                entry.form += f" (q, k, v of {dtypes} cast to {str(site.precision.dtype).replace('torch.', '')})"
    return dropped


def _run_pass(gm: fx.GraphModule, example_inputs, *, rewrite: bool, verify: bool,
              report: Explanation | None) -> Rewritten | None:
    global pass_seconds
    start = time.perf_counter()
    try:
        bodies, read, outer_before = _rewrite_checkpoint_bodies(gm, example_inputs, rewrite=rewrite, verify=verify,
                                                                report=report)
        if report is not None:            # attention in another higher-order op's body: left as written, said so
            try:
                for refusal in hidden_attention(gm, read) + transformed_attention(gm):
                    report.add_refusal(refusal)
            except Exception as err:  # noqa: BLE001 - a report only
                log.warning("based_compile: looking into higher-order op bodies failed (%s: %s)",
                            type(err).__name__, err)
        result = _run_one(gm, example_inputs, rewrite=rewrite, verify=verify, report=report)
        if not bodies:
            return result
        if result is None:
            result = Rewritten(gm, [], copy_graph(gm.graph), [])
        if outer_before is not None:      # an operand of a checkpoint call was dropped: undo that too
            result = result._replace(original=outer_before)
        return result._replace(baked=result.baked + [b for body in bodies for b in body.baked],
                               sources=result.sources + [x for body in bodies for x in body.sources],
                               bodies=tuple((body.gm, body.original) for body in bodies))
    finally:
        pass_seconds += time.perf_counter() - start


def _run_one(gm: fx.GraphModule, example_inputs, *, rewrite: bool, verify: bool, report: Explanation | None,
             constants: list[bool] | None = None, outside: dict[int, str] | None = None,
             autocast: dict | None = None) -> Rewritten | None:
    """The pass on one graph (Dynamo's, or a checkpointed body); ``autocast``: the autocast settings it runs under
    (device type -> dtype; the caller's when None, a checkpoint call's inside ``torch.autocast`` for its body)."""
    reported = len(report.sites) if report is not None else 0
    try:
        outer = traced_settings() if autocast is None else autocast
        settings = settings_by_node(gm, outer)      # the autocast each node was traced in
        with analysis_without_autocast():
            found = _find_sites(gm, example_inputs, verify=verify, rewrite=rewrite, report=report,
                                constants=constants, outside=outside, autocast=settings)
    except Exception as err:      # a bug of the pass must not stop the model from compiling
        log.warning("based_compile: the pass failed on this graph (%s: %s); it is compiled unchanged",
                    type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
        if report is not None:
            report.add_refusal(Refusal("<graph>", "unsupported",
                                       f"internal error of the pass: {type(err).__name__}: {err}"))
        return None
    if found is None:
        return None
    settled, steps, to_dynamo, region, baked = found
    original = copy_graph(gm.graph)
    sources = [source_of(site.match.anchor) for site in settled]
    try:
        rewrite_recurrent_steps(gm, steps, to_dynamo)
        rewritten = rewrite_dynamo_sites(gm, settled, to_dynamo, region)
    except Exception as err:      # a bug of the rewrite: the graph as Dynamo made it, compiled unchanged
        gm.graph = original
        gm.recompile()
        log.warning("based_compile: rewriting this graph failed (%s: %s); it is compiled unchanged",
                    type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
        if report is not None:      # its sites were not rewritten after all: refusals, with the error
            del report.sites[reported:]
            for source in sources or ["<graph>"]:
                report.add_refusal(Refusal(source, "unsupported",
                                           f"internal error of the rewrite: {type(err).__name__}: {err}"))
        return None
    return Rewritten(rewritten, baked, original, sources)


def _rewrite_checkpoint_bodies(gm: fx.GraphModule, example_inputs, *, rewrite: bool, verify: bool,
                               report: Explanation | None) -> tuple[list[Rewritten], set, fx.Graph | None]:
    """The pass on the body of each ``torch.utils.checkpoint`` call (Dynamo's
    ``tag_activation_checkpoint`` higher-order op): a site inside is rewritten inside, and the body
    stays checkpointed (recomputed in the backward). The body's inputs take the values of the call's
    arguments: a graph input's example value (a registered buffer stays a compile-time constant, and
    a rewrite that bakes it in guards the graph input), else a random tensor of its shape. An argument
    the graph around the call builds from sizes and buffers (a causal mask built outside and passed in)
    is read where it is built (``checkpoint_operands``); one the rewritten body no longer reads is
    dropped from the call. Returns the rewritten bodies, every body the pass read (sites and refusals
    reported), and a copy of ``gm``'s graph before the first change to it (None: unchanged)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    read: set = set()
    if hop is None:
        return [], read, None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {n: i for i, n in enumerate(placeholders)}
    constant_flags = constant_placeholders(gm, example_inputs)
    autocast_at = settings_by_node(gm, traced_settings())     # a body runs under its call's autocast
    constant = {n: constant_flags[i] for n, i in index_of.items()}
    done, outer_before = [], None
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not hop or not node.args \
                or not isinstance(node.args[0], fx.Node) or node.args[0].op != "get_attr":
            continue
        body = getattr(gm, node.args[0].target, None)
        if not isinstance(body, fx.GraphModule) or not all(isinstance(a, fx.Node) for a in node.args[1:]):
            continue
        if len(node.args) - 1 != sum(n.op == "placeholder" for n in body.graph.nodes):
            continue
        try:
            spliced = splice(gm, node, body, constant)
        except Exception as err:  # noqa: BLE001 - a defect of the pass: the body is read on its own
            log.warning("based_compile: reading a checkpointed body's arguments where they are built failed "
                        "(%s: %s)", type(err).__name__, err)
            spliced = Splice(gm, node, body)
        args = list(node.args[1:]) + spliced.leaves
        real, constants = [], []
        for i, arg in enumerate(args):
            if arg in index_of:
                real.append(example_inputs[index_of[arg]])
                constants.append(constant_flags[index_of[arg]])
                continue
            if arg.op == "get_attr":                  # a constant of the outer graph a copied mask reads
                real.append(getattr(gm, str(arg.target)))
                constants.append(True)
                continue
            value = example_value(arg)
            if isinstance(value, torch.Tensor):
                real.append(LazyTensor(tuple(int(hint(x)) for x in value.shape), value.dtype, value.device, seed=i))
            else:
                real.append(hint(value) if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else value)
            constants.append(not isinstance(value, torch.Tensor))
        read.add(body)
        outside = {i: spliced.reasons.get(i, "computed outside it") for i, arg in enumerate(args)
                   if arg not in index_of and arg.op != "get_attr" and isinstance(example_value(arg), torch.Tensor)}
        reported = len(report.sites) if report is not None else 0
        result = _run_one(body, real, rewrite=rewrite, verify=verify, report=report, constants=constants,
                          outside=outside, autocast=autocast_at.get(node.name, {}))
        if result is None:
            spliced.undo()
            continue
        # a buffer the body's rewrite baked in is the graph input passed to the body at that position
        baked = []
        for b in result.baked:
            arg = args[b.index]
            if arg in index_of:
                baked.append(BakedBuffer(index_of[arg], source_name(arg), b.why))
        try:
            before = spliced.settle()
        except Exception as err:  # noqa: BLE001 - a defect of the pass: the body stays as written
            log.warning("based_compile: the checkpointed body is left as written (%s: %s)", type(err).__name__, err)
            spliced.undo()
            if report is not None:           # its sites were not rewritten after all: refusals, with the error
                del report.sites[reported:]
                for source in result.sources or ["<graph>"]:
                    report.add_refusal(Refusal(source, "unsupported", "the checkpointed body is left as written: "
                                               f"internal error of the rewrite: {type(err).__name__}: {err}"))
            if spliced.outer_replaced:       # the outer graph was put back as a copy: its other calls stay as written
                break
            continue
        if outer_before is None:
            outer_before = before
        _clone_returned_outputs(body)
        done.append(Rewritten(result.gm, baked, spliced.original or result.original, result.sources))
    return done, read, outer_before


def _clone_returned_outputs(body: fx.GraphModule) -> None:
    """A rewritten site's output that the body returns goes to code the body's pass did not see (the
    caller may write it in place, ``o = checkpoint(...); o += x``, where the operator saved it for its
    backward): the body returns a clone of it."""
    output = next(n for n in body.graph.nodes if n.op == "output")
    rewritten = (based_attention_call, based_attention_with_state_call)

    def from_site(node) -> bool:
        while isinstance(node, fx.Node) and node.op == "call_function":
            if node.target in rewritten:
                return True
            if node.target not in (operator.getitem, torch.transpose, torch.flatten, torch.reshape, torch.squeeze,
                                   torch.unsqueeze) and not (isinstance(node.target, str)):
                return False
            node = node.args[0] if node.args else None
        return False

    def clone(node):
        if not (isinstance(node, fx.Node) and from_site(node)):
            return node
        with body.graph.inserting_before(output):
            copy_ = body.graph.call_function(torch.clone, (node,))
        copy_.meta = dict(node.meta)
        return copy_

    output.args = fx.node.map_aggregate(output.args, lambda x: clone(x) if isinstance(x, fx.Node) else x)
    body.recompile()


def _find_sites(gm: fx.GraphModule, example_inputs, *, verify: bool, rewrite: bool, report: Explanation | None,
                constants: list[bool] | None = None, outside: dict[int, str] | None = None, autocast: dict | None = None):
    """Detection without side effects on ``gm``: (settled sites, ATen -> Dynamo node map, region) or None.
    ``autocast``: the autocast settings each node was traced in (``autocast_scope.settings_by_node``); the
    caller runs this with autocast off."""
    region = attention_region(gm)
    if not region:
        return None
    sub, inputs, outputs = extract_region(gm, region)
    aten_gm = lower_region(sub, autocast or {})
    aten_inputs = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    output_node = next(n for n in aten_gm.graph.nodes if n.op == "output")
    aten_outputs = output_node.args[0]
    output_node.args = ((),)      # every node was an output only to map it back: not a real user
    split_prepended_states(aten_gm)           # cat([state, x]).cumsum(t)[1:] -> state + x.cumsum(t)
    read_baddbmm_scores(aten_gm)              # baddbmm(0, q, kT, alpha=a) -> a * bmm(q, kT)
    read_constant_fills(aten_gm)              # z + full_like(z, eps) -> z + eps
    read_unit_selects(aten_gm)                # phi(q)[:, :, 0] of a [B, H, 1, F] map -> phi(q).squeeze(2)
    read_constant_pads(aten_gm)               # F.pad(x, (1, 0), value=c) -> cat([full_like(x[..., :1], c), x], -1)
    unfolded = unfold_folded_rows(aten_gm)    # bmm([B, H*T, D], [B, D, S]) -> bmm([B*H, T, D], [B*H, D, S])
    to_dynamo: dict[fx.Node, fx.Node] = dict(zip(aten_inputs, inputs))
    mark_inputs(inputs, aten_inputs)          # what a custom Function or a hook computed, for the reasons
    for dynamo_node, aten_node in zip(outputs, aten_outputs):
        if isinstance(aten_node, fx.Node):
            to_dynamo.setdefault(aten_node, dynamo_node)
    for old, new in unfolded.items():         # the unfolded product is the user's matmul's value
        if old in to_dynamo:
            to_dynamo.setdefault(new, to_dynamo[old])
    for dynamo_node, aten_node in zip(outputs, aten_outputs):      # the value a regenerated view shows
        source = same_value_source(aten_node) if isinstance(aten_node, fx.Node) else None
        if source is not None:
            to_dynamo.setdefault(source, dynamo_node)
    real, variable = region_inputs(gm, example_inputs, inputs, aten_inputs, constants)
    evaluator = GraphEvaluator(aten_gm, real, variable_placeholders=variable)
    declare_buffer_values(aten_gm, {n: v for n, v in evaluator.inputs.items()
                                    if n not in variable and isinstance(v, torch.Tensor)})
    if outside is not None:                   # a checkpointed body's inputs computed in the outer graph
        passed = {p: outside[i] for i, p in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")
                  if i in outside}
        declare_outer_operands(aten_gm, {a: passed[d] for d, a in zip(inputs, aten_inputs) if d in passed})
    matcher = Matcher(aten_gm, evaluator, variable)
    storages = Storages(gm)
    settled, answered, refused = [], set(), []
    for result, node in find_matches(matcher):
        answered.add(node)
        if isinstance(result, Refused):
            refused.append(result.node)
            _refuse(result, report)
            continue
        try:
            cast = lossy_round_trip(result)
            if cast is not None:
                raise Refused("unsupported", f"{describe_cast(cast)} inside the attention and back: that "
                                             "rounding is part of what it computes", result.output)
            site = settle(result, evaluator, probe=verify, available=to_dynamo.__contains__)
            reason = _unsupported_reason(site)
            if reason is not None:
                raise Refused("unsupported", f"{reason}: left to the inner compiler", result.output)
            starts = [] if site.match.initial is None else \
                [st.source for st in (site.match.initial.kv, site.match.initial.k) if st is not None]
            scale = [n for x in (site.match.score_scale, site.match.out_scale) if x is not None for n in x.nodes]
            missing = [n.name for n in (site.match.q, site.match.k, site.match.v, site.match.output,
                                        *scale, *starts) if n is not None and n not in to_dynamo]
            if missing:
                raise Refused("unsupported", f"the matched tensors {missing} are intermediate values of a "
                                             "decomposed operation, not values of the model's graph", result.output)
            rejected = REJECTED_BY_INNER.get(source_of(result.anchor))
            if rejected is not None:
                raise Refused("unsupported", rejected, result.output)
            written = written_before_output(gm, site, to_dynamo, storages)
            if written:
                raise Refused("unsupported", f"{written} writes in place into a tensor the site reads before "
                                             "its output: the operator would read the written values", result.output)
            try:
                plan_output(gm, to_dynamo[site.match.output], storages)
            except OutputAliased as err:
                raise Refused("unsupported", str(err), result.output) from None
            switch = switch_inside([to_dynamo[site.match.output]],
                                   [to_dynamo[n] for n in (site.match.q, site.match.k, site.match.v, *starts)])
            if switch is not None:
                raise Refused("unsupported", f"torch.autocast is entered or left inside the attention ({switch.name}): "
                                             "its matmuls and its output run under different autocast settings",
                              result.output)
        except Refused as refusal:
            refused.append(refusal.node)
            _refuse(refusal, report)
            continue
        settled.append(site)
        form = result.form
        if result.initial is not None:
            form += " from initial state(s) (" + ", ".join(
                f"{name} {to_dynamo[st.source].name}" for name, st in (("kv_state", result.initial.kv),
                                                                      ("k_state", result.initial.k)) if st is not None) + ")"
        entry = Site(source_of(result.anchor), form, site.spec,
                     _kernel_description(site.spec, site.match.q, site.match.k, site.match.v,
                                         [to_dynamo[n] for n in (site.match.q, site.match.k, site.match.v)
                                          if n in to_dynamo]),
                     nodes={role: to_dynamo[getattr(site.match, role)].name for role in ("q", "k", "v", "output")},
                     run_time_scale=_scale_words(site.match.score_scale, to_dynamo),
                     output_scale=_scale_words(site.match.out_scale, to_dynamo))
        if report is not None:
            report.sites.append(entry)
        log.info("based_compile: %s Based attention at %s -> based::attention (%s); kernel: %s%s", result.form,
                 entry.source, entry.spec_text, entry.kernel, "" if rewrite else " [not rewritten: report only]")
    _find_states(gm, aten_gm, evaluator, settled, to_dynamo, storages, report)
    refused.extend(_settle_precision(settled, to_dynamo, autocast or {}, report))
    steps = _find_steps(gm, aten_gm, evaluator, to_dynamo, storages, rewrite=rewrite, report=report,
                        refused=refused)
    # a lookalike no reader answered: a refusal (what the sites and steps compute is theirs)
    step_nodes = [n for step in steps for n in (step.output, step.kv_new, step.k_new) if n is not None]
    covered = covered_by(aten_gm, list(answered) + refused + [site.match.output for site in settled] + step_nodes)
    lines = {source_of(n) for n in refused + [site.match.anchor for site in settled] + [step.anchor for step in steps]
             if n is not None}
    for node, category, why in unexplained(aten_gm, answered, covered, to_dynamo):
        if source_of(node) not in lines:        # a line with a site or a refusal already says what it is
            _refuse(Refused(category, why, node), report)
    if not (settled or steps) or not rewrite:
        return None
    return settled, steps, to_dynamo, region, baked_buffers(gm, settled, evaluator, variable, to_dynamo, steps)


def _scale_words(scale, to_dynamo) -> str:
    """What a scale read at run time (a match's ``score_scale`` or ``out_scale``) is, graph inputs named as
    the model names them (``self.temperature``); "" without one."""
    if scale is None:
        return ""

    def name_of(node):
        dynamo = to_dynamo.get(node)
        return readable_source(source_name(dynamo)) if dynamo is not None and dynamo.op == "placeholder" else None
    return scale.describe(name_of)


def _find_states(gm, aten_gm, evaluator, settled: list, to_dynamo, storages: Storages,
                 report: Explanation | None) -> None:
    """The final states the settled sites' prefills return (``final_state.py``): each site with
    states, settled by their probe, gets ``site.states`` (it then runs based::attention_with_state)."""
    if not settled:
        return
    reads: dict[int, list] = {}
    for result in find_states(aten_gm, evaluator, settled, to_dynamo.__contains__):
        if isinstance(result, Refused):
            _refuse(result, report)
            continue
        site_nodes = _ancestors(to_dynamo[settled[result[0]].match.output])
        if all(user in site_nodes for user in to_dynamo[result[1].node].users):
            continue                  # a state the code never uses, or only the site's own readout does
        reads.setdefault(result[0], []).append(result[1])
    for index, site_reads in reads.items():
        site = settled[index]
        try:
            plan = settle_states(site, site_reads, evaluator, to_dynamo)
            position = storages.position
            output = to_dynamo[site.match.output]
            first = min([output] + [to_dynamo[r.node] for r in site_reads], key=position.__getitem__)
            late = [to_dynamo[n].name for n in (site.match.q, site.match.k, site.match.v)
                    if position[to_dynamo[n]] >= position[first]]
            if late:
                raise Refused("unsupported", f"the prefill's state is computed before {late} exist(s): the operator "
                                             "that returns both cannot run there", site_reads[0].node)
            starts = [] if site.match.initial is None else \
                [st.source for st in (site.match.initial.kv, site.match.initial.k) if st is not None]
            switch = switch_inside([output] + [to_dynamo[r.node] for r in site_reads],
                                   [to_dynamo[n] for n in (site.match.q, site.match.k, site.match.v, *starts)])
            if switch is not None:
                raise Refused("unsupported", f"torch.autocast is entered or left between the prefill's output and its "
                                             f"state(s) ({switch.name}): they run under different autocast settings",
                              site_reads[0].node)
            init = site.match.initial       # the in-place write that adds an initial state is the op's own
            own = set() if init is None else {to_dynamo.get(st.add) for st in (init.kv, init.k) if st is not None}
            for r in site_reads:
                key = storages.of(to_dynamo[r.node])
                writer = next((n for n in gm.graph.nodes if storages.writes_into(n, key) and not (
                    n in own and position[n] < position[to_dynamo[r.node]])), None)
                if writer is not None:
                    raise Refused("unsupported", f"{source_of(writer)} writes in place into the memory of the "
                                                 "prefill's state (or a tensor it views)", r.node)
        except Refused as refusal:
            _refuse(refusal, report)
            continue
        site.states = plan
        if report is not None:
            entry = next((e for e in report.sites if e.nodes.get("output") == to_dynamo[site.match.output].name), None)
            if entry is not None:
                entry.form += " + final state (" + ", ".join(
                    f"{'kv_state' if r.kind == 'kv' else 'k_state'} {to_dynamo[r.node].name}" for r in site_reads) + ")"
                entry.kernel = ("based::attention_with_state: the fused-chunk kernel with its final state on CUDA, "
                                "the PyTorch forms and one moments product on the CPU")
        log.info("based_compile: the prefill at %s returns its final state(s) %s: -> based::attention_with_state",
                 source_of(site.match.anchor), [to_dynamo[r.node].name for r in site_reads])


def _ancestors(node: fx.Node) -> set:
    """``node`` and every node it is computed from."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _find_steps(gm, aten_gm, evaluator, to_dynamo, storages: Storages, *, rewrite: bool,
                report: Explanation | None, refused: list) -> list:
    """The recurrent steps (``recurrent.py``) of the lowered region, settled by their probe (the nodes of
    refused ones are appended to ``refused``)."""
    steps = []
    for result in find_steps(aten_gm):
        try:
            if isinstance(result, Refused):
                raise result
            settle_step(result, evaluator, available=to_dynamo.__contains__)
            missing = [n.name for n in (result.q, result.k, result.v, result.kv_state, result.k_state,
                                        result.output, result.kv_new, result.k_new)
                       if n is not None and n not in to_dynamo]
            if missing:
                raise Refused("unsupported", f"the step's tensors {missing} are intermediate values of a decomposed "
                                             "operation, not values of the model's graph", result.output)
            _check_step_reads(gm, result, to_dynamo, storages)
            switch = switch_inside([to_dynamo[n] for n in (result.output, result.kv_new, result.k_new) if n is not None],
                                   [to_dynamo[n] for n in (result.q, result.k, result.v, result.kv_state,
                                                           result.k_state) if n is not None])
            if switch is not None:
                raise Refused("unsupported", f"torch.autocast is entered or left inside the step ({switch.name}): its "
                                             "matmuls and its output run under different autocast settings",
                              result.output)
        except Refused as refusal:
            refused.append(refusal.node)
            _refuse(refusal, report)
            continue
        steps.append(result)
        values = [None if n is None else example_value(n)
                  for n in (result.q, result.k, result.v, result.kv_state, result.k_state)]
        entry = Site(source_of(result.anchor), result.form, spec_of(result), describe_step(*values, result.pieces))
        if report is not None:
            report.sites.append(entry)
        log.info("based_compile: Based recurrent step at %s -> based::recurrent_step (%s)%s", entry.source,
                 entry.spec, "" if rewrite else " [not rewritten: report only]")
    return steps


def _check_step_reads(gm, step, to_dynamo, storages: Storages) -> None:
    """Refuse a step the operator, inserted at its first state update (``rewrite_recurrent_steps``),
    would read other values of than the user's code did: an input computed after that update, or a
    write in place, while the step runs, into the memory of q, k, v or a state (other than the
    step's own state updates, which the operator performs)."""
    roles = tuple(r for r in ("q", "k", "v", "kv_state", "k_state") if getattr(step, r) is not None)
    reads = {role: to_dynamo[getattr(step, role)] for role in roles}
    kv_new, k_new, output = (None if n is None else to_dynamo[n] for n in (step.kv_new, step.k_new, step.output))
    updates = [n for n in (kv_new, k_new) if n is not None]
    # Dynamo's values carry requires_grad as the step computed them (grad mode and inputs included);
    # the lowered graph's fake inputs do not.
    if any(getattr(example_value(n), "requires_grad", False) for n in (output, *updates)):
        raise Refused("unsupported", "the recurrent step runs with inputs that require grad: based::recurrent_step "
                                     "has no backward (decode under torch.no_grad())", step.output)
    first = min(updates, key=storages.position.__getitem__)
    late = [role for role in roles if storages.position[reads[role]] >= storages.position[first]]
    if late:
        raise Refused("unsupported", f"{', '.join(late)} computed after the first state update "
                                     f"({source_of(first)}): the operator reads every input there", step.output)
    # the step's own state updates, in place (kv_state.add_(...)) or stored by a copy of the functional
    # update over the state (kv_state.copy_(kv_state + ...)): the operator's new states go there
    exempt = {reads["kv_state"]: {kv_new} | copies_over(gm, kv_new, reads["kv_state"], storages)}
    if k_new is not None:
        exempt[reads["k_state"]] = {k_new} | copies_over(gm, k_new, reads["k_state"], storages)
    written = first_write_between(gm, list(reads.values()), output, storages, exempt)
    if written:
        raise Refused("unsupported", f"{written} writes in place, while the recurrent step runs, into a tensor it "
                                     "reads (q, k, v or a state): the operator reads them all at the first state "
                                     "update", step.output)


def _refuse(refusal: Refused, report: Explanation | None) -> None:
    noted = reduction_dtype_note(refusal)
    refusal = noted if noted is not refusal else weights_cast_note(refusal)
    entry = Refusal(source_of(refusal.node), refusal.category, refusal.reason)
    log.debug("based_compile: refused at %s (%s): %s", entry.source, entry.category, entry.reason)
    if report is not None:
        report.add_refusal(entry)
