"""The linear (cumsum) feature-map form, as Based's reference code writes it.

    kv_state = (phi(k)[..., None, :] * v[..., None]).cumsum(t)     # running sum of phi(k_j) (x) v_j
    num = (phi(q)[..., None, :] * kv_state).sum(f)                # phi(q_i) . kv_state_i
    den = (phi(q) * phi(k).cumsum(t)).sum(f) + eps
    o = num / den

(``.sum(t, keepdim=True)`` instead of ``cumsum``: the non-causal form; its other spellings, the state
a matmul, an einsum or a sum without keepdim, are read at the end of this module as the state product.) It is the quadratic
form phi(q_i) . phi(k_j) summed over j <= i, so it becomes the same Match (coefficients from
the feature maps). Anchored on the state node (cumsum or sum over time of phi(k) * v). The
normaliser is read by ``feature_normaliser`` (which rows and features it pairs, proven on index
tensors, and over the numerator's time axis, with the numerator's scalar factors); which axes of
the numerator are time and features is left to the numerical probe.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.fx as fx

from . import polynomial
from .candidate import Weights, pick_output, view_chain
from .contraction import SUMMED, axes_of, contraction
from .canonicalize import VIEW_OPS, hint_shape, live_users, read_views, shape_of, strip_views, track_axis, walk_operand
from .feature_map import (feature_map_factors, multiplied_map_reason, other_readings, pair_feature_maps,
                          read_feature_map, same_feature_map, unread_reason)
from .feature_normaliser import read_feature_sum, time_axis
from .initial_state import InitialStates, follow, read_initial
from .kv_mask import guard_more_queries
from .mask import Keep, size_expr
from .refusal import NotACandidate, Refused

aten = torch.ops.aten


# writes into part of a tensor, as functionalisation lowers ``x[i] += y``, ``x[:, :, 1:].add_(y)``
_PARTIAL_WRITES = {aten.slice_scatter.default, aten.select_scatter.default, aten.index_put.default,
                   aten.as_strided_scatter.default}


def _state_kind(node: fx.Node):
    """("cumsum" | "total", dim, input) for a running or total sum over one axis, else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.cumsum.default:
        return "cumsum", node.args[1], node.args[0]
    if node.target is aten.sum.dim_IntList and len(node.args) > 1 and node.args[1] is not None \
            and len(node.args[1]) == 1 and (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim")):
        return "total", node.args[1][0], node.args[0]
    return None


def _feature_side(gm, a, b):
    """Of the two factors of a product, (the feature map side's (map, cat, factor), the other node)."""
    for mine, other in ((a, b), (b, a)):
        if not isinstance(mine, fx.Node):
            continue
        walked = walk_operand(gm, mine)
        phi = read_feature_map(gm, walked.stop) if walked.stop.op == "call_function" else None
        if phi is not None:
            return (phi, walked.stop, walked.factor), other
    return (None, None, None), None


def _factor_elsewhere(product: fx.Node, state: fx.Node) -> bool:
    """``product`` (through views) is also a factor of another product or matmul than the one ``state`` sums."""
    stack, seen = [product], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in live_users(node):
            if user is state or user.op != "call_function":
                continue
            if user.target in VIEW_OPS:
                stack.append(user)
            elif user.target in (aten.mul.Tensor, aten.bmm.default):
                return True
    return False


def _divided_by(end, read):
    """The first user of ``end`` that divides it by a normaliser (or multiplies it by its inverse) which
    ``read(other operand)`` accepts: (that user, what ``read`` returned, its last item saying whether
    the normaliser is inverted), or (None, None). Multiplying by a normaliser itself is refused."""
    for user in list(end.users):
        if user.op != "call_function" or user.target not in (aten.div.Tensor, aten.mul.Tensor):
            continue
        if user.args[0] is not end and user.target is aten.div.Tensor:
            continue
        other = user.args[1] if user.args[0] is end else user.args[0]
        try:
            found = read(other)
        except NotACandidate:
            continue
        if found[-1] != (user.target is aten.mul.Tensor):
            raise Refused("normaliser", "the output is multiplied by the normaliser instead of divided", user)
        return user, found
    return None, None


def _forward_through_views(node: fx.Node) -> fx.Node:
    while len(live_users(node)) == 1:
        user = live_users(node)[0]
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is node:
            node = user
            continue
        break
    return node


def _single_user(node: fx.Node) -> fx.Node | None:
    node = _forward_through_views(node)
    users = live_users(node)
    return users[0] if len(users) == 1 else None


def _row_read(node: fx.Node, dim: int) -> bool:
    """A read of one row of a running sum along its time axis ``dim`` (``kv[:, :, -1]``, ``kv[:, :, -1:]``):
    a state the prefill returns (``final_state.py`` reads it, and refuses rows other than the last)."""
    if node.op != "call_function" or node.target not in (aten.select.int, aten.slice.Tensor) or len(node.args) < 2:
        return False
    rank = len(hint_shape(node.args[0]) or ())
    return rank > 0 and node.args[1] % rank == dim % rank


def _consumer(state: fx.Node, dim: int, running: bool | None = None) -> fx.Node | None:
    """The one user of the state (through views) besides reads of its rows (of a running sum, or of
    ``running`` sums an initial state was added to), else None."""
    running = state.target is aten.cumsum.default if running is None else running
    users = [u for u in live_users(state) if not (running and _row_read(u, dim))]
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is state:
        return _single_user(user)
    return user


def _contracts_features(bmm: fx.Node, cat: fx.Node) -> bool:
    """A bmm (an einsum's lowering) that sums over as many entries as phi(q) has features, one query
    at a time (a [N, 1, F] or [N, F, 1] operand): phi(q_i) . state_i, not a product over tokens."""
    a, b = (hint_shape(x) or () for x in bmm.args[:2])
    width = (hint_shape(cat) or (None,))[-1]
    return len(a) == 3 and len(b) == 3 and a[2] == b[1] == width and (a[1] == 1 or b[2] == 1)


def _refuse_shifted(state: fx.Node, consumer: fx.Node | None, dim: int) -> None:
    """Running sums read one token late (``F.pad(kv, (.., 1, 0))[:, :, :T]``, ``cat([0, kv[:, :, :-1]])``,
    the exclusive sums over j < i) are a shifted causal mask: refused with that reason."""
    rank = len(hint_shape(state) or ())
    if rank == 0 or state.target is not aten.cumsum.default:
        return
    if consumer is not None and consumer.op == "call_function" and consumer.target is aten.constant_pad_nd.default:
        pad = list(consumer.args[1])
        padded = {rank - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
        if dim % rank in padded:
            raise Refused("mask", "the running sums are padded along time (F.pad): read shifted by a token, a "
                                  "shifted causal mask (Based sums over j <= i)", consumer)
        raise Refused("unsupported", "the running sums are padded (F.pad) along a feature or value axis", consumer)
    if consumer is None:
        for user in state.users:
            if _row_read(user, dim) and user.target is aten.slice.Tensor:
                length = (hint_shape(user) or (None,) * rank)[dim % rank]
                if length not in (None, 1):
                    raise Refused("mask", "the running sums are read through a slice along time (kv[:, :, :-1]): "
                                          "shifted by a token, a shifted causal mask (Based sums over j <= i)", user)


def _normaliser(gm, node, cat_q, cat_k, factor: float, time: int | None):
    """(state kind, eps, initial k_state or None, inverted) of den = phi(q) . sum_{j <= i} phi(k_j) + eps
    (``FeatureSum.initial``: the running sum starts from an initial state) over the numerator's
    feature maps ``cat_q`` and ``cat_k`` (``feature_normaliser``), with the numerator's scalar
    ``factor`` on them and its sum over the maps' axis ``time``; NotACandidate / Refused."""
    found = read_feature_sum(gm, node)
    if not same_feature_map(gm, found.cat_q, cat_q):
        raise NotACandidate("not a contraction with phi(q)")
    if not same_feature_map(gm, found.cat_k, cat_k):
        raise Refused("normaliser", "the normaliser sums a different key feature map than the numerator", node)
    if abs(found.factor - factor) > 1e-12 * max(abs(factor), 1e-300):
        raise Refused("normaliser", f"the normaliser's feature maps are scaled by {found.factor:g} and the "
                                    f"numerator's by {factor:g}: they do not sum the same weights", node)
    if found.time != time:
        raise Refused("normaliser", "the normaliser sums phi(k) over another axis than the numerator's sum over "
                                    "time", node)
    if found.initial is not None and found.kind != "cumsum":
        raise Refused("unsupported", "the total sum of phi(k) is added to an initial state (a non-causal attention "
                                     "from an initial state): not rewritten", node)
    return found.kind, found.eps, found.initial, found.inverted


def match_linear(matcher, state: fx.Node):
    gm = matcher.gm
    kind = _state_kind(state)
    if kind is None:
        raise NotACandidate("not a state")
    state_kind, dim, kv_arg = kind
    kv = strip_views(kv_arg)
    if not isinstance(kv, fx.Node) or kv.op != "call_function" or kv.target is not aten.mul.Tensor:
        raise NotACandidate("the state does not sum a product")
    (phi_k, cat_k, factor_k), v_arg = _feature_side(gm, kv.args[0], kv.args[1])
    if phi_k is None or not isinstance(v_arg, fx.Node):
        for arg in kv.args[:2]:
            stop = walk_operand(gm, arg).stop if isinstance(arg, fx.Node) else None
            why = (unread_reason(gm, stop) or multiplied_map_reason(gm, stop)) \
                if stop is not None and stop.op == "call_function" else None
            if why is not None:
                raise Refused("feature_map", why, state)
        raise NotACandidate("the state does not sum phi(k) times a tensor")
    map_side = kv.args[0] if walk_operand(gm, kv.args[0]).stop is cat_k else kv.args[1]
    if hint_shape(kv) == hint_shape(map_side) and _factor_elsewhere(kv, state):
        # phi(k) * x adds no axis of x's (no outer product) and is also a factor of another product (the
        # numerator's (phi(k) * mask) (x) v, beside this normaliser's running sum of it): x multiplies the
        # keys' feature map, it is not this sum's values
        why = multiplied_map_reason(gm, kv)
        if why is not None:
            raise Refused("feature_map", why, state)
    v_stop = walk_operand(gm, v_arg).stop
    if read_feature_map(gm, v_stop) is not None or _state_kind(strip_views(v_arg)) is not None:
        raise NotACandidate("phi(k) times phi(k), or times a running sum")
    k_arg = kv.args[0] if walk_operand(gm, kv.args[0]).stop is cat_k else kv.args[1]
    _, feature = follow(gm, k_arg, -1)
    if feature is not None and feature + len(hint_shape(kv)) - len(hint_shape(k_arg)) == dim % len(hint_shape(kv)):
        raise NotACandidate("a product summed over phi's features (a contraction, e.g. phi(q) . k_state), not over "
                            "time")
    v_walk = walk_operand(gm, v_arg, through_scalars=False)
    v = v_walk.source
    t = hint_shape(kv)[dim]
    consumer = _consumer(state, dim)
    _refuse_shifted(state, consumer, dim)
    written = next((u for u in live_users(state) if u.op == "call_function" and u.target in _PARTIAL_WRITES), None)
    if written is not None and state_kind == "cumsum":
        raise Refused("state", "the running sums are written in place on some entries only (e.g. a state added to "
                               "some rows, kv[:, :, 1:] += kv_state[:, :, None]): neither Based's running sums nor "
                               "an initial state, which every position sees alike", written)
    if consumer is None:
        raise NotACandidate("the state has several users")
    if consumer.target in (aten.sub.Tensor, aten.add.Tensor) and \
            any(strip_views(arg) is kv or (strip_views(arg) is not state
                                            and matcher.evaluator.depends_on(arg, {cat_k}))
                for arg in consumer.args[:2] if isinstance(arg, fx.Node)):
        raise Refused("mask", "the running sums leave out (or add) the current token: a shifted causal mask",
                      consumer)
    initial_kv = None
    if consumer.target in (aten.sub.Tensor, aten.add.Tensor) and state in consumer.args[:2] \
            and state_kind == "cumsum" and all(isinstance(a, fx.Node) for a in consumer.args[:2]):
        if consumer.target is aten.sub.Tensor:
            raise Refused("state", "a tensor is subtracted from (or subtracts) the running sum of phi(k)^T v: not an "
                                   "initial state, which adds", consumer)
        if float(consumer.kwargs.get("alpha", 1)) != 1.0:
            raise Refused("state", f"the initial kv_state is added with alpha={consumer.kwargs['alpha']:g} (a decayed "
                                   "or gated state): not Based, whose states only add", consumer)
        init = consumer.args[1] if consumer.args[0] is state else consumer.args[0]
        labels = _state_axes(gm, kv, cat_k, v_arg, consumer)
        initial_kv = read_initial(gm, matcher.evaluator, init, state, dim % len(hint_shape(state)), labels, "kv",
                                  consumer, {cat_k, v_walk.source, phi_k.source})
        add = consumer
        consumer = _consumer(add, dim, running=True)
        _refuse_shifted(state, consumer, dim)
        if consumer is None:
            raise NotACandidate("the running sums from the initial state have several users")
    if consumer.target not in (aten.mul.Tensor, aten.bmm.default):
        raise NotACandidate("the state is not contracted with phi(q)")
    (phi_q, cat_q, factor_q), _ = _feature_side(gm, consumer.args[0], consumer.args[1])
    if phi_q is None:
        raise Refused("feature_map", "the state is contracted with a query that is not a feature map", consumer)
    # phi(q) . state: a product summed over the features, or a bmm (an einsum such as
    # "bhnf,bhnfd->bhnd" lowers to one); which axes it contracts is left to the probe.
    num = consumer if consumer.target is aten.bmm.default else _single_user(consumer)
    if num is consumer and not _contracts_features(consumer, cat_q):
        raise NotACandidate("the bmm does not contract phi(q)'s features")
    if num is None or num.target not in (aten.sum.dim_IntList, aten.bmm.default):
        raise NotACandidate("the contraction is not summed")
    poly = polynomial.scale(pair_feature_maps(phi_q, phi_k), factor_q * factor_k)

    normalize, eps, start = False, 0.0, num
    k_operand = kv.args[0] if walk_operand(gm, kv.args[0]).stop is cat_k else kv.args[1]
    read = time_axis(gm, k_operand, dim - (len(hint_shape(kv)) - len(hint_shape(k_operand))))
    time = read[1] if read is not None else None
    user, found = _divided_by(_forward_through_views(num),
                              lambda other: _normaliser(gm, other, cat_q, cat_k, factor_q * factor_k, time))
    if user is not None:
        den_kind, eps, _, _ = found
        if den_kind != state_kind:
            raise Refused("normaliser", f"the normaliser is a {den_kind} sum over time but the numerator a "
                                        f"{state_kind} sum: they do not sum the same weights", user)
        normalize, start = True, user

    initial_k = None
    if user is not None and found[2] is not None:
        add, init, k_sum, k_dim, k_feature = found[2]
        initial_k = read_initial(gm, matcher.evaluator, init, k_sum, k_dim, {k_feature: "F"}, "k", add,
                                 {cat_k, cat_q, v_walk.source, phi_k.source, phi_q.source})
    initial = None
    if initial_kv is not None or initial_k is not None:
        if initial_kv is not None and matcher.evaluator.depends_on(initial_kv.source, {cat_q, phi_q.source}):
            raise Refused("state", "the tensor added to the running sums (as an initial kv_state) is computed from q: "
                                   "not the state of earlier tokens", initial_kv.add)
        initial = _initial_states(phi_k, factor_k, initial_kv, initial_k)

    keep = Keep.causal(0) if state_kind == "cumsum" else None        # the running sum over j <= i
    length = size_expr(shape_of(kv)[dim])
    w = Weights(poly, keep, False, state, phi_q.source, phi_k.source, "feature-map linear (cumsum)", None, t,
                lengths=(length, length))
    match = matcher._finish(w, w.form, pick_output(start), phi_q.source, phi_k.source, v, normalize, eps,
                            num, start)
    return replace(match, q_alternatives=other_readings(gm, cat_q, phi_q),
                   k_alternatives=other_readings(gm, cat_k, phi_k), v_alternatives=v_walk.alternatives,
                   initial=initial)


def _state_axes(gm, kv: fx.Node, cat_k: fx.Node, v_arg, where: fx.Node) -> dict:
    """The running sum of phi(k) (x) v's feature and value axes ({axis: "F" | "Dv"}), followed from
    phi(k)'s and v's last axes through their views into the product ``kv``."""
    rank = len(hint_shape(kv))
    labels = {}
    for operand, label in ((kv.args[0], None), (kv.args[1], None)):
        stop, axis = follow(gm, operand, -1)
        name = "F" if stop is cat_k else "Dv" if operand is v_arg else None
        if name is None or axis is None:
            continue
        labels[axis + rank - len(hint_shape(operand))] = name
    if sorted(labels.values()) != ["Dv", "F"]:
        raise Refused("state", "the running sum's feature and value axes could not be followed from phi(k) and v: "
                               "the initial state's layout is not proven", where)
    return labels


def _initial_states(phi_k, factor_k: float, kv, k) -> InitialStates:
    """The initial states in the attention's key features (the operator converts them with these)."""
    kinds = [p.kind for p in phi_k.pieces]
    if any(kind not in ("const", "linear", "outer") for kind in kinds) or len(set(kinds)) != len(kinds):
        raise Refused("unsupported", "a prefill continued from initial states whose feature map is not [c, a x, "
                                     f"b x (x) x] with one piece of each kind (pieces {kinds}): the operator reads "
                                     "states in the full outer-product basis", (kv or k).add)
    pieces = tuple(f"const:{p.width}" if p.kind == "const" else p.kind for p in phi_k.pieces)
    return InitialStates(kv, k, pieces, tuple(p.factor * factor_k for p in phi_k.pieces))


# ---------------------------------------------------------------------- the non-causal state product
#
#     S = phi(k)^T @ v              summed over every key: a matmul, an einsum, or a product summed over
#                                   time, ``(phi_k[..., :, None] * v[..., None, :]).sum(t)``; kept as
#                                   [.., F, Dv] or transposed, [.., Dv, F] (``v^T @ phi(k)``)
#     o = phi(q) @ S                or ``(S^T @ phi(q)^T)^T``, an einsum, ``(phi_q[..., :, None] * S).sum(f)``
#     den = phi(q) . sum_t phi(k) + eps      (or none; ``feature_normaliser``)
#
# is (phi(q) phi(k)^T) v, the quadratic form without a mask: it becomes the same Match. Every spelling
# is one reading: each contraction (a ``bmm``, or a product summed over one axis) is read as which axis
# of each factor it sums and where the others go (``contraction``), and each factor through its views
# down to phi(q), phi(k), v or the state, whose axes are followed onto the factor's (``read_views``).
# The state sums one axis of phi(k) and of v, the same one (time), and keeps phi(k)'s and v's features
# on two axes; the readout sums phi(q)'s features against the state's features and keeps phi(q)'s time
# and the state's values. Which axes are batch, heads and time is left to the numerical probe, and
# without it to the axis labels (``axis_labels``).

@dataclass(frozen=True)
class _StateSum:
    """S = sum over time of phi(k) (x) v: the contraction ``node``, phi(k)'s map, cat and scalar factor,
    v as read (``Operand``), the axis of phi(k)'s cat it sums (``time``), and the axes of S that hold
    phi(k)'s features and v's features."""

    node: fx.Node
    phi: object
    cat: fx.Node
    factor: float
    v: object
    time: int
    features: int
    values: int


def read_state_sum(gm, node) -> _StateSum | None:
    """The non-causal state ``node`` computes (phi(k) summed over one axis that is not its features,
    against v summed over one axis that is not its own), or None."""
    c = contraction(node)
    if c is None:
        return None
    for i, k_chain, phi in feature_map_factors(gm, c.factors):
        cat = k_chain.base
        other = c.factors[1 - i]
        v = walk_operand(gm, other, through_scalars=False)
        if v.stop.op == "call_function" and read_feature_map(gm, v.stop) is not None:
            return None                               # phi(q) phi(k)^T: the scores
        rank, v_rank = len(hint_shape(cat)), len(hint_shape(v.source) or ())
        k_axes = axes_of(k_chain, c.where[i], rank)
        v_axes = axes_of(read_views(gm, other, scalars=False, until=v.source), c.where[1 - i], v_rank)
        summed_k = [a for a, w in enumerate(k_axes) if w == SUMMED]
        summed_v = [a for a, w in enumerate(v_axes) if w == SUMMED]
        if len(summed_k) != 1 or summed_k == [rank - 1] or len(summed_v) != 1 or summed_v == [v_rank - 1] \
                or v_rank < 2:
            return None
        features, values = k_axes[rank - 1], v_axes[v_rank - 1]
        if not isinstance(features, int) or not isinstance(values, int) or features == values:
            return None
        return _StateSum(node, phi, cat, k_chain.factor, v, summed_k[0], features, values)
    return None


def _state_normaliser(gm, node, cat_q, cat_k, factor: float, time: int | None):
    """eps, inverted of den = phi(q) . sum_t phi(k) + eps (a matmul, an einsum or a product summed over
    the features), else NotACandidate; Refused for a running sum or a sum over another axis."""
    kind, eps, _, inverted = _normaliser(gm, node, cat_q, cat_k, factor, time)
    if kind != "total":
        raise Refused("normaliser", "the normaliser is a running sum over time but the numerator sums over "
                                    "all keys: they do not sum the same weights", node)
    return eps, inverted


def _readout_output(node: fx.Node, rows: int, values: int) -> fx.Node:
    """The readout's output: the first 4-d view after ``node`` (whose axes ``rows`` and ``values`` hold
    phi(q)'s time and the values) that has the values last and the rows before them (``(S^T phi(q)^T)^T``
    is the view after the transpose back); ``pick_output`` when the product has them so already."""
    if values == len(hint_shape(node)) - 1 and rows < values:
        return pick_output(node)
    for view in view_chain(node)[1:]:
        rows, values = track_axis(view, rows), track_axis(view, values)
        if rows is None or values is None:
            break
        if len(hint_shape(view)) == 4 and values == 3 and rows in (1, 2):
            return view
    raise NotACandidate("the state product is not read with its values last")


def match_state_product(matcher, node: fx.Node):
    """phi(q) @ (phi(k)^T @ v), in any spelling of the two contractions: the non-causal linear form, as a
    Match (Refused / NotACandidate). ``node``: the readout's contraction (a bmm, or a sum)."""
    gm = matcher.gm
    c = contraction(node)
    if c is None:
        raise NotACandidate("not a contraction")
    for i, q_chain, phi_q in feature_map_factors(gm, c.factors):
        cat_q = q_chain.base
        s_chain = read_views(gm, c.factors[1 - i])
        state = read_state_sum(gm, s_chain.base)
        if state is None:
            continue
        rank = len(hint_shape(cat_q))
        if rank != len(hint_shape(state.cat)):
            raise NotACandidate("phi(q) and phi(k) of different ranks")
        q_axes = axes_of(q_chain, c.where[i], rank)
        s_axes = axes_of(s_chain, c.where[1 - i], len(hint_shape(state.node)))
        if q_axes[rank - 1] != SUMMED or [a for a, w in enumerate(q_axes) if w == SUMMED] != [rank - 1]:
            raise NotACandidate("the product does not contract phi(q) over its features alone")
        if s_axes[state.features] != SUMMED or s_axes.count(SUMMED) != 1:
            raise Refused("feature_map", "phi(q) is contracted with the state's values, not its features (a state "
                                         "kept as [.., Dv, F] read as [.., F, Dv]?)", node)
        rows, values = q_axes[state.time], s_axes[state.values]
        if not isinstance(rows, int) or not isinstance(values, int):
            raise NotACandidate("the readout does not keep phi(q)'s time and the state's values")
        t, tk = hint_shape(cat_q)[state.time], hint_shape(state.cat)[state.time]
        if tk < t:                      # the operator takes Tq <= Tk (non-causal: queries against any keys)
            guard_more_queries(shape_of(cat_q)[state.time], shape_of(state.cat)[state.time])
            raise NotACandidate("more queries than keys")
        factor = q_chain.factor * state.factor * s_chain.factor
        poly = polynomial.scale(pair_feature_maps(phi_q, state.phi), factor)
        output = _readout_output(node, rows, values)
        normalize, eps, start = False, 0.0, output
        user, found = _divided_by(_forward_through_views(output), lambda other: _state_normaliser(
            gm, other, cat_q, state.cat, factor, state.time))
        if user is not None:
            eps, _ = found
            normalize, start = True, user
        length = size_expr(shape_of(cat_q)[state.time])
        keys = size_expr(shape_of(state.cat)[state.time]) if tk != t else length     # non-causal: any Tk
        w = Weights(poly, None, False, node, phi_q.source, state.phi.source, "feature-map linear (state product)",
                    None, t, lengths=(length, keys), tk=tk if tk != t else None)
        match = matcher._finish(w, w.form, pick_output(start) if normalize else output, phi_q.source,
                                state.phi.source, state.v.source, normalize, eps, node, start)
        return replace(match, q_alternatives=other_readings(gm, cat_q, phi_q),
                       k_alternatives=other_readings(gm, state.cat, state.phi), v_alternatives=state.v.alternatives)
    raise NotACandidate("not phi(q) times a state sum_t phi(k_t)^T v_t")
