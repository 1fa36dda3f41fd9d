"""The records of a candidate site: the weights read so far (``Weights``) and a matched site (``Match``).

``pick_output`` finds, from a node that ends a site, the 4-d tensor that is its output.
Shared by the quadratic reader (``match``) and the linear-form reader (``linear_form``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import polynomial
from .canonicalize import VIEW_OPS, hint_shape
from .folded_rows import UNFOLDED
from .mask import Keep
from .score_scale import ScoreScale


@dataclass
class Weights:
    """A Tq x Tk weight tensor read as keep * P(q.k) (P in the raw dot product); ``t`` is Tq,
    ``tk`` Tk (None: Tq == Tk; Tq < Tk is a block of queries against a KV cache)."""

    poly: polynomial.Poly
    keep: Keep | None             # what the masks keep, as a function of j - i; None: nothing masked
    junk: bool                    # entries outside ``keep`` are not zero (masked before f)
    scores: fx.Node               # the bmm of the scores
    q: fx.Node
    k: fx.Node
    form: str
    s_scale: float | None         # the factor of q.k inside the squared term (the user's scale)
    t: int
    shape: tuple = ()             # hint shape of the tensor this value describes
    axes: tuple = (-2, -1)        # where the query (i) and key (j) axes sit in it
    row_normalised: float | None = None   # eps when the weights were already divided by their row sums
    buffers: frozenset = field(default_factory=frozenset)
    k_alternatives: tuple = ()
    tk: int | None = None
    q_alternatives: tuple = ()

    @property
    def key_length(self) -> int:
        return self.t if self.tk is None else self.tk
    lengths: tuple = ()           # (Tq, Tk): ints, or size expressions under dynamic shapes
    score_scale: ScoreScale | None = None   # one-element tensors the raw scores were multiplied or divided by
    out_scale: ScoreScale | None = None     # one-element tensors read at run time the weights were scaled by
    feature_sum: object = None    # feature_normaliser.FeatureSum: these weights are a normaliser written on features
    k_state_term: object = None   # state_readout.StateTerm: a normaliser of these row sums plus phi(q) . k_state

    def same_function(self, other: "Weights") -> bool:
        same_keep = (self.keep is None and other.keep is None) or (
            self.keep is not None and other.keep is not None and self.keep == other.keep)
        return (same_keep and self.junk == other.junk and self.q is other.q and self.k is other.k
                and self.score_scale == other.score_scale and self.out_scale == other.out_scale
                and polynomial.close(self.poly, other.poly))

    def describe(self) -> str:
        return f"{polynomial.describe(self.poly)} (x = q.k){'' if self.keep is None else ', masked'}"

    def difference(self, other: "Weights") -> str | None:
        """How ``other`` (the numerator's weights) is another function than these (a normaliser's), in
        words, or None when ``same_function``."""
        if self.same_function(other):
            return None
        if self.describe() != other.describe():
            return f"sums {self.describe()} but the numerator uses {other.describe()}"
        for mine, theirs, name in ((self.q, other.q, "queries"), (self.k, other.k, "keys")):
            if mine is not theirs:
                return (f"sums {self.describe()} as the numerator does, but of other {name} ({mine.name}, the "
                        f"numerator's {theirs.name}: another tensor or view)")
        if self.score_scale != other.score_scale:
            return f"sums {self.describe()} as the numerator does, but with another one-element scale on q.k"
        if self.out_scale != other.out_scale:
            return (f"sums {self.describe()} as the numerator does, but with another one-element scale of the "
                    "weights (after the polynomial)")
        return f"sums {self.describe()} as the numerator does, but masked otherwise"


@dataclass
class Match:
    """A structurally matched site, before the numerical probe settles layout and group."""

    form: str
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    t: int
    coeffs: tuple[float, float, float]
    scale: float
    causal: bool
    normalize: bool
    eps: float
    anchor: fx.Node               # the node whose stack trace names the user's line
    k_alternatives: tuple = ()    # other readings of k and v (e.g. the repeated heads), tried in order
    v_alternatives: tuple = ()
    q_alternatives: tuple = ()    # other readings of q (the other side of a transpose), tried after q
    tk: int | None = None         # keys and values' length when it differs from the queries' (``t``)
    score_scale: ScoreScale | None = None   # a scale of the scores read at run time: the op reads q times it
    # a scale of the weights read at run time (after the polynomial), of an unnormalised output: the op's
    # output is multiplied by it ((c P(s)) @ v = c (P(s) @ v))
    out_scale: ScoreScale | None = None
    initial: object = None        # initial_state.InitialStates: the running sums start from earlier tokens' states

    @property
    def key_length(self) -> int:
        return self.t if self.tk is None else self.tk


_SIZE_QUERIES = {torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
                 torch.ops.aten.sym_storage_offset.default}


def _unused_view(node: fx.Node) -> bool:
    """A view whose value nothing reads: no users but size queries and unused views
    (functionalisation leaves chains of them behind, e.g. ``view -> permute`` regenerated after an
    in-place write, and under dynamic shapes the sizes of such a view may be read)."""
    return node.op == "call_function" and node.target in VIEW_OPS and all(
        _size_query(u) or _unused_view(u) for u in node.users)


def _size_query(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SIZE_QUERIES


def _users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its value, without unused ones when there are several
    (functionalisation leaves unused views behind, e.g. a view regenerated after an in-place write
    into its base; under dynamic shapes a size query of a view is a user that reads no value)."""
    users = [u for u in node.users if not _size_query(u)]
    return [u for u in users if u.users and not _unused_view(u)] if len(users) > 1 else users


def view_chain(node: fx.Node) -> list[fx.Node]:
    path = [node]
    while len(_users(node)) == 1:
        user = _users(node)[0]
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is node:
            node = user
            path.append(node)
            continue
        break
    return path


def pick_output(start: fx.Node) -> fx.Node:
    """The first 4-d tensor of the views of ``start`` (not one the unfolding of a matmul inserted:
    ``folded_rows``), else ``start``."""
    chain = view_chain(start)
    for node in chain:
        if len(hint_shape(node)) == 4 and not node.meta.get(UNFOLDED):
            return node
    return start


def placeholders_between(outputs, inputs) -> set:
    """The lowered placeholders read by the part of the graph a rewrite replaces: from ``outputs`` back to,
    not through, ``inputs`` (what the operator reads at run time)."""
    stop, seen, stack, found = set(inputs), set(), [n for n in outputs if n is not None], set()
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def site_inputs(match: Match) -> set:
    """The lowered placeholders the replaced part of a site reads (from its output back to, not
    through, q, k and v), with q, k, v and the nodes of a scale read at run time (the operator reads
    them at the output's position: a write into them before it is a write into what it reads)."""
    found = placeholders_between([match.output], [match.q, match.k, match.v]) | {match.q, match.k, match.v}
    if match.initial is not None:
        found |= {s.source for s in (match.initial.kv, match.initial.k) if s is not None}
    for scale in (match.score_scale, match.out_scale):
        if scale is not None:
            found |= set(scale.nodes)
    return found
