"""Explicit Taylor feature maps: phi(x) = cat([c * 1, a * x, b * flatten(x (x) x)], -1).

``read_feature_map(gm, cat)`` reads a ``cat`` along the last axis piece by piece:
- "const": a ones column (``torch.ones``, ``x[..., :1] ** 0``, ``ones_like``, ``full``) times c;
- "linear": the source x times a;
- "outer": the flattened outer product x (x) x times b (width D^2);
- "square": an elementwise x * x (width D): not a function of q.k, refused;
- "degreeN": a flattened N-fold outer product (N >= 3): a higher-order term, refused.
``pair_feature_maps`` turns phi(q) . phi(k) into a polynomial in q.k:
c_q c_k w + a_q a_k (q.k) + b_q b_k (q.k)^2, when both maps have the same pieces in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import polynomial
from .canonicalize import VIEW_OPS, hint_shape, scalar_factor, scalar_value, walk_operand
from .refusal import Refused

aten = torch.ops.aten

_CONST_OPS = {aten.ones.default, aten.ones_like.default, aten.new_ones.default, aten.full.default,
              aten.full_like.default, aten.new_full.default}


@dataclass(frozen=True)
class Piece:
    kind: str          # "const", "linear", "outer", "square"
    factor: float      # c, a or b
    width: int         # features this piece contributes
    source: fx.Node | None


@dataclass(frozen=True)
class FeatureMap:
    pieces: tuple[Piece, ...]
    source: fx.Node    # the x every non-constant piece is a function of


def _strip(gm, node: fx.Node) -> tuple[fx.Node, float]:
    factor = 1.0
    while True:
        if node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        scaled = scalar_factor(gm, node)
        if scaled is not None:
            node, f = scaled
            factor *= f
            continue
        return node, factor


def _const_value(gm, node: fx.Node) -> float | None:
    t = node.target
    if t in (aten.ones.default, aten.ones_like.default, aten.new_ones.default):
        return 1.0
    if t is aten.full.default:
        return scalar_value(gm, node.args[1])
    if t in (aten.full_like.default, aten.new_full.default):
        return scalar_value(gm, node.args[1] if t is aten.full_like.default else node.args[2])
    if t is aten.pow.Tensor_Scalar and scalar_value(gm, node.args[1]) == 0.0:
        return 1.0
    return None


def _monomial(gm, node: fx.Node, rank: int | None = None):
    """(degree, factor, source) of a product of copies of one tensor x, or None.

    ``rank``: the rank of the feature map (and so of x): the source is the deepest tensor of that
    rank on the chain of views (x.unsqueeze(-1) of a [B, H, D] x is 4-D, but x is what it reads)."""
    stop, factor = _strip(gm, node)
    if stop.op == "call_function":
        const = _const_value(gm, stop)
        if const is not None:
            return 0, factor * const, None
        if stop.target is aten.mul.Tensor and all(isinstance(a, fx.Node) and hint_shape(a) is not None
                                                  for a in stop.args[:2]):
            ma, mb = _monomial(gm, stop.args[0], rank), _monomial(gm, stop.args[1], rank)
            if ma is None or mb is None:
                return None
            if ma[2] is not None and mb[2] is not None and ma[2] is not mb[2]:
                return None
            return ma[0] + mb[0], factor * ma[1] * mb[1], ma[2] if ma[2] is not None else mb[2]
        if stop.target in (aten.pow.Tensor_Scalar, aten.square.default):
            n = 2.0 if stop.target is aten.square.default else scalar_value(gm, stop.args[1])
            inner = _monomial(gm, stop.args[0], rank)
            if n is None or n != int(n) or n < 1 or inner is None:
                return None
            return inner[0] * int(n), factor * inner[1] ** int(n), inner[2]
    operand = walk_operand(gm, node)
    source = operand.source
    if rank is not None and len(hint_shape(source)) != rank:
        node_ = node
        while True:               # the views between the operand and where the walk stopped
            if len(hint_shape(node_) or ()) == rank:
                source = node_
            if node_ is operand.stop or not (node_.op == "call_function" and node_.args
                                             and isinstance(node_.args[0], fx.Node)):
                break
            node_ = node_.args[0] if node_.target in VIEW_OPS else (scalar_factor(gm, node_) or (operand.stop,))[0]
    return 1, operand.factor, source


def _piece(gm, node: fx.Node) -> Piece | None:
    width = hint_shape(node)[-1]
    mono = _monomial(gm, node, len(hint_shape(node)))
    if mono is None:
        return None
    degree, factor, source = mono
    if degree == 0:
        return Piece("const", factor, width, None)
    d = hint_shape(source)[-1]
    if degree == 1:
        return Piece("linear", factor, width, source) if width == d else None
    if width != d ** degree:
        return Piece("square", factor, width, source)       # elementwise powers: not a function of q.k
    return Piece("outer" if degree == 2 else f"degree{degree}", factor, width, source)


def read_feature_map(gm: fx.GraphModule, cat: fx.Node) -> FeatureMap | None:
    """The Taylor-like map a ``cat`` builds, or None when the cat is not a feature map."""
    if cat.op != "call_function" or cat.target is not aten.cat.default:
        return None
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = len(hint_shape(cat))
    if dim not in (-1, rank - 1):
        return None
    pieces = tuple(_piece(gm, t) for t in tensors)
    if any(p is None for p in pieces):
        return None
    kinds = {p.kind for p in pieces}
    sources = {p.source for p in pieces if p.source is not None}
    if kinds <= {"linear"} or len(sources) != 1:
        return None                          # e.g. a rotary split: an ordinary q, not a feature map
    return FeatureMap(pieces, sources.pop())


def pair_feature_maps(phi_q: FeatureMap, phi_k: FeatureMap) -> polynomial.Poly:
    """phi(q) . phi(k) as a polynomial in q.k; refuses maps that are not functions of q.k."""
    for phi in (phi_q, phi_k):
        if any(p.kind == "square" for p in phi.pieces):
            raise Refused("feature_map", "feature map squares x elementwise (x * x): phi(q).phi(k) is not a "
                                         "function of q.k; the Taylor map needs the flattened outer product")
    if [p.kind for p in phi_q.pieces] != [p.kind for p in phi_k.pieces] or \
            [p.width for p in phi_q.pieces] != [p.width for p in phi_k.pieces]:
        raise Refused("feature_map", "q and k go through different feature maps (pieces differ: "
                                     f"{[p.kind for p in phi_q.pieces]} vs {[p.kind for p in phi_k.pieces]})")
    higher = sorted({p.kind for p in phi_q.pieces if p.kind.startswith("degree")})
    if higher:
        raise Refused("polynomial", f"the feature map has a term of {higher[-1].replace('degree', 'degree ')} "
                                    "(x (x) x (x) x ...): Based is second order")
    poly: polynomial.Poly = (0.0,)
    for pq, pk in zip(phi_q.pieces, phi_k.pieces):
        power = {"const": 0, "linear": 1, "outer": 2}[pq.kind]
        weight = pq.factor * pk.factor * (pq.width if pq.kind == "const" else 1.0)
        poly = polynomial.add(poly, tuple([0.0] * power + [weight]))
    return poly
