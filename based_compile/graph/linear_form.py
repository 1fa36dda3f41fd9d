"""The linear (cumsum) feature-map form, as Based's reference code writes it.

    kv_state = (phi(k)[..., None, :] * v[..., None]).cumsum(t)     # running sum of phi(k_j) (x) v_j
    num = (phi(q)[..., None, :] * kv_state).sum(f)                # phi(q_i) . kv_state_i
    den = (phi(q) * phi(k).cumsum(t)).sum(f) + eps
    o = num / den

(``.sum(t, keepdim=True)`` instead of ``cumsum``: the non-causal form.) It is the quadratic
form phi(q_i) . phi(k_j) summed over j <= i, so it becomes the same Match (coefficients from
the feature maps). Anchored on the state node (cumsum or sum over time of phi(k) * v). Which
axis is time and which are features is left to the numerical probe.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx

from . import polynomial
from .candidate import Weights, pick_output
from .canonicalize import VIEW_OPS, hint_shape, live_users, scalar_factor, scalar_value, shape_of, walk_operand
from .feature_map import other_readings, pair_feature_maps, read_feature_map
from .mask import Keep, size_expr
from .refusal import NotACandidate, Refused

aten = torch.ops.aten


def _strip_views(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
    return node


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


def _consumer(state: fx.Node, dim: int) -> fx.Node | None:
    """The one user of the state (through views) besides reads of its rows, else None."""
    users = [u for u in live_users(state) if not (state.target is aten.cumsum.default and _row_read(u, dim))]
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is state:
        return _single_user(user)
    return user


def _normaliser(gm, node, cat_q, cat_k):
    """(state kind, eps, inverted) of den = sum(phi(q) * cumsum(phi(k))) + eps, else NotACandidate."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise NotACandidate("not a normaliser")
    if node.target in VIEW_OPS:
        return _normaliser(gm, node.args[0], cat_q, cat_k)
    if node.target is aten.add.Tensor:
        c = scalar_value(gm, node.args[1])
        if c is not None:
            kind, eps, inverted = _normaliser(gm, node.args[0], cat_q, cat_k)
            if inverted:
                raise Refused("normaliser", "eps is added after the reciprocal", node)
            return kind, eps + c * float(node.kwargs.get("alpha", 1)), inverted
        raise NotACandidate("sum of tensors")
    if node.target is aten.reciprocal.default:
        kind, eps, inverted = _normaliser(gm, node.args[0], cat_q, cat_k)
        return kind, eps, not inverted
    scaled = scalar_factor(gm, node)
    if scaled is not None:
        kind, eps, inverted = _normaliser(gm, scaled[0], cat_q, cat_k)
        if scaled[1] != 1.0:
            raise Refused("normaliser", f"the normaliser is scaled by {scaled[1]:g}", node)
        return kind, eps, inverted
    if node.target is aten.sum.dim_IntList:
        prod = _strip_views(node.args[0])
        if prod.op != "call_function" or prod.target is not aten.mul.Tensor:
            raise NotACandidate("not a feature contraction")
        (phi, cat, _), other = _feature_side(gm, prod.args[0], prod.args[1])
        if phi is None or cat is not cat_q:
            raise NotACandidate("not a contraction with phi(q)")
        state = _strip_views(other)
        kind = _state_kind(state) if isinstance(state, fx.Node) else None
        if kind is None:
            raise Refused("normaliser", "the normaliser does not sum phi(k) over time", node)
        k_side = walk_operand(gm, kind[2]).stop
        if k_side is not cat_k:
            raise Refused("normaliser", "the normaliser sums a different key feature map than the numerator", node)
        return kind[0], 0.0, False
    raise NotACandidate("not a normaliser")


def match_linear(matcher, state: fx.Node):
    gm = matcher.gm
    kind = _state_kind(state)
    if kind is None:
        raise NotACandidate("not a state")
    state_kind, dim, kv_arg = kind
    kv = _strip_views(kv_arg)
    if not isinstance(kv, fx.Node) or kv.op != "call_function" or kv.target is not aten.mul.Tensor:
        raise NotACandidate("the state does not sum a product")
    (phi_k, cat_k, factor_k), v_arg = _feature_side(gm, kv.args[0], kv.args[1])
    if phi_k is None or not isinstance(v_arg, fx.Node):
        raise NotACandidate("the state does not sum phi(k) times a tensor")
    v_stop = walk_operand(gm, v_arg).stop
    if read_feature_map(gm, v_stop) is not None or _state_kind(_strip_views(v_arg)) is not None:
        raise NotACandidate("phi(k) times phi(k), or times a running sum")
    v_walk = walk_operand(gm, v_arg, through_scalars=False)
    v = v_walk.source
    t = hint_shape(kv)[dim]
    consumer = _consumer(state, dim)
    if consumer is None:
        raise NotACandidate("the state has several users")
    if consumer.target in (aten.sub.Tensor, aten.add.Tensor) and \
            any(_strip_views(arg) is kv for arg in consumer.args[:2] if isinstance(arg, fx.Node)):
        raise Refused("mask", "the running sums leave out (or add) the current token: a shifted causal mask",
                      consumer)
    if consumer.target is not aten.mul.Tensor:
        raise NotACandidate("the state is not contracted with phi(q)")
    (phi_q, cat_q, factor_q), _ = _feature_side(gm, consumer.args[0], consumer.args[1])
    if phi_q is None:
        raise Refused("feature_map", "the state is contracted with a query that is not a feature map", consumer)
    num = _single_user(consumer)
    if num is None or num.target is not aten.sum.dim_IntList:
        raise NotACandidate("the contraction is not summed")
    poly = polynomial.scale(pair_feature_maps(phi_q, phi_k), factor_q * factor_k)

    normalize, eps, start = False, 0.0, num
    end = _forward_through_views(num)
    for user in list(end.users):
        if user.op != "call_function" or user.target not in (aten.div.Tensor, aten.mul.Tensor):
            continue
        if user.args[0] is not end and user.target is aten.div.Tensor:
            continue
        other = user.args[1] if user.args[0] is end else user.args[0]
        try:
            den_kind, eps, inverted = _normaliser(gm, other, cat_q, cat_k)
        except NotACandidate:
            continue
        if inverted != (user.target is aten.mul.Tensor):
            raise Refused("normaliser", "the output is multiplied by the normaliser instead of divided", user)
        if den_kind != state_kind:
            raise Refused("normaliser", f"the normaliser is a {den_kind} sum over time but the numerator a "
                                        f"{state_kind} sum: they do not sum the same weights", user)
        normalize, start = True, user
        break

    keep = Keep.causal(0) if state_kind == "cumsum" else None        # the running sum over j <= i
    length = size_expr(shape_of(kv)[dim])
    w = Weights(poly, keep, False, state, phi_q.source, phi_k.source, "feature-map linear (cumsum)", None, t,
                lengths=(length, length))
    match = matcher._finish(w, w.form, pick_output(start), phi_q.source, phi_k.source, v, normalize, eps,
                            num, start)
    return replace(match, q_alternatives=other_readings(gm, cat_q, phi_q),
                   k_alternatives=other_readings(gm, cat_k, phi_k), v_alternatives=v_walk.alternatives)
