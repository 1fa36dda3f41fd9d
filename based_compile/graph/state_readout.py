"""Initial states read by phi(q) beside the quadratic form: a continued prefill written with the T x T weights.

    a = torch.tril(phi(q) @ phi(k).mT)                   # any Based weights of the block's own tokens
    num = a @ v + phi(q) @ kv_state                      # + what the earlier tokens' states give each query
    den = a.sum(-1, keepdim=True) + phi(q) @ k_state[..., None] + eps
    o = num / den

Every query also sees the earlier tokens through the states: Based attention from initial states, what
``based::attention_with_state`` computes (``initial_state.py`` reads the same thing written as the
linear form's running sums). ``read_state_term`` reads one added term, ``phi(q) @ kv_state`` (role
"kv") or ``phi(q) . k_state`` (role "k"), in any spelling of its contraction (``contraction``: a matmul,
an einsum, a broadcast product summed over the features; the state kept as [B, H, F, Dv] or
[B, H, Dv, F], with a time axis of one or without); the quadratic reader (``match``) adds it to the
site as its initial state.

What is proven on the graph: the term contracts the features of a Taylor feature map of the
attention's own q (one piece of each kind: the operator's state basis) with one axis of a tensor
that reads none of q, k, v, through views alone (no scale: ``0.9 * kv_state`` is a decayed state; no
cast); that tensor's axes are its features (the summed one), its values (kv: the one axis of the
output that phi(q) does not reach), axes of one broadcast along the queries (dropped), and batch and
heads, in that order. Which state features the operator's feature map gives (``k_factors``) follows
from the pairing: phi(q)'s piece factors times the key factors are the weights' coefficients, so a
piece's key factor is its coefficient over phi(q)'s (``initial_states``). The numerical probe checks
the whole site against the operator's reference with those states; the axis labels without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import polynomial
from .canonicalize import hint_shape, read_views, scalar_factor
from .contraction import BROADCAST, SUMMED, axes_of, contraction
from .feature_map import FeatureMap, feature_map_factors, read_feature_map
from .initial_state import STATE_VIEWS, InitialState, InitialStates
from .refusal import NotACandidate, Refused

aten = torch.ops.aten

@dataclass(frozen=True)
class StateTerm:
    """One term phi(q) . state: phi(q)'s map, cat and scalar factor, and the state as the operator reads it."""

    phi: FeatureMap
    cat: fx.Node
    factor: float
    state: InitialState


def read_state_term(gm, ev, node, role: str, q: fx.Node, reads: set, add: fx.Node) -> StateTerm:
    """The term ``node`` (added to the numerator, role "kv", or to the row sums, role "k", by ``add``) as
    phi(q) . state; NotACandidate when it is no such product, Refused for a near-miss. ``q``: the
    attention's query (None: the caller checks ``phi.source``); ``reads``: nodes the state must not read
    (q, k, v; an empty set: the caller checks)."""
    what = "kv_state" if role == "kv" else "k_state"
    outer = read_views(gm, node)
    c = contraction(outer.base)
    if c is None:
        raise NotACandidate("not a contraction")
    for i, q_chain, phi in feature_map_factors(gm, c.factors):
        cat = q_chain.base
        s_chain = read_views(gm, c.factors[1 - i], view_ops=STATE_VIEWS, scalars=False)
        source = s_chain.base
        if not isinstance(source, fx.Node) or read_feature_map(gm, source) is not None:
            raise NotACandidate("phi(q) times a feature map")
        if ev.depends_on(source, reads | {cat}):
            raise NotACandidate("phi(q) times a tensor computed from q, k or v")
        if outer.factor != 1.0 or (source.op == "call_function" and scalar_factor(gm, source) is not None):
            factor = outer.factor if outer.factor != 1.0 else scalar_factor(gm, source)[1]
            raise Refused("state", f"the initial {what} is scaled by {factor:g} where phi(q) reads it (a decayed or "
                                   f"gated state, 0.9 * {what}): not Based, whose states only add", add)
        if q is not None and phi.source is not q:
            raise Refused("state", f"phi(q) . {what} reads another query than the attention's (phi of another "
                                   "tensor): not the queries' view of the earlier tokens", add)
        rank = len(hint_shape(cat))
        q_axes = axes_of(q_chain, c.where[i], rank)
        if [a for a, w in enumerate(q_axes) if w == SUMMED] != [rank - 1]:
            raise NotACandidate("the product does not contract phi(q) over its features alone")
        shape = tuple(hint_shape(source) or ())
        s_axes = axes_of(s_chain, c.where[1 - i], len(shape))
        reached = {w for w in q_axes if isinstance(w, int)}
        features = [a for a, w in enumerate(s_axes) if w == SUMMED]
        values = [a for a, w in enumerate(s_axes) if isinstance(w, int) and w not in reached]
        squeeze = tuple(a for a, w in enumerate(s_axes) if w == BROADCAST and shape[a] == 1)
        others = [a for a in range(len(shape)) if a not in features + values + list(squeeze)]
        if len(features) != 1:
            raise Refused("state", f"phi(q) is contracted with {len(features)} axes of the {what}", add)
        if len(values) != (1 if role == "kv" else 0):
            raise Refused("state", f"the {what} read by phi(q) has {len(values)} axes besides its features that the "
                                   f"queries do not reach ({'one, its values, is' if role == 'kv' else 'none is'} "
                                   "wanted): not a state of the attention's shape", add)
        if len(others) != 2 or any(s_axes[a] == BROADCAST for a in others):
            raise Refused("state", f"the {what}'s axes besides its features{' and values' if role == 'kv' else ''} "
                                   "are not one batch and one head axis (a state broadcast over the batch or the "
                                   "heads, or of another rank)", add)
        order = others + features + values
        ranks = {a: j for j, a in enumerate(sorted(order))}
        perm = tuple(ranks[a] for a in order)
        return StateTerm(phi, cat, q_chain.factor, InitialState(source, squeeze, perm, add, None))
    raise NotACandidate(f"no phi(q) . {what}")


def initial_states(kv: StateTerm | None, k: StateTerm | None, poly, where: fx.Node) -> InitialStates:
    """The operator's initial states from the terms read (at least one), for weights ``poly`` (the
    raw q.k polynomial): one feature map and factor of q in both terms, one piece of each kind, and the
    key factors that pair with phi(q)'s to the weights' coefficients."""
    terms = [t for t in (kv, k) if t is not None]
    first = terms[0]
    for other in terms[1:]:
        if other.cat is not first.cat and (other.phi.pieces != first.phi.pieces or
                                           other.phi.source is not first.phi.source) \
                or abs(other.factor - first.factor) > 1e-12 * max(1.0, abs(first.factor)):
            raise Refused("state", "phi(q) reads kv_state and k_state in two different feature maps", where)
    kinds = [p.kind for p in first.phi.pieces]
    if any(kind not in ("const", "linear", "outer") for kind in kinds) or len(set(kinds)) != len(kinds):
        raise Refused("unsupported", "a prefill continued from initial states whose feature map is not [c, a x, "
                                     f"b x (x) x] with one piece of each kind (pieces {kinds}): the operator reads "
                                     "states in the full outer-product basis", where)
    degree = {"const": 0, "linear": 1, "outer": 2}
    pieces, k_factors = [], []
    for piece in first.phi.pieces:
        coefficient = polynomial.coefficient(poly, degree[piece.kind])
        q_factor = piece.factor * first.factor * (piece.width if piece.kind == "const" else 1)
        if coefficient == 0.0 or q_factor == 0.0:
            raise Refused("unsupported", f"a prefill continued from initial states whose weights have no "
                                         f"{piece.kind} term, or whose phi(q) has a zero {piece.kind} piece: the "
                                         "operator's state basis needs each", where)
        pieces.append(f"const:{piece.width}" if piece.kind == "const" else piece.kind)
        k_factors.append(coefficient / q_factor)
    return InitialStates(None if kv is None else kv.state, None if k is None else k.state, tuple(pieces),
                         tuple(k_factors))
