"""Prefill that returns the final state: the states a Based prefill hands to decoding, as people write them.

    kv_state = torch.einsum("bhtf,bhtd->bhfd", phi_k, v)          # sum over time of phi(k_t)^T v_t
    kv_state = (phi_k.unsqueeze(-1) * v.unsqueeze(-2)).sum(2)      # the same, a broadcast product
    kv_state = kv_cumsum[:, :, -1]                                 # the last row of the linear form's
    k_state  = phi_k.sum(2)   or   phi_k.cumsum(2)[:, :, -1]       # running sums (kv: [.., Dv, F] too)

returned next to the output of a Based attention site over the same q, k, v. The site then runs
``based::attention_with_state``, which computes the output and the states in O(T) memory
(no [T, F, Dv] running sum); the states are laid out as the user's tensors (repeated over a GQA
group when the user repeated k and v before phi, transposed when the user kept [Dv, F], reshaped,
cast to the user's dtype).

Reading (on the lowered graph): a candidate is a reduction over time of something that reads the
site's k and not its q: a ``sum`` over one axis, a ``bmm`` that contracts the time axis, or the
last row (``select(-1)``, ``[-1:]``) of a ``cumsum``. Its operand must be a Taylor feature map
of k (``feature_map.py``: the state's own pieces and factors, which the operator reproduces
exactly), times v for the kv state. The numerical probe (``settle_states``) evaluates the user's
state on random float64 q, k, v and compares it with the operator's, in each layout the operator
can produce; it decides. Refused with reasons: another row of the running sum (``[:, :, -2]``),
a sum over an axis that is not time, a scaled or weighted sum (a decayed or gated state),
features that are not a Taylor map. The operator is differentiable: states computed from inputs
that require grad are rewritten too.

A non-causal site read from its own states (``phi(q) @ (phi(k)^T @ v)``, ``linear_form``'s state product)
that also returns them: those sums are inside the site, and they are its final states (every query reads
the total); a state only the site's own readout reads is not returned (``driver``).

A site whose running sums start from initial states (``initial_state.py``, a continued prefill):
the last row of those sums (``kv[:, :, -1]`` of ``kv_state[:, :, None] + cumsum(...)``) is its
state; the states must be in the attention's keys' feature map (the operator converts the initial
states with it), and a returned state without the initial state (the bare running sum's last row)
is refused: the operator returns them added.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx

from ..kernels.arguments import check_arguments
from ..op.attention_with_state import features_of_moments, moments
from .canonicalize import VIEW_OPS, example_value, hint_shape, read_views, scalar_factor, strip_views, walk_operand
from .evaluate import GraphEvaluator
from .feature_map import FeatureMap, read_feature_map
from .initial_state import STATE_VIEWS
from .mask import size_expr
from .refusal import Refused

aten = torch.ops.aten
_TOLERANCE = 1e-9


@dataclass
class StateRead:
    """One state the user's code keeps: ``node`` (lowered) is sum_t phi(k_t)^T v_t ("kv") or sum_t phi(k_t) ("k")."""

    node: fx.Node
    kind: str
    phi: FeatureMap
    repeat: bool = False          # the user's heads are the op's kv heads repeated over the GQA group
    transpose: bool = False       # the user's kv state is [.., Dv, F]
    initial: bool = False         # the last row of running sums that start from the site's initial state
    inner: fx.Node | None = None  # initial: the sum over this prefill's tokens the initial state is added to

    @property
    def pieces(self) -> tuple:
        return tuple(f"const:{p.width}" if p.kind == "const" else p.kind for p in self.phi.pieces)

    @property
    def k_factors(self) -> tuple:
        return tuple(p.factor for p in self.phi.pieces)


@dataclass
class SiteStates:
    """The states one attention site returns: what ``based::attention_with_state`` gets and gives."""

    pieces: tuple
    k_factors: tuple
    reads: list = field(default_factory=list)




def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _taylor(gm, node):
    """The Taylor feature map that ``node`` is through views (factor 1), else None."""
    walked = walk_operand(gm, node)
    if walked.factor != 1.0 or walked.stop.op != "call_function":
        return None
    phi = read_feature_map(gm, walked.stop)
    if phi is None or any(p.kind not in ("const", "linear", "outer") for p in phi.pieces):
        return None               # e.g. the compressed map's products x_a x_b: not the operator's state layout
    return phi


def _last_row(node: fx.Node, starts: dict | None = None):
    """(cumsum, None) when ``node`` is the last row of a running sum along its axis, (cumsum, index)
    for another row of it, else None. Last means last at every length the graph runs at: under
    dynamic shapes a constant row (``[:, :, 10]`` traced at T = 11) is another row. ``starts``: the
    nodes that add an initial state to a running sum -> that running sum (their rows are its rows,
    from the state)."""
    if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor):
        return None
    src = node.args[0]
    if isinstance(src, fx.Node) and starts and src in starts:
        src = starts[src]
    if not isinstance(src, fx.Node) or src.op != "call_function" or src.target is not aten.cumsum.default:
        return None
    rank = len(hint_shape(src) or ())
    dim = node.args[1] if len(node.args) > 1 else 0
    if _dim(dim, rank) != _dim(src.args[1], rank):
        return None
    size = size_expr(example_value(src).shape[_dim(dim, rank)])
    if node.target is aten.select.int:
        index = node.args[2]
        return (src, None) if _is_last(index, size) else (src, _shown(index))
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if _is_last(start, size) and _reaches_end(end, size) and step == 1:
        return src, None
    return src, f"{_shown(start)}:{_shown(end)}"


def _shown(index):
    value = size_expr(index) if index is not None else None
    return index if value is None else value


def _is_last(index, size) -> bool:
    """``index`` (an int, a SymInt or a node of one) is the last of ``size`` rows at every size."""
    i = size_expr(index)
    if i is None or size is None:
        return False
    if isinstance(i, int) and i == -1:
        return True
    return sympy.expand(i - (size - 1)) == 0


def _reaches_end(end, size) -> bool:
    """A slice's ``end`` is at or past ``size`` at every size (None and huge ints: open-ended)."""
    if end is None:
        return True
    e = size_expr(end)
    if e is None or size is None:
        return False
    if isinstance(e, int) and e >= 2 ** 62:
        return True
    diff = sympy.expand(e - size)
    return bool(diff.is_Integer and diff >= 0) if hasattr(diff, "is_Integer") else diff >= 0


class _Site:
    """What the reading needs of a settled site."""

    def __init__(self, settled):
        m = settled.match
        self.settled, self.q, self.k, self.v, self.t = settled, m.q, m.k, m.v, m.key_length
        init = m.initial
        self.starts = {} if init is None else {st.add: st.running for st in (init.kv, init.k)
                                               if st is not None and st.running is not None}
        # the initial states themselves (a state added beside the quadratic form: no running sum)
        self.sources = {} if init is None else {st.source: kind for kind, st in (("kv", init.kv), ("k", init.k))
                                                if st is not None and st.running is None}


def _product_operands(gm, node):
    """(a, b) of an elementwise product, through views, or None; a scaled product raises."""
    inner = strip_views(node)
    if not isinstance(inner, fx.Node) or inner.op != "call_function":
        return None
    if inner.target is aten.mul.Tensor and all(isinstance(x, fx.Node) for x in inner.args[:2]):
        return inner.args[0], inner.args[1]
    return None


def _read_operand(gm, ev: GraphEvaluator, site: _Site, operand, where):
    """("k", phi) or ("kv", phi) for the summed operand of a state candidate; Refused for near-misses;
    None when it is no state of this site's k."""
    if not ev.depends_on(operand, {site.k}) or ev.depends_on(operand, {site.q}):
        return None
    scaled = scalar_factor(gm, strip_views(operand)) if strip_views(operand).op == "call_function" else None
    if scaled is not None and scaled[1] != 1.0:
        raise Refused("state", f"a state summed with a factor ({scaled[1]:g} * phi(k) v^T): not Based's state, "
                               "whose terms only add", where)
    phi = _taylor(gm, operand)
    if phi is not None:
        return "k", phi
    pair = _product_operands(gm, operand)
    if pair is not None:
        for a, b in (pair, pair[::-1]):
            phi = _taylor(gm, a)
            if phi is None or not ev.depends_on(b, {site.v}):
                continue
            if ev.depends_on(b, {site.k}):
                raise Refused("state", "a sum over time of phi(k) times a tensor that reads k as well as v "
                                       "(a decayed or gated state): not Based's state sum_t phi(k_t)^T v_t", where)
            return "kv", phi
        if any(_taylor(gm, x) is not None or _product_operands(gm, x) is not None for x in pair):
            raise Refused("state", "a weighted sum over time of phi(k) v^T (a decayed or gated state): not Based's "
                                   "state, whose terms only add", where)
    raise Refused("feature_map", "a sum over time of features of k that are not the Taylor feature map "
                                 "phi(x) = [c, a x, b x (x) x] of Based: not the state the operator computes", where)


def _candidate(gm, ev, site: _Site, node: fx.Node):
    """(StateRead | None) for ``node`` as a state of ``site``; Refused for a near-miss."""
    if node.op != "call_function":
        return None
    if node.target is aten.add.Tensor and site.sources and float(node.kwargs.get("alpha", 1)) == 1.0 \
            and all(isinstance(a, fx.Node) for a in node.args[:2]):
        for start, other in (node.args[:2], node.args[1::-1]):      # kv_state + phi(k)^T v: the state after
            kind = site.sources.get(read_views(gm, start, view_ops=STATE_VIEWS, scalars=False).base)
            inner = strip_views(other)
            read = _candidate(gm, ev, site, inner) if kind is not None and isinstance(inner, fx.Node) else None
            if read is not None and read.kind == kind and not read.initial:
                return StateRead(node, kind, read.phi, initial=True, inner=read.node)
    if node.target is aten.sum.dim_IntList and len(node.args) > 1 and node.args[1] is not None \
            and len(node.args[1]) == 1:
        operand = node.args[0]
        rank = len(hint_shape(operand) or ())
        size = hint_shape(operand)[_dim(node.args[1][0], rank)] if rank else None
        found = _read_operand(gm, ev, site, operand, node)
        if found is None:
            return None
        if size != site.t:
            raise Refused("state", f"phi(k){' v^T' if found[0] == 'kv' else ''} summed over an axis of size {size}, "
                                   f"not over time (T={site.t}): not a state of the prefill", node)
        return StateRead(node, found[0], found[1])
    last = _last_row(node, site.starts)
    if last is not None:
        cumsum, index = last
        found = _read_operand(gm, ev, site, cumsum.args[0], node)
        if found is None:
            return None
        rank = len(hint_shape(cumsum))
        if hint_shape(cumsum)[_dim(cumsum.args[1], rank)] != site.t:
            raise Refused("state", "the last row of a running sum over an axis that is not time", node)
        if index is not None:
            raise Refused("state", f"the state is row {index} of the running sum over time, not its last row: "
                                   "not the state after the prefill", node)
        return StateRead(node, found[0], found[1], initial=node.args[0] in site.starts)
    if node.target is aten.bmm.default:
        a, b = node.args[0], node.args[1]
        sa, sb = hint_shape(a), hint_shape(b)
        for feats, other, t_axis in ((a, b, -1), (b, a, -2)):
            if (sa if feats is a else sb)[t_axis] != site.t:
                continue
            if not ev.depends_on(feats, {site.k}) or ev.depends_on(feats, {site.q}) or ev.depends_on(other, {site.q}):
                continue
            phi = _taylor(gm, feats)
            if phi is None:
                if ev.depends_on(other, {site.k}) or not ev.depends_on(other, {site.v}):
                    continue
                raise Refused("feature_map", "a product phi(k)^T v over time whose features of k are not the Taylor "
                                             "feature map phi(x) = [c, a x, b x (x) x] of Based", node)
            if not ev.depends_on(other, {site.v}) or ev.depends_on(other, {site.k}):
                continue
            return StateRead(node, "kv", phi)
    return None


def _visible(node: fx.Node, available) -> fx.Node | None:
    """The node of the model's graph that holds ``node``'s value: itself, or the end of its views."""
    while True:
        if available(node):
            return node
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_function" or users[0].target not in VIEW_OPS:
            return None
        node = users[0]


def find_states(gm: fx.GraphModule, ev: GraphEvaluator, settled: list, available):
    """Yield (site index, StateRead) or Refused for the final states the settled sites' prefills return."""
    sites = [_Site(s) for s in settled]
    seen, found = set(), []
    for node in gm.graph.nodes:
        for index, site in enumerate(sites):
            if site.settled.match.tk is not None or site.settled.match.out_scale is not None:
                continue        # queries against keys of another length, or an output scaled at run time: the
                                # states stay the user's code's
            try:
                read = _candidate(gm, ev, site, node)
            except Refused as refusal:
                if ev.depends_on(site.settled.match.output, {node}):
                    continue                      # part of the site itself (e.g. the linear form's sums)
                yield refusal
                break
            if read is None:
                continue
            visible = _visible(read.node, available)
            inside = ev.depends_on(site.settled.match.output, {read.node})
            if visible is None or visible in seen or (inside and site.settled.spec.causal):
                continue                          # a value inside the site or of a decomposed operation
            # (a non-causal site's own total sums, phi(q) @ (phi(k)^T v) returning phi(k)^T v, are its states)
            seen.add(visible)
            read.node = visible
            found.append((index, read))
            break
    # the sum an initial state is added to (kv_state + phi(k)^T v) is read within that state, not on its own
    within = {(index, _visible(read.inner, available)) for index, read in found if read.inner is not None}
    for index, read in found:
        if (index, read.node) not in within:
            yield index, read


def settle_states(site, reads: list, ev: GraphEvaluator, to_dynamo: dict) -> SiteStates:
    """Probe the site's states (``reads``, one feature map) against the operator's; returns the plan or Refused."""
    m, spec = site.match, site.spec
    init = m.initial
    pieces, k_factors = (reads[0].pieces, reads[0].k_factors) if init is None else (init.pieces, init.k_factors)
    for read in reads:
        if read.pieces != pieces or any(abs(a - b) > 1e-12 * max(1.0, abs(a)) for a, b in zip(read.k_factors, k_factors)):
            raise Refused("state", "the site's states use two different feature maps: the operator returns one"
                          if init is None else "the returned state is in another feature map than the attention's "
                          "keys, whose features the initial state is in: the operator returns one", read.node)
        started = init is not None and (init.kv if read.kind == "kv" else init.k) is not None
        if started and not read.initial:
            raise Refused("state", "the prefill returns a state without the initial state its running sums start "
                                   "from: the operator returns them added", read.node)
    gen = torch.Generator().manual_seed(2025)
    values = {n: torch.randn(hint_shape(n), generator=gen, dtype=torch.float64) for n in (m.q, m.k, m.v)}
    q, k, v = (values[n] for n in (m.q, m.k, m.v))
    q, k, v = site.operator_inputs(q, k, v)
    args = check_arguments(q, k, v, spec.scale, spec.coeffs, spec.causal, spec.normalize, spec.eps, spec.layout)
    kv, ks = features_of_moments(moments(k, v, args), pieces, k_factors, args.dk)
    if init is not None:                  # the states the running sums start from, at random values
        for st, positive in ((init.kv, False), (init.k, True)):
            if st is None:
                continue
            x = torch.randn(hint_shape(st.source), generator=gen, dtype=torch.float64)
            values[st.source] = x.abs() + 1.0 if positive else x
            if st is init.kv:
                kv = kv + st.operator_tensor(values[st.source])
            else:
                ks = ks + st.operator_tensor(values[st.source])
    for read in reads:
        try:
            got = ev.evaluate(read.node, substitute=dict(values))
        except Exception as err:          # noqa: BLE001 - refuse, never crash
            raise Refused("verify", f"the numerical probe could not evaluate the state: {type(err).__name__}: {err}",
                          read.node) from err
        want = kv if read.kind == "kv" else ks
        ok = False
        for repeat in ((False, True) if args.group > 1 else (False,)):
            for transpose in ((False, True) if read.kind == "kv" else (False,)):
                x = want.repeat_interleave(args.group, dim=1) if repeat else want
                x = x.transpose(-2, -1) if transpose else x
                if x.numel() != got.numel():
                    continue
                err = ((got.double() - x.reshape(got.shape)).norm() / x.norm().clamp_min(1e-300)).item()
                if err < _TOLERANCE:
                    read.repeat, read.transpose, ok = repeat, transpose, True
                    break
            if ok:
                break
        if not ok:
            what = "sum_t phi(k_t)^T v_t" if read.kind == "kv" else "sum_t phi(k_t)"
            raise Refused("verify", f"structure matched a prefill's final state ({what}) but the numerical probe "
                                    f"disagrees with the operator's in every layout it can produce", read.node)
        if [n for n in x.shape if n != 1] != [n for n in got.shape if n != 1]:
            # the probe compared the values as a reshape of the operator's state; the rewrite places the
            # state only by transposing and adding or removing size-1 axes, so a reshape it cannot undo
            raise Refused("state", f"the returned state is the operator's {list(x.shape)} reshaped to "
                                   f"{list(got.shape)}: only size-1 axes can be added or removed", read.node)
    return SiteStates(pieces, k_factors, list(reads))
