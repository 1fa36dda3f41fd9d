"""The recurrent step of Based attention (one decoding step against carried states), as people write it:

    phi_q, phi_k = phi(q), phi(k)                        # the Taylor feature map [1, x, x (x) x]
    kv_state = kv_state + phi_k.transpose(-2, -1) @ v     # or einsum(...), or kv_state.add_(...)
    k_state = k_state + phi_k                             # or k_state.add_(phi_k), k_state += phi_k
    y = (phi_q @ kv_state) / ((phi_q * k_state).sum(-1, keepdim=True) + eps)

or unnormalised, ``y = phi_q @ kv_state`` (the key state updated or absent), and with grouped-query
states kept per kv head: q [B, H, 1, D] with H = G * Hkv heads, k, v and the states per kv head,
the readout grouping q heads on their kv head (``kv_state.repeat_interleave(G, dim=1)``, the
``expand`` + ``reshape`` spelling, or q reshaped to [B, Hkv, G, D]: query row i reads state row
i // G). Each state is updated once per kv head.

The states may have any leading axes (the step's rows): HazyResearch zoology's ``recurrent_forward``
keeps them 5-d and broadcast, ``kv_state += phi_k[:, :, -1:, None, :] * v[:, :, -1:, :, None]``
([B, H, 1, Dv, F]) read out by ``(phi_q[:, :, :, None, :] * kv_state).sum(-1)``; the token's
``[:, :, -1:]`` of a one-token axis is the tensor itself (``canonicalize._drop_full_slices``). A state
stored back by ``state.copy_(state + update)`` is the update written in place (the driver's
``_check_step_reads``, ``inplace.copies_over``).

The kv state may also be kept transposed, [.., Dv, F] (``kv_state + v^T phi(k)``, read out by
``phi(q) kv_state^T``): which layout it is, the probe decides (``kv_transposed``).

It becomes ``based::recurrent_step(q, k, v, kv_state, k_state, pieces, factors, eps)``, which returns
the output and the two updated states in the user's shapes and dtypes (``op/recurrent_step.py``); a
transposed kv state goes in as its [.., F, Dv] view and its update comes back transposed.

Reading (on the lowered, functional graph): the key-state update is an ``add`` of a state and phi(k)
(a feature map ``cat``, ``feature_map.py``); the kv-state update an ``add`` of a state and the outer
product of the same phi(k) with v (a ``bmm`` or ``mul`` of the two); the output a division of a
readout of the new kv state by a readout of the new key state plus eps, both with phi(q). Roles
found, the numerical probe (``settle_step``) evaluates the user's subgraph on random inputs and
states and compares all three results with the operator's reference: it is what makes the
rewrite exact (the layouts of the states included, and the grouping of query heads: a
``repeat(1, G, 1, 1)`` of the states, which gives query head h kv head h % Hkv, disagrees with the
operator's h // G and is refused). Refused: a decayed or gated state (``0.9 * kv_state + ...``), an
outer product with features that are not a Taylor map, a readout of the old state, an update
without the readout, grad mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..op.recurrent_step import StepSpec, feature_width, recurrent_step_reference
from .canonicalize import VIEW_OPS, example_value, hint, hint_shape, scalar_factor, scalar_value, strip_views, walk_operand
from .evaluate import GraphEvaluator
from .feature_map import FeatureMap, map_readings, pair_feature_maps, read_feature_map, readings_of
from .refusal import Refused

aten = torch.ops.aten
FORM = "recurrent step"


@dataclass
class StepMatch:
    output: fx.Node           # y
    kv_new: fx.Node           # the updated kv state
    k_new: fx.Node | None     # the updated key state (None: an unnormalised step without one)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    kv_state: fx.Node
    k_state: fx.Node | None
    pieces: tuple
    q_factors: tuple
    k_factors: tuple
    eps: float
    anchor: fx.Node

    form: str = FORM
    reshape_out: bool = False     # the user's output holds the op's rows in another shape (a size-1 axis moved)
    readings: tuple = ()          # candidates for (q, k, v), each nearest first; settle_step picks
    normalize: bool = True        # False: y = phi(q) kv_state, no denominator
    outputs: tuple = ()           # unnormalised: candidates for y (the readout and the views after it), last first
    kv_transposed: bool = False   # the user keeps kv_state as [.., Dv, F] (the operator's [.., F, Dv] transposed)




def _feature_map_of(gm, node):
    """(FeatureMap, cat node) when ``node`` is, through views, a Taylor feature map; else (None, None)."""
    if not isinstance(node, fx.Node):
        return None, None
    walked = walk_operand(gm, node)
    stop = walked.stop
    if stop.op != "call_function" or walked.factor != 1.0:
        return None, None
    phi = read_feature_map(gm, stop)
    return (phi, stop) if phi is not None else (None, None)


def _outer_operands(node):
    """(a, b) when ``node`` is, through views, an outer product over a size-1 axis (bmm [.., F, 1] @
    [.., 1, D], or a mul of two broadcast tensors), else None."""
    node = strip_views(node)
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is aten.bmm.default:
        a, b = node.args[0], node.args[1]
        sa = hint_shape(a)
        return (a, b) if sa is not None and sa[-1] == 1 else None
    if node.target is aten.mul.Tensor and all(isinstance(x, fx.Node) for x in node.args[:2]):
        sa, sb = hint_shape(node.args[0]), hint_shape(node.args[1])
        if sa is None or sb is None or min(len(sa), len(sb)) < 2:
            return None
        while min(len(sa), len(sb)) > 2 and sa[-1] == sb[-1] == 1:     # an einsum over a size-1 t axis
            sa, sb = sa[:-1], sb[:-1]
        if (sa[-1] == 1 and sb[-2] == 1 and sa[-2] > 1 and sb[-1] > 1) or \
                (sa[-2] == 1 and sb[-1] == 1 and sa[-1] > 1 and sb[-2] > 1):
            return node.args[0], node.args[1]
    return None


def _check_state(gm, state, what: str, where):
    """A state operand that is scaled or gated is not Based's recurrence."""
    inner = strip_views(state)
    if isinstance(inner, fx.Node) and inner.op == "call_function":
        scaled = scalar_factor(gm, inner)
        if scaled is not None:
            raise Refused("unsupported", f"decayed {what} ({scaled[1]:g} * state + update): not Based's recurrence, "
                                         "whose states only add", where)
        if inner.target is aten.mul.Tensor:
            raise Refused("unsupported", f"gated {what} (a tensor times the state, plus the update): not Based's "
                                         "recurrence, whose states only add", where)


def _updates(gm, add: fx.Node):
    """('k', state, cat, phi) or ('kv', state, cat, phi, v) for an ``add`` that updates a state."""
    if add.op != "call_function" or add.target is not aten.add.Tensor or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[0], add.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for state, update in ((a, b), (b, a)):
        phi, cat = _feature_map_of(gm, update)
        if phi is not None and hint_shape(state) is not None and _feature_map_of(gm, state)[0] is None:
            return ("k", state, cat, phi)
        pair = _outer_operands(update)
        if pair is None:
            continue
        for x, y in (pair, pair[::-1]):
            phi, cat = _feature_map_of(gm, x)
            if phi is not None and _feature_map_of(gm, y)[0] is None and not _reads(state, {cat}) \
                    and hint_shape(state) == hint_shape(add):
                return ("kv", state, cat, phi, readings_of(gm, y, len(hint_shape(cat))) or (y,))
        return ("outer", state, *pair)
    for state, update in ((a, b), (b, a)):
        if hint_shape(state) == hint_shape(add) and strip_views(update).op == "call_function":
            return ("sum", state, strip_views(update))
    return None


def _reads(node: fx.Node, targets: set, depth: int = 8, stop: frozenset = frozenset()) -> set:
    """The nodes of ``targets`` that ``node`` reads within ``depth`` operations back, not reading past
    the nodes of ``stop``. Views are not counted: they only rearrange what they read (an einsum's
    lowering puts several around each operand, and a map squeezed to the token, ``phi(q).squeeze(2)``,
    adds more)."""
    found, frontier, seen = set(), [node], set()
    for _ in range(depth):
        nxt = []
        while frontier:
            n = frontier.pop()
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a in targets:
                    found.add(a)
                elif a not in stop:
                    view = a.op == "call_function" and a.target in VIEW_OPS
                    (frontier if view else nxt).append(a)
        frontier = nxt
    return found


def _readout(gm, kv_new: fx.Node, k_new: fx.Node, cats_q: set):
    """(output, eps, cat_q) of y = (phi_q . kv_new) / (phi_q . k_new + eps), or None."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.div.Tensor or not isinstance(node.args[1], fx.Node):
            continue
        num, den = node.args[0], node.args[1]
        if not isinstance(num, fx.Node) or kv_new not in _reads(num, {kv_new}):
            continue
        eps, inner = 0.0, strip_views(den)
        while inner.op == "call_function" and inner.target is aten.add.Tensor:
            c = scalar_value(gm, inner.args[1])
            if c is None:
                break
            eps, inner = eps + c, strip_views(inner.args[0])
        # phi(q) is read beside the states, not through them (an earlier step's phi(k) is in the states)
        cat_num = _reads(num, cats_q, stop=frozenset({kv_new}))
        cat_den = _reads(inner, cats_q, stop=frozenset({k_new}))
        if k_new in _reads(inner, {k_new}) and cat_num and cat_num == cat_den:
            return node, eps, cat_num.pop()
    return None


_CONTRACTIONS = {aten.bmm.default, aten.sum.dim_IntList}


def _plain_readout(gm, kv_new: fx.Node, cats_q: set, other_states: frozenset):
    """(candidates for y, cat_q) of an unnormalised readout y = phi_q . kv_new (a ``bmm``, or a ``sum``
    of a ``mul``, of phi(q) read beside the state and the new kv state, read through views or a
    repeat but not through another step's update), else None. The candidates are the contraction and
    the views after it, each with a single user, last first: the probe picks the one that is y."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONTRACTIONS:
            continue
        operands = node.args[:2]
        if node.target is aten.sum.dim_IntList:
            inner = node.args[0]
            if not (isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is aten.mul.Tensor):
                continue
            operands = inner.args[:2]
        if not all(isinstance(x, fx.Node) for x in operands):
            continue
        for x, y in (operands, operands[::-1]):
            if kv_new not in _reads(y, {kv_new}, stop=other_states) and y is not kv_new:
                continue
            if kv_new in _reads(x, {kv_new}) or x is kv_new:
                continue
            cat_q = _reads(x, cats_q, stop=frozenset({kv_new})) | ({x} & cats_q)
            if len(cat_q) != 1:
                continue
            chain = [node]
            while len(chain[-1].users) == 1:
                nxt = next(iter(chain[-1].users))
                if nxt.op != "call_function" or nxt.target not in VIEW_OPS or nxt.args[0] is not chain[-1]:
                    break
                chain.append(nxt)
            return tuple(reversed(chain)), cat_q.pop()
    return None


def find_steps(gm: fx.GraphModule):
    """Yield StepMatch or Refused for every Based state update in the lowered graph ``gm``."""
    k_updates, kv_updates, summed, outers = {}, [], set(), []
    for node in gm.graph.nodes:
        try:
            found = _updates(gm, node)
        except Refused as refusal:
            yield refusal
            continue
        if found is None:
            continue
        if found[0] == "k":
            k_updates.setdefault(found[2], (node, found[1]))
        elif found[0] == "kv":
            kv_updates.append((node, *found[1:]))
        elif found[0] == "sum":
            summed.add(found[2])
        else:
            outers.append((node, found[2], found[3]))
    for node, x, y in outers:       # state + x^T y with state' + x beside it: a recurrence on other features
        features = next((f for f in (strip_views(x), strip_views(y)) if any(_same_part(f, s) for s in summed)), None)
        if features is not None and _token_of_map(gm, features):
            yield Refused("feature_map", "a recurrent state update (state + phi(k)^T v, k_state + phi(k)) whose "
                                         "features are one token taken out of a feature map of several tokens "
                                         "(phi(k)[:, :, i] of a [B, H, T, D] map, T > 1): the pass reads the map "
                                         "of the token itself, phi(k[:, :, i]) or phi of a [B, H, 1, D] slice", node)
        elif features is not None:
            yield Refused("feature_map", "a recurrent state update (state + phi(k)^T v, k_state + phi(k)) whose "
                                         "features are not the Taylor feature map phi(x) = [c, a x, b x (x) x] of "
                                         "Based", node)
    cats = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.cat.default}
    kv_nodes = frozenset(u[0] for u in kv_updates)
    for kv_new, kv_state, cat_k, phi_k, v in kv_updates:
        try:
            yield _match_step(gm, kv_new, kv_state, cat_k, phi_k, v, k_updates, cats, kv_nodes - {kv_new})
        except Refused as refusal:
            if refusal.node is None:
                refusal.node = kv_new
            yield refusal


def _same_part(a: fx.Node, b: fx.Node) -> bool:
    """``a`` and ``b`` are one value: the same node, or the same slice or select of the same tensor
    spelled twice (``phi_k[:, :, -1:]`` in the kv update and again in the key update)."""
    if a is b:
        return True
    parts = (aten.slice.Tensor, aten.select.int)
    return a.op == b.op == "call_function" and a.target is b.target and a.target in parts \
        and a.args == b.args and a.kwargs == b.kwargs


def _token_of_map(gm, features: fx.Node) -> bool:
    """``features`` takes a part of a feature map along an axis other than its features (a select or
    slice of a time axis longer than one: a select of a size-1 axis is a view, ``unit_select.py``)."""
    if features.op != "call_function" or features.target not in (aten.select.int, aten.slice.Tensor):
        return False
    dim = features.args[1] if len(features.args) > 1 else 0
    whole = features.args[0]
    rank = len(hint_shape(whole) or ())
    return rank > 0 and dim not in (-1, rank - 1) and _feature_map_of(gm, whole)[0] is not None


def _check_step_map(phi: FeatureMap, where) -> None:
    """The step operator computes phi on the fly from the pieces ones, x and the flattened x (x) x:
    a map with other pieces (a compressed map's products x_a x_b, a third-order term) is refused."""
    other = [p.kind for p in phi.pieces if p.kind not in ("const", "linear", "outer")]
    if other:
        raise Refused("feature_map", "a recurrent state update (state + phi(k)^T v, k_state + phi(k)) whose "
                                     "features are not the Taylor feature map phi(x) = [c, a x, b x (x) x] the step "
                                     f"operator computes (pieces {other}: its state layout is not the operator's)",
                      where)


def _match_step(gm, kv_new, kv_state, cat_k, phi_k: FeatureMap, v, k_updates, cats, other_states) -> StepMatch:
    _check_step_map(phi_k, kv_new)
    _check_state(gm, kv_state, "kv state", kv_new)
    k_new = k_state = found = None
    cats_q = {c for c in cats if c is not cat_k and read_feature_map(gm, c) is not None}
    if cat_k in k_updates:
        k_new, k_state = k_updates[cat_k]
        _check_state(gm, k_state, "key state", k_new)
        found = _readout(gm, kv_new, k_new, cats_q)
    outputs, normalize = (), True
    if found is not None:
        output, eps, cat_q = found
    else:                                     # the unnormalised readout phi(q) kv_state
        plain = _plain_readout(gm, kv_new, cats_q, other_states)
        if plain is None:
            updates = ("Based state updates (kv_state + phi(k)^T v, k_state + phi(k))" if k_new is not None else
                       "a Based kv-state update (kv_state + phi(k)^T v)")
            raise Refused("unsupported", f"{updates} without a readout phi(q) kv_state / (phi(q) . k_state + eps) or "
                                         "phi(q) kv_state of the updated states in this graph", kv_new)
        outputs, cat_q = plain
        output, eps, normalize = outputs[0], 0.0, False
    phi_q = read_feature_map(gm, cat_q)
    pair_feature_maps(phi_q, phi_k)           # refuses maps that are not functions of q.k
    _check_step_map(phi_q, kv_new)
    pieces = tuple(f"const:{p.width}" if p.kind == "const" else p.kind for p in phi_q.pieces)
    readings = (map_readings(gm, cat_q, phi_q), map_readings(gm, cat_k, phi_k), v)
    return StepMatch(output, kv_new, k_new, readings[0][0], readings[1][0], v[0], kv_state, k_state, pieces,
                     tuple(p.factor for p in phi_q.pieces), tuple(p.factor for p in phi_k.pieces), eps, output,
                     readings=readings, normalize=normalize, outputs=outputs)


_TOLERANCE = 1e-9


def _rows(shape) -> int:
    return math.prod(shape[:-1])


def settle_step(m: StepMatch, evaluator: GraphEvaluator, available=None) -> StepMatch:
    """The first reading of q, k, v (tensors of the model's graph, ``available``) that fits the
    operator (one Dk for q and k, v with k's leading dims, q's rows a multiple G of k's: one q shape
    for k first, then grouped readings) and, for an unnormalised step, the output among the readout's
    views, probed (``_probe_step``)."""
    fits, grouped, unavailable = [], [], []
    qs, ks, vs = m.readings or ((m.q,), (m.k,), (m.v,))
    for q in qs:
        for k in ks:
            for v in vs:
                if available is not None and not all(available(x) for x in (q, k, v)):
                    unavailable.extend(x for x in (q, k, v) if not available(x) and x not in unavailable)
                    continue
                sq, sk, sv = hint_shape(q), hint_shape(k), hint_shape(v)
                if sq is None or sk is None or sv is None or sq[-1] != sk[-1] or sv[:-1] != sk[:-1]:
                    continue
                if sq == sk:
                    fits.append((q, k, v))
                elif _rows(sk) and _rows(sq) % _rows(sk) == 0:
                    grouped.append((q, k, v))
    fits += grouped
    if not fits:
        shapes = [[list(hint_shape(x)) for x in r] for r in (qs, ks, vs)]
        if unavailable:
            raise Refused("unsupported", f"no reading of q, k, v that the operator can be given: "
                                         f"{[n.name for n in unavailable]} are intermediate values of one operation of "
                                         f"the model's graph (a part of an indexing expression such as "
                                         f"v[:, :, :1, :, None]), and no other reading fits (candidates {shapes})",
                          m.output)
        raise Refused("unsupported", f"no reading of q, k, v with one Dk for q and k, v with k's leading dims and "
                                     f"q's rows a multiple of k's (candidates {shapes})", m.output)
    m.q, m.k, m.v = fits[0]
    if m.normalize:
        return _guard_group(_probe_step(m, evaluator))
    outputs = [o for o in m.outputs if available is None or available(o)]
    first = None
    for output in outputs:
        m.output = m.anchor = output
        try:
            return _guard_group(_probe_step(m, evaluator))
        except Refused as refusal:
            first = first or refusal
    if first is None:
        raise Refused("unsupported", "the unnormalised readout phi(q) kv_state is an intermediate value of a "
                                     "decomposed operation, not a value of the model's graph", m.kv_new)
    raise first


def _guard_group(m: StepMatch) -> StepMatch:
    """Specialise the number G of query rows per state row on the traced one (a guard when the rows are
    symbolic): the probe proved the user's grouping equal to the operator's (row i reads state row
    i // G) at this G only. A tiling (``kv_state.repeat(1, g, 1, 1)`` with g = H // Hkv) equals it at
    G = 1 and differs at G = 2: a graph traced at G = 1 must recompile, not run the operator, when
    called with twice as many query heads as kv heads."""
    q, k = example_value(m.q), example_value(m.k)
    q_rows, k_rows = math.prod(q.shape[:-1]), math.prod(k.shape[:-1])
    if isinstance(q_rows, int) and isinstance(k_rows, int):
        return m
    hq, hk = int(hint(q_rows)), int(hint(k_rows))
    group = hq // hk if hk else 1
    if not bool(q_rows == group * k_rows):          # a guard on symbolic sizes; true at the traced ones
        raise Refused("verify", "the query rows are not the traced multiple of the state rows", m.output)
    return m


def _probe_step(m: StepMatch, evaluator: GraphEvaluator) -> StepMatch:
    """Evaluate the user's step on random float64 inputs and states (states built from a few random
    earlier tokens, as decoding has them) and compare its output and the new states with the
    operator's, with the kv state in each layout the operator can read it in: rows x F x Dv as
    stored, and, where the state's last two axes are [Dv, F], those two transposed (``kv_transposed``:
    the rewrite hands the operator the transposed view and returns its result transposed back).
    Refuse ("verify") unless one layout agrees on all three."""
    inputs = [n for n in (m.q, m.k, m.v, m.kv_state, m.k_state) if n is not None]
    for node in inputs:
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            raise Refused("verify", f"{node.name} is not a tensor", m.output)
        if value.requires_grad and torch.is_grad_enabled():
            raise Refused("unsupported", "the recurrent step runs with inputs that require grad: based::recurrent_step "
                                         "has no backward (decode under torch.no_grad())", m.output)
    shapes = {n: hint_shape(n) for n in inputs}
    dk, dv = shapes[m.k][-1], shapes[m.v][-1]
    kv_shape = shapes[m.kv_state]
    layouts = [False]
    try:
        f = feature_width(m.pieces, dk)
    except ValueError:
        f = None
    if f is not None and len(kv_shape) >= 2 and tuple(kv_shape[-2:]) == (dv, f):
        layouts.append(True)
    first = None
    for transposed in layouts:
        try:
            _probe_layout(m, evaluator, shapes, transposed)
        except Refused as refusal:
            first = first or refusal
            continue
        m.kv_transposed = transposed
        m.form = FORM + (" (kv state [.., Dv, F])" if transposed else "")
        return m
    if len(layouts) > 1 and first.category == "verify":
        first = Refused(first.category, f"{first.reason} (with the kv state read as [.., F, Dv] and as its "
                                        "transpose [.., Dv, F] alike)", first.node)
    raise first


def _probe_layout(m: StepMatch, evaluator: GraphEvaluator, shapes: dict, transposed: bool) -> None:
    """The probe of ``_probe_step`` with the kv state in one layout (``transposed``: the user's state is
    the operator's with its last two axes swapped); Refused unless the user's step agrees."""
    gen = torch.Generator().manual_seed(2024)
    dk, dv = shapes[m.k][-1], shapes[m.v][-1]
    rows = _rows(shapes[m.k])
    group = _rows(shapes[m.q]) // rows if rows else 1
    q, k = (torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in (m.q, m.k))
    if m.k is m.q:                                # one tensor read as q and as k (phi(x) for both)
        k = q
    v = torch.randn(shapes[m.v], generator=gen, dtype=torch.float64)
    kv_shape = tuple(shapes[m.kv_state])
    if transposed:                                # the operator's [.., F, Dv]
        kv_shape = kv_shape[:-2] + (kv_shape[-1], kv_shape[-2])
    kv = ks = None
    try:
        kv = torch.zeros(kv_shape, dtype=torch.float64)
        ks = None if m.k_state is None else torch.zeros(shapes[m.k_state], dtype=torch.float64)
        for _ in range(3):                        # states of three earlier tokens
            kj = torch.randn(rows, dk, generator=gen, dtype=torch.float64)
            vj = torch.randn(rows, dv, generator=gen, dtype=torch.float64)
            _, kv, ks_j = recurrent_step_reference(kj.reshape(shapes[m.k]), kj.reshape(shapes[m.k]),
                                                   vj.reshape(shapes[m.v]), kv, ks, m.pieces, m.q_factors,
                                                   m.k_factors, ks is not None, m.eps)
            ks = None if ks is None else ks_j
        want = recurrent_step_reference(q, k, v, kv, ks, m.pieces, m.q_factors, m.k_factors, m.normalize, m.eps)
    except (ValueError, RuntimeError) as err:
        raise Refused("verify", f"the states do not fit the operator's rows x features reading: {err}", m.output) from err
    if transposed:                                # the user's tensors: the operator's transposed, as stored
        kv = kv.transpose(-2, -1).contiguous()
        want = (want[0], want[1].transpose(-2, -1), want[2])
    substitute = {m.q: q, m.k: k, m.v: v, m.kv_state: kv}
    nodes, names = [m.output, m.kv_new], ["output", "kv state"]
    if m.k_state is not None:
        substitute[m.k_state] = ks
        nodes.append(m.k_new)
        names.append("key state")
    try:
        got = [evaluator.evaluate(n, substitute=substitute) for n in nodes]
    except Exception as err:               # noqa: BLE001 - e.g. a float32 constant: refuse, never crash
        raise Refused("verify", f"the numerical probe could not evaluate the step: {type(err).__name__}: {err}",
                      m.output) from err
    m.reshape_out = False
    if got[0].shape != want[0].shape and got[0].numel() == want[0].numel():
        want = (want[0].reshape(got[0].shape), *want[1:])
        m.reshape_out = True
    grouping = (f" (grouped-query states: the operator gives query row i the state row i // G, G = {group}, as "
                "repeat_interleave(G) / expand / a [B, Hkv, G, ...] reshape of q group heads; repeat(1, G, ...) "
                "groups them differently)") if group > 1 else ""
    for name, g, w in zip(names, got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise Refused("verify", f"the step's {name} has shape {list(g.shape)}, the operator's {list(w.shape)}",
                          m.output)
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-300)).item()
        if not err < _TOLERANCE:
            raise Refused("verify", f"structure matched a Based recurrent step but the numerical probe disagrees on "
                                    f"the {name}: relative error {err:.2e} on random inputs{grouping}", m.output)


def spec_of(m: StepMatch) -> StepSpec:
    return StepSpec(m.pieces, m.q_factors, m.k_factors, m.normalize, m.eps)
