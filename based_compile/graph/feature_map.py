"""Explicit Taylor feature maps: phi(x) = cat([c * 1, a * x, b * flatten(x (x) x)], -1).

``read_feature_map(gm, cat)`` reads a ``cat`` along the last axis piece by piece:
- "const": a ones column (``torch.ones``, ``x[..., :1] ** 0``, ``ones_like``, ``full``) times c;
- "linear": the source x times a;
- "outer": the flattened outer product x (x) x times b (width D^2);
- "pairs": products x_a * x_b listed feature by feature: an elementwise x * x (the pairs (a, a)), or
  ``x[..., i] * x[..., j]`` with constant index tensors (the upper triangle of ``triu_indices``, inline
  or kept in registered buffers, read by value and guarded);
  a ``cat`` nested in the map (the compressed map's ``cat([x * x, sqrt(2) x[iu] x[ju]])``) is read
  piece by piece;
- "degreeN": a flattened N-fold outer product (N >= 3): a higher-order term, refused.
``pair_feature_maps`` turns phi(q) . phi(k) into a polynomial in q.k:
c_q c_k w + a_q a_k (q.k) + b_q b_k (q.k)^2, when both maps have the same pieces in the same order.
The "pairs" pieces together are (q.k)^2 times a coefficient c exactly when every x_a^2 has weight c
and every x_a x_b (a < b) weight 2c, summed over the pieces (the compressed Taylor map: the diagonal,
and the upper triangle weighted by sqrt(2)); an elementwise square alone (no x_a x_b) is refused.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx

from . import polynomial
from .canonicalize import (VIEW_OPS, buffer_value, hint_shape, read_views, scalar_factor, scalar_value, shape_of,
                           specialised_value, walk_operand)
from .feature_order import keeps_last_axis, linear_in_order, outer_block_in_order, outer_in_order, square_in_order
from .marked_dynamic import is_marked_dynamic
from .refusal import Refused
from .region_cuts import computed_by

aten = torch.ops.aten

_CONST_OPS = {aten.ones.default, aten.ones_like.default, aten.new_ones.default, aten.full.default,
              aten.full_like.default, aten.new_full.default}


@dataclass(frozen=True)
class Piece:
    kind: str          # "const", "linear", "outer", "pairs", "elementwise", "degreeN"
    factor: float      # c, a or b
    width: int         # features this piece contributes
    source: fx.Node | None
    pairs: tuple = ()  # "pairs": the (a, b) of x_a * x_b, feature by feature
    node: fx.Node | None = field(default=None, compare=False)   # the cat operand it was read from


@dataclass(frozen=True)
class FeatureMap:
    pieces: tuple[Piece, ...]
    source: fx.Node    # the x every non-constant piece is a function of


def _strip(gm, node: fx.Node) -> tuple[fx.Node, float]:
    """(``node`` under its views and scalar factors, the product of those factors)."""
    chain = read_views(gm, node)
    return chain.base, chain.factor


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
    if stop.op == "call_function" and stop.target is aten.detach.default and isinstance(stop.args[0], fx.Node):
        inner = _monomial(gm, stop.args[0], rank)       # a detached constant (an inlined checkpoint's
        if inner is not None and inner[0] == 0:         # ones column) is that constant
            return 0, factor * inner[1], None
    if stop.op == "call_function":
        const = _const_value(gm, stop)
        if const is not None:
            return 0, factor * const, None
        outer_bmm = stop.target is aten.bmm.default and (hint_shape(stop.args[0]) or (0,))[-1] == 1
        if (stop.target is aten.mul.Tensor or outer_bmm) and all(
                isinstance(a, fx.Node) and hint_shape(a) is not None and any(s != 1 for s in hint_shape(a))
                for a in stop.args[:2]):
            # (a bmm over a size-1 axis, x.unsqueeze(-1) @ x.unsqueeze(-2), is the product x_a x_b)
            # (a product with a one-element tensor, q * self.scale, is an x of its own)
            ma, mb = _monomial(gm, stop.args[0], rank), _monomial(gm, stop.args[1], rank)
            if ma is not None and mb is not None and (ma[2] is None or mb[2] is None or ma[2] is mb[2]):
                return ma[0] + mb[0], factor * ma[1] * mb[1], ma[2] if ma[2] is not None else mb[2]
            # Not a power of one tensor (q * weight, x * rsqrt(mean(x^2)): a norm before the map):
            # the product itself is the x the map is a function of.
        if stop.target in (aten.pow.Tensor_Scalar, aten.square.default):
            n = 2.0 if stop.target is aten.square.default else scalar_value(gm, stop.args[1])
            inner = _monomial(gm, stop.args[0], rank)
            if n is None or n != int(n) or n < 1 or inner is None:
                return None
            return inner[0] * int(n), factor * inner[1] ** int(n), inner[2]
    operand = walk_operand(gm, node)
    source, factor = operand.source, operand.factor
    if rank is not None and len(hint_shape(source)) != rank:
        # the deepest tensor of the map's rank on the chain of views and scalar factors, with the factors
        # above it (not those above walk_operand's 4-D source: x = q[:, 0] * c of a [B, T, D] map is
        # unsqueezed to 4-D above c, and c was lost: the outer product read c^4 too large)
        matching = [(n, f) for n, f in read_views(gm, node).trail if len(hint_shape(n) or ()) == rank]
        # not past a view that splits or merges the feature axis (the [B, T, H * D] projection that
        # view(B, T, H, D).transpose(1, 2).reshape(B * H, T, D) folds heads out of is not x)
        matching = [(n, f) for n, f in matching if hint_shape(n)[-1] == hint_shape(matching[0][0])[-1]]
        if matching:
            source, factor = matching[-1]
    return 1, factor, source


def _piece(gm, node: fx.Node) -> Piece | None:
    width = hint_shape(node)[-1]
    mono = _monomial(gm, node, len(hint_shape(node)))
    if mono is None:
        return None
    degree, factor, source = mono
    if degree == 0:
        return Piece("const", factor, width, None)
    d = hint_shape(source)[-1]
    if degree == 1:                              # x_a at feature a (not x's features reordered by views)
        return Piece("linear", factor, width, source) if width == d and linear_in_order(gm, node, source) else None
    if width != d ** degree:
        if degree == 2 and width == d:           # x * x: the products x_a x_a
            if not square_in_order(gm, node, source):
                return None
            return Piece("pairs", factor, width, source, tuple((a, a) for a in range(d)))
        return Piece("elementwise", factor, width, source)    # x ** 3 elementwise: not a function of q.k
    if degree == 2 and not outer_in_order(gm, node, source):     # x_a x_b at feature a * D + b
        return None
    return Piece("outer" if degree == 2 else f"degree{degree}", factor, width, source)


def _constant(gm, node) -> torch.Tensor | None:
    """The value of a small integer tensor computed from constants alone (``triu_indices``, or a
    registered buffer that holds it: read by value, and guarded when a rewrite relies on it)."""
    if not isinstance(node, fx.Node):
        return node
    buffer = buffer_value(gm, node)
    if buffer is not None:
        return buffer
    if node.op != "call_function" or node.target in (aten.sym_size.int,):
        return None
    args, kwargs = [], {}
    for a in node.args:
        if isinstance(a, fx.Node):
            a = _constant(gm, a)
            if a is None:
                return None
        elif isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
            return None
        args.append(a)
    for key, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            return None
        kwargs[key] = a
    if any(isinstance(a, torch.Tensor) and a.numel() > 1 << 16 for a in args):
        return None
    try:
        with torch.no_grad():
            value = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - not a constant we can read: the piece stays unread
        return None
    return value


def _is_index(value) -> bool:
    """A 1-d tensor of integer indices (a bool or uint8 tensor indexes as a mask: not positions)."""
    return isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype in (torch.int64, torch.int32)


def _indexed(gm, node: fx.Node, rank: int):
    """(factor, x, indices) when ``node`` is, through views and scalar factors, ``x[..., idx]`` with a
    constant 1-d index tensor on the last axis (indices: a tuple of ints), or x itself (all of them)."""
    stop, factor = _strip(gm, node)
    if stop.op == "call_function" and stop.target is aten.index.Tensor:
        x, indices = stop.args[0], stop.args[1]
        if not isinstance(x, fx.Node) or len(hint_shape(x) or ()) != rank or len(indices) != rank \
                or any(i is not None for i in indices[:-1]):
            return None
        idx = _constant(gm, indices[-1])
        if not _is_index(idx):
            return None
        d = hint_shape(x)[-1]
        idx = [int(i) % d for i in idx.tolist()]
        return factor, x, tuple(idx)
    shape = hint_shape(stop)
    if stop.op in ("placeholder", "call_function") and shape is not None and len(shape) == rank:
        return factor, stop, tuple(range(shape[-1]))
    return None


def _pairs_piece(gm, node: fx.Node, rank: int) -> Piece | None:
    """x[..., i] * x[..., j] (times constants): the products x_{i_f} x_{j_f}, feature by feature."""
    stop, factor = _strip(gm, node)
    if stop.op != "call_function" or stop.target is not aten.mul.Tensor:
        return None
    a, b = stop.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    ia, ib = _indexed(gm, a, rank), _indexed(gm, b, rank)
    if ia is None or ib is None or ia[1] is not ib[1] or len(ia[2]) != len(ib[2]):
        return None
    if len(ia[2]) != hint_shape(node)[-1]:
        return None
    x = walk_operand(gm, ia[1])      # the source as the other pieces read it (through views and scalars)
    if len(hint_shape(x.source) or ()) != rank:
        return None
    # feature f is x_{i_f} x_{j_f}: the index's axis, and x's below it, reach the piece's last axis whole
    if not keeps_last_axis(gm, node, stop) or not keeps_last_axis(gm, ia[1], x.source) \
            or not all(keeps_last_axis(gm, f, _strip(gm, f)[0]) for f in (a, b)):
        return None
    return Piece("pairs", factor * ia[0] * ib[0] * x.factor ** 2, len(ia[2]), x.source, tuple(zip(ia[2], ib[2])))


def _block_pairs(gm, stop: fx.Node, rank: int):
    """(the [.., D, D] tensor read, the pairs (a, b) of its last two axes, feature by feature) when ``stop``
    is ``torch.diagonal`` of those two axes (offset o: the pairs (a, a + |o|)) or ``P[..., I, J]`` with
    constant 1-d index tensors I, J on them (the pairs (I_f, J_f)); else None. Its output is ``rank``-d,
    the pairs along its last axis."""
    if stop.op != "call_function" or not isinstance(stop.args[0], fx.Node):
        return None
    block = stop.args[0]
    shape = hint_shape(block) or ()
    if len(shape) != rank + 1 or shape[-1] != shape[-2]:
        return None
    d = shape[-1]
    if stop.target is aten.diagonal.default:
        offset, dim1, dim2 = (list(stop.args[1:]) + [0, 0, 1][len(stop.args) - 1:])[:3]
        if sorted((dim1 % (rank + 1), dim2 % (rank + 1))) != [rank - 1, rank]:
            return None
        o = abs(int(offset))
        return block, tuple((a, a + o) for a in range(d - o))
    if stop.target is aten.index.Tensor:
        indices = list(stop.args[1])
        if len(indices) != rank + 1 or any(i is not None for i in indices[:-2]):
            return None
        values = [_constant(gm, i) for i in indices[-2:]]
        if not all(_is_index(v) for v in values) or values[0].numel() != values[1].numel():
            return None
        rows, cols = ([int(i) % d for i in v.tolist()] for v in values)
        return block, tuple(zip(rows, cols))
    return None


def _block_piece(gm, node: fx.Node, rank: int) -> Piece | None:
    """torch.diagonal of x (x) x, or x (x) x gathered at constant index pairs ``P[..., I, J]`` (the
    memory-saving Taylor map: the squares, and the products below the diagonal through ``tril_indices``):
    the products x_a x_b, feature by feature."""
    stop, factor = _strip(gm, node)
    read = _block_pairs(gm, stop, rank)
    if read is None:
        return None
    block, pairs = read
    if len(pairs) != hint_shape(node)[-1] or not keeps_last_axis(gm, node, stop):
        return None
    mono = _monomial(gm, block, rank)
    if mono is None or mono[0] != 2 or mono[2] is None or len(hint_shape(mono[2]) or ()) != rank \
            or not outer_block_in_order(gm, block, mono[2]):
        return None
    return Piece("pairs", factor * mono[1], len(pairs), mono[2], pairs)


def _pieces(gm, cat: fx.Node, rank: int, factor: float = 1.0) -> list:
    """The pieces of a cat along the last axis; a cat nested in it is read piece by piece."""
    out = []
    for t in cat.args[0]:
        stop, f = _strip(gm, t)
        if stop.op == "call_function" and stop.target is aten.cat.default and len(hint_shape(stop)) == rank \
                and (stop.args[1] if len(stop.args) > 1 else stop.kwargs.get("dim", 0)) in (-1, rank - 1):
            if not keeps_last_axis(gm, t, stop):       # the nested map's features, in their order
                out.append(None)
                continue
            out += _pieces(gm, stop, rank, factor * f)
            continue
        piece = _pairs_piece(gm, t, rank) or _block_piece(gm, t, rank) or _piece(gm, t)
        # (a product of two tensors is an x of its own in _piece)
        if piece is not None:
            piece = replace(piece, factor=piece.factor * factor, node=t)
        out.append(piece)
    return out


def read_feature_map(gm: fx.GraphModule, cat: fx.Node) -> FeatureMap | None:
    """The Taylor-like map a ``cat`` builds, or None when the cat is not a feature map."""
    if cat.op != "call_function" or cat.target is not aten.cat.default:
        return None
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    rank = len(hint_shape(cat))
    if dim not in (-1, rank - 1):
        return None
    pieces = tuple(_pieces(gm, cat, rank))
    if any(p is None for p in pieces):
        return None
    kinds = {p.kind for p in pieces}
    sources = {p.source for p in pieces if p.source is not None}
    if kinds <= {"linear"} or len(sources) != 1:
        return None                          # e.g. a rotary split: an ordinary q, not a feature map
    return FeatureMap(pieces, sources.pop())


def same_feature_map(gm: fx.GraphModule, a: fx.Node, b: fx.Node) -> bool:
    """``a`` and ``b`` (two cats) are one feature map: the same node, or the same computation op by op from
    the same inputs (``phi(q)`` called twice: in the scores and in the normaliser). Not pieces read alike
    of the same tensor: those are read through views, and phi of another view of q (``q.reshape`` where
    the scores read ``q.transpose``) holds other rows."""
    return _same_computation(a, b, {})


def _same_computation(a, b, seen: dict, depth: int = 0) -> bool:
    """``a`` and ``b`` compute the same values: the same node, or one deterministic op with equal constant
    arguments applied to arguments that compute the same values (at most 64 ops deep)."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(_same_computation(x, y, seen, depth) for x, y in zip(a, b))
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and type(a) is type(b) and a == b
    key = (a, b)
    if key in seen:
        return seen[key]
    if depth > 64 or a.op != "call_function" or b.op != "call_function" or a.target is not b.target \
            or a.is_impure() or b.is_impure() or a.kwargs.keys() != b.kwargs.keys() \
            or hint_shape(a) != hint_shape(b):
        seen[key] = False
        return False
    same = _same_computation(list(a.args), list(b.args), seen, depth + 1) and all(
        _same_computation(a.kwargs[name], b.kwargs[name], seen, depth + 1) for name in a.kwargs)
    seen[key] = same
    return same



def feature_map_factors(gm: fx.GraphModule, factors):
    """Each of a contraction's factors that is a feature map through views, in order, as (index, its
    views ``ViewChain``, the ``FeatureMap``); the chain's ``base`` is the map's ``cat``."""
    for i, factor in enumerate(factors):
        chain = read_views(gm, factor)
        base = chain.base
        phi = read_feature_map(gm, base) if isinstance(base, fx.Node) and base.op == "call_function" else None
        if phi is not None:
            yield i, chain, phi


def unread_reason(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a ``cat`` along the last axis that looks like a Taylor map (a constant column beside other
    pieces) is not read as one, when the cause is a piece scaled by a one-element tensor whose value is
    not a compile-time constant (``x2 / self.temperature``, an ``nn.Parameter``); else None."""
    if node.op != "call_function" or node.target is not aten.cat.default:
        return None
    rank = len(hint_shape(node) or ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if rank == 0 or dim not in (-1, rank - 1):
        return None
    pieces = node.args[0]
    if not any(isinstance(t, fx.Node) and _monomial(gm, t, rank) is not None and _monomial(gm, t, rank)[0] == 0
               for t in pieces):
        return None
    for t in pieces:
        stop, _ = _strip(gm, t) if isinstance(t, fx.Node) else (None, None)
        if stop is None or stop.op != "call_function" or stop.target not in (aten.mul.Tensor, aten.div.Tensor):
            continue
        for arg in stop.args[:2]:
            shape = hint_shape(arg) if isinstance(arg, fx.Node) else None
            if shape is not None and all(s == 1 for s in shape) and scalar_value(gm, arg) is None:
                return (f"a piece of the feature map is scaled by a one-element tensor ({arg.name}, shape "
                        f"{tuple(shape)}) that the pass does not read as a compile-time constant (an nn.Parameter "
                        "such as a learnable temperature, a plain tensor attribute, a value computed at run time, or "
                        "a registered buffer that is not 0-d): the operator takes constant coefficients (scale x "
                        "before the map, use a Python number, or keep a fixed value in a 0-d registered buffer, "
                        "which is read as the constant it is and guarded)")
    return None


def readings_of(gm, node: fx.Node, rank: int) -> tuple:
    """The tensors of ``rank`` dims on the chain of views (and scalar factors) from ``node`` down,
    nearest first, the deepest such tensor and those with the same scalar factors above them (a
    scaled q is not q): the candidates for the tensor the user passed (x before the unsqueeze of an
    outer product, or before a transpose), as the pieces' factors read them (``_monomial``). None of
    that rank below a scalar factor (x = (q * c).unsqueeze(2), a 5-D map of a 4-D q): q is not a
    reading (c would be lost); () when none has the rank at all and a factor was passed."""
    groups, found = [], []
    while True:
        if len(hint_shape(node) or ()) == rank:
            found.append(node)
        if node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        scaled = scalar_factor(gm, node) if node.op == "call_function" else None
        if scaled is not None:
            groups.append(found)
            found, node = [], scaled[0]
            continue
        groups.append(found)
        break
    for group in reversed(groups):
        if group:
            return tuple(group)
    return (node,) if len(groups) == 1 else ()


def map_readings(gm, cat: fx.Node, phi: FeatureMap) -> tuple:
    """Candidates for x of phi(x) = cat(...), read from its linear piece, nearest first."""
    for piece in phi.pieces:
        if piece.kind == "linear" and piece.node is not None:
            return readings_of(gm, piece.node, len(hint_shape(cat))) or (phi.source,)
    return (phi.source,)


def other_readings(gm, cat: fx.Node, phi: FeatureMap) -> tuple:
    """The candidates for x other than ``phi.source`` (x on the other side of a transpose: the
    numerical probe picks the reading whose layout agrees with k and v)."""
    return tuple(x for x in map_readings(gm, cat, phi) if x is not phi.source)


def pair_feature_maps(phi_q: FeatureMap, phi_k: FeatureMap) -> polynomial.Poly:
    """phi(q) . phi(k) as a polynomial in q.k; refuses maps that are not functions of q.k."""
    for phi in (phi_q, phi_k):
        if any(p.kind == "elementwise" for p in phi.pieces):
            raise Refused("feature_map", "feature map raises x to a power elementwise: phi(q).phi(k) is not a "
                                         "function of q.k")
        pairs = [pair for p in phi.pieces if p.kind == "pairs" for pair in p.pairs]
        if pairs and all(a == b for a, b in pairs):
            raise Refused("feature_map", "feature map squares x elementwise (x * x): phi(q).phi(k) is not a "
                                         "function of q.k; the Taylor map needs the flattened outer product")
    if [p.kind for p in phi_q.pieces] != [p.kind for p in phi_k.pieces] or \
            [p.width for p in phi_q.pieces] != [p.width for p in phi_k.pieces]:
        raise Refused("feature_map", "q and k go through different feature maps (pieces differ: "
                                     f"{[p.kind for p in phi_q.pieces]} vs {[p.kind for p in phi_k.pieces]})")
    if [p.pairs for p in phi_q.pieces] != [p.pairs for p in phi_k.pieces]:
        raise Refused("feature_map", "q and k go through different feature maps (their products x_a x_b are "
                                     "listed in different orders)")
    higher = sorted({p.kind for p in phi_q.pieces if p.kind.startswith("degree")})
    if higher:
        raise Refused("polynomial", f"the feature map has a term of {higher[-1].replace('degree', 'degree ')} "
                                    "(x (x) x (x) x ...): Based is second order")
    poly: polynomial.Poly = (0.0,)
    pairs = [(pq, pk) for pq, pk in zip(phi_q.pieces, phi_k.pieces) if pq.kind == "pairs"]
    if pairs:
        for phi in (phi_q, phi_k):
            _specialise_feature_size(phi.source)
        poly = polynomial.add(poly, (0.0, 0.0, _pairs_coefficient(pairs, phi_q.source)))
    for pq, pk in zip(phi_q.pieces, phi_k.pieces):
        if pq.kind == "pairs":
            continue
        power = {"const": 0, "linear": 1, "outer": 2}[pq.kind]
        weight = pq.factor * pk.factor * (pq.width if pq.kind == "const" else 1.0)
        poly = polynomial.add(poly, tuple([0.0] * power + [weight]))
    return poly


def _specialise_feature_size(source: fx.Node) -> None:
    """Guard x's feature size equal to its traced value when it is symbolic (``dynamic=True``, or
    ``mark_dynamic`` on the feature axis). The products x_a x_b a map lists are proven to be (x.y)^2 at
    the traced size only: a table fixed at one Dk (``triu_indices(4, 4, 1)`` inline, in a buffer or an
    attribute; zoology's ``tril_indices`` of ``forward_mem_save``) lists the pairs of 4 features at any
    Dk, and at Dk = 8 the map is not Based. A call at another Dk recompiles instead of reusing the proof
    (as ``specialised_value`` does for a scale computed from Dk). Refused when the size cannot be guarded."""
    size = (shape_of(source) or (None,))[-1]
    if not isinstance(size, torch.SymInt):
        return
    if is_marked_dynamic(size):
        raise Refused("feature_map", f"the feature map's products x_a x_b are (x.y)^2 at the traced feature size "
                                     f"{hint_shape(source)[-1]} alone (a table of index pairs fixed at one size), "
                                     "and the feature axis is marked dynamic (torch._dynamo.mark_dynamic), so the "
                                     "pass cannot specialise it: use maybe_mark_dynamic, or leave that axis static")
    try:
        specialised_value(size)
    except Exception as err:  # noqa: BLE001 - no guard: the proof would hold at the traced Dk alone
        raise Refused("feature_map", f"the feature map's products x_a x_b are read at the traced feature size "
                                     f"{hint_shape(source)[-1]} of a symbolic size that could not be guarded "
                                     f"({type(err).__name__}): at another size they would not be (x.y)^2") from err


def _pairs_coefficient(pairs, source) -> float:
    """c with sum over the "pairs" features of w_q w_k x_a x_b y_a y_b = c (x.y)^2, or Refused.

    (x.y)^2 = sum_a x_a^2 y_a^2 + 2 sum_{a<b} x_a x_b y_a y_b: every unordered pair {a, b} needs the
    weight c on the diagonal and 2c off it, summed over the features that list it."""
    d = hint_shape(source)[-1]
    weight: dict[tuple[int, int], float] = {}
    for pq, pk in pairs:
        w = pq.factor * pk.factor
        for a, b in pq.pairs:
            key = (min(a, b), max(a, b))
            weight[key] = weight.get(key, 0.0) + w
    c = weight.get((0, 0), 0.0)
    if c == 0.0:
        raise Refused("feature_map", "the feature map's products x_a x_b are not (x.y)^2 times one constant: x_0^2 "
                                     "has no weight in phi(q).phi(k), and (x.y)^2 weights every x_a^2 alike (c) and "
                                     "every x_a x_b by 2c")
    for a in range(d):
        for b in range(a, d):
            want = c if a == b else 2.0 * c
            got = weight.get((a, b), 0.0)
            if abs(got - want) > 1e-12 * abs(want):
                what = "x_%d^2" % a if a == b else "x_%d x_%d" % (a, b)
                raise Refused("feature_map", f"the feature map's products x_a x_b are not (x.y)^2 times one "
                                             f"constant: {what} has the weight {got:.6g} in phi(q).phi(k), "
                                             f"{want:.6g} wanted (the compressed Taylor map weights the "
                                             f"off-diagonal products by sqrt(2))")
    return c


# In-place writes as functionalisation lowers them: a map built into new_empty / zeros by slice writes.
_SCATTERS = {aten.slice_scatter.default, aten.select_scatter.default, aten.index_put.default,
             aten.as_strided_scatter.default, aten.copy.default}
# Ops that take a part of a tensor along one axis (``x[0]``, ``x.unbind(0)``, ``x.split(t, 2)``).
_PARTS = {aten.select.int, aten.slice.Tensor, aten.unbind.int, aten.split.Tensor, aten.split_with_sizes.default,
          aten.chunk.default}



def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def _through_constants(gm, node: fx.Node) -> fx.Node:
    """``node`` through views, scalar factors and scalar terms (elu(x) + 1 is elu for this purpose)."""
    while True:
        node, _ = _strip(gm, node)
        if node.op == "call_function" and node.target in (aten.add.Tensor, aten.sub.Tensor) and \
                len(node.args) > 1 and scalar_value(gm, node.args[1]) is not None and isinstance(node.args[0], fx.Node):
            node = node.args[0]
            continue
        return node


_READ = "the pass reads the Taylor map phi(x) = torch.cat([c, a x, b x (x) x], -1) (or its compressed form)"


def features_first(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why a torch.cat that stands where a feature map would (an operand of the scores whose product has no
    second-order term) is not read: it joins its pieces along another axis than the last (a map built
    features first, ``[B, H, F, T]``, and transposed into the scores). None when ``node`` is no such cat."""
    if not isinstance(node, fx.Node):
        return None
    stop = _through_constants(gm, node)
    if stop.op != "call_function" or stop.target is not aten.cat.default:
        return None
    rank = len(hint_shape(stop) or ())
    dim = stop.args[1] if len(stop.args) > 1 else stop.kwargs.get("dim", 0)
    if rank < 2 or dim in (-1, rank - 1):
        return None
    return (f"its torch.cat joins the pieces along axis {dim} of {rank}, not the last: a feature map built with "
            f"its features on another axis (features first, [B, H, F, T], then transposed) is not read; {_READ}")


def multiplied_map_reason(gm: fx.GraphModule, product: fx.Node) -> str | None:
    """Why ``product``, a feature map the pass reads times a tensor that is not one number
    (``phi(k) * attention_mask[:, None, :, None]``), is not a feature map; None for any other node."""
    if product.op != "call_function" or product.target is not aten.mul.Tensor or len(product.args) < 2:
        return None
    for a, b in ((product.args[0], product.args[1]), (product.args[1], product.args[0])):
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
            continue
        inner = _through_constants(gm, a)
        if inner.op == "call_function" and inner.target is aten.cat.default \
                and read_feature_map(gm, inner) is not None and scalar_value(gm, b) is None:
            return (f"the feature map is multiplied by a tensor ({b.name}, shape {tuple(hint_shape(b) or ())}: "
                    "a padding mask, a gate?): the operator's weights are phi(q).phi(k) with nothing "
                    "multiplied in (masking k before the map is not the same: phi(0) is not 0)")
    return None


def describe_unread(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """What the pass could not read of a tensor that stands where a feature map would (an operand of the
    scores, of a running sum or of a readout), or None when it reads it (or it is not computed in the
    graph: an input, a view of one)."""
    if not isinstance(node, fx.Node):
        return None
    stop = _through_constants(gm, node)
    if computed_by(stop) is not None:          # q' of a feature map the code computes in a custom Function
        return f"it is computed by {computed_by(stop)}"
    if stop.op != "call_function":
        return None
    target = stop.target
    if target is aten.cat.default:
        if read_feature_map(gm, stop) is not None:
            return None
        why = unread_reason(gm, stop)
        if why is not None:
            return why
        rank = len(hint_shape(stop) or ())
        dim = stop.args[1] if len(stop.args) > 1 else stop.kwargs.get("dim", 0)
        if rank == 0 or dim not in (-1, rank - 1):
            return None
        unread_index = _unread_index(gm, stop, rank) or _unread_block(gm, stop, rank)
        if unread_index is not None:
            return unread_index
        pieces = _pieces(gm, stop, rank)
        bad = [(i, t) for i, (t, p) in enumerate(zip(stop.args[0], pieces)) if p is None]
        if bad:
            i, t = bad[0]
            inner = _through_constants(gm, t)
            what = _op_name(inner) if inner.op == "call_function" else inner.name
            mono = _monomial(gm, t, rank) if isinstance(t, fx.Node) else None
            if mono is not None and mono[0] in (1, 2) and mono[2] is not None:
                d, width = hint_shape(mono[2])[-1], hint_shape(t)[-1]
                if width in (d, d * d):
                    return (f"piece {i} of the feature map torch.cat (computed by {what}) is of degree {mono[0]} "
                            "in x but does not hold x's features in order (x_a at feature a, x_a x_b at feature "
                            "a * D + b): a view regroups the feature axis, or a square x_a^2 stands where x_a x_b "
                            f"should: {_READ}")
            return (f"piece {i} of the feature map torch.cat (computed by {what}) is not a constant column, x, "
                    f"x (x) x or products x_a x_b of the same x: {_READ}")
        if {p.kind for p in pieces} <= {"linear"}:
            for i, p in enumerate(pieces):       # softmax(x) pieces (a Hedgehog map): name the op
                src = p.source
                if src is not None and src.op == "call_function" and _non_polynomial(src.target):
                    return f"piece {i} of the feature map torch.cat is {_op_name(src)}(x): {_READ}"
            return None                                       # a rotary split: an ordinary q
        sources = list(dict.fromkeys(p.source for p in pieces if p.source is not None))
        named = ", ".join(f"{_op_name(n)}(...)" if n.op == "call_function" else n.name for n in sources)
        return (f"the pieces of the feature map torch.cat are functions of different tensors ({named}: e.g. a "
                f"slice x[..., :2] or a clamp of x beside x (x) x): {_READ}")
    if target is aten.detach.default and isinstance(stop.args[0], fx.Node):
        inner = _through_constants(gm, stop.args[0])
        if inner.op == "call_function" and inner.target is aten.cat.default:
            return ("the feature map is detached after it is computed (phi(x).detach(), or computed under "
                    "torch.no_grad()): the operator would differentiate through it (phi(x.detach()) is read)")
        return None
    if target in _SCATTERS:
        return ("the feature map is written in place into a new tensor (new_empty / zeros and slice "
                f"assignments such as out[..., :1] = 1), which the pass does not read: {_READ}; write it as "
                "torch.cat")
    if target is aten.mul.Tensor:
        return multiplied_map_reason(gm, stop)
    whole = stop.args[0] if target is operator.getitem and stop.args else stop
    if isinstance(whole, fx.Node) and whole.op == "call_function" and whole.target in _PARTS \
            and isinstance(whole.args[0], fx.Node):
        inner = _through_constants(gm, whole.args[0])
        if inner.op == "call_function" and inner.target is aten.cat.default and read_feature_map(gm, inner) is not None:
            return ("the feature map is computed once on a tensor that holds q and k together (torch.stack([q, k]), "
                    "torch.cat([q, k], ...)) and then split apart: the pass reads phi applied to q and to k "
                    "themselves (apply the feature map to each)")
    if _non_polynomial(target):
        return f"{_op_name(stop)}(x) is not the Taylor feature map of Based: {_READ}"
    ops, inner = [], stop              # a map the pass reads, then ops it does not read (a replicate pad, a pad of
    while len(ops) < 4 and inner.op == "call_function" and inner.args and isinstance(inner.args[0], fx.Node):
        ops.append(_op_name(inner))    # the time axis and a slice: a token shifted)
        inner = _through_constants(gm, inner.args[0])
        if inner.op == "call_function" and inner.target is aten.cat.default:
            if read_feature_map(gm, inner) is None:
                break
            return (f"the feature map torch.cat goes through {', '.join(reversed(ops))} (a pad of another axis than "
                    "its last, a slice, a pad that is not constant: only a constant pad of its last axis, "
                    f"F.pad(phi, (1, 0), value=c), is read, as a constant column): {_READ}")
    return None


def _leaf_pieces(gm, cat: fx.Node, rank: int):
    """(piece, the op under its views and scalar factors) for each computed piece of a map's torch.cat, the
    pieces of a nested cat of the map's rank in its place."""
    for t in cat.args[0]:
        if not isinstance(t, fx.Node):
            continue
        stop, _ = _strip(gm, t)
        if stop.op != "call_function":
            continue
        if stop.target is aten.cat.default and len(hint_shape(stop) or ()) == rank:
            yield from _leaf_pieces(gm, stop, rank)
            continue
        yield t, stop


def _unread_index(gm, cat: fx.Node, rank: int) -> str | None:
    """Why a product ``x[..., i] * x[..., j]`` among a map's pieces (a nested cat's included) is not read:
    an index tensor whose value is not a compile-time constant (an argument of forward, or computed from
    one); else None."""
    for t, stop in _leaf_pieces(gm, cat, rank):
        if stop.target is aten.mul.Tensor:
            gathers = [_strip(gm, f)[0] for f in stop.args[:2] if isinstance(f, fx.Node)]
            what = "a product x[..., i] * x[..., j]"
        else:
            gathers, what = [stop], "a gather t[..., idx] (such as x (x) x at tril_indices)"
        for inner in gathers:
            if inner.op != "call_function" or inner.target is not aten.index.Tensor:
                continue
            for index in inner.args[1]:
                if isinstance(index, fx.Node) and _constant(gm, index) is None:
                    return (f"a piece of the feature map torch.cat is {what} whose index tensor ({index.name}) "
                            "is not a compile-time constant (an argument of forward or computed from one, a "
                            "plain tensor attribute that is not an integer table, or a buffer the model "
                            "writes): the pass reads which products x_a x_b the map lists from the "
                            "indices' values (torch.triu_indices / tril_indices inline, or kept in a registered "
                            "buffer)")
    return None


def _unread_block(gm, cat: fx.Node, rank: int) -> str | None:
    """Why a piece that is ``torch.diagonal`` or a gather ``P[..., i, j]`` of a [.., D, D] tensor (a nested
    cat's included) is not read as products x_a x_b; else None."""
    for t, stop in _leaf_pieces(gm, cat, rank):
        if stop.target not in (aten.diagonal.default, aten.index.Tensor) or _block_piece(gm, t, rank) is not None:
            continue
        block = stop.args[0]
        if len(hint_shape(block) or ()) != rank + 1:
            continue
        what = "torch.diagonal" if stop.target is aten.diagonal.default else "a gather P[..., i, j]"
        read = _block_pairs(gm, stop, rank)
        if read is None:
            return (f"a piece of the feature map torch.cat is {what} of a [.., D, D] tensor that does not take "
                    "the pairs of its last two axes (a diagonal of other axes, or index tensors other than two "
                    f"constant 1-d ones on the last two axes): {_READ}")
        mono = _monomial(gm, block, rank)
        if mono is None or mono[0] != 2 or mono[2] is None or not outer_block_in_order(gm, block, mono[2]):
            return (f"a piece of the feature map torch.cat is {what} of a [.., D, D] tensor ({block.name}) the "
                    "pass does not prove is the outer product x (x) x of the map's x (x_a x_b at [.., a, b]): "
                    f"{_READ}")
        return (f"a piece of the feature map torch.cat is {what} of x (x) x whose features are not the pairs "
                f"it lists along the map's last axis (a view moves or regroups them): {_READ}")
    return None


def _non_polynomial(target) -> bool:
    """An elementwise (or softmax) op that is not a sum or product: relu, elu, exp, softmax, clamp, ..."""
    if target in (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.neg.default,
                  aten.pow.Tensor_Scalar, aten.square.default, aten.rsub.Scalar, aten.rsub.Tensor):
        return False
    return torch.Tag.pointwise in getattr(target, "tags", ()) or target in (
        aten._softmax.default, aten._log_softmax.default, aten.relu.default)
