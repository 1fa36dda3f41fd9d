"""A normaliser written on the features: den_i = phi(q_i) . sum_{j <= i} phi(k_j) + eps.

    den = (phi(q) * phi(k).cumsum(t)).sum(f) + eps                   # a broadcast product summed over features
    den = torch.einsum("bhtf,bhtf->bht", phi(q), phi(k).cumsum(2))   # an einsum (lowered to a bmm [N, 1, F] x [N, F, 1])
    den = phi(q) @ phi(k).sum(t).unsqueeze(-1)                       # non-causal: the total sum over time (a matmul)
    den = torch.einsum("bhtf,bhf->bht", phi(q), phi(k).sum(2))

divided by, or ``1 / den`` multiplied. It is the row sum of the weights phi(q_i) . phi(k_j) over
j <= i (over every j for the total sum): the normaliser of the linear forms (``linear_form``) and,
next to a quadratic numerator, the same function as ``a.sum(-1)`` (``match.Matcher.normaliser``).

``read_feature_sum`` reads it into a ``FeatureSum``: which feature maps (and scalar factors) it
contracts, running or total sum, eps, inverted or not. Which entries the contraction pairs is
proven by replaying its views on index tensors (``_pairing``): each query row's features must meet
the same row of the running sum (same batch, head and time position), feature by feature; the
sum must run over the whole axis ``FeatureSum.time`` of phi(k), from position 0, step 1 (not a
strided or restarting sum; callers compare the axis with their numerator's time axis and the
feature maps with the numerator's); and the result's rows must be phi(q)'s rows in their order
(what the numerator's rows are), through the views up to the divisor. Index tensors cost one
integer per feature entry; above ``INDEX_MAX_ELEMENTS`` entries the same is proven by following
every axis of the maps through the views as runs of whole axes (``_tracked``): a view that splits
an axis or broadcasts one is refused there. Every structural check holds on its own: at real
shapes the numerical probe is skipped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import polynomial
from .canonicalize import (VIEW_OPS, example_value, hint, hint_shape, read_views, scalar_factor, scalar_value,
                           through_views)
from .feature_map import FeatureMap, pair_feature_maps, read_feature_map
from .mask import Keep
from .refusal import NotACandidate, Refused

aten = torch.ops.aten
log = logging.getLogger("based_compile")

# Index tensors hold one int64 per entry of phi(q) (B * H * T * F; with their coordinates, about 40 bytes an
# entry at the peak); above this many entries (the numerical probe's limit) the pairing of rows
# and features is proven by following whole axes through the views (``_tracked``).
INDEX_MAX_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class FeatureSum:
    """den = factor * sum_f phi_q(x_q)_f * S_f + eps, S the running (``cumsum``) or total (``total``)
    sum over time of phi_k(x_k); ``inverted``: the expression is 1 / den."""

    kind: str                 # "cumsum" | "total"
    eps: float
    inverted: bool
    phi_q: FeatureMap
    cat_q: fx.Node
    phi_k: FeatureMap
    cat_k: fx.Node
    factor: float             # scalar factors on phi(q) and phi(k) inside the contraction
    time: int | None          # the axis of phi(k)'s cat the sum runs over (None: one time step)
    # the running sum starts from an initial k_state: (the add, the tensor added, the running sum,
    # its time axis, its feature axis), read by ``initial_state.read_initial``; None: from zero
    initial: tuple | None = None

    @property
    def poly(self) -> polynomial.Poly:
        """The weights it sums, as a polynomial in the raw q.k."""
        return polynomial.scale(pair_feature_maps(self.phi_q, self.phi_k), self.factor)

    @property
    def keep(self) -> Keep | None:
        return Keep.causal(0) if self.kind == "cumsum" else None


def _feature_map(gm, node):
    """(map, cat, factor, views) when ``node`` is a Taylor feature map through views and scalar factors."""
    if not isinstance(node, fx.Node):
        return None
    chain = read_views(gm, node)
    views, factor, stop = chain.views, chain.factor, chain.base
    if not isinstance(stop, fx.Node) or stop.op != "call_function":
        return None
    phi = read_feature_map(gm, stop)
    return None if phi is None else (phi, stop, factor, views)


def _state(gm, node):
    """(kind, dim, keepdim, map, cat, factor, outer views, inner views) for a running or total sum over
    one axis of a feature map (through views on both sides), else None."""
    if not isinstance(node, fx.Node):
        return None
    outer_chain = read_views(gm, node, scalars=False)
    outer, state = outer_chain.views, outer_chain.base
    if not isinstance(state, fx.Node) or state.op != "call_function":
        return None
    initial = None
    if state.target is aten.add.Tensor:          # k_state[:, :, None] + phi(k).cumsum(t): from an initial state
        for run, init in (state.args[:2], state.args[1::-1]):
            if isinstance(run, fx.Node) and run.op == "call_function" and run.target is aten.cumsum.default \
                    and _feature_map(gm, run.args[0]) is not None and hint_shape(run) == hint_shape(state):
                if float(state.kwargs.get("alpha", 1)) != 1.0:
                    raise Refused("state", f"the initial k_state is added with alpha={state.kwargs['alpha']:g} (a "
                                           "decayed or gated state): not Based, whose states only add", state)
                rank = len(hint_shape(run))
                inner_views = read_views(gm, run.args[0]).views
                initial = (state, init, run, run.args[1] % rank, through_views(inner_views, rank - 1))
                state = run
                break
    if state.target is aten.cumsum.default:
        kind, dim, keepdim = "cumsum", state.args[1], True
    elif state.target is aten.sum.dim_IntList and len(state.args) > 1 and state.args[1] is not None \
            and len(state.args[1]) == 1:
        kind, dim = "total", state.args[1][0]
        keepdim = bool(state.args[2] if len(state.args) > 2 else state.kwargs.get("keepdim", False))
    else:
        return None
    found = _feature_map(gm, state.args[0])
    if found is None:
        return None
    phi, cat, factor, inner = found
    return kind, dim % len(hint_shape(state.args[0])), keepdim, phi, cat, factor, outer, inner, state, initial


def _size(x):
    if isinstance(x, fx.Node):
        x = example_value(x)
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return hint(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_size(y) for y in x)
    return x


def _replay(views, x: torch.Tensor) -> torch.Tensor:
    """``x`` through ``views`` (outermost first, as ``read_views`` lists them), sizes at their hints."""
    for view in reversed(views):
        if view.target in (aten.view.default, aten._unsafe_view.default):
            x = x.contiguous()     # the values a view shows, whatever the strides of the index tensor (a narrowed sum)
        args = [x] + [_size(a) for a in view.args[1:]]
        kwargs = {k: _size(v) for k, v in view.kwargs.items()}
        x = view.target(*args, **kwargs)
    return x


def _coordinates(index: torch.Tensor, shape) -> torch.Tensor:
    """Flat indices into ``shape`` -> their multi-indices (a trailing axis of len(shape))."""
    out, rest = [], index
    for size in reversed(shape):
        out.append(rest % size)
        rest = rest // size
    return torch.stack(out[::-1], dim=-1)


def _pairing(prod: fx.Node, summed, q_operand: fx.Node, q_side, st, where: fx.Node, top: tuple) -> int | None:
    """Prove, on index tensors, that the contraction ``prod`` (a product summed over the axes
    ``summed``, or a bmm) pairs entry (row r, feature f) of phi(q) with entry (row r, feature f) of
    the sum over phi(k), over every feature once; returns the axis of phi(k)'s cat the sum runs over
    (None at one time step). Refused when the pairing is another."""
    _, cat_q, _, q_views = q_side
    kind, dim, keepdim, _, cat_k, _, outer, inner, state = st[:9]
    shape_q, shape_k = tuple(hint_shape(cat_q)), tuple(hint_shape(cat_k))
    if shape_q[-1] != shape_k[-1] or len(shape_q) != len(shape_k):
        raise Refused("normaliser", "the normaliser contracts feature maps of different widths or ranks", prod)
    n_q, n_k = torch.Size(shape_q).numel(), torch.Size(shape_k).numel()
    if max(n_q, n_k) > INDEX_MAX_ELEMENTS:
        log.info("based_compile: the feature normaliser at %s is read from its shapes (%d entries > %d)",
                 prod.name, max(n_q, n_k), INDEX_MAX_ELEMENTS)
        return _tracked(prod, summed, q_operand, q_views, shape_q, shape_k, st, where, top)
    ids_q = _replay(q_views, torch.arange(n_q).view(shape_q))
    ids_k = _replay(inner, torch.arange(n_k).view(shape_k))
    length = ids_k.shape[dim]
    time = None
    if length > 1:          # the cat axis that moves along the summed axis (exactly one)
        step = _coordinates(ids_k.narrow(dim, 1, 1), shape_k) != _coordinates(ids_k.narrow(dim, 0, 1), shape_k)
        moving = [a for a in range(len(shape_k)) if bool(step[..., a].any())]
        if len(moving) != 1:
            raise Refused("normaliser", "the normaliser's sum over time runs over merged axes of phi(k)", state)
        time = moving[0]
        if time == len(shape_k) - 1:
            raise Refused("normaliser", "the normaliser sums phi(k) over its features, not over time", state)
        _whole_time_axis(ids_k, dim, shape_k, time, state)
    if kind == "total":     # one entry stands for every row: phi(k)'s row 0 (its time coordinate is not compared)
        ids_k = ids_k.narrow(dim, 0, 1)
        if not keepdim:
            ids_k = ids_k.squeeze(dim)
    ids_k = _replay(outer, ids_k)
    if prod.target is aten.bmm.default:
        q_first = prod.args[0] is q_operand
        a, b = (ids_q, ids_k) if q_first else (ids_k, ids_q)
        if a.dim() != 3 or b.dim() != 3:
            raise NotACandidate("not a bmm of 3-d operands")
        pa, pb = torch.broadcast_tensors(a.unsqueeze(-1), b.unsqueeze(1))     # [N, M, K, P]: pairs over K
        pq, pk = (pa, pb) if q_first else (pb, pa)
        axis = 2
    else:
        out_shape = tuple(hint_shape(prod))
        pq, pk = (x.reshape((1,) * (len(out_shape) - x.dim()) + tuple(x.shape)).expand(out_shape)
                  for x in (ids_q, ids_k))
        if len(summed) != 1:
            raise Refused("normaliser", "the normaliser sums the product over several axes", prod)
        axis = summed[0] % len(out_shape)
    cq, ck = _coordinates(pq, shape_q), _coordinates(pk, shape_k)
    features = shape_q[-1]
    order = cq[..., -1].movedim(axis, -1).sort(dim=-1).values
    if cq.shape[axis] != features or not bool((order == torch.arange(features)).all()):
        raise Refused("normaliser", "the normaliser's contraction does not run over the features of phi(q)", prod)
    if not bool((cq[..., -1] == ck[..., -1]).all()):
        raise Refused("normaliser", "the normaliser pairs different features of phi(q) and phi(k)", prod)
    # phi(k) with one entry on an axis where phi(q) has several, other than time (one key/value head
    # read by every query head, multi-query attention): every row of phi(q) meets that one entry, as
    # in the numerator, whose reading proves which axis it is (the heads; the batch is refused there)
    shared = [a for a in range(len(shape_q) - 1) if shape_k[a] == 1 < shape_q[a] and time is not None and a != time]
    keep = [a for a in range(len(shape_q) - 1) if a not in shared and not (kind == "total" and a == time)]
    rows_q, rows_k = cq[..., keep], ck[..., keep]
    if not bool((rows_q == rows_k).all()):
        raise Refused("normaliser", "the normaliser pairs a query row with another row of the sum over phi(k) "
                                    "(another position, batch or head)", prod)
    # the rows of the result (phi(q)'s row met at each entry), through the views up to the divisor
    strides = torch.tensor([math.prod(shape_q[a + 1:-1]) for a in range(len(shape_q) - 1)])
    rows = (cq[..., :-1] * strides).sum(-1).narrow(axis, 0, 1)
    if prod.target is aten.bmm.default or not _keepdim(where):
        rows = rows.squeeze(axis)
    _rows_in_order(_replay(top, rows), math.prod(shape_q[:-1]), top[0] if top else where)
    return time


def _keepdim(node: fx.Node) -> bool:
    return bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))


def _rows_in_order(rows: torch.Tensor, count: int, where: fx.Node) -> None:
    """Refused unless ``rows`` (phi(q)'s row at each entry of the normaliser the output is divided by)
    runs over phi(q)'s rows in their order with a trailing axis of one: the normaliser then lines up
    with the numerator's rows (phi(q)'s rows in their order) as ``o / den[..., None]`` broadcasts it."""
    if rows.dim() == 0 or rows.shape[-1] != 1 or rows.numel() != count \
            or not bool((rows.flatten() == torch.arange(count)).all()):
        raise Refused("normaliser", "the normaliser's rows are not phi(q)'s rows in their order with a trailing "
                                    "axis of one (transposed, permuted or broadcast against the output)", where)


def _whole_time_axis(ids_k: torch.Tensor, dim: int, shape_k, time: int, state: fx.Node) -> None:
    """Refused unless position p along the summed axis ``dim`` is time step p of phi(k)'s cat, over
    the whole time axis, every other coordinate fixed along ``dim``: the running sum at p is then the
    sum over j <= p (the total sum over every j). A sum over a strided time axis, or one that restarts
    (time reshaped into chunks) pairs rows correctly but sums other keys."""
    coords = _coordinates(ids_k, shape_k)
    length = ids_k.shape[dim]
    shape = [1] * ids_k.dim()
    shape[dim] = length
    position = torch.arange(length).view(shape)
    fixed = coords.narrow(dim, 0, 1)
    others = [a for a in range(len(shape_k)) if a != time]
    if length != shape_k[time] or not bool((coords[..., time] == position).all()) \
            or not bool((coords[..., others] == fixed[..., others]).all()):
        raise Refused("normaliser", "the normaliser's sum does not run over the whole time axis of phi(k) from its "
                                    "first position in order (a strided or restarting running sum sums other keys "
                                    "than j <= i)", state)


def _tracked(prod, summed, q_operand, q_views, shape_q, shape_k, st, where, top) -> int | None:
    """Above the index tensors' limit: every axis of phi(q)'s and phi(k)'s cats followed through the
    views as runs of whole cat axes (``_runs``; an axis split, or broadcast to a size > 1, is refused):
    the contraction must meet phi(q) and the sum over phi(k) on the same runs, sum over the features
    alone, the sum over phi(k) run over one whole cat axis, and the result be phi(q)'s rows in order."""
    kind, dim, keepdim, _, _, _, outer, inner, state = st[:9]
    rank = len(shape_q)
    feature = (rank - 1,)
    if shape_q[-1] == 1:
        raise Refused("normaliser", "the normaliser's feature maps have one feature (not proven above the index "
                                    "tensors' limit)", prod)
    base_q = [(a,) if shape_q[a] > 1 else () for a in range(rank)]
    base_k = [(a,) if shape_k[a] > 1 else () for a in range(rank)]
    runs_q = _runs(q_views, base_q, shape_q)
    runs_s = _runs(inner, base_k, shape_k)
    if runs_q is None or runs_s is None:
        raise Refused("normaliser", "the normaliser's views split or broadcast an axis of phi(q) or phi(k) (not "
                                    "proven above the index tensors' limit)", prod)
    if len(runs_s[dim]) > 1:
        raise Refused("normaliser", "the normaliser's sum over time runs over merged axes of phi(k)", state)
    time = runs_s[dim][0] if runs_s[dim] else None
    if time == rank - 1:
        raise Refused("normaliser", "the normaliser sums phi(k) over its features, not over time", state)
    if any(shape_q[a] != shape_k[a] for a in range(rank) if a != time or kind == "cumsum"):
        raise Refused("normaliser", "the normaliser contracts feature maps of other shapes", prod)
    if kind == "total":
        runs_s = list(runs_s)
        if keepdim:
            runs_s[dim] = ()
        else:
            del runs_s[dim]
    runs_k = _runs(outer, runs_s, shape_k)
    if runs_k is None:
        raise Refused("normaliser", "the normaliser's views split or broadcast the sum over phi(k) (not proven "
                                    "above the index tensors' limit)", state)
    query_only = (time,) if kind == "total" and time is not None else None    # phi(q)'s time against the total
    if prod.target is aten.bmm.default:
        q_first = prod.args[0] is q_operand
        a, b = (runs_q, runs_k) if q_first else (runs_k, runs_q)
        if len(a) != 3 or len(b) != 3:
            raise NotACandidate("not a bmm of 3-d operands")
        (q_n, q_free, q_sum), (k_n, k_free, k_sum) = ((a[0], a[1], a[2]), (b[0], b[2], b[1])) if q_first \
            else ((b[0], b[2], b[1]), (a[0], a[1], a[2]))
        if q_sum != feature or k_sum != feature:
            raise Refused("normaliser", "the normaliser's contraction does not run over the features of phi(q) "
                                        "and phi(k)", prod)
        if q_n != k_n or k_free != () or q_free not in ((), query_only):
            raise Refused("normaliser", "the normaliser pairs a query row with another row of the sum over phi(k) "
                                        "(another position, batch or head)", prod)
        rows = [q_n, q_free, ()] if q_first else [q_n, (), q_free]
    else:
        out_rank = len(hint_shape(prod))
        if len(summed) != 1:
            raise Refused("normaliser", "the normaliser sums the product over several axes", prod)
        axis = summed[0] % out_rank
        pq = [()] * (out_rank - len(runs_q)) + list(runs_q)
        pk = [()] * (out_rank - len(runs_k)) + list(runs_k)
        if len(pq) != out_rank or len(pk) != out_rank or pq[axis] != feature or pk[axis] != feature:
            raise Refused("normaliser", "the normaliser's product is not summed over the features of phi(q)", prod)
        if any(x != y and not (y == () and x == query_only) for x, y in zip(pq, pk)):
            raise Refused("normaliser", "the normaliser pairs a query row with another row of the sum over phi(k) "
                                        "(another position, batch or head)", prod)
        rows = [x for i, x in enumerate(pq) if i != axis or _keepdim(where)]
        if _keepdim(where):
            rows[axis] = ()
    rows = _runs(top, rows, shape_q)
    end = top[0] if top else where
    if rows is None or not rows or rows[-1] != () or hint_shape(end)[-1] != 1 \
            or tuple(a for run in rows for a in run) != tuple(a for a in range(rank - 1) if shape_q[a] > 1):
        raise Refused("normaliser", "the normaliser's rows are not phi(q)'s rows in their order with a trailing "
                                    "axis of one (transposed, permuted or broadcast against the output)", end)
    return time


def _runs(views, runs, sizes):
    """Each axis after ``views`` (outermost first) as the run of the base's axes it holds (row-major;
    () for an axis of one), from ``runs`` for the base's axes (of sizes ``sizes``); None where a view
    splits an axis of the base of size > 1 or broadcasts one to a size > 1."""
    runs = list(runs)
    for view in reversed(views):
        src, out = hint_shape(view.args[0]), hint_shape(view)
        if src is None or out is None or len(src) != len(runs):
            return None
        target, args = view.target, view.args
        if target is aten.permute.default:
            runs = [runs[d % len(src)] for d in args[1]]
        elif target is aten.transpose.int:
            d0, d1 = args[1] % len(src), args[2] % len(src)
            runs[d0], runs[d1] = runs[d1], runs[d0]
        elif target is aten.t.default:
            runs = runs[::-1]
        elif target in (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.contiguous.default,
                        aten.lift_fresh_copy.default):
            pass
        elif target is aten.expand.default:
            lead = len(out) - len(src)
            if any(out[i] != 1 for i in range(lead)) or any(src[i] != out[lead + i] for i in range(len(src))):
                return None
            runs = [()] * lead + runs
        else:                   # view / reshape / unsqueeze / squeeze / flatten: row-major over whole base axes
            atoms = [a for run in runs for a in run]
            new, i = [], 0
            for size in out:
                run, prod = (), 1
                while prod < size and i < len(atoms):
                    run, prod = run + (atoms[i],), prod * sizes[atoms[i]]
                    i += 1
                if prod != size:
                    return None
                new.append(run)
            if i != len(atoms):
                return None
            runs = new
    return runs


def read_feature_sum(gm: fx.GraphModule, node, top: tuple = ()) -> FeatureSum:
    """The feature normaliser ``node`` computes (``FeatureSum``); NotACandidate when it is none,
    Refused for a near-miss (a shifted running sum, another axis, eps after the reciprocal, ...).
    ``top``: the views met on the way down from the normaliser the caller divides by (outermost first):
    the rows of that tensor must be phi(q)'s rows in their order (``_rows_in_order``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise NotACandidate("not a normaliser")
    target = node.target
    if target in VIEW_OPS:
        return read_feature_sum(gm, node.args[0], top + (node,))
    if target is aten.add.Tensor:
        alpha = float(node.kwargs.get("alpha", 1))
        ca, cb = scalar_value(gm, node.args[0]), scalar_value(gm, node.args[1])
        if cb is None and ca is None:
            raise NotACandidate("a sum of tensors")
        inner, c = (node.args[0], cb * alpha) if cb is not None else (node.args[1], ca)
        found = read_feature_sum(gm, inner, top)
        if found.inverted:
            raise Refused("normaliser", "eps is added after the reciprocal", node)
        return FeatureSum(found.kind, found.eps + c, False, found.phi_q, found.cat_q, found.phi_k, found.cat_k,
                          found.factor, found.time, found.initial)
    if target is aten.reciprocal.default:
        found = read_feature_sum(gm, node.args[0], top)
        return FeatureSum(found.kind, found.eps, not found.inverted, found.phi_q, found.cat_q, found.phi_k,
                          found.cat_k, found.factor, found.time, found.initial)
    scaled = scalar_factor(gm, node)
    if scaled is not None:
        found = read_feature_sum(gm, scaled[0], top)
        if scaled[1] != 1.0:
            raise Refused("normaliser", f"the normaliser is scaled by {scaled[1]:g}", node)
        return found
    if target is aten.sum.dim_IntList and len(node.args) > 1 and node.args[1] is not None:
        prod = node.args[0]
        if not isinstance(prod, fx.Node) or prod.op != "call_function" or prod.target is not aten.mul.Tensor:
            raise NotACandidate("not a sum of a product")
        return _contraction(gm, prod, list(node.args[1]), node, top)
    if target is aten.bmm.default:
        return _contraction(gm, node, None, node, top)
    raise NotACandidate("not a feature normaliser")


def _contraction(gm, prod: fx.Node, summed, where: fx.Node, top: tuple) -> FeatureSum:
    a, b = prod.args[0], prod.args[1]
    for x, y in ((a, b), (b, a)):
        q_side = _feature_map(gm, x)
        if q_side is None:
            continue
        st = _state(gm, y)
        if st is None:
            if _feature_map(gm, y) is not None:
                raise NotACandidate("a product of two feature maps (the scores)")
            if not isinstance(y, fx.Node) or not y.op == "call_function":
                raise NotACandidate("phi(q) times a non-tensor")
            inner = read_views(gm, y, scalars=False).base
            if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target is aten.detach.default:
                raise Refused("normaliser", "the sum of phi(k) the normaliser contracts phi(q) with is detached "
                                            "(.detach(), or computed under torch.no_grad()): the operator would "
                                            "differentiate through it", where)
            raise Refused("normaliser", "the normaliser contracts phi(q) with something that is not a sum of "
                                        "phi(k) over time", where)
        if prod.target is aten.bmm.default:
            shape_a, shape_b = hint_shape(a), hint_shape(b)
            if len(shape_a) != 3 or len(shape_b) != 3 or shape_a[2] != hint_shape(q_side[1])[-1]:
                raise NotACandidate("the bmm does not contract phi(q)'s features")
        time = _pairing(prod, summed, x, q_side, st, where, top)
        kind, _dim, _keepdim, phi_k, cat_k, factor_k = st[:6]
        return FeatureSum(kind, 0.0, False, q_side[0], q_side[1], phi_k, cat_k, q_side[2] * factor_k, time, st[9])
    raise NotACandidate("no feature map of q in the contraction")


def time_axis(gm: fx.GraphModule, operand: fx.Node, along: int) -> tuple[fx.Node, int | None] | None:
    """(cat, its axis) for a matmul operand that is a feature map through views: the axis of the
    map's cat that moves along the operand's axis ``along`` (the scores' query or key axis), None where
    none or several move (above ``INDEX_MAX_ELEMENTS``: tracked through the views). None when it is no
    feature map."""
    found = _feature_map(gm, operand)
    if found is None:
        return None
    _, cat, _, views = found
    shape = tuple(hint_shape(cat))
    n = torch.Size(shape).numel()
    along %= len(hint_shape(operand))
    if n > INDEX_MAX_ELEMENTS:
        return cat, next((a for a in range(len(shape)) if through_views(views, a) == along), None)
    ids = _replay(views, torch.arange(n).view(shape))
    if ids.shape[along] < 2:
        return cat, None
    step = _coordinates(ids.narrow(along, 1, 1), shape) != _coordinates(ids.narrow(along, 0, 1), shape)
    moving = [a for a in range(len(shape)) if bool(step[..., a].any())]
    return cat, (moving[0] if len(moving) == 1 else None)
