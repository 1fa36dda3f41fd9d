"""Find Based attention in a lowered (ATen) graph and derive what it computes.

Quadratic forms are anchored on the ``bmm`` that multiplies the weights by V. Its first
operand is read backwards as an abstract value ``Weights = keep * P(q.k)``:

- the scores ``bmm`` gives P(x) = sigma * x (sigma: the scalar factors on q, k and the
  scores wherever they sit), or, when q and k went through explicit Taylor feature maps,
  phi(q).phi(k) as a polynomial (``feature_map.py``);
- scalar add / sub / mul / div / neg, ``pow``, ``square``, ``x * x`` build P (``polynomial.py``);
- ``masked_fill`` / ``where`` / multiplication by a 0/1 constant / ``tril`` / ``triu``
  intersect ``keep`` with a pattern evaluated at compile time (``mask.py``).

The normaliser is read from the user of the numerator: division by (or multiplication by
the reciprocal of) the row sums of weights, plus eps; those weights must be the same
abstract value as the numerator's. A numerator plus ``phi(q) @ kv_state`` and row sums plus
``phi(q) . k_state`` are a continued prefill from those initial states (``state_readout``). The
linear (cumsum) feature-map form is anchored on the
``cumsum`` of k (x) v (``match_linear``). Everything the reading cannot explain either ends
the candidate silently (``NotACandidate``: nothing Based-like) or refuses it with a
category (``Refused``); ``verify.py`` then settles layout and GQA group with a numerical probe.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_bool

from . import mask as masks
from . import polynomial
from .candidate import Match, Weights, pick_output, view_chain
from .canonicalize import (VIEW_OPS, example_value, fill_value, hint_shape, read_views, scalar_factor, scalar_value,
                           shape_of, specialised_value, through_views, track_axis, walk_operand)
from .evaluate import GraphEvaluator, NotConstant
from .feature_map import (describe_unread, features_first, other_readings, pair_feature_maps, read_feature_map,
                          same_feature_map, unread_reason)
from .feature_normaliser import read_feature_sum, time_axis
from . import kv_mask
from .linear_form import match_linear, match_state_product, read_state_sum
from .refusal import NotACandidate, Refused
from .score_scale import ScoreScale
from .state_readout import initial_states, read_state_term

aten = torch.ops.aten
log = logging.getLogger("based_compile")


def _lengths(scores: fx.Node) -> tuple:
    """(Tq, Tk) of a [.., Tq, Tk] scores node: ints, or size expressions under dynamic shapes."""
    return tuple(masks.size_expr(s) for s in shape_of(scores)[-2:])


def _normalise_dims(dims, rank: int) -> list[int]:
    if isinstance(dims, int):
        dims = [dims]
    return sorted(d % rank for d in dims)


# Elementwise ops that are polynomials (or, dividing, rational functions that ``polynomial.fit``
# refuses) in their tensor operands for scalar other operands: the only ops ``_read_pointwise``
# reads by evaluation.
POLYNOMIAL_OPS = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar,
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.positive.default,
    aten.addcmul.default, aten.addcdiv.default, aten.lerp.Scalar, aten.lerp.Tensor, aten.square.default,
    aten.pow.Tensor_Scalar,
}


class Matcher:
    """Matches one lowered graph. ``variable``: placeholders that are not compile-time constants."""

    def __init__(self, gm: fx.GraphModule, evaluator: GraphEvaluator, variable: set):
        self.gm = gm
        self.evaluator = evaluator
        self.variable = variable
        self._weights: dict[fx.Node, Weights | Exception] = {}
        self._more_queries: set = set()      # scores matmuls with more rows (queries) than columns (keys)
        self._constants: dict[fx.Node, torch.Tensor | None] = {}

    # ------------------------------------------------------------------ constants

    def constant(self, node) -> torch.Tensor | None:
        """The compile-time value of a tensor that depends only on constants, buffers and sizes. A value
        computed from a symbolic size (``torch.tensor(float(k.shape[-2])).sqrt()`` under dynamic shapes) is
        evaluated at the traced size, so those sizes are specialised (guarded, ``specialised_value``): a call
        at another length recompiles instead of reusing the number (it was baked silently)."""
        if not isinstance(node, fx.Node) or not isinstance(shape_of(node), tuple):
            return None
        if node in self._constants:
            return self._constants[node]
        value = None
        if not self.evaluator.depends_on(node, self.variable):
            try:
                value = self.evaluator.evaluate(node)
            except NotConstant:
                value = None
            if value is not None:
                for size in self.evaluator.symbolic_values_read(node):
                    specialised_value(size)
        self._constants[node] = value
        return value

    def _buffers(self, node) -> frozenset:
        return frozenset(p for p in self.evaluator.placeholders_read(node)
                         if isinstance(self.evaluator.inputs[p], torch.Tensor))

    # ------------------------------------------------------------------ scores

    def scores(self, node: fx.Node) -> Weights:
        t, tk = hint_shape(node)[-2], hint_shape(node)[-1]
        tk = None if tk == t else tk
        x, y = walk_operand(self.gm, node.args[0]), walk_operand(self.gm, node.args[1])
        phi_q = read_feature_map(self.gm, x.stop) if x.stop.op == "call_function" else None
        phi_k = read_feature_map(self.gm, y.stop) if y.stop.op == "call_function" else None
        for phi, side in ((phi_q, x), (phi_k, y)):
            why = unread_reason(self.gm, side.stop) if phi is None and side.stop.op == "call_function" else None
            if why is not None:
                raise Refused("feature_map", why, node)
        if phi_q is not None or phi_k is not None:
            if (phi_q is None or phi_k is None) and read_state_sum(self.gm, node) is not None:
                raise NotACandidate("phi(k) times v summed over time: a state, read by its readout")
            if phi_q is None or phi_k is None:
                side, name = (x, "q") if phi_q is None else (y, "k")
                why = describe_unread(self.gm, side.stop) if side.stop.op == "call_function" else None
                raise Refused("feature_map", f"phi({'k' if name == 'q' else 'q'}) is read as a feature map but "
                                             f"{name}'s side is not: {why}" if why is not None else
                              "only one of q and k goes through a feature map", node)
            poly = polynomial.scale(pair_feature_maps(phi_q, phi_k), x.factor * y.factor)
            return Weights(poly, None, False, node, phi_q.source, phi_k.source, "feature-map quadratic",
                           None, t, hint_shape(node), (1, 2), tk=tk, lengths=_lengths(node),
                           q_alternatives=other_readings(self.gm, x.stop, phi_q),
                           k_alternatives=other_readings(self.gm, y.stop, phi_k))
        if shape_of(x.source) is None or shape_of(y.source) is None:
            raise NotACandidate("scores operands are not tensors")
        sigma = x.factor * y.factor
        return Weights((0.0, sigma), None, False, node, x.source, y.source, "quadratic", None, t,
                       hint_shape(node), (1, 2), k_alternatives=y.alternatives, tk=tk, lengths=_lengths(node),
                       q_alternatives=x.alternatives)

    # ------------------------------------------------------------------ weights

    def weights(self, node: fx.Node) -> Weights:
        cached = self._weights.get(node)
        if isinstance(cached, Exception):
            raise cached
        if cached is not None:
            return cached
        try:
            value = self._read_weights(node)
        except (NotACandidate, Refused) as err:
            self._weights[node] = err
            raise
        self._weights[node] = value
        return value

    def _mask(self, w: Weights, keep: masks.Keep, source) -> Weights:
        _not_normalised(w)
        new_keep = keep if w.keep is None else _intersect(w.keep, keep)
        junk = w.junk
        if junk and w.keep is not None and _hides(keep, w.keep):
            junk = False                    # the new mask hides everything the old one left behind
        buffers = w.buffers | (self._buffers(source) if isinstance(source, fx.Node) else frozenset())
        return replace(w, keep=new_keep, junk=junk, buffers=buffers)

    def _with_poly(self, w: Weights, poly, *, junk=None, s_scale=None, node=None) -> Weights:
        """``w`` with the polynomial ``poly``; ``node``: the op, which does not commute with a scale of the
        weights read at run time (a sum, a power; None: a constant factor, which does)."""
        _not_normalised(w)
        if node is not None:
            _unscaled(w, node)
        return replace(w, poly=poly, junk=w.junk if junk is None else junk,
                       s_scale=w.s_scale if s_scale is None else s_scale)

    def _row_normalised(self, node, weights_arg, z_arg, *, divide: bool) -> Weights:
        """weights / (row sums + eps) (or * reciprocal): normalised before the matmul with V."""
        w = self.weights(weights_arg)
        wz, eps, inverted = self.normaliser(z_arg)
        if wz.k_state_term is not None:
            raise Refused("state", "the weights are divided by their row sums plus phi(q) . k_state before the "
                                   "matmul with v: the earlier tokens' values (phi(q) kv_state) are not in the "
                                   "numerator", node)
        if inverted == divide:
            raise Refused("normaliser", "divides by the reciprocal of the row sums" if divide else
                          "multiplies the weights by their row sums instead of dividing", node)
        _not_normalised(w)
        for x in (w, wz):
            if x.out_scale is not None:
                raise Refused("unsupported", _NORMALISED_SCALE, node)
        w = self._broadcast(node, w)
        if not _constant_along(z_arg, node, w.axes[1]):
            raise Refused("normaliser", "the row sums are broadcast along the key axis (each column divided by "
                                        "another row's sum), not along the query axis", node)
        why = self._normaliser_mismatch(wz, w)
        if why is not None:
            raise Refused("normaliser", why, node)
        self._rows_in_place(z_arg, node, w.axes[0])
        return replace(w, row_normalised=eps)

    def _rows_in_place(self, den, divided: fx.Node, query_axis: int) -> None:
        """The row sums ``den`` of a division ``divided`` run along the query axis of what they divide
        (``query_axis`` of ``divided``): their query axis tracked through every view between the sum
        and the division (``track_axis``). A sum transposed between heads and time (H == T) or merged
        away is Refused; a feature normaliser is not a row sum (its own reader checks it)."""
        views, node = [], den
        while True:
            if not isinstance(node, fx.Node) or node.op != "call_function":
                return
            target = node.target
            if target in VIEW_OPS and isinstance(node.args[0], fx.Node):
                views.append(node)
                node = node.args[0]
            elif target is aten.add.Tensor and scalar_value(self.gm, node.args[1]) is not None:
                node = node.args[0]
            elif target is aten.add.Tensor and scalar_value(self.gm, node.args[0]) is not None:
                node = node.args[1]
            elif target is aten.add.Tensor and self._beside_state_term(node) is not None:
                node = self._beside_state_term(node)        # row sums + phi(q) . k_state: the row sums
            elif target is aten.reciprocal.default:
                node = node.args[0]
            elif target in (aten.clamp.default, aten.clamp_min.default) and _clamp_max(node) is None:
                node = node.args[0]                          # a clamp that never binds (normaliser read it)
            elif scalar_factor(self.gm, node) is not None:
                node = scalar_factor(self.gm, node)[0]
            elif target in (aten.sum.dim_IntList, aten.bmm.default, aten.linalg_vector_norm.default):
                break
            else:
                return
        norm = target is aten.linalg_vector_norm.default
        try:
            if target is aten.bmm.default:
                raise NotACandidate("a contraction of features")
            w = self.weights(_abs_of(node.args[0]) if _abs_of(node.args[0]) is not None else node.args[0])
        except NotACandidate:                        # a feature normaliser: its pairing is read by its reader;
            if any(_moves_axes(view) for view in views):    # an axis moved after it is not traced here
                raise Refused("normaliser", "the normaliser on the features is transposed (permute/transpose) "
                                            "before it divides: its query axis is not traced", divided)
            return
        at = 3 if norm else 2
        keepdim = bool(node.args[at] if len(node.args) > at else node.kwargs.get("keepdim", False))
        qa, ka = w.axes
        axis = qa if keepdim or qa < ka else qa - 1
        axis = through_views(views, axis)
        rank_den, rank_out = len(hint_shape(den) or ()), len(hint_shape(divided) or ())
        if axis is None or axis + rank_out - rank_den != query_axis:
            raise Refused("normaliser", "the row sums' query axis does not run along the numerator's query axis "
                                        "(transposed between heads and time, or merged by a view)", divided)

    def _normaliser_with_state(self, add: fx.Node, top: tuple) -> tuple[Weights, float, bool]:
        """A sum (of sums: ``add`` and the adds under it) of the row sums, one phi(q) . k_state term
        (``state_readout``) and numbers (eps): (the row sums' weights with the term, eps, inverted)."""
        leaves, stack = [], [add]
        while stack:
            node = stack.pop()
            if isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.add.Tensor \
                    and float(node.kwargs.get("alpha", 1)) == 1.0:
                stack.extend(node.args[1::-1])
            else:
                leaves.append(node)
        eps = sum(c for c in (scalar_value(self.gm, x) for x in leaves) if c is not None)
        tensors = [x for x in leaves if scalar_value(self.gm, x) is None]
        if len(tensors) != 2 or not all(isinstance(x, fx.Node) for x in tensors):
            raise NotACandidate("not a sum of the row sums and one other tensor")
        for rows, other in (tensors, tensors[::-1]):
            try:
                term = read_state_term(self.gm, self.evaluator, other, "k", None, set(), add)
                w, eps_rows, inverted = self.normaliser(rows, top)
            except NotACandidate:
                continue
            if self.evaluator.depends_on(term.state.source, {w.q, w.k}):
                continue
            if term.phi.source is not w.q:
                raise Refused("state", "phi(q) . k_state reads another query than the attention's (phi of another "
                                       "tensor): not the queries' view of the earlier tokens", add)
            if inverted:
                raise Refused("normaliser", "a term is added to the reciprocal of the row sums", add)
            if w.k_state_term is not None:
                raise Refused("state", "two k_state terms are added to the row sums", add)
            return replace(w, k_state_term=term), eps + eps_rows, False
        raise NotACandidate("sum of two tensors")

    def _beside_state_term(self, add: fx.Node):
        """The operand of ``add`` that a phi(q) . state term (``state_readout``) is added to, or None."""
        if not all(isinstance(a, fx.Node) for a in add.args[:2]):
            return None
        for rows in add.args[:2]:
            base = read_views(None, rows, scalars=False).base
            if not (isinstance(base, fx.Node) and base.op == "call_function"
                    and base.target in (aten.sum.dim_IntList, aten.sum.default)):
                continue
            try:
                self.weights(base.args[0])
            except NotACandidate:
                continue
            return rows
        return None

    def _feature_normaliser(self, node: fx.Node, top: tuple = ()) -> Weights:
        """A normaliser written on the features (``feature_normaliser``), phi(q) . cumsum(phi(k)) or
        phi(q) . sum(phi(k)) (read from the contraction outwards: eps and the reciprocal are read by
        ``normaliser``), as the weights it sums; Refused for a near-miss (a shifted running sum, ...)."""
        found = read_feature_sum(self.gm, node, top)
        if found.initial is not None:
            raise Refused("normaliser", "the normaliser's running sum of phi(k) starts from an initial k_state, but "
                                        "the numerator is the quadratic form (no initial kv_state): not rewritten",
                          found.initial[0])
        return Weights(found.poly, found.keep, False, None, found.phi_q.source, found.phi_k.source,
                       "feature normaliser", None, hint_shape(found.cat_q)[-2], feature_sum=found)

    def _normaliser_mismatch(self, wz: Weights, w: Weights) -> str | None:
        """Why the normaliser ``wz`` does not sum the numerator's weights ``w`` (None when it does: the
        same function of q.k, mask, q and k; a feature normaliser also over the very feature maps the
        scores multiply, along the numerator's time axis, at equal lengths)."""
        difference = wz.difference(w)
        if difference is not None:
            return f"the normaliser {difference}"
        found = wz.feature_sum
        if found is None:
            return None
        if w.tk is not None or w.scores is None or w.scores.target is not aten.bmm.default:
            return "the normaliser is written on the features but the numerator's scores are not phi(q) @ phi(k)^T"
        # the scores' query rows (axis 1 of [N, T, F]) and key columns (axis 2 of [N, F, T]) run along
        # the axis of the maps' cats (the leading axes of q and k) that the normaliser sums over; the
        # cats are the normaliser's, or compute the same map of the same tensor (phi(q) called twice); phi
        # of another view of q or k is another function
        for operand, along, cat, name in ((w.scores.args[0], 1, found.cat_q, "query"),
                                          (w.scores.args[1], 2, found.cat_k, "key")):
            read = time_axis(self.gm, operand, along)
            if read is None or not same_feature_map(self.gm, read[0], cat):
                whose = "queries" if name == "query" else "keys"
                return f"the normaliser's {name} feature map is not the one the numerator's scores read (another " \
                       f"map, or the map of another tensor or view of the {whose})"
            if read[1] != found.time:
                return f"the normaliser sums phi(k) over another axis than the numerator's {name} axis"
        return None

    def _broadcast(self, node: fx.Node, w: Weights) -> Weights:
        """``w`` as seen in the (possibly broadcast, higher-rank) output of ``node``."""
        out = hint_shape(node)
        shift = len(out) - len(w.shape)
        if shift < 0 or any(out[a + shift] != w.shape[a] for a in w.axes):
            raise NotACandidate("broadcast changes the [T, T] axes")
        if shift == 0 and out == w.shape:
            return w
        return replace(w, shape=out, axes=(w.axes[0] + shift, w.axes[1] + shift))

    def _keep_of(self, mask_node, w: Weights, invert: bool, where: fx.Node) -> masks.Keep:
        """What the mask ``mask_node`` keeps of ``w``, read from its structure (``mask.keep_of``)."""
        try:
            return masks.keep_of(self.gm, mask_node, len(w.shape), w.axes, self.constant, invert=invert,
                                 lengths=w.lengths)
        except masks.MaskError as err:
            raise Refused("mask", str(err), where) from err

    def _read_weights(self, node: fx.Node) -> Weights:
        if node.op != "call_function":
            raise NotACandidate(f"{node.op} {node.name}")
        target = node.target
        args = node.args
        if target is aten.bmm.default:
            shape = hint_shape(node)
            if shape is None or len(shape) != 3:
                raise NotACandidate("bmm output is not 3-d")
            if shape[-2] > shape[-1]:
                kv_mask.guard_more_queries(*shape_of(node)[-2:])
                try:        # read on, so that attention with more queries than keys is refused, not unseen
                    scores = self.scores(node)
                except (NotACandidate, Refused) as err:
                    raise NotACandidate("bmm output has more rows (queries) than columns (keys)") from err
                self._more_queries.add(node)
                return scores
            return self.scores(node)
        if target in VIEW_OPS:
            w = self.weights(args[0])
            ai, aj = (track_axis(node, a) for a in w.axes)
            if ai is None or aj is None:
                raise NotACandidate("a view merges or splits the [T, T] axes of the weights")
            if ai > aj and w.scores in self._more_queries:
                raise NotACandidate("transposed weights of queries and keys of different lengths")
            if ai > aj:      # (k @ q.mT).mT: the scores of the swapped operands, transposed back
                return _swapped(replace(w, shape=hint_shape(node), axes=(aj, ai)))
            return replace(w, shape=hint_shape(node), axes=(ai, aj))
        scaled = scalar_factor(self.gm, node)
        if scaled is not None:
            w = self.weights(scaled[0])
            return self._with_poly(w, polynomial.scale(w.poly, scaled[1]))
        if target in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Scalar, aten.rsub.Tensor):
            return self._read_add(node)
        if target in (aten.pow.Tensor_Scalar, aten.square.default):
            w = self.weights(args[0])
            n = 2.0 if target is aten.square.default else scalar_value(self.gm, args[1])
            if n is None or n != int(n) or n < 0:
                raise Refused("polynomial", f"weights raised to the power {args[1]!r}", node)
            if n == 0:
                # w ** 0 is 1 everywhere (pow(x, 0) = 1 for every x, nan and inf included: the term of degree
                # 0 of a Taylor sum written sum(s ** i / i!)); what a mask zeroed becomes 1, as with w + c
                return self._with_poly(w, (1.0,), junk=w.junk or w.keep is not None, node=node)
            s_scale = w.poly[1] if (int(n) == 2 and polynomial.is_monomial(w.poly, 1)) else None
            return self._with_poly(w, polynomial.power(w.poly, int(n)), s_scale=s_scale, node=node)
        if target is aten.mul.Tensor:
            return self._read_mul(node)
        if target is aten.div.Tensor and isinstance(args[1], fx.Node):
            return self._read_divided(node)
        if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            w = self.weights(args[0])
            fill = fill_value(self.gm, args[2])
            if fill is None or fill != 0.0:
                cat = "unsupported" if fill is not None and fill == float("-inf") else "mask"
                raise Refused(cat, f"masked_fill with {args[2]!r}, not 0 (softmax-style masking)" if cat ==
                              "unsupported" else f"masked entries are set to {args[2]!r}, not 0", node)
            w = self._broadcast(node, w)
            return self._mask(w, self._keep_of(args[1], w, True, node), args[1])
        if target is aten.where.self:
            cond, a, b = args
            for weights_arg, other, invert in ((a, b, False), (b, a, True)):
                try:
                    w = self.weights(weights_arg) if isinstance(weights_arg, fx.Node) else None
                except NotACandidate:
                    continue
                if w is None:
                    continue
                if fill_value(self.gm, other) != 0.0:
                    raise Refused("mask", f"torch.where fills masked weights with {other!r}, not 0", node)
                w = self._broadcast(node, w)
                return self._mask(w, self._keep_of(cond, w, invert, node), cond)
            raise NotACandidate("where without weights")
        if target in (aten.tril.default, aten.triu.default):
            w = self.weights(args[0])
            if w.axes != (len(w.shape) - 2, len(w.shape) - 1):
                raise Refused("unsupported", "tril/triu over axes that are not the weights' [T, T] axes", node)
            diagonal = masks.size_expr(args[1] if len(args) > 1 else node.kwargs.get("diagonal", 0))
            if diagonal is None:
                raise Refused("mask", f"tril/triu with diagonal {args[1]!r}", node)
            keep = masks.Keep.diagonal("tril" if target is aten.tril.default else "triu", diagonal)
            return self._mask(w, keep, None)
        if target in (aten._softmax.default, aten.exp.default):
            try:
                self.weights(args[0])
            except (NotACandidate, Refused):
                raise NotACandidate(f"{target} of something that is not attention scores") from None
            raise Refused("unsupported", "softmax attention (exp of the scores): not Based's polynomial "
                                         "kernel, left to the inner compiler", node)
        if torch.Tag.pointwise in getattr(target, "tags", ()):
            return self._read_pointwise(node)
        raise NotACandidate(f"unsupported op {target}")

    def _read_pointwise(self, node: fx.Node) -> Weights:
        """An elementwise function of the weights of one score matrix (and of scalars) built from
        sums and products (``POLYNOMIAL_OPS``: ``addcmul``, ``addcdiv``, ``lerp``, ...), read by
        evaluating it: P is fitted through probe values of q.k (``polynomial.fit``); a function that
        is not a polynomial is refused. Evaluation at finitely many points proves nothing about a
        piecewise function (``clamp(max=20)``, ``hardtanh``, ``fmod`` agree with a polynomial
        wherever the probe points land): any other elementwise op is refused without evaluating."""
        value = example_value(node)
        if not (isinstance(value, torch.Tensor) and value.dtype.is_floating_point):
            raise NotACandidate(f"{node.target} does not compute weights (not floating point)")
        weights, seen = [], {}
        for arg in node.all_input_nodes:
            if arg in seen or scalar_value(self.gm, arg) is not None:
                continue
            w = self.weights(arg)          # NotACandidate: not a function of the weights alone
            _not_normalised(w)
            _unscaled(w, node)
            seen[arg] = w
            weights.append(w)
        if not weights:
            raise NotACandidate("no weights among the operands")
        first = weights[0]
        if any(w.q is not first.q or w.k is not first.k or w.score_scale != first.score_scale for w in weights):
            raise NotACandidate(f"{node.target} of weights of different scores")
        # a cast (a value-changing _to_copy, canonicalize) keeps the weights' zeros (a mask) and is read as what
        # it is: a widening is exact (the weights as they were; what the operator computes in, and whether eager
        # returns wider than it would, is autocast_scope.operator_precision's); any other is read by evaluation,
        # where a rounding one fails to fit (refused, saying so) and precision.py refuses the round trips that
        # round (float64 -> float32 -> float64)
        cast = node.target is torch.ops.prims.convert_element_type.default
        if node.target not in POLYNOMIAL_OPS and not cast:
            raise Refused("polynomial", f"{node.target} of the scores is not a polynomial operation (only sums and "
                                        "products are read: a clamp, min/max, rounding or modulo is piecewise)", node)
        if not cast and any(w.keep is not None or w.junk for w in weights):
            raise Refused("mask", f"{node.target} applied to masked weights: the masked entries become "
                                  f"{node.target} of 0, not 0", node)
        broadcast = [self._broadcast(node, w) for w in weights]
        if any(w.axes != broadcast[0].axes for w in broadcast):
            raise NotACandidate("operands with different [T, T] axes")
        if cast and _widening(node):
            return broadcast[0]

        def at(x: float) -> float:
            probe = {arg: torch.tensor(_evaluate(w.poly, x), dtype=torch.float64) for arg, w in seen.items()}
            args = fx.node.map_arg(node.args, lambda n: probe.get(n, scalar_value(self.gm, n)))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: probe.get(n, scalar_value(self.gm, n)))
            return float(node.target(*args, **kwargs))

        poly = polynomial.fit(at)
        if poly is None and cast:
            raise Refused("unsupported", f"the weights cast from {_dtype_of(node.args[0])} to {_dtype_of(node)}, "
                                         "which rounds them: not a polynomial of q.k the operator computes", node)
        if poly is None:
            raise Refused("polynomial", f"{node.target} of the scores is not a polynomial in q.k (read by "
                                        f"evaluating it at {len(polynomial.FIT_POINTS)} points)", node)
        s_scale = next((w.s_scale for w in weights if w.s_scale is not None), None)
        return replace(broadcast[0], poly=poly, s_scale=s_scale,
                       buffers=frozenset().union(*(w.buffers for w in weights)))

    def _read_add(self, node: fx.Node) -> Weights:
        target, args = node.target, node.args
        alpha = node.kwargs.get("alpha", 1)
        a, b = args[0], args[1]
        sign_a, sign_b = 1.0, float(alpha)
        if target is aten.sub.Tensor:
            sign_b = -float(alpha)
        elif target in (aten.rsub.Scalar, aten.rsub.Tensor):        # b - alpha * a
            sign_a, sign_b = -float(alpha), 1.0
        ca, cb = scalar_value(self.gm, a), scalar_value(self.gm, b)
        if ca is not None or cb is not None:
            tensor_arg, const, sign_t, sign_c = (b, ca, sign_b, sign_a) if ca is not None else (a, cb, sign_a, sign_b)
            w = self.weights(tensor_arg)
            poly = polynomial.add(polynomial.scale(w.poly, sign_t), (sign_c * const,))
            junk = w.junk or (w.keep is not None and const != 0.0)
            return self._with_poly(w, poly, junk=junk, node=node)
        wa, wb = self.weights(a), self.weights(b)
        _not_normalised(wa)
        _not_normalised(wb)
        _unscaled(wa, node)
        _unscaled(wb, node)
        if wa.q is not wb.q or wa.k is not wb.k or wa.score_scale != wb.score_scale:
            raise NotACandidate("sum of weights of different scores")
        poly = polynomial.add(polynomial.scale(wa.poly, sign_a), polynomial.scale(wb.poly, sign_b))
        same_keep = (wa.keep is None and wb.keep is None) or (
            wa.keep is not None and wb.keep is not None and wa.keep == wb.keep)
        keep = wa.keep if same_keep else (wb.keep if wa.keep is None else
                                          (wa.keep if wb.keep is None else _intersect(wa.keep, wb.keep)))
        junk = wa.junk or wb.junk or not same_keep
        s_scale = wa.s_scale if wa.s_scale is not None else wb.s_scale
        wa, wb = self._broadcast(node, wa), self._broadcast(node, wb)
        if wa.axes != wb.axes:
            raise NotACandidate("sum of weights with different axes")
        return replace(wa, poly=poly, keep=keep, junk=junk, s_scale=s_scale, buffers=wa.buffers | wb.buffers)

    def _read_mul(self, node: fx.Node) -> Weights:
        a, b = node.args[0], node.args[1]
        wa = wb = None
        try:
            wa = self.weights(a) if isinstance(a, fx.Node) else None
        except NotACandidate:
            pass
        try:
            wb = self.weights(b) if isinstance(b, fx.Node) else None
        except NotACandidate:
            pass
        if wa is not None and wb is not None:
            _not_normalised(wa)
            _not_normalised(wb)
            _unscaled(wa, node)
            _unscaled(wb, node)
            if wa.q is not wb.q or wa.k is not wb.k or wa.score_scale != wb.score_scale:
                raise NotACandidate("product of weights of different scores")
            s_scale = None
            if a is b and polynomial.is_monomial(wa.poly, 1):
                s_scale = wa.poly[1]
            else:
                s_scale = wa.s_scale if wa.s_scale is not None else wb.s_scale
            keep = wa.keep if wb.keep is None else (wb.keep if wa.keep is None else _intersect(wa.keep, wb.keep))
            wa, wb = self._broadcast(node, wa), self._broadcast(node, wb)
            if wa.axes != wb.axes:
                raise NotACandidate("product of weights with different axes")
            return replace(wa, poly=polynomial.mul(wa.poly, wb.poly), keep=keep, junk=wa.junk or wb.junk,
                           s_scale=s_scale, buffers=wa.buffers | wb.buffers)
        w, other = (wa, b) if wa is not None else (wb, a)
        if w is None:
            raise NotACandidate("product without weights")
        if self._variable(other):
            try:
                return self._row_normalised(node, a if w is wa else b, other, divide=False)
            except NotACandidate:
                pass
        return self._read_scaled(node, w, other, 1)

    def _variable(self, other) -> bool:
        return not isinstance(other, fx.Node) or self.evaluator.depends_on(other, self.variable)

    def _read_divided(self, node: fx.Node) -> Weights:
        """weights / x: divided by their row sums (normalised before the matmul with v), else by a
        factor (``_read_scaled``: division by a one-element tensor is multiplication by its reciprocal)."""
        try:
            return self._row_normalised(node, node.args[0], node.args[1], divide=True)
        except NotACandidate:
            pass
        return self._read_scaled(node, self.weights(node.args[0]), node.args[1], -1)

    def _read_scaled(self, node: fx.Node, w: Weights, other, power: int) -> Weights:
        """``w`` times (``power`` 1) or divided by (-1) the tensor ``other``, which is not a row sum of
        the weights. One element and a compile-time constant: a number in P. One element and not a
        constant (a learnable parameter, a scale computed from the inputs), on the raw scores, masked or
        not (a mask fills zeros: c (keep s) = keep (c s)): a scale read at run time (``score_scale``; the
        op reads q times it); after the polynomial, a scale of the weights (``out_scale``: of an
        unnormalised output, the op's output times it). Anything else is refused with what it is (a
        scale computed from the scores, a
        per-head or per-query scale) or, multiplying, read as a mask."""
        verb = "multiplied" if power == 1 else "divided"
        if not isinstance(other, fx.Node) or hint_shape(other) is None:
            raise NotACandidate(f"weights {verb} by something that is not a tensor")
        if not self._variable(other):
            if _one_element(other):                 # a scalar factor (a 0-d or one-element constant)
                value = self.constant(other)
                if value is None:
                    raise Refused("mask", f"weights {verb} by a tensor that is not a compile-time constant", node)
                c = float(value.reshape(()).item())
                if power == -1 and c == 0.0:
                    raise Refused("polynomial", "the scores are divided by a constant zero", node)
                return self._with_poly(w, polynomial.scale(w.poly, c if power == 1 else 1.0 / c))
            if _same_along_weights(other, w):
                # a constant of more than one element that is the same along the query and key axes: a number
                # where all its elements are one (a constant is a value, not a spelling), else a per-head scale
                value = self.constant(other)
                if value is not None and value.numel() and bool((value == value.reshape(-1)[0]).all()):
                    c = float(value.reshape(-1)[0].item())
                    if power == -1 and c == 0.0:
                        raise Refused("polynomial", "the scores are divided by a constant zero", node)
                    w = self._broadcast(node, w)
                    return self._with_poly(w, polynomial.scale(w.poly, c if power == 1 else 1.0 / c))
                what = "scores" if polynomial.is_monomial(w.poly, 1) else "weights"
                raise Refused("unsupported", f"the {what} are {verb} by a constant tensor of shape "
                                             f"{tuple(hint_shape(other))} that is the same along the query and key "
                                             "axes and differs between heads or batch entries (a per-head scale): "
                                             "the operator takes one scale for every head (a per-head scale of q "
                                             "before the scores is read)", node)
            if power == -1:
                raise NotACandidate("weights divided by a constant tensor of more than one element")
            w = self._broadcast(node, w)
            return self._mask(w, self._keep_of(other, w, False, node), other)
        if w.scores is not None and self.evaluator.depends_on(other, {w.scores}):
            raise Refused("unsupported", f"the weights are {verb} by a tensor of shape {tuple(hint_shape(other))} "
                                         "computed from the scores themselves (their sum, mean or max, not the row "
                                         "sums of the weights): the operator never forms the T x T scores, so it "
                                         "cannot read a scale computed from them", node)
        if _one_element(other):
            if getattr(example_value(other), "dtype", None) != getattr(example_value(w.q), "dtype", 0):
                raise Refused("unsupported", f"the scores are {verb} by a one-element tensor of another dtype "
                                             f"({getattr(example_value(other), 'dtype', None)}) than q's "
                                             f"({getattr(example_value(w.q), 'dtype', None)}): not read (what "
                                             "the product is rounded to follows type promotion)", node)
            if polynomial.is_monomial(w.poly, 1) and not w.junk and w.out_scale is None:
                # on the raw scores, masked or not: a mask fills zeros (or multiplies), and c (keep sigma s) is
                # keep (sigma c s); sigma c (q.k) = sigma ((c q) . k): the op reads q times c (or q / c), c as
                # the graph computes it
                scale = (w.score_scale or ScoreScale()).times(other, power)
                return replace(self._broadcast(node, w), score_scale=scale)
            # after the polynomial: c P(s) is not P(c s), but (c P(s)) @ v is c (P(s) @ v), the output times c
            # (masks and constant factors commute with it; a sum, a power or a normaliser do not: refused)
            if len(hint_shape(other)) > 4:
                raise Refused("unsupported", f"the weights are {verb} by a one-element tensor of rank "
                                             f"{len(hint_shape(other))} (more axes than the output's)", node)
            scale = (w.out_scale or ScoreScale()).times(other, power)
            return replace(self._broadcast(node, w), out_scale=scale)
        shape = tuple(hint_shape(other))
        if _same_along_weights(other, w):
            raise Refused("unsupported", f"the weights are {verb} by a tensor of shape {shape} that is the same "
                                         "along the query and key axes (a per-head or per-batch scale, e.g. an "
                                         "nn.Parameter [1, H, 1, 1]) and not a compile-time constant: the operator "
                                         "takes one scale for every head (a per-head scale of q before the scores "
                                         "is read)", node)
        if power == -1:
            raise Refused("unsupported", f"the weights are divided by a tensor of shape "
                                         f"{shape} that varies along the query or key axis "
                                         "and is neither their row sums nor a compile-time constant (a per-query "
                                         "temperature?): the operator takes one scale", node)
        raise Refused("mask", masks.passed_in_reason(self.gm, other)
                      or "weights multiplied by a tensor that is not a compile-time constant", node)

    # ------------------------------------------------------------------ normaliser

    def normaliser(self, node, top: tuple = ()) -> tuple[Weights, float, bool]:
        """(weights summed, eps, inverted) for a row-sum normaliser expression; ``top``: the views met on
        the way down (outermost first), for a normaliser written on the features."""
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise NotACandidate("not a normaliser")
        target, args = node.target, node.args
        if target in VIEW_OPS:
            return self.normaliser(args[0], top + (node,))
        if target is aten.add.Tensor:
            alpha = float(node.kwargs.get("alpha", 1))
            ca, cb = scalar_value(self.gm, args[0]), scalar_value(self.gm, args[1])
            if cb is not None or ca is not None:
                tensor_arg, c = (args[0], cb * alpha) if cb is not None else (args[1], ca)
                w, eps, inverted = self.normaliser(tensor_arg, top)
                if inverted:
                    raise Refused("normaliser", "eps is added after the reciprocal of the row sums", node)
                return w, eps + c, inverted
            if alpha == 1.0:               # row sums + phi(q) . k_state (+ eps), in any order: the earlier tokens
                return self._normaliser_with_state(node, top)
            raise NotACandidate("sum of two tensors")
        if target is aten.reciprocal.default:
            w, eps, inverted = self.normaliser(args[0], top)
            return w, eps, not inverted
        scaled = scalar_factor(self.gm, node)
        if scaled is not None:
            w, eps, inverted = self.normaliser(scaled[0], top)
            if scaled[1] != 1.0:
                raise Refused("normaliser", f"the row sums are scaled by {scaled[1]:g}", node)
            return w, eps, inverted
        if target is aten.linalg_vector_norm.default:
            return self._one_norm(node, node.args[0], node.args[1] if len(node.args) > 1 else 2,
                                  node.args[2] if len(node.args) > 2 else None), 0.0, False
        if target is aten.sum.dim_IntList and _abs_of(args[0]) is not None:      # a.abs().sum(-1): a 1-norm
            return self._one_norm(node, _abs_of(args[0]), 1, args[1] if len(args) > 1 else None), 0.0, False
        if target in (aten.sum.dim_IntList, aten.sum.default):
            x = args[0]
            rank = len(hint_shape(x))
            dims = _normalise_dims(args[1], rank) if len(args) > 1 and args[1] is not None else list(range(rank))
            try:
                w = self.weights(x)
            except NotACandidate:
                if target is aten.sum.dim_IntList:
                    return self._feature_normaliser(node, top), 0.0, False
                raise
            if dims != [w.axes[1]]:
                raise Refused("normaliser", _not_key_axis(dims, w), node)
            return w, 0.0, False
        if target is aten.bmm.default:
            return self._feature_normaliser(node, top), 0.0, False
        if target in (aten.clamp.default, aten.clamp_min.default) and _clamp_max(node) is None:
            w, eps, inverted = self.normaliser(args[0], top)
            self._clamp_never_binds(node, w, eps, inverted)
            return w, eps, inverted
        if target in (aten.clamp.default, aten.clamp_min.default, aten.maximum.default, aten.abs.default):
            try:
                self.normaliser(args[0])
            except NotACandidate:
                raise
            raise Refused("normaliser", f"the normaliser goes through {target}, not + eps", node)
        raise NotACandidate("not a normaliser")

    def _one_norm(self, node: fx.Node, x, order, dims) -> Weights:
        """The weights ``x`` summed as a p-norm over ``dims`` (``F.normalize``, ``vector_norm``, ``a.abs().sum``):
        their row sums when p = 1 and no weight is negative (|P| = P: P of least value >= 0 on the real line,
        masked entries 0); Refused otherwise."""
        if "dtype" in node.kwargs:
            raise Refused("normaliser", "the weights' norm is taken in another dtype (vector_norm(dtype=...))", node)
        try:
            w = self.weights(x)
        except NotACandidate:
            raise NotACandidate("not a norm of weights") from None
        if not isinstance(order, (int, float)) or float(order) != 1.0:
            raise Refused("normaliser", f"the weights are divided by their {order}-norm (F.normalize with p={order}, "
                                        f"vector_norm with ord={order}), not by their row sums", node)
        rank = len(hint_shape(x))
        if dims is None or _normalise_dims(dims, rank) != [w.axes[1]]:
            raise Refused("normaliser", _not_key_axis(None if dims is None else _normalise_dims(dims, rank), w), node)
        least = polynomial.minimum(w.poly)
        if least is None or least < 0.0 or w.out_scale is not None:
            raise Refused("normaliser", f"the weights are divided by the sums of their absolute values (a 1-norm: "
                                        f"F.normalize(p=1), vector_norm(ord=1), a.abs().sum()) and f = "
                                        f"{polynomial.describe(w.poly)} (x = q.k) "
                                        f"{'takes negative values' if w.out_scale is None else 'is scaled at run time'}"
                                        ": |f| is not f, and the operator sums f", node)
        return w

    def _clamp_never_binds(self, node: fx.Node, w: Weights, eps: float, inverted: bool) -> None:
        """Refused unless ``clamp_min(z + eps, c)`` of the row sums z of ``w`` is z + eps everywhere: every row
        keeps an entry (the masks the operator runs keep the diagonal, or the last Tk - Tq + i + 1 keys) and no
        entry is negative, so z is at least P's least value m, and c <= m + eps (F.normalize's eps, 1e-12,
        under Based's m = 1/2)."""
        bound = scalar_value(self.gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("min"))
        least = polynomial.minimum(w.poly)
        if inverted or bound is None or w.k_state_term is not None or w.out_scale is not None:
            raise Refused("normaliser", f"the normaliser goes through {node.target}, not + eps", node)
        if least is None or least < 0.0:
            raise Refused("normaliser", f"the row sums are clamped from below ({node.target}, min {bound:g}) and f = "
                                        f"{polynomial.describe(w.poly)} (x = q.k) takes negative values: the clamp "
                                        "may bind, and it is not + eps", node)
        if bound > least + eps:
            raise Refused("normaliser", f"the row sums are clamped from below ({node.target}, min {bound:g}) above "
                                        f"their least value {least + eps:g} (f = {polynomial.describe(w.poly)} >= "
                                        f"{least:g}, x = q.k{f', plus eps {eps:g}' if eps else ''}): the clamp binds "
                                        "on rows of small weights, and it is not + eps", node)

    def _find_normaliser(self, path: list[fx.Node], value_axis: int, query_axis: int | None = None):
        """(the division, the weights its normaliser sums, eps) on the numerator's path (``path``, from
        the bmm whose axis ``value_axis`` holds the values), or None. A normaliser that varies along the
        value axis (the row sums broadcast against another axis) is none."""
        for p in path:
            if p is not path[0]:
                value_axis = track_axis(p, value_axis) if value_axis is not None else None
                query_axis = track_axis(p, query_axis) if query_axis is not None else None
            for u in p.users:
                if u.op != "call_function":
                    continue
                if u.target in (aten.div.Tensor, aten.mul.Tensor) and p in u.args[:2]:
                    other = u.args[1] if u.args[0] is p else u.args[0]
                    if value_axis is None or not _constant_along(other, u, value_axis + len(hint_shape(u))
                                                                 - len(hint_shape(p))):
                        continue
                if u.target is aten.div.Tensor and u.args[0] is p and isinstance(u.args[1], fx.Node):
                    try:
                        w, eps, inverted = self.normaliser(u.args[1])
                    except NotACandidate:
                        continue
                    if inverted:
                        raise Refused("normaliser", "divides by the reciprocal of the row sums", u)
                    self._rows_in_place(u.args[1], u, -1 if query_axis is None else
                                        query_axis + len(hint_shape(u)) - len(hint_shape(p)))
                    return u, w, eps
                if u.target is aten.mul.Tensor and p in u.args[:2]:
                    other = u.args[1] if u.args[0] is p else u.args[0]
                    try:
                        w, eps, inverted = self.normaliser(other)
                    except NotACandidate:
                        continue
                    if not inverted:
                        raise Refused("normaliser", "multiplies by the row sums instead of dividing", u)
                    self._rows_in_place(other, u, -1 if query_axis is None else
                                        query_axis + len(hint_shape(u)) - len(hint_shape(p)))
                    return u, w, eps
        return None

    # ------------------------------------------------------------------ sites

    def _weights_transposed(self, node) -> Weights:
        """The weights read through views that put the key axis before the query axis (``a.mT`` as the
        right operand of ``v.mT @ a.mT``), without reading the swap as the scores of (k, q)."""
        walked = read_views(None, node, scalars=False)
        chain, node = walked.views, walked.base
        if not chain or not isinstance(node, fx.Node):
            raise NotACandidate("not transposed weights")
        w = self.weights(node)
        axes = w.axes
        axes = tuple(walked.lands(a) for a in axes)
        if None in axes:
            raise NotACandidate("a view merges or splits the [T, T] axes of the weights")
        return replace(w, shape=hint_shape(chain[0]), axes=axes)

    def match_quadratic(self, bmm: fx.Node) -> Match:
        a_node = bmm.args[0]
        try:
            w = self.weights(a_node)
        except NotACandidate:
            try:
                return self._match_transposed(bmm)
            except NotACandidate:
                return match_state_product(self, bmm)
        if w.scores is bmm:
            raise NotACandidate("scores")
        if w.axes != (1, 2):
            raise NotACandidate("the matmul does not contract the weights over the key axis")
        v_operand = walk_operand(self.gm, bmm.args[1], through_scalars=False)
        return self._match_tail(bmm, w, v_operand, view_chain(bmm))

    def _match_transposed(self, bmm: fx.Node) -> Match:
        """(v^T @ W^T)^T = W @ v: the weights transposed as the right operand; the output is the first
        view of the product with the query axis back before the value axis."""
        w = self._weights_transposed(bmm.args[1])
        if w.axes != (2, 1):
            raise NotACandidate("the matmul does not contract transposed weights over the key axis")
        chain, axis = view_chain(bmm), 2
        for i, node in enumerate(chain[1:], 1):
            axis = track_axis(node, axis)
            if axis is None:
                raise NotACandidate("a view merges the query axis of the transposed product")
            if len(hint_shape(node)) == 4 and axis == 2:
                break
        else:
            raise NotACandidate("the transposed product is not transposed back")
        v_operand = walk_operand(self.gm, bmm.args[0], through_scalars=False)
        value_axis = 1                      # [N, Dv, T]: tracked to the view the output is read from
        for node in chain[1:i + 1]:
            value_axis = track_axis(node, value_axis) if value_axis is not None else None
        return self._match_tail(bmm, replace(w, axes=(1, 2)), v_operand, chain[i:], value_axis, 2)

    def _match_tail(self, bmm: fx.Node, w: Weights, v_operand, path: list, value_axis: int | None = 2,
                    query_axis: int | None = 1) -> Match:
        if w.tk is not None and polynomial.degree(w.poly) < 2:
            raise NotACandidate("a product of rectangular matmuls without a polynomial: not attention-like")
        self._refuse_more_queries(w, bmm)
        v = v_operand.source
        kv_term = self._numerator_state(path, w, v, value_axis, query_axis)
        start = bmm
        if kv_term is not None:              # a @ v + phi(q) @ kv_state: the numerator is that sum
            add, term, value_axis, query_axis = kv_term
            path, start = view_chain(add), add
        found = self._find_normaliser(path, value_axis, query_axis)
        normalize, eps = w.row_normalised is not None, w.row_normalised or 0.0
        if found is not None and normalize:
            raise Refused("normaliser", "the output is normalised twice (weights and output)", found[0])
        k_term = None
        if found is not None:
            start, wz, eps = found
            why = self._normaliser_mismatch(wz, w)
            if why is not None:
                raise Refused("normaliser", why, start)
            normalize, k_term = True, wz.k_state_term
        if w.out_scale is not None and normalize:
            raise Refused("unsupported", _NORMALISED_SCALE, start)
        output = pick_output(start) if start is not bmm or path[0] is bmm else path[0]
        initial = None
        if kv_term is not None or k_term is not None:
            if w.tk is not None:
                raise Refused("unsupported", "a block of queries against a KV cache that also reads initial states "
                                             "(phi(q) . kv_state): not rewritten", start)
            initial = initial_states(None if kv_term is None else kv_term[1], k_term, w.poly, start)
        match = self._finish(w, "quadratic" if w.form == "quadratic" else w.form, output, w.q, w.k, v,
                             normalize, eps, w.scores, bmm)
        return replace(match, k_alternatives=w.k_alternatives, v_alternatives=v_operand.alternatives,
                       q_alternatives=w.q_alternatives, score_scale=w.score_scale, out_scale=w.out_scale,
                       initial=initial)

    def _numerator_state(self, path: list, w: Weights, v, value_axis, query_axis):
        """(the add, its StateTerm, the value and query axes in the add) when the numerator (``path``: the
        weights' product with v and its views) has phi(q) @ kv_state added, the earlier tokens' values,
        else None."""
        for p in path:
            if p is not path[0]:
                value_axis = track_axis(p, value_axis) if value_axis is not None else None
                query_axis = track_axis(p, query_axis) if query_axis is not None else None
            for u in p.users:
                if u.op != "call_function" or u.target is not aten.add.Tensor or p not in u.args[:2] \
                        or float(u.kwargs.get("alpha", 1)) != 1.0 or hint_shape(u) != hint_shape(p):
                    continue
                other = u.args[1] if u.args[0] is p else u.args[0]
                if not isinstance(other, fx.Node):
                    continue
                try:
                    term = read_state_term(self.gm, self.evaluator, other, "kv", w.q, {w.q, w.k, v}, u)
                except NotACandidate:
                    continue
                if w.score_scale is not None or w.out_scale is not None:
                    raise Refused("unsupported", "initial states read beside scores scaled by a learnable "
                                                 "one-element tensor: not rewritten", u)
                return u, term, value_axis, query_axis
        return None

    def _refuse_more_queries(self, w: Weights, where) -> None:
        if w.scores in self._more_queries:
            tq, tk = hint_shape(w.scores)[-2:]
            raise Refused("mask", f"more queries (Tq={tq}) than keys (Tk={tk}): the operator takes a block of "
                                  "queries against at least as many keys (Tq <= Tk)", where)

    def _finish(self, w: Weights, form, output, q, k, v, normalize, eps, anchor, where) -> Match:
        self._refuse_more_queries(w, where)
        if w.junk:
            raise Refused("mask", "the mask is applied before the polynomial, and no mask after it hides every "
                                  "entry it masked: masked scores still pass through f (f(0) != 0)", where)
        deg = polynomial.degree(w.poly)
        if deg > 2:
            raise Refused("polynomial", f"f has a term of degree {deg}: {polynomial.describe(w.poly)} "
                                        "(x = q.k); Based is second order", where)
        if polynomial.coefficient(w.poly, 2) == 0.0:
            unread = [why for why in (describe_unread(self.gm, n) or features_first(self.gm, n) for n in (q, k)
                                      if isinstance(n, fx.Node)) if why is not None]
            if unread:          # q.k is a product of computed features the feature map reader could not read
                raise Refused("feature_map", f"the scores are q'.k' of computed features that are not read as a "
                                             f"feature map ({unread[0]}), so f = {polynomial.describe(w.poly)} "
                                             "(x = q'.k') has no second-order term", where)
            raise Refused("polynomial", f"f = {polynomial.describe(w.poly)} (x = q.k) has no second-order term",
                          where)
        causal = False
        if w.keep is not None:
            kind, why = kv_mask.classify(w.keep, *w.lengths)
            if kind == "refuse" and _tie_lengths(w, lambda t: kv_mask.classify(w.keep, t, t)[0]
                                                                 != "refuse"):
                kind, why = kv_mask.classify(w.keep, w.lengths[0], w.lengths[0])
            elif kind == "refuse" and kv_mask.tie_offset(w.keep, *w.lengths):
                kind, why = kv_mask.classify(w.keep, *w.lengths)
            if kind == "refuse":
                raise Refused("mask", why, where)
            causal = kind == "causal"
        p0, p1, p2 = (polynomial.coefficient(w.poly, i) for i in range(3))
        s = w.s_scale if w.s_scale not in (None, 0.0) else (p1 if p1 != 0.0 else 1.0)
        if w.tk is not None:
            form = f"{form}, KV cache (Tq={w.t} <= Tk={w.tk}{', causal aligned to the end' if causal else ''})"
        return Match(form, output, q, k, v, w.t, (p0, p1 / s, p2 / (s * s)), s, causal, normalize, eps, anchor,
                     tk=w.tk)

    # ------------------------------------------------------------------ linear (cumsum) form

def _tie_lengths(w: Weights, fits) -> bool:
    """Queries and keys of the same traced length that Dynamo gave two symbols (nothing in the graph ties
    them: ``torch.tril(q @ k.mT)``), where the mask ``fits`` the operator only at equal lengths (a top-left
    causal mask is the operator's causal one when Tq == Tk): guard Tq == Tk, as Dynamo guards what it
    traced, so that the compiled graph runs only at equal lengths (other lengths recompile, and the pass
    reads that graph on its own). Returns whether it did."""
    sizes = shape_of(w.scores)
    if sizes is None or len(sizes) < 2:
        return False
    tq, tk = sizes[-2], sizes[-1]
    if not (isinstance(tq, torch.SymInt) and isinstance(tk, torch.SymInt)) or not fits(w.lengths[0]):
        return False
    try:
        # records Eq(Tq, Tk) in Dynamo's shape environment; traced at Tq != Tk, Ne(Tq, Tk): this graph,
        # not rewritten, then runs only at unequal lengths, and equal ones get the rewritten graph
        return guard_bool(tq == tk)
    except Exception as err:  # noqa: BLE001 - the shape environment refused: the site is refused
        log.debug("based_compile: could not guard Tq == Tk (%s: %s)", type(err).__name__, err)
        return False


def _moves_axes(view: fx.Node) -> bool:
    """A permute / transpose that changes the order of the axes of more than one entry (einsum's
    lowering moves unit axes only)."""
    if view.target not in (aten.permute.default, aten.transpose.int, aten.t.default):
        return False
    shape = hint_shape(view.args[0]) or ()
    landed = [track_axis(view, axis) for axis, size in enumerate(shape) if size > 1]
    return None in landed or landed != sorted(landed)


def _constant_along(den, divided: fx.Node, axis: int) -> bool:
    """``den``, broadcast against ``divided`` (the output of the division), has one value along ``axis``:
    the row sums divide each row, not each column (``z[..., None, :]`` would divide columns). One value: one
    entry, or one entry expanded (``z.expand(..., Dv)``, as a row sum spelled ``a @ ones(T, Dv)`` is read),
    through a scalar added, subtracted, multiplied or divided."""
    out = hint_shape(divided)
    return out is not None and _one_value_along(den, axis - len(out))


_SCALAR_OPS = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)


def _one_value_along(node, axis: int) -> bool:
    """``node`` holds one value along its axis ``axis`` (counted from the end, negative; missing: one)."""
    shape = hint_shape(node) if isinstance(node, fx.Node) else ()
    if shape is None:
        return False
    if -axis > len(shape) or shape[axis] == 1:
        return True
    if node.op != "call_function":
        return False
    if node.target is aten.expand.default:
        return _one_value_along(node.args[0], axis)
    if node.target in _SCALAR_OPS and len(node.args) == 2:
        tensors = [a for a in node.args if isinstance(a, fx.Node) and hint_shape(a)]
        if len(tensors) == 1 and float(node.kwargs.get("alpha", 1)) == 1.0:
            return _one_value_along(tensors[0], axis)
    return False


def _abs_of(node):
    """x of ``x.abs()``, else None."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.abs.default:
        return node.args[0]
    return None


def _clamp_max(node: fx.Node):
    """The upper bound of a clamp (None for clamp_min, or a clamp with no max)."""
    if node.target is aten.clamp_min.default:
        return None
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("max")


def _one_element(node) -> bool:
    """A tensor of one element (any rank: a 0-d parameter, a [1, 1, 1, 1] buffer)."""
    shape = hint_shape(node) if isinstance(node, fx.Node) else None
    return shape is not None and all(s == 1 for s in shape)


def _intersect(a: masks.Keep, b: masks.Keep) -> masks.Keep:
    try:
        return a & b
    except masks.MaskError as err:
        raise Refused("mask", str(err)) from err


def _hides(keep: masks.Keep, kept: masks.Keep) -> bool:
    """A mask that keeps ``keep`` hides every entry outside ``kept`` (keep is within kept, at every size):
    what an earlier mask left behind (P(0) = c0 where the raw scores were masked) is zero after it."""
    try:
        return (keep & ~kept).is_empty()
    except masks.MaskError:
        return False


def _evaluate(poly: polynomial.Poly, x: float) -> float:
    return sum(c * x ** i for i, c in enumerate(poly))


def _not_key_axis(dims, w: Weights) -> str:
    """Why a sum of the weights over ``dims`` (None: every axis) is not their row sums."""
    if dims == [w.axes[0]]:
        return ("the normaliser sums the weights over the scores' rows (of q @ k.mT: over the queries; of k @ q.mT "
                "transposed after the normaliser: over the keys, a layout the pass does not read)")
    if dims is not None and w.axes[1] in dims:
        return "the normaliser sums the weights over the key axis and other axes, not over the key axis alone"
    return "the normaliser does not sum the weights over the key axis"


def _swapped(w: Weights) -> Weights:
    """Weights read with the query and key axes swapped: element [j, i] of P(k_j . q_i) is element
    [i, j] of P(q_i . k_j), so q and k trade roles (unmasked weights only: a mask applied before the
    transpose is refused)."""
    if w.row_normalised is not None:
        raise Refused("normaliser", "the weights are transposed after their rows were normalised: the "
                                    "normaliser sums over the query axis")
    if w.keep is not None or w.junk:
        raise Refused("mask", "the weights are masked before they are transposed (the mask is read on the "
                              "keys' axis as the queries')")
    if w.tk is not None:
        raise NotACandidate("transposed weights of queries and keys of different lengths")
    return replace(w, q=w.k, k=w.q, k_alternatives=())


_NORMALISED_SCALE = (
    "the weights are scaled by a one-element tensor that is not a compile-time constant (a learnable scale, "
    "nn.Parameter, or one computed at run time) after the polynomial, and normalised by their row sums: c P(s) "
    "is not P(c s), and c P(s) / (sum c P(s) + eps) is P(s) / (sum P(s) + eps / c), an eps the operator does not "
    "take (on the raw scores or on q it is rewritten; an unnormalised output is rewritten times the scale)")


def _unscaled(w: Weights, node: fx.Node) -> None:
    """Refused when ``w`` is scaled at run time after the polynomial (``out_scale``) and ``node`` (a sum, a
    power, another function of the weights) does not commute with that scale."""
    if w.out_scale is not None:
        raise Refused("unsupported", f"the weights are scaled by a one-element tensor that is not a compile-time "
                                     f"constant after the polynomial, then go through {node.target}: c P(s) is "
                                     "not P(c s), and only a scale of the weights as they meet v (the output "
                                     "times it) is read", node)


def _same_along_weights(other: fx.Node, w: Weights) -> bool:
    """``other``, broadcast against the weights ``w``, is the same along their query and key axes (size 1 or
    absent there: a per-head or per-batch factor)."""
    shape = tuple(hint_shape(other))
    return all(i < 0 or shape[i] == 1 for i in (a - (len(w.shape) - len(shape)) for a in w.axes))


def _dtype_of(node) -> torch.dtype | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _widening(cast: fx.Node) -> bool:
    """A cast between floating dtypes to one at least as precise, which represents every value of its input
    exactly (float16 or bfloat16 -> float32 -> float64; not float16 <-> bfloat16)."""
    src, dst = _dtype_of(cast.args[0]) if cast.args else None, _dtype_of(cast)
    if src is None or dst is None or not (src.is_floating_point and dst.is_floating_point):
        return False
    fs, fd = torch.finfo(src), torch.finfo(dst)
    return fd.eps <= fs.eps and fd.max >= fs.max and fd.tiny <= fs.tiny

def _not_normalised(w: Weights) -> None:
    if w.row_normalised is not None:
        raise NotACandidate("the weights are changed after they were normalised")


def find_matches(matcher: Matcher):
    """Yield (Match | Refused, node) for every candidate site in the graph (one Match per output: a site
    two anchors read, e.g. a non-causal state read from its sum and from its readout, is the first's)."""
    outputs = set()
    for node in list(matcher.gm.graph.nodes):
        if node.op != "call_function":
            continue
        try:
            result = None
            if node.target is aten.bmm.default:
                result = matcher.match_quadratic(node)
            elif node.target in (aten.cumsum.default, aten.sum.dim_IntList):
                try:
                    result = match_linear(matcher, node)
                except NotACandidate:
                    if node.target is not aten.sum.dim_IntList:
                        raise
                    result = match_state_product(matcher, node)     # a readout summed over the features
            if isinstance(result, Match):
                if result.output in outputs:
                    continue
                outputs.add(result.output)
            if result is not None:
                yield result, node
        except Refused as refusal:
            if refusal.node is None:
                refusal.node = node
            yield refusal, node
        except NotACandidate as why:
            if node.target is aten.bmm.default:
                log.debug("based_compile: %s is not Based attention: %s", node.name, why)
        except Exception as err:            # a defect of the pass must not break the user's model
            log.warning("based_compile: internal error while matching at %s (%s: %s); not rewritten",
                        node.name, type(err).__name__, err)
            yield Refused("unsupported", f"internal error of the pass: {type(err).__name__}: {err}", node), node
