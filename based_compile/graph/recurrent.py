"""The recurrent step of Based attention (one decoding step against carried states), as people write it:

    phi_q, phi_k = phi(q), phi(k)                        # the Taylor feature map [1, x, x (x) x]
    kv_state = kv_state + phi_k.transpose(-2, -1) @ v     # or einsum(...), or kv_state.add_(...)
    k_state = k_state + phi_k                             # or k_state.add_(phi_k), k_state += phi_k
    y = (phi_q @ kv_state) / ((phi_q * k_state).sum(-1, keepdim=True) + eps)

It becomes ``based::recurrent_step(q, k, v, kv_state, k_state, pieces, factors, eps)``, which returns
the output and the two updated states in the user's shapes and dtypes (``op/recurrent_step.py``).

Reading (on the lowered, functional graph): the key-state update is an ``add`` of a state and phi(k)
(a feature map ``cat``, ``feature_map.py``); the kv-state update an ``add`` of a state and the outer
product of the same phi(k) with v (a ``bmm`` or ``mul`` of the two); the output a division of a
readout of the new kv state by a readout of the new key state plus eps, both with phi(q). Roles
found, the numerical probe (``settle_step``) evaluates the user's subgraph on random inputs and
states and compares all three results with the operator's reference: it is what makes the
rewrite exact (the layouts of the states included). Refused: a decayed or gated state
(``0.9 * kv_state + ...``), an outer product with features that are not a Taylor map, a readout of
the old state, an update without the readout, grad mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..op.recurrent_step import StepSpec, recurrent_step_reference
from .canonicalize import VIEW_OPS, example_value, hint_shape, scalar_factor, scalar_value, walk_operand
from .evaluate import GraphEvaluator
from .feature_map import FeatureMap, pair_feature_maps, read_feature_map
from .refusal import Refused

aten = torch.ops.aten
FORM = "recurrent step"


@dataclass
class StepMatch:
    output: fx.Node           # y
    kv_new: fx.Node           # the updated kv state
    k_new: fx.Node            # the updated key state
    q: fx.Node
    k: fx.Node
    v: fx.Node
    kv_state: fx.Node
    k_state: fx.Node
    pieces: tuple
    q_factors: tuple
    k_factors: tuple
    eps: float
    anchor: fx.Node

    form: str = FORM
    reshape_out: bool = False     # the user's output holds the op's rows in another shape (a size-1 axis moved)
    readings: tuple = ()          # candidates for (q, k, v), each nearest first; settle_step picks


def _strip(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS \
            and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


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
    node = _strip(node)
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
        if (sa[-1] == 1 and sb[-2] == 1 and sa[-2] > 1 and sb[-1] > 1) or \
                (sa[-2] == 1 and sb[-1] == 1 and sa[-1] > 1 and sb[-2] > 1):
            return node.args[0], node.args[1]
    return None


def _readings_of(gm, node: fx.Node, rank: int) -> tuple:
    """The tensors of ``rank`` dims on the chain of views (and scalar factors) from ``node`` down,
    nearest first, only those below every scalar factor (a scaled q is not q): the candidates for
    the tensor the user passed (x before the unsqueeze of an outer product, or before a transpose)."""
    found = []
    while True:
        if len(hint_shape(node) or ()) == rank:
            found.append(node)
        if node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        scaled = scalar_factor(gm, node) if node.op == "call_function" else None
        if scaled is not None:
            found, node = [], scaled[0]
            continue
        return tuple(found) or (node,)


def _map_readings(gm, cat: fx.Node, phi: FeatureMap) -> tuple:
    """Candidates for x of phi(x) = cat(...), read from its linear piece, nearest first."""
    for node, piece in zip(cat.args[0], phi.pieces):
        if piece.kind == "linear":
            return _readings_of(gm, node, len(hint_shape(cat)))
    return (phi.source,)


def _check_state(gm, state, what: str, where):
    """A state operand that is scaled or gated is not Based's recurrence."""
    inner = _strip(state)
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
                return ("kv", state, cat, phi, _readings_of(gm, y, len(hint_shape(cat))))
        return ("outer", state, *pair)
    for state, update in ((a, b), (b, a)):
        if hint_shape(state) == hint_shape(add) and _strip(update).op == "call_function":
            return ("sum", state, _strip(update))
    return None


def _reads(node: fx.Node, targets: set, depth: int = 8, stop: frozenset = frozenset()) -> set:
    """The nodes of ``targets`` that ``node`` reads within ``depth`` steps back, not reading past the
    nodes of ``stop``."""
    found, frontier, seen = set(), [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a in seen:
                    continue
                seen.add(a)
                if a in targets:
                    found.add(a)
                elif a not in stop:
                    nxt.append(a)
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
        eps, inner = 0.0, _strip(den)
        while inner.op == "call_function" and inner.target is aten.add.Tensor:
            c = scalar_value(gm, inner.args[1])
            if c is None:
                break
            eps, inner = eps + c, _strip(inner.args[0])
        # phi(q) is read beside the states, not through them (an earlier step's phi(k) is in the states)
        cat_num = _reads(num, cats_q, stop=frozenset({kv_new}))
        cat_den = _reads(inner, cats_q, stop=frozenset({k_new}))
        if k_new in _reads(inner, {k_new}) and cat_num and cat_num == cat_den:
            return node, eps, cat_num.pop()
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
        features = next((f for f in (_strip(x), _strip(y)) if f in summed), None)
        if features is not None:
            yield Refused("feature_map", "a recurrent state update (state + phi(k)^T v, k_state + phi(k)) whose "
                                         "features are not the Taylor feature map phi(x) = [c, a x, b x (x) x] of "
                                         "Based", node)
    cats = {n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.cat.default}
    for kv_new, kv_state, cat_k, phi_k, v in kv_updates:
        try:
            yield _match_step(gm, kv_new, kv_state, cat_k, phi_k, v, k_updates, cats)
        except Refused as refusal:
            if refusal.node is None:
                refusal.node = kv_new
            yield refusal


def _match_step(gm, kv_new, kv_state, cat_k, phi_k: FeatureMap, v, k_updates, cats) -> StepMatch:
    _check_state(gm, kv_state, "kv state", kv_new)
    if cat_k not in k_updates:
        raise Refused("unsupported", "a Based kv-state update (state + phi(k)^T v) without the key-state update "
                                     "(k_state + phi(k)) of the same phi(k): an unnormalised recurrent step is not "
                                     "rewritten", kv_new)
    k_new, k_state = k_updates[cat_k]
    _check_state(gm, k_state, "key state", k_new)
    cats_q = {c for c in cats if c is not cat_k and read_feature_map(gm, c) is not None}
    found = _readout(gm, kv_new, k_new, cats_q)
    if found is None:
        raise Refused("unsupported", "Based state updates (kv_state + phi(k)^T v, k_state + phi(k)) without a readout "
                                     "phi(q) kv_state / (phi(q) . k_state + eps) of the updated states in this graph",
                      kv_new)
    output, eps, cat_q = found
    phi_q = read_feature_map(gm, cat_q)
    pair_feature_maps(phi_q, phi_k)           # refuses maps that are not functions of q.k
    pieces = tuple(f"const:{p.width}" if p.kind == "const" else p.kind for p in phi_q.pieces)
    readings = (_map_readings(gm, cat_q, phi_q), _map_readings(gm, cat_k, phi_k), v)
    return StepMatch(output, kv_new, k_new, readings[0][0], readings[1][0], v[0], kv_state, k_state, pieces,
                     tuple(p.factor for p in phi_q.pieces), tuple(p.factor for p in phi_k.pieces), eps, output,
                     readings=readings)


_TOLERANCE = 1e-9


def settle_step(m: StepMatch, evaluator: GraphEvaluator, available=None) -> StepMatch:
    """The first reading of q, k, v (tensors of the model's graph, ``available``) with one shape for q
    and k and v's leading dims, probed (``_probe_step``)."""
    fits = []
    qs, ks, vs = m.readings or ((m.q,), (m.k,), (m.v,))
    for q in qs:
        for k in ks:
            for v in vs:
                if available is not None and not all(available(x) for x in (q, k, v)):
                    continue
                sq, sk, sv = hint_shape(q), hint_shape(k), hint_shape(v)
                if sq == sk and sv is not None and sv[:-1] == sq[:-1]:
                    fits.append((q, k, v))
    if not fits:
        shapes = [[list(hint_shape(x)) for x in r] for r in (qs, ks, vs)]
        raise Refused("unsupported", f"no reading of q, k, v with one shape for q and k and v's leading dims "
                                     f"(candidates {shapes}): grouped-query states are not rewritten", m.output)
    m.q, m.k, m.v = fits[0]
    return _probe_step(m, evaluator)


def _probe_step(m: StepMatch, evaluator: GraphEvaluator) -> StepMatch:
    """Evaluate the user's step on random float64 inputs and states (states built from a few random
    earlier tokens, as decoding has them) and compare its output and both new states with the
    operator's; refuse ("verify") unless all three agree."""
    for node in (m.q, m.k, m.v, m.kv_state, m.k_state):
        value = example_value(node)
        if not isinstance(value, torch.Tensor):
            raise Refused("verify", f"{node.name} is not a tensor", m.output)
        if value.requires_grad and torch.is_grad_enabled():
            raise Refused("unsupported", "the recurrent step runs with inputs that require grad: based::recurrent_step "
                                         "has no backward (decode under torch.no_grad())", m.output)
    shapes = {n: hint_shape(n) for n in (m.q, m.k, m.v, m.kv_state, m.k_state)}
    if shapes[m.q] != shapes[m.k]:
        raise Refused("unsupported", f"q {list(shapes[m.q])} and k {list(shapes[m.k])} differ in shape (GQA states are "
                                     "not rewritten)", m.output)
    gen = torch.Generator().manual_seed(2024)
    dk, dv = shapes[m.q][-1], shapes[m.v][-1]
    rows = math.prod(shapes[m.q][:-1])
    q, k = (torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in (m.q, m.k))
    if m.k is m.q:                                # one tensor read as q and as k (phi(x) for both)
        k = q
    v = torch.randn(shapes[m.v], generator=gen, dtype=torch.float64)
    kv = ks = None
    try:
        kv = torch.zeros(shapes[m.kv_state], dtype=torch.float64)
        ks = torch.zeros(shapes[m.k_state], dtype=torch.float64)
        for _ in range(3):                        # states of three earlier tokens
            kj = torch.randn(rows, dk, generator=gen, dtype=torch.float64)
            vj = torch.randn(rows, dv, generator=gen, dtype=torch.float64)
            _, kv, ks = recurrent_step_reference(kj.reshape(shapes[m.q]), kj.reshape(shapes[m.k]),
                                                 vj.reshape(shapes[m.v]), kv, ks, m.pieces, m.q_factors,
                                                 m.k_factors, True, m.eps)
        want = recurrent_step_reference(q, k, v, kv, ks, m.pieces, m.q_factors, m.k_factors, True, m.eps)
    except (ValueError, RuntimeError) as err:
        raise Refused("verify", f"the states do not fit the operator's rows x features reading: {err}", m.output) from err
    substitute = {m.q: q, m.k: k, m.v: v, m.kv_state: kv, m.k_state: ks}
    try:
        got = [evaluator.evaluate(n, substitute=substitute) for n in (m.output, m.kv_new, m.k_new)]
    except Exception as err:               # noqa: BLE001 - e.g. a float32 constant: refuse, never crash
        raise Refused("verify", f"the numerical probe could not evaluate the step: {type(err).__name__}: {err}",
                      m.output) from err
    if got[0].shape != want[0].shape and got[0].numel() == want[0].numel():
        want = (want[0].reshape(got[0].shape), *want[1:])
        m.reshape_out = True
    for name, g, w in zip(("output", "kv state", "key state"), got, want):
        if tuple(g.shape) != tuple(w.shape):
            raise Refused("verify", f"the step's {name} has shape {list(g.shape)}, the operator's {list(w.shape)}",
                          m.output)
        err = ((g.double() - w).norm() / w.norm().clamp_min(1e-300)).item()
        if not err < _TOLERANCE:
            raise Refused("verify", f"structure matched a Based recurrent step but the numerical probe disagrees on "
                                    f"the {name}: relative error {err:.2e} on random inputs", m.output)
    return m


def spec_of(m: StepMatch) -> StepSpec:
    return StepSpec(m.pieces, m.q_factors, m.k_factors, True, m.eps)
