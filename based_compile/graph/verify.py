"""The numerical probe: does the matched subgraph compute the Based function of the derived spec?

Structure fixes the polynomial, the mask and the normaliser; what the shapes alone leave
open (which axis is heads and which is time when H == T, how the output is laid out, the
GQA head mapping) is settled here. ``settle`` enumerates the readings the shapes allow,
evaluates the matched subgraph on fresh random float64 q, k, v (buffers and constants at
their real values) and keeps the first reading whose reference
(``naive_parallel_based``) agrees; if none agrees the site is refused with "verify".
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import sympy
import torch
import torch.fx as fx

from .canonicalize import VIEW_OPS, example_value, hint_shape, read_views, size_hints, track_axis
from .evaluate import GraphEvaluator
from . import axis_labels
from ..kernels.arguments import check_arguments
from ..kernels.naive import naive_parallel_based
from ..op.attention_with_state import composed_forward
from ..op.recurrent_step import feature_width
from .candidate import Match
from .precision import cast_dtypes
from .refusal import Refused
from ..op.spec import BasedSpec

log = logging.getLogger("based_compile")

# The probe evaluates the matched subgraph at the traced shapes; above this many elements in
# its intermediates ([B, H, T, T], or [B, H, T, F, Dv] with F = 1 + Dk + Dk^2 for the linear
# form) it is skipped and the structural match stands alone (logged at info). 4M float64
# elements keep the probe under ~0.1 s; small and test shapes are always probed.
PROBE_MAX_ELEMENTS = 1 << 22
_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Settled:
    """A site ready to rewrite: the spec plus how op inputs/outputs map onto the user's tensors."""

    match: Match
    spec: BasedSpec
    unsqueeze_inputs: bool        # q, k, v are [B*H, T, D]: the op sees them as [1, B*H, T, D]
    transpose_out: bool           # the user's output has T and H swapped relative to the op's
    flatten_out: bool             # the user's output folds the first two axes
    probed: bool
    states: object = None         # final_state.SiteStates: the final states the prefill returns, if any
    precision: object = None      # autocast_scope.OperatorPrecision: how the operator runs (set by the driver)
    # (k, v): [B, T, D] without a heads axis next to a 4-d q (one key/value head, multi-query
    # attention: ``k[:, :, 0]``); the op reads it with a heads axis of size one
    unsqueeze_kv: tuple = (False, False)

    @property
    def head_axis(self) -> int:
        return 1 if self.spec.layout == "BHTD" else 2

    def operator_inputs(self, q, k, v) -> tuple:
        """Values of the user's q, k, v as the operator reads them."""
        if self.unsqueeze_inputs:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        k, v = (x.unsqueeze(self.head_axis) if flag else x for x, flag in zip((k, v), self.unsqueeze_kv))
        return q, k, v


def _readings(m: Match):
    shapes = [hint_shape(n) for n in (m.q, m.k, m.v)]
    ranks = [len(s) for s in shapes]
    # k and v [B, T, D] next to a 4-d q: one key/value head without its axis (multi-query attention)
    headless = (ranks[0] == 4 and all(r in (3, 4) for r in ranks[1:]) and 3 in ranks[1:])
    if not headless and (len(set(ranks)) != 1 or ranks[0] not in (3, 4)):
        raise Refused("unsupported", f"q, k, v have shapes {shapes}: expected [B, H, T, D] or [B, T, H, D] "
                                     "(or [B*H, T, D]; k and v may be [B, T, D], one head)")
    unsqueeze = len(shapes[0]) == 3
    flags = (ranks[1] == 3, ranks[2] == 3) if headless else (False, False)
    out_shape = hint_shape(m.output)
    readings = []
    for layout, tdim, hdim in (("BHTD", 2, 1), ("BTHD", 1, 2)):
        qs, ks, vs = [((1,) + s) if unsqueeze else s for s in shapes]
        ks, vs = (s[:hdim] + (1,) + s[hdim:] if flag else s for s, flag in zip((ks, vs), flags))
        if not (qs[tdim] == m.t and ks[tdim] == vs[tdim] == m.key_length):
            continue
        heads, kv_heads = qs[hdim], ks[hdim]
        if kv_heads == 0 or heads % kv_heads or vs[hdim] != kv_heads or not (qs[0] == ks[0] == vs[0]):
            continue
        if qs[3] != ks[3]:
            continue
        op_shape = list(qs[:3]) + [vs[3]]
        for transpose in (False, True):
            shape = list(op_shape)
            if transpose:
                shape[1], shape[2] = shape[2], shape[1]
            for flatten in (False, True):
                final = [shape[0] * shape[1]] + shape[2:] if flatten else shape
                if tuple(final) == tuple(out_shape):
                    spec = BasedSpec(layout=layout, scale=m.scale, c0=m.coeffs[0], c1=m.coeffs[1],
                                     c2=m.coeffs[2], causal=m.causal, normalize=m.normalize, eps=m.eps,
                                     group=heads // kv_heads)
                    readings.append(Settled(m, spec, unsqueeze, transpose, flatten, False, unsqueeze_kv=flags))
    if not readings:
        chunked = _chunked(m)
        if chunked is not None:
            raise Refused("unsupported", chunked, m.output)
        raise Refused("unsupported", f"q {shapes[0]}, k {shapes[1]}, v {shapes[2]} and output {out_shape} "
                                     "are not a [B, H, T, D] / [B, T, H, D] attention layout"
                                     f"{_detached_view(m)}", m.output)
    return readings, qs, vs


def _detached_view(m: Match) -> str:
    """A note for the layout refusal when q, k or v is a detach of a view that moves its axes (``k.mT.detach()``):
    the layout is read through views up to the detach, not through it (``k.detach().mT`` is read)."""
    for name, node in (("q", m.q), ("k", m.k), ("v", m.v)):
        if not (isinstance(node, fx.Node) and node.op == "call_function"
                and node.target in (torch.ops.aten.detach.default, torch.ops.aten.alias.default)):
            continue
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in VIEW_OPS:
            return (f" ({name} is a detach of a view of another tensor, such as k.mT.detach(): the pass reads the "
                    "layout through the views below a detach, not above it; k.detach().mT is read)")
    return ""


def _chunked(m: Match) -> str | None:
    """Why a site whose weights are computed within blocks of the sequence is not rewritten (the
    chunked form: q and k reshaped to [.., T / C, C, ..], the weights C x C per chunk), else None:
    a view between the scores and q splits q's time axis into (T / C, C) with C the weights' length."""
    anchor = m.anchor
    if anchor.op != "call_function" or anchor.target is not torch.ops.aten.bmm.default:
        return None
    node = anchor.args[0]
    while isinstance(node, fx.Node) and node is not m.q and node.op == "call_function":
        if node.target in VIEW_OPS:
            src, out = hint_shape(node.args[0]) or (), hint_shape(node) or ()
            for axis, size in enumerate(src):
                chunks = size // m.t if m.t else 0
                if size > m.t > 0 and size % m.t == 0 and any(      # the axis split in place
                        out[i:i + 2] == (chunks, m.t) and math.prod(out[:i]) == math.prod(src[:axis])
                        for i in range(len(out) - 1)):
                    return (f"the weights are computed within chunks of {m.t} of the {size} positions (q and k "
                            f"reshaped to [.., {chunks}, {m.t}, ..]): a chunked form (the intra-chunk quadratic "
                            "plus inter-chunk states) is not rewritten; written over the whole sequence it is")
        node = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return None


def _naive(q, k, v, s: BasedSpec) -> torch.Tensor:
    return naive_parallel_based(q, k, v, scale=s.scale, coeffs=s.coeffs, causal=s.causal, normalize=s.normalize,
                                eps=s.eps, layout=s.layout)


def _reference(reading: Settled, q, k, v, initial: tuple = (None, None)) -> torch.Tensor:
    """The op's output for this reading; ``initial``: the operator's initial states (kv0, k0) of a
    continued prefill (``reading.match.initial``), whose feature map converts them."""
    s = reading.spec
    q, k, v = reading.operator_inputs(q, k, v)
    if reading.match.initial is None:
        o = _naive(q, k, v, s)
    else:
        init = reading.match.initial
        args = check_arguments(q, k, v, s.scale, s.coeffs, s.causal, s.normalize, s.eps, s.layout)
        o = composed_forward(q, k, v, args, init.pieces, init.k_factors, *initial, attend=_naive)[0]
    if reading.transpose_out:
        o = o.transpose(1, 2)
    if reading.flatten_out:
        o = o.flatten(0, 1)
    return o


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return math.inf
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def _grouped_structure(m: Match, layout: str) -> bool:
    """Without the probe: are k and v repeated per group (head h uses kv head h // group)?

    The lowered repeat is unsqueeze -> expand -> view; the new axis must come right after
    the heads axis (``repeat_interleave``, ``x[:, :, None].expand``), not before it (tiling).
    """
    for source in (m.k, m.v):
        verdicts = _repeat_axes(source, 1 if layout == "BHTD" else 2, depth=4)
        if not verdicts or not all(verdicts):
            return False
    return True


def _one_kv_head(m: Match, reading: Settled) -> bool:
    """k and v have one head (multi-query attention): every query head reads it, so how it reaches
    them (matmul broadcasting, expand, repeat, repeat_interleave) cannot pair a query head with the
    wrong key head. Which axis is the heads axis is still proven (``axis_labels``). A k or v of
    [B, T, D] (``k[:, :, 0]``) is one head without its axis."""
    head = reading.head_axis
    for node, headless in zip((m.k, m.v), reading.unsqueeze_kv):
        if headless:
            continue
        fake = example_value(node)
        if not isinstance(fake, torch.Tensor) or fake.dim() != 4 or not isinstance(fake.shape[head], int) \
                or fake.shape[head] != 1:
            return False
    return True


def _repeat_axes(node, head: int, depth: int) -> list[bool]:
    """For each unsqueeze reached from ``node`` through views: is the new axis right after the heads?"""
    found = []
    if depth == 0 or head is None:
        return found
    for user in node.users:
        if user.op != "call_function" or user.target not in VIEW_OPS or user.args[0] is not node:
            continue
        if user.target is torch.ops.aten.unsqueeze.default:
            found.append(user.args[1] % (len(hint_shape(node)) + 1) == head + 1)
        elif user.target not in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default,
                                 torch.ops.aten.reshape.default, torch.ops.aten.expand.default):
            found.extend(_repeat_axes(user, track_axis(user, head), depth - 1))
    return found


def _paired(k, v) -> bool:
    """k and v agree on every axis but the features ([B, H, T]; one head with or without its axis:
    [B, 1, T] or [B, T])."""
    def rows(x):
        return tuple(s for s in hint_shape(x)[:-1] if s != 1)
    return len(hint_shape(k)) == len(hint_shape(v)) and hint_shape(k)[:-1] == hint_shape(v)[:-1] \
        or rows(k) == rows(v)


def settle(m: Match, evaluator: GraphEvaluator, *, probe: bool = True, available=None) -> Settled:
    """The first reading of ``m`` the probe confirms: k and v as found (the un-repeated heads
    under GQA), then each alternative pair (e.g. heads repeated by tiling, which the op must
    see repeated); each with q as found, then its alternatives (q read on the other side of a
    transpose, when k and v come from elsewhere, e.g. a KV cache in another layout)."""
    pairs = [(m.k, m.v)] + [(k, v) for k in m.k_alternatives for v in m.v_alternatives if _paired(k, v)]
    # k as found with another reading of v, and the reverse: k computed after its transpose (rotary
    # embeddings, a norm) while v is read before its own
    pairs += [(k, v) for k, v in [(m.k, v) for v in m.v_alternatives] + [(k, m.v) for k in m.k_alternatives]
              if _paired(k, v)]
    if available is not None:
        pairs = [(k, v) for k, v in pairs if available(k) and available(v)]
    if not pairs:
        missing = [name for name, x in (("k", m.k), ("v", m.v)) if available is not None and not available(x)]
        what = (f"{missing[0]} is an intermediate value" if len(missing) == 1 else "k and v are intermediate values")
        raise Refused("unsupported", f"{what} of an operation that the compiled graph keeps whole (a decomposed "
                                     "operation, or a custom op that writes it in place)", m.output)
    queries = [m.q] + [q for q in m.q_alternatives if available is None or available(q)]
    first_refusal = None
    for q, k, v in ((q, k, v) for q in queries for k, v in pairs):
        try:
            return _settle_one(replace(m, q=q, k=k, v=v), evaluator, probe=probe)
        except Refused as refusal:
            first_refusal = first_refusal or refusal
            if refusal.category != "verify" and refusal.category != "unsupported":
                raise
    raise first_refusal


def _moved_sizes(env, symbols: dict) -> dict | None:
    """Other values of the symbolic sizes ``symbols`` (symbol -> traced value) that keep every guard of
    the shape environment ``env`` true (relations between sizes Dynamo recorded as guards, e.g.
    ``Eq(s49 + s7, s0 + s82)`` for a cache grown by cat): every size doubled (keeps sums, ratios and
    divisibility), else each moved by a different amount, the longest by the most (keeps order), else
    tripled, else moved by twice as much, else halved, else each moved down (a size the code caps).
    Each changes Tk - Tq where both move; a size an equality defines from others follows them
    (``_tied``). None when none does (a graph specialised to its traced sizes, e.g. by a guard
    ``Eq(s0//2, 1)``)."""
    values = dict(size_hints(env))                      # sizes, and floats Dynamo made symbolic
    symbols, grown = dict(symbols), True
    while grown:                 # sizes an equality ties to a moved one move too (v's length with k's)
        grown = False
        for guard in env.guards:
            free = guard.expr.free_symbols
            new = {sym for sym in free if sym in values and sym.is_integer} - symbols.keys()
            if isinstance(guard.expr, sympy.Eq) and free & symbols.keys() and new:
                symbols.update({sym: int(values[sym]) for sym in new})
                grown = True
    ranked = sorted(symbols.items(), key=lambda kv: (kv[1], str(kv[0])))
    candidates = [{sym: 2 * hint for sym, hint in ranked},
                  {sym: hint + 1 + i for i, (sym, hint) in enumerate(ranked)},
                  {sym: 3 * hint for sym, hint in ranked},
                  {sym: hint + 2 + 2 * i for i, (sym, hint) in enumerate(ranked)},
                  # downwards, for a size the code caps (``if tk > MAX: raise``, a mask buffer of MAX rows)
                  # (sizes at 2 stay: Dynamo specialises 0 and 1)
                  {sym: max(2, hint // 2) for sym, hint in ranked},
                  {sym: max(2, hint - 1 - i) for i, (sym, hint) in enumerate(ranked)}]
    for moved in candidates:
        moved = _tied(moved, env.guards, values)
        if min(moved.values()) < 2 or all(moved[sym] == int(values[sym]) for sym in moved):
            continue
        at = {**values, **moved}
        try:
            if all(bool(guard.expr.xreplace(at)) for guard in env.guards):
                return moved
        except (TypeError, ValueError):           # a guard that does not evaluate to a truth value
            continue
    return None


def _tied(moved: dict, guards, values: dict) -> dict:
    """``moved`` with each size an equality guard defines from others (``Eq(s3, 1 + s1 + s1**2)``: a
    state's feature count from the head dim) set to its value at the moved sizes."""
    moved = dict(moved)
    for _ in range(3):
        for guard in guards:
            if not isinstance(guard.expr, sympy.Eq):
                continue
            for lhs, rhs in (guard.expr.args, guard.expr.args[::-1]):
                if lhs in moved and isinstance(lhs, sympy.Symbol) and lhs not in rhs.free_symbols:
                    value = rhs.xreplace({**values, **moved})
                    if getattr(value, "is_Integer", False):
                        moved[lhs] = int(value)
                    break
    return moved


def _moved_inputs(m: Match, evaluator: GraphEvaluator, dtype) -> tuple:
    """(values of the subgraph's inputs at moved sizes: fresh q, k, v, initial states and every input
    whose shape moves; the operator's initial states made of them (the reference's); where the sizes
    moved, for messages), or (None, None, why not), or (None, None, None) when no size is symbolic."""
    symbols, env = {}, None
    for node in evaluator.inputs:
        fake = node.meta.get("val")
        sizes = fake.shape if isinstance(fake, torch.Tensor) else [fake] if isinstance(fake, torch.SymInt) else []
        for size in sizes:
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                values = size_hints(env)
                for sym in env.replace(size.node.expr).free_symbols:     # sizes guarded equal: one symbol
                    symbols[sym] = int(values[sym])
    if not symbols:
        return None, None, None
    moved = _moved_sizes(env, symbols)
    if moved is None:
        return None, None, ("no other sizes satisfy the graph's guards (sizes doubled, halved, or each moved up or down "
                      "by a different amount): the site is checked at the traced sizes only")

    def size_at(x):
        return int(env.replace(x.node.expr).xreplace(moved)) if isinstance(x, torch.SymInt) else int(x)

    gen = torch.Generator().manual_seed(4321)
    substitute, initial = {}, [None, None]
    for i, st in enumerate((m.initial.kv, m.initial.k) if m.initial is not None else ()):
        if st is not None:             # a continued prefill's states, at the moved feature and value sizes
            fake = example_value(st.source)
            x = torch.randn([size_at(s) for s in fake.shape], generator=gen, dtype=torch.float64)
            x = x.abs() + 1.0 if i == 1 else x      # a k_state keeps the normaliser away from zero
            substitute[st.source] = x.to(device=fake.device, dtype=dtype)
            initial[i] = st.operator_tensor(substitute[st.source].to(torch.float64))
    for node in evaluator.inputs:
        if node in substitute:
            continue
        fake = node.meta.get("val")
        if isinstance(fake, torch.SymInt):
            substitute[node] = size_at(fake)
        elif isinstance(fake, torch.Tensor) and (node in (m.q, m.k, m.v)
                                                 or any(isinstance(x, torch.SymInt) for x in fake.shape)):
            shape = [size_at(x) for x in fake.shape]
            if fake.dtype.is_floating_point:
                substitute[node] = torch.randn(shape, generator=gen, dtype=torch.float64).to(
                    device=fake.device, dtype=dtype if node in (m.q, m.k, m.v) else fake.dtype)
            else:
                substitute[node] = torch.zeros(shape, dtype=fake.dtype, device=fake.device)
    for node in (m.q, m.k, m.v):                 # q, k or v computed in the graph (a cache grown by cat)
        fake = example_value(node)
        if node not in substitute and isinstance(fake, torch.Tensor) and fake.dtype.is_floating_point:
            substitute[node] = torch.randn([size_at(x) for x in fake.shape], generator=gen,
                                           dtype=torch.float64).to(device=fake.device, dtype=dtype)
    if not all(n in substitute for n in (m.q, m.k, m.v)):
        return None, None, "q, k or v is not a floating-point tensor the probe can give values"
    return substitute, tuple(initial), ", ".join(f"{sym}: {values[sym]} -> {moved[sym]}" for sym in sorted(moved, key=str))


def _scale_of_q(m: Match, evaluator: GraphEvaluator, substitute: dict, scale=None):
    """The factor the operator reads q times (a scale of the scores read at run time, ``score_scale``;
    ``scale``: another one, the output's ``out_scale``), evaluated as the rewritten graph computes it:
    from the same inputs as the output it is compared with (the probe's q, k, v, or its moved sizes), so
    that a scale computed from q follows the probe's q."""
    scale = m.score_scale if scale is None else scale
    if scale is None:
        return 1.0
    return scale.value(lambda node: evaluator.evaluate(node, substitute=substitute))


def _scale_of_output(m: Match, evaluator: GraphEvaluator, substitute: dict):
    """The factor the rewritten graph multiplies the operator's output by (``out_scale``), or 1."""
    return 1.0 if m.out_scale is None else _scale_of_q(m, evaluator, substitute, m.out_scale)


def _probe_other_lengths(reading: Settled, evaluator: GraphEvaluator, dtype, tol: float) -> str | None:
    """A site on a graph with symbolic sizes: the probe read it at the traced sizes, where, e.g., a
    constant mask offset (``tril(ones(Tq, Tk), 2)``) is indistinguishable from Tk - Tq, or a view that
    depends on the length may happen to line up. Evaluate the matched subgraph again with every
    symbolic size moved (each symbol by a different amount, the longest by the most) and refuse
    unless the op's function still agrees (a continued prefill's states drawn afresh at the moved
    sizes too); a scale of the scores read at run time is evaluated at the moved sizes too.
    None when it agrees or nothing is symbolic; why not, when the subgraph cannot be evaluated at
    the moved sizes (a size guarded to divide another)."""
    m = reading.match
    try:
        substitute, initial, where = _moved_inputs(m, evaluator, dtype)
    except Exception as exc:      # e.g. a data-dependent size (``n = t.item()``) has no value to move
        return f"the sizes could not be moved ({type(exc).__name__}: {exc})"
    if substitute is None:
        return where
    q, k, v = (substitute[n] for n in (m.q, m.k, m.v))
    tdim = -2 if reading.spec.layout == "BHTD" or reading.unsqueeze_inputs or k.dim() == 3 else -3
    size = q[..., 0].numel() * (k.shape[tdim] if "linear" not in m.form else (1 + q.shape[-1] ** 2 + q.shape[-1])
                                * v.shape[-1])
    if size > 4 * PROBE_MAX_ELEMENTS:
        return f"the moved sizes ({where}) are too large for the probe ({size} elements)"
    try:
        out = evaluator.evaluate(m.output, substitute=substitute)
        factor = _scale_of_q(m, evaluator, substitute)
        ref = _reference(reading, *(substitute[n].to(torch.float64) * (factor if n is m.q else 1.0)
                                    for n in (m.q, m.k, m.v)), initial) * _scale_of_output(m, evaluator, substitute)
    except Exception as exc:
        return f"the site could not be evaluated at other sizes ({where}): {type(exc).__name__}: {exc}"
    err = _rel_error(out, ref)
    if not err < tol:
        what = ("its mask does not follow Tk - Tq (e.g. a constant offset)" if m.tk is not None else
                "what it computes depends on the length in a way Based attention does not")
        raise Refused("verify", f"the site agrees with Based attention at the traced sizes but not at other sizes "
                                f"({where}; relative error {err:.2e}): {what}", m.output)
    return None


def _site_bmms(m: Match) -> list[fx.Node]:
    """The matmuls the site's output is computed from (its ancestors)."""
    seen, stack, found = set(), [m.output], []
    while stack:
        node = stack.pop()
        if node in seen or not isinstance(node, fx.Node):
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is torch.ops.aten.bmm.default:
            found.append(node)
        stack.extend(node.all_input_nodes)
    return found


def _axes_kept(m: Match, reading: Settled) -> str | None:
    """Without the probe, the reading's layout proved on the graph: for each matmul of the site that
    reads q, k or v through views only, the source's time axis lands, through every view, on the
    matmul's time axis (scores: the rows for q, the columns for k; values: the contracted axis) and
    its feature axis on the other one; a view that splits, merges or reorders the sequence (a
    reshape-transpose-reshape permutation of time) fails. Why not, or None."""
    gm = m.output.graph.owning_module
    tdim = 1 if reading.unsqueeze_inputs else (2 if reading.spec.layout == "BHTD" else 1)
    for bmm in _site_bmms(m):
        if (hint_shape(bmm.args[0]) or (0,))[-1] == 1:
            # contracts nothing: an outer product (x.unsqueeze(-1) @ x.unsqueeze(-2) in a feature map),
            # an elementwise product in the form of a matmul, read by the feature-map reader as such
            continue
        for position in (0, 1):
            operand = bmm.args[position]
            rank = len(hint_shape(operand) or ())
            contracted, free = (rank - 1, rank - 2) if position == 0 else (rank - 2, rank - 1)
            # q, k, v that are one tensor (``q = k = v = x``, ``k = v``): the role the operand plays at this
            # matmul is q's or k's when the other operand reads q, k or v through views too (the scores),
            # v's when it does not (the weights times the values); q and k ask the same of their axes
            roles: dict = {}
            for name, source in (("q", m.q), ("k", m.k), ("v", m.v)):
                roles.setdefault(source, []).append(name)
            other = bmm.args[1 - position]
            scores = any(read_views(gm, other, same_shape=True, until=s).base is s for s in roles)
            for source, names in roles.items():
                path = read_views(gm, operand, same_shape=True, until=source)
                if path.base is not source:
                    continue
                if len(names) > 1 and "v" in names:
                    names = [n for n in names if n != "v"] if scores else ["v"]
                name = names[0]
                src_rank = len(hint_shape(source) or ())
                headless = name != "q" and reading.unsqueeze_kv[name == "v"]
                time, feature = path.lands(1 if headless else tdim), path.lands(src_rank - 1)
                want_time = contracted if name == "v" else free
                want_feature = free if name == "v" else contracted
                if time != want_time or feature != want_feature:
                    return (f"{name}'s views (to the matmul at {bmm.name}) do not keep its {reading.spec.layout} "
                            "time and feature axes in place: q/k/v views reorder the sequence or the features")
    return None


def _structural_reading(m: Match, readings: list, why: str):
    """The first reading the graph's structure alone vouches for (no numerical probe): a grouped-
    query reading only where the heads' repetition is seen as such (``_grouped_structure``), and only
    a layout the views from q, k, v to the matmuls keep axis by axis (``_axes_kept``)."""
    readings = [r for r in readings if r.spec.group == 1 or _one_kv_head(m, r)
                or _grouped_structure(m, r.spec.layout)]
    if not readings:
        raise Refused("verify", f"grouped-query heads whose repetition the structure does not show ({why})",
                      m.output)
    reasons = []
    for reading in readings:
        reason = _axes_kept(m, reading)
        if reason is None:
            labels = axis_labels.why_not(m, reading)
            if labels is None:
                return reading
            reason = (f"the axes of q, k, v do not line up with the {reading.spec.layout} roles the rewrite gives "
                      f"them ({labels})")
        reasons.append(reason)
    raise Refused("verify", f"{reasons[0]} ({why})", m.output)


def _initial_values(m: Match, values: dict, gen, device, dtype) -> tuple:
    """Random values of a continued prefill's initial states (the user's tensors, put into ``values``)
    and the operator's tensors made of them (float64), or (None, None)."""
    out = []
    for st, positive in ((None, False), (None, True)) if m.initial is None else \
            ((m.initial.kv, False), (m.initial.k, True)):
        if st is None:
            out.append(None)
            continue
        x = torch.randn(hint_shape(st.source), generator=gen, dtype=torch.float64)
        x = x.abs() + 1.0 if positive else x          # a k_state keeps the normaliser away from zero
        values[st.source] = x.to(device=device, dtype=dtype)
        out.append(st.operator_tensor(values[st.source].to(torch.float64)))
    return tuple(out)


def _states_fit(m: Match, reading: Settled, qs, vs) -> bool:
    """A continued prefill's initial states, as the operator takes them (``InitialState.operator_tensor``
    of the traced shapes), are [B, H, F, Dv] and [B, H, F] for this reading's batch and heads (the
    operator checks it when it runs: a state broadcast over the batch would raise there)."""
    heads = qs[1] if reading.spec.layout == "BHTD" else qs[2]
    f = feature_width(m.initial.pieces, qs[-1])
    for st, want in ((m.initial.kv, (qs[0], heads, f, vs[-1])), (m.initial.k, (qs[0], heads, f))):
        if st is None:
            continue
        shape = [n for a, n in enumerate(hint_shape(st.source)) if a not in st.squeeze]
        if len(shape) != len(st.perm) or tuple(shape[p] for p in st.perm) != want:
            return False
    return True


def _folded_output(m: Match) -> fx.Node | None:
    """For q, k, v of [B*H, T, D] (heads folded into the batch of torch.bmm) whose output was taken at a 4-D
    view of it (``o.view(B, H, T, Dv)``): the [B*H, T, Dv] tensor that view reads, the output the operator
    then replaces (the user's view stays). None otherwise."""
    shapes = [hint_shape(n) for n in (m.q, m.k, m.v)]
    if any(s is None or len(s) != 3 for s in shapes) or len(hint_shape(m.output) or ()) != 4:
        return None
    node = m.output
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEW_OPS:
        node = node.args[0]
        if isinstance(node, fx.Node) and hint_shape(node) == (shapes[0][0], shapes[0][1], shapes[2][2]):
            return node
    return None


def _settle_one(m: Match, evaluator: GraphEvaluator, *, probe: bool) -> Settled:
    try:
        readings, qs, vs = _readings(m)
    except Refused:
        folded = _folded_output(m)
        if folded is None:
            raise
        m = replace(m, output=folded)
        readings, qs, vs = _readings(m)
    if m.initial is not None:       # the user's states are per query head: k and v as the op reads them
        readings = [r for r in readings if r.spec.group == 1]
        if not readings:
            raise Refused("unsupported", "a prefill continued from initial states with grouped-query heads (k and v "
                                         "shared by several query heads): the states the code adds are per query "
                                         "head, the operator's per key/value head", m.output)
        readings = [r for r in readings if _states_fit(m, r, qs, vs)]
        if not readings:
            raise Refused("state", "the initial states, read as the operator takes them, are not [B, H, F, Dv] and "
                                   "[B, H, F] of the attention's batch and heads (a state broadcast over them?)",
                          m.output)
    if not probe:
        return _structural_reading(m, readings, "the numerical probe is off")
    rows = math.prod(qs[:3])                                     # B * H * T
    features = 1 + qs[-1] + qs[-1] * qs[-1]
    size = rows * (m.key_length if "linear" not in m.form else features * vs[-1])
    if size > PROBE_MAX_ELEMENTS:
        log.info("based_compile: numerical probe skipped at %s (%d elements > %d); structure only",
                 m.output.name, size, PROBE_MAX_ELEMENTS)
        return _structural_reading(m, readings, f"the shapes are too large for the numerical probe ({size} "
                                                f"elements > {PROBE_MAX_ELEMENTS})")
    fake_q = example_value(m.q)
    device = fake_q.device
    errors = []
    widest = fake_q.dtype                   # q, k, v of different dtypes (mixed under autocast): also in the widest
    for node in (m.k, m.v):
        if isinstance(example_value(node), torch.Tensor) and example_value(node).is_floating_point():
            widest = torch.promote_types(widest, example_value(node).dtype)
    # a site that casts inside (bfloat16 weights widened to float32 by .float()) computes that part in the cast's
    # dtype whatever the probe's: it agrees with the reference to that dtype's accuracy only
    inner_tolerance = max((_TOLERANCE.get(d, 1e-3) for d in cast_dtypes(m)), default=0.0)
    for dtype in dict.fromkeys((torch.float64, fake_q.dtype, widest)):
        gen = torch.Generator().manual_seed(1234)
        values = {}
        for node in (m.q, m.k, m.v):
            if node not in values:
                values[node] = torch.randn(hint_shape(node), generator=gen, dtype=torch.float64).to(
                    device=device, dtype=dtype)
        initial = _initial_values(m, values, gen, device, dtype)
        try:
            out = evaluator.evaluate(m.output, substitute=values)
        except Exception as err:            # e.g. float64 probe against float32 parameters: retry in q's dtype
            errors.append(f"{type(err).__name__}: {err}")
            continue
        tol = max(_TOLERANCE.get(out.dtype, 1e-3), _TOLERANCE.get(dtype, 1e-3), inner_tolerance)
        best = math.inf
        factor, out_factor = _scale_of_q(m, evaluator, values), _scale_of_output(m, evaluator, values)
        for reading in readings:
            ref = _reference(reading, *(values[n].to(torch.float64) * (factor if n is m.q else 1.0)
                                        for n in (m.q, m.k, m.v)), initial) * out_factor
            err = _rel_error(out, ref)
            best = min(best, err)
            if err < tol:
                reading.probed = True
                why = _probe_other_lengths(reading, evaluator, dtype, tol)
                if why is not None:          # not checked at other sizes: the structure must vouch for it too
                    return _structural_reading(m, [reading], why)
                return reading
        raise Refused("verify", f"structure matched ({readings[0].spec}) but the numerical probe disagrees: "
                                f"relative error {best:.2e} >= {tol:.0e} on random inputs", m.output)
    raise Refused("verify", f"the numerical probe could not evaluate the matched subgraph ({'; '.join(errors)})",
                  m.output)
