"""Masks as predicates on (query i, key j), read from how the graph builds them, never at T x T.

The rule (a rewrite of a graph with a symbolic length must hold at every length it runs at):
a mask is accepted only when its structure is PROVEN from the graph, as a function of the
sizes: keep(i, j) <=> j - i <= off (causal with offset ``off``) or keep is all-true.

How a mask is read (``keep_of``): the mask's subgraph is interpreted abstractly.
- Index tensors (``arange(start, end, step)``, ``+``, ``-``, integer ``*``, broadcasting views)
  are affine in the tensor's coordinates; comparing two of them gives an atom
  ``a . x + b <= 0`` (b an integer or a function of the sizes).
- ``ones`` / ``zeros`` / ``full(0 | 1)`` / ``*_like``, ``tril`` / ``triu(diagonal=d)`` (d a constant or
  a size expression), ``&``, ``|``, ``~``, ``^``, ``== 0``, ``!= 0``, ``1 - m``, products of 0/1
  tensors, ``where`` / ``masked_fill`` with 0/1 values, dtype casts, views that keep every
  coordinate (unsqueeze, expand, permute, transpose, reshapes that add or drop size-1 axes) and
  slices with step 1 (a shift of the coordinates) combine atoms with and / or / not.
- A registered buffer or constant (a table; evaluated at its own size, never at T x T) enters as
  a function of d = j - i only when the part of it the graph can read is Toeplitz (constant
  along diagonals: a tril / triu / band buffer), which then holds for every slice of it.
- Other ops: under static shapes, evaluated once when small (<= 2^22 elements) and read as a
  table; under symbolic shapes, refused.
Mapped onto the weights' (query, key) axes, every atom must be a function of d = j - i, i.e.
``d <= e`` with e an integer or a size expression (the batch and head axes must not matter).
A ``Keep`` is then a step function of t = d - base with constant integer cut points; keeps
whose bases differ by a size-dependent amount (``tril(ones, -3)`` against ``tril(ones, T - 8)``)
cannot be combined and are refused: the mask's structure changes with the length.

Deciding (``Keep.equals_on``): when every size and offset is a number (a static graph), on the
domain -(Tq - 1) <= d <= Tk - 1 of that shape; otherwise on every integer t, which is every
length the graph can run at (a sliding window of width 3 looks causal at T <= 3; read here it
is a window at every T and refused). Compile-time work is O(number of atoms) for masks built
from sizes and O(buffer) for buffers, never O(T^2).

API (also for other forms, e.g. a query block against a KV cache: causal aligned to the end is
``Keep.causal(tk - tq)``):
- ``Keep.causal(offset)``: keep <=> j - i <= offset (offset an int or a size expression);
  ``Keep.const(True)``: nothing masked; ``Keep.diagonal("tril" | "triu", d)``.
- ``k1 & k2``, ``k1 | k2``, ``~k`` (MaskError when the bases are a size-dependent distance apart),
  ``k1 == k2`` (same predicate at every size), ``k.is_empty()``.
- ``k.equals_on(other, tq, tk)``: True when proven equal on the [tq, tk] domain at every size
  the graph runs at (tq, tk: ints or SymInts / size expressions).
- ``k.describe()``: the kept set in words ("-2 <= j - i <= 0").
- ``keep_of(gm, node, weights_rank, axes, evaluate)``: the ``Keep`` a mask node selects.
- ``size_expr(x)``: an int / SymInt / fx node of one -> int or size expression.
"""
from __future__ import annotations

import bisect
import logging
import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_bool

from .canonicalize import example_value, reads_outer_operand, size_hints

log = logging.getLogger("based_compile")

aten = torch.ops.aten

# Unknown ops under static shapes are evaluated (as the old reader did) only up to this size.
EVALUATE_MAX_ELEMENTS = 1 << 22
_TOEPLITZ_ROWS = 1024          # rows per chunk when checking a buffer (bounds the temporaries)


class MaskError(Exception):
    """The mask is not provably a function of j - i of the supported kind (the reason is the message)."""


# ---------------------------------------------------------------------- sizes

def size_expr(x):
    """An int, SymInt, or fx node of one -> int or a sympy size expression (None if neither)."""
    if isinstance(x, fx.Node):
        x = example_value(x)
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        return int(expr) if getattr(expr, "is_Integer", False) else expr
    if hasattr(x, "is_Integer"):                       # already a sympy expression
        return int(x) if x.is_Integer else x
    return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _difference(a, b):
    """a - b as an int when it is one (or the graph's guards make it one), else None."""
    d = a - b
    if _is_int(d):
        return d
    d = getattr(d, "expand", lambda: d)()
    return int(d) if getattr(d, "is_Integer", False) else _guarded_constant(d)


def _shape_env():
    """The shape environment of the compilation in progress, or None."""
    context = torch._guards.TracingContext.try_get()
    return context.fake_mode.shape_env if context is not None and context.fake_mode is not None else None


def traced_value(x) -> int | None:
    """A size (int or size expression) at the sizes the graph was traced at, or None."""
    if _is_int(x):
        return x
    try:
        shape_env = _shape_env()
        value = x.xreplace(size_hints(shape_env)) if shape_env is not None and hasattr(x, "xreplace") else None
        return int(value) if getattr(value, "is_Integer", False) else None
    except Exception:  # noqa: BLE001 - a private API of the shape environment: no value
        return None


def size_text(x) -> str:
    """A size for a reason: an int as it is, a size expression by its traced value ("7 (symbolic)"),
    not by the names of Dynamo's symbols; outside a compilation, with no traced sizes, as written)."""
    if _is_int(x):
        return str(x)
    value = traced_value(x)
    return f"{value} (symbolic)" if value is not None else str(x)


def guard_equal_sizes(a, b) -> bool:
    """Guard a == b for two size expressions that are equal at the traced sizes but not provably so
    (two symbols Dynamo gave one length: two layers' cache lengths), as Dynamo guards what it traced:
    the graph then runs only where they are equal, and other sizes recompile. Returns whether it did.
    Only a relation between sizes is guarded, never a size pinned to a number (``tril(T - 8)`` is causal
    at T = 8 alone: guarding T == 8 would make a graph of symbolic length serve one length)."""
    d = a - b
    if _is_int(d):
        return d == 0
    d = sympy.expand(d)
    if len(getattr(d, "free_symbols", ())) < 2 or traced_value(d) != 0:
        return False
    try:
        shape_env = _shape_env()
        if shape_env is None:
            return False
        return bool(guard_bool(shape_env.create_symintnode(d, hint=0) == 0))
    except Exception as err:  # noqa: BLE001 - the shape environment refused: nothing guarded
        log.debug("based_compile: could not guard %s == %s (%s: %s)", a, b, type(err).__name__, err)
        return False


def _guarded_constant(d):
    """A size expression as the int it equals wherever the graph runs, by the guards Dynamo traced it
    under (``Eq(s61 + s82, s0 + s82)`` when a mask of [Tq, past + Tq] broadcasts against scores of
    [Tq, past + new]: new - Tq is 0), else None. Outside a compilation, or on any failure: None."""
    try:
        shape_env = _shape_env()
        if shape_env is None or not hasattr(d, "free_symbols"):
            return None
        value = d.xreplace(size_hints(shape_env))
        if not getattr(value, "is_Integer", False):
            return None
        proven = shape_env._maybe_evaluate_static(sympy.Eq(d, value))
        return int(value) if proven is not None and bool(proven) else None
    except Exception:  # noqa: BLE001 - a private API of the shape environment: refuse, never crash
        return None


def _text(x) -> str:
    return size_text(x)


# ---------------------------------------------------------------------- step functions of t = d - base

@dataclass(frozen=True)
class Steps:
    """A boolean function of an integer t: ``first`` for t below every cut, flipping at each cut (t >= cut)."""

    first: bool
    cuts: tuple = ()

    def at(self, t: int) -> bool:
        return self.first ^ bool(bisect.bisect_right(self.cuts, t) % 2)

    @staticmethod
    def upto(c: int) -> "Steps":
        return Steps(True, (c + 1,))                   # t <= c

    def combine(self, other: "Steps", op) -> "Steps":
        first = bool(op(self.first, other.first))
        cuts, current = [], first
        for p in sorted(set(self.cuts) | set(other.cuts)):
            value = bool(op(self.at(p), other.at(p)))
            if value != current:
                cuts.append(p)
                current = value
        return Steps(first, tuple(cuts))

    def shifted(self, s: int) -> "Steps":
        """t -> self(t + s)."""
        return Steps(self.first, tuple(c - s for c in self.cuts))

    def intervals(self) -> list:
        """The kept t as inclusive (lo, hi) intervals, None for an unbounded end."""
        out, value, start = [], self.first, None
        for c in self.cuts:
            if value:
                out.append((start, c - 1))
            else:
                start = c
            value = not value
        if value:
            out.append((start, None))
        return out

    def intervals_within(self, lo: int, hi: int) -> list:
        """Kept t in [lo, hi] as inclusive intervals."""
        out = []
        for a, b in self.intervals():
            a = lo if a is None else max(a, lo)
            b = hi if b is None else min(b, hi)
            if a <= b:
                out.append((a, b))
        return out


# ---------------------------------------------------------------------- the keep predicate

@dataclass(frozen=True)
class Keep:
    """keep(i, j) = steps(j - i - base): ``base`` an int or a size expression, the cut points constants."""

    base: object
    steps: Steps

    def __post_init__(self):
        if not self.steps.cuts and self.base != 0:
            object.__setattr__(self, "base", 0)       # a constant predicate has no base
        elif not _is_int(self.base) and getattr(self.base, "is_Integer", False):
            object.__setattr__(self, "base", int(self.base))

    # constructors
    @staticmethod
    def const(value: bool) -> "Keep":
        return Keep(0, Steps(bool(value)))

    @staticmethod
    def causal(offset=0) -> "Keep":
        """keep <=> j - i <= offset (offset: an int or a size expression)."""
        offset = size_expr(offset) if not _is_int(offset) else offset
        return Keep(0, Steps.upto(offset)) if _is_int(offset) else Keep(offset, Steps.upto(0))

    @staticmethod
    def diagonal(kind: str, d) -> "Keep":
        """What ``torch.tril(x, d)`` ("tril": j - i <= d) or ``torch.triu(x, d)`` ("triu": j - i >= d) keeps."""
        if kind == "tril":
            return Keep.causal(d)
        return ~Keep.causal(d - 1)

    # algebra
    def _aligned(self, other: "Keep"):
        """(base, self steps, other steps) on a common base, or None when the bases are a
        size-dependent distance apart."""
        if not other.steps.cuts:
            return self.base, self.steps, other.steps
        if not self.steps.cuts:
            return other.base, self.steps, other.steps
        diff = _difference(other.base, self.base)
        if diff is None:
            return None
        return self.base, self.steps, other.steps.shifted(-diff)

    def _combine(self, other: "Keep", op) -> "Keep":
        aligned = self._aligned(other)
        if aligned is None:
            raise MaskError(f"the mask combines diagonals at j - i = {_text(self.base)} and j - i = "
                            f"{_text(other.base)}, a length-dependent distance apart: its structure changes "
                            "with the length")
        base, a, b = aligned
        return Keep(base, a.combine(b, op))

    def __and__(self, other: "Keep") -> "Keep":
        return self._combine(other, operator.and_)

    def __or__(self, other: "Keep") -> "Keep":
        return self._combine(other, operator.or_)

    def __xor__(self, other: "Keep") -> "Keep":
        return self._combine(other, operator.xor)

    def __invert__(self) -> "Keep":
        return Keep(self.base, Steps(not self.steps.first, self.steps.cuts))

    def __eq__(self, other) -> bool:
        """The same predicate for every (i, j) at every size."""
        if not isinstance(other, Keep):
            return NotImplemented
        aligned = self._aligned(other)
        return aligned is not None and aligned[1] == aligned[2]

    def __hash__(self):
        return hash(self.steps.first)

    def is_empty(self) -> bool:
        return not self.steps.cuts and not self.steps.first

    def is_all(self) -> bool:
        return not self.steps.cuts and self.steps.first

    # deciding
    def equals_on(self, other: "Keep", tq, tk) -> bool:
        """Proven: self and other keep the same (i, j) for 0 <= i < tq, 0 <= j < tk, at every size
        the graph runs at. With every size and base a number (a static graph), decided on that
        domain; otherwise on every integer j - i (the domain grows without bound with the length)."""
        tq, tk = size_expr(tq), size_expr(tk)
        if _is_int(tq) and _is_int(tk) and _is_int(self.base) and _is_int(other.base):
            a, b = self.steps.shifted(-self.base), other.steps.shifted(-other.base)    # functions of d
            lo, hi = -(tq - 1), tk - 1
            return a.intervals_within(lo, hi) == b.intervals_within(lo, hi)
        aligned = self._aligned(other)            # bases an int apart (by the guards too)
        return aligned is not None and aligned[1] == aligned[2]

    def describe(self) -> str:
        """The kept set in words: "j - i <= 0", "-2 <= j - i <= 0", "j - i >= 1", ..."""
        if self.is_all():
            return "every (i, j)"
        if self.is_empty():
            return "nothing"
        parts = []
        for lo, hi in self.steps.intervals():
            lo_d = None if lo is None else self.base + lo
            hi_d = None if hi is None else self.base + hi
            if lo_d is None:
                parts.append(f"j - i <= {_text(hi_d)}")
            elif hi_d is None:
                parts.append(f"j - i >= {_text(lo_d)}")
            elif lo == hi:
                parts.append(f"j - i = {_text(lo_d)}")
            else:
                parts.append(f"{_text(lo_d)} <= j - i <= {_text(hi_d)}")
        return " or ".join(parts)

    def refusal(self) -> str:
        """Why this (square, same-length) mask is not the causal j <= i pattern, in words."""
        moving = "" if _is_int(self.base) else ": its diagonal moves with the length"
        pieces = self.steps.intervals()
        if len(pieces) == 1:
            lo, hi = pieces[0]
            if lo is None:
                return f"shifted causal mask (keeps {self.describe()}), not j <= i{moving}"
            if hi is None:
                return f"anti-causal mask (keeps {self.describe()}){moving}"
            return (f"windowed (banded) mask: keeps only {self.describe()} (drops keys far in the past)"
                    f"{moving}")
        return f"mask is not the causal (lower-triangular) pattern: keeps {self.describe()}{moving}"


# ---------------------------------------------------------------------- abstract values of mask subgraphs
#
# Coordinates are the tensor's own indices x_0 .. x_{rank-1}.
#   _Lin:   an integer-valued tensor  sum(coefs[a] * x_a) + off
#   _Bool:  a 0/1 tensor, 1 where ``pred`` holds; pred is a tree of
#           ("const", b) | ("le", coefs, off) meaning sum(coefs * x) + off <= 0
#           | ("table", index, axes, shifts): tables[index][x_axes[k] + shifts[k] ...] (axes[k] None: pinned)
#           | ("not", p) | ("and", p, q) | ("or", p, q)
#   _Table: a concrete tensor read at coordinates (x_axes[k] + shifts[k]) (a buffer, maybe sliced)
#   _Pick:  a two-valued tensor, ``hi`` where ``pred`` holds and ``lo`` elsewhere (numbers in the tensor's
#           dtype, any of them: an additive mask's -inf or finfo.min and 0, read by ``== -inf``, ``exp``)

@dataclass(frozen=True)
class _Lin:
    rank: int
    coefs: tuple
    off: object


@dataclass(frozen=True)
class _Bool:
    rank: int
    pred: tuple


@dataclass(frozen=True)
class _Table:
    rank: int
    index: int
    axes: tuple
    shifts: tuple


@dataclass(frozen=True)
class _Pick:
    rank: int
    pred: tuple
    hi: float
    lo: float


_TRUE, _FALSE = ("const", True), ("const", False)


def _not(p):
    if p[0] == "const":
        return ("const", not p[1])
    if p[0] == "not":
        return p[1]
    return ("not", p)


def _and(p, q):
    if p == _FALSE or q == _FALSE:
        return _FALSE
    if p == _TRUE:
        return q
    if q == _TRUE:
        return p
    return ("and", p, q)


def _or(p, q):
    if p == _TRUE or q == _TRUE:
        return _TRUE
    if p == _FALSE:
        return q
    if q == _FALSE:
        return p
    return ("or", p, q)


def _choose(p, hi: bool, lo: bool):
    """The predicate of ``hi where p else lo`` for two truth values."""
    return _or(_and(p, ("const", hi)), _and(_not(p), ("const", lo)))


def _map_atoms(p, fn):
    kind = p[0]
    if kind in ("le", "table"):
        return fn(p)
    if kind == "not":
        return _not(_map_atoms(p[1], fn))
    if kind in ("and", "or"):
        a, b = _map_atoms(p[1], fn), _map_atoms(p[2], fn)
        return _and(a, b) if kind == "and" else _or(a, b)
    return p


def _reaxis(value, where: list, rank: int):
    """Coordinates renamed: old axis a becomes new axis where[a] (None: the axis has size 1 and is gone)."""
    def lin(coefs, off):
        new = [0] * rank
        for a, c in enumerate(coefs):
            if where[a] is not None:
                new[where[a]] += c
        return tuple(new), off

    def atom(p):
        if p[0] == "le":
            coefs, off = lin(p[1], p[2])
            return ("le", coefs, off)
        return ("table", p[1], tuple(None if a is None else where[a] for a in p[2]), p[3])

    if isinstance(value, _Lin):
        coefs, off = lin(value.coefs, value.off)
        return _Lin(rank, coefs, off)
    if isinstance(value, _Bool):
        return _Bool(rank, _map_atoms(value.pred, atom))
    if isinstance(value, _Pick):
        return _Pick(rank, _map_atoms(value.pred, atom), value.hi, value.lo)
    if isinstance(value, _Table):
        return _Table(rank, value.index, tuple(None if a is None else where[a] for a in value.axes), value.shifts)
    return value


def _shift(value, axis: int, s):
    """Coordinates x_axis (new) = x_axis (old) - s: a slice starting at s."""
    def atom(p):
        if p[0] == "le":
            return ("le", p[1], p[2] + p[1][axis] * s if p[1][axis] else p[2])
        return ("table", p[1], p[2], tuple(sh + s if a == axis else sh for a, sh in zip(p[2], p[3])))

    if isinstance(value, _Lin):
        return _Lin(value.rank, value.coefs, value.off + value.coefs[axis] * s if value.coefs[axis] else value.off)
    if isinstance(value, _Bool):
        return _Bool(value.rank, _map_atoms(value.pred, atom))
    if isinstance(value, _Pick):
        return _Pick(value.rank, _map_atoms(value.pred, atom), value.hi, value.lo)
    if isinstance(value, _Table):
        return _Table(value.rank, value.index, value.axes,
                      tuple(sh + s if a == axis else sh for a, sh in zip(value.axes, value.shifts)))
    return value


_ELEMENTWISE_IDENTITY = {aten.clone.default, aten.alias.default, aten.contiguous.default, aten._to_copy.default,
                         torch.ops.prims.convert_element_type.default,  # a value-changing _to_copy (canonicalize)
                         aten.lift_fresh_copy.default, aten.detach.default}
_COMPARISONS = {
    aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt",
    aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
    aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne",
}
_AND_OPS = {aten.bitwise_and.Tensor, aten.logical_and.default, aten.minimum.default}
_OR_OPS = {aten.bitwise_or.Tensor, aten.logical_or.default, aten.maximum.default}
_XOR_OPS = {aten.bitwise_xor.Tensor, aten.logical_xor.default}
_NOT_OPS = {aten.bitwise_not.default, aten.logical_not.default}
_FILL_OPS = {aten.ones.default: 1, aten.zeros.default: 0, aten.ones_like.default: 1, aten.zeros_like.default: 0,
             aten.new_ones.default: 1, aten.new_zeros.default: 0}


# The largest integer up to which a dtype holds every integer (index values beyond it round or wrap).
_EXACT_UP_TO = {torch.float32: 1 << 24, torch.float16: 1 << 11, torch.bfloat16: 1 << 8,
                torch.int32: (1 << 31) - 1, torch.int16: (1 << 15) - 1, torch.int8: (1 << 7) - 1,
                torch.uint8: 255}


def _uniform(value) -> float | None:
    """The one number every element of an abstract value holds, or None."""
    if isinstance(value, _Lin) and not any(value.coefs) and _is_int(value.off):
        return float(value.off)
    if isinstance(value, _Bool) and value.pred[0] == "const":
        return float(value.pred[1])
    if isinstance(value, _Pick):
        hi, lo = _pick_values(value)
        if hi == lo:
            return hi
    return None


def _pick_values(value: "_Pick") -> tuple[float, float]:
    """(hi, lo) of a two-valued mask, each replaced by the other where the predicate never (or always) holds."""
    if value.pred == _TRUE:
        return value.hi, value.hi
    if value.pred == _FALSE:
        return value.lo, value.lo
    return value.hi, value.lo


def _one_valued(value, node) -> "_Pick | None":
    """A constant tensor (``full((T, T), finfo.min)``: an index value without coordinates) as the
    one-valued mask it also is (read by tril / triu, compared, exponentiated like an additive mask), or
    None for anything else (and for a value that is a size, not a number)."""
    if isinstance(value, _Pick):
        return value
    if isinstance(value, _Lin) and not any(value.coefs) and _is_int(value.off):
        dtype = getattr(example_value(node), "dtype", None) if isinstance(node, fx.Node) else None
        c = _in_dtype(value.off, dtype)
        return _Pick(value.rank, _TRUE, c, c)
    return None


def _in_dtype(c, dtype) -> float:
    """``c`` as a tensor of ``dtype`` holds it: rounded to a floating dtype, truncated to an integer one, made a
    bool (a fill converts its number so); a MaskError where the dtype cannot hold it at all."""
    if not isinstance(dtype, torch.dtype):
        return float(c)
    if not dtype.is_floating_point and not math.isfinite(c):
        raise MaskError(f"the mask fills {c} into {dtype}")
    if isinstance(c, int) and not -(1 << 63) <= c < (1 << 63):
        c = float(c)                                   # finfo.min read as an integer: the float it was
    source = torch.int64 if isinstance(c, int) else torch.float64
    try:
        return float(torch.tensor(c, dtype=source).to(dtype).item())
    except (RuntimeError, OverflowError) as e:
        raise MaskError(f"the mask fills {c} into {dtype}") from e


def _number(c: float) -> str:
    return f"{c:g}"


def _exact_indices(node: fx.Node, value):
    """``value`` if the index values it stands for are exact in ``node``'s dtype, else a MaskError.

    An index tensor read as a linear function of positions is only that function while its dtype holds
    every value it takes: ``arange(T).to(torch.bfloat16)`` rounds from 256 on (259 and 260 compare equal)
    and ``uint8`` wraps at 256, so a comparison of such indices is not the causal mask it reads as past
    that length. int64 and float64 are exact at any length a mask can have. A narrower dtype is accepted
    only when the sizes are static and every value fits (a dynamic length can grow past the limit)."""
    if not isinstance(value, _Lin) or not any(value.coefs):
        return value
    val = example_value(node)
    limit = _EXACT_UP_TO.get(getattr(val, "dtype", None))
    if limit is None:                   # int64, float64 (exact) or not a tensor
        return value
    shape = [size_expr(s) for s in val.shape]
    terms = [value.off] + [c for c in value.coefs] + shape
    if not all(_is_int(t) for t in terms):
        raise MaskError(f"the mask compares indices held in {val.dtype}, which are exact only up to {limit}, "
                        "at a length that is not static")
    unsigned = val.dtype == torch.uint8
    high = value.off + sum(max(c, 0) * (n - 1) for c, n in zip(value.coefs, shape))
    low = value.off + sum(min(c, 0) * (n - 1) for c, n in zip(value.coefs, shape))
    if high > limit or low < (0 if unsigned else -limit):
        raise MaskError(f"the mask compares indices held in {val.dtype}, which are exact only up to {limit}, "
                        f"with values from {low} to {high}")
    return value


class _Reader:
    def __init__(self, gm: fx.GraphModule, evaluate):
        self.gm = gm
        self.evaluate = evaluate          # node -> concrete tensor, or None when it depends on inputs
        self.values: dict = {}
        self.tables: list[torch.Tensor] = []
        self.table_names: list[str] = []

    # ------------------------------------------------------------ helpers
    def shape(self, node) -> tuple | None:
        val = example_value(node) if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        return tuple(size_expr(s) for s in val.shape)

    def scalar(self, arg):
        """A scalar operand as _Lin rank 0 (int or size expression), or None."""
        if isinstance(arg, bool):
            return _Lin(0, (), int(arg))
        if isinstance(arg, int):
            return _Lin(0, (), arg)
        if isinstance(arg, float):
            if math.isfinite(arg) and arg == int(arg):
                return _Lin(0, (), int(arg))
            raise MaskError(f"the mask is built with the non-integer value {arg}")
        if isinstance(arg, fx.Node):
            val = example_value(arg)
            if isinstance(val, (int, bool, torch.SymInt)):
                return _Lin(0, (), size_expr(val))
            if isinstance(val, (float, torch.SymFloat)):
                raise MaskError("the mask is built with a float that is not a constant")
        return None

    def read(self, node):
        if node in self.values:
            return self.values[node]
        stack = [node]
        while stack:                                  # post-order without recursion
            n = stack[-1]
            if n in self.values:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if a not in self.values
                       and isinstance(example_value(a), torch.Tensor)]
            if pending:
                stack.extend(pending)
                continue
            stack.pop()
            try:
                self.values[n] = _exact_indices(n, self._read_one(n))
            except MaskError as err:
                self.values[n] = err
        value = self.values[node]
        if isinstance(value, MaskError):
            raise value
        return value

    def arg(self, a):
        """The abstract value of an operand (tensor node or scalar)."""
        if isinstance(a, fx.Node) and isinstance(example_value(a), torch.Tensor):
            value = self.values.get(a)
            if value is None:
                value = self.read(a)
            if isinstance(value, MaskError):
                raise value
            return value
        if isinstance(a, float) and not (math.isfinite(a) and a == int(a)):
            return _Pick(0, _TRUE, a, a)        # -inf, finfo.min, 0.5: a number an additive mask holds
        s = self.scalar(a)
        if s is None:
            raise MaskError(f"the mask is built from {a!r}")
        return s

    def table(self, tensor: torch.Tensor, what: str):
        """A concrete tensor read by coordinates; ``what`` names it in a reason ("the registered mask buffer")."""
        self.tables.append(tensor)
        self.table_names.append(what)
        r = tensor.dim()
        return _Table(r, len(self.tables) - 1, tuple(range(r)), (0,) * r)

    def broadcast(self, value, node_shape: tuple, operand_shape: tuple | None):
        """An operand's value in the coordinates of a broadcasting op's output."""
        rank = len(node_shape)
        if operand_shape is None:                         # a scalar
            return _reaxis(value, [], rank) if isinstance(value, (_Lin, _Bool)) and value.rank == 0 else value
        r = len(operand_shape)
        where = [None if operand_shape[a] == 1 else a + rank - r for a in range(r)]
        return _reaxis(self.pin_ones(value, operand_shape), where, rank)

    def pin_ones(self, value, shape):
        """Size-1 axes have coordinate 0: drop their coefficients (a table reads its shift there)."""
        ones = [a for a, s in enumerate(shape) if s == 1]
        if not ones:
            return value
        where = [None if a in ones else a for a in range(len(shape))]
        return _reaxis(value, where, len(shape))

    def as_bool(self, value):
        if isinstance(value, _Bool):
            return value
        if isinstance(value, _Lin) and not any(value.coefs) and value.off in (0, 1):
            return _Bool(value.rank, ("const", bool(value.off)))
        if isinstance(value, _Table):
            t = self.tables[value.index]
            if t.dtype != torch.bool:
                if not bool(((t == 0) | (t == 1)).all()):
                    raise MaskError("multiplies the weights by a matrix that is not 0/1")
                self.tables[value.index] = t = t != 0
            return _Bool(value.rank, ("table", value.index, value.axes, value.shifts))
        if isinstance(value, _Pick):
            hi, lo = _pick_values(value)
            if {hi, lo} <= {0.0, 1.0}:
                return _Bool(value.rank, _choose(value.pred, hi == 1.0, lo == 1.0))
            values = " and ".join(_number(c) for c in sorted({hi, lo} - {0.0, 1.0}))
            raise MaskError(f"the mask has values other than 0 and 1 ({values})")
        raise MaskError("the mask has values other than 0 and 1 (an index tensor used as a mask)")

    def as_lin(self, value):
        if isinstance(value, _Lin):
            return value
        if isinstance(value, _Bool) and value.pred[0] == "const":
            return _Lin(value.rank, (0,) * value.rank, int(value.pred[1]))
        c = _uniform(value)
        if c is not None and math.isfinite(c) and c == int(c):
            return _Lin(value.rank, (0,) * value.rank, int(c))
        raise MaskError("the mask does arithmetic on a 0/1 tensor")

    # ------------------------------------------------------------ one node
    def _read_one(self, node: fx.Node):
        shape = self.shape(node)
        if node.op in ("placeholder", "get_attr"):
            return self._leaf(node)
        if node.op != "call_function":
            raise MaskError(f"the mask is built by {node.op} {node.name}")
        target, args, kwargs = node.target, node.args, node.kwargs
        if target in _FILL_OPS:
            return _Bool(len(shape), ("const", bool(_FILL_OPS[target])))
        if target in (aten.full.default, aten.full_like.default, aten.new_full.default, aten.fill.Scalar,
                      aten.scalar_tensor.default):
            fill = args[0] if target is aten.scalar_tensor.default else args[1]
            if isinstance(fill, (int, float)) and not isinstance(fill, bool):
                # the number the elements hold (full((T, T), 257., dtype=bfloat16) holds 256)
                fill = _in_dtype(fill, getattr(example_value(node), "dtype", torch.float64))
                if not (math.isfinite(fill) and fill == int(fill)):
                    return _Pick(len(shape), _TRUE, fill, fill)
                fill = int(fill)
            s = self.scalar(fill)
            if s is None:
                raise MaskError(f"the mask is filled with {fill!r}")
            return _Lin(len(shape), (0,) * len(shape), s.off)
        if target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            if target is aten.arange.default:
                start, step = 0, 1
            else:
                start = args[0]
                step = args[2] if target is aten.arange.start_step and len(args) > 2 else 1
            start, step = self.scalar(start), self.scalar(step)
            if start is None or step is None or not _is_int(step.off):
                raise MaskError("the mask uses an arange with a non-integer start or step")
            return _Lin(1, (step.off,), start.off)
        if target in _ELEMENTWISE_IDENTITY:
            value = self.arg(args[0])
            dtype = kwargs.get("dtype")
            if dtype == torch.bool and isinstance(value, _Table):
                return self._table_op(node, value)
            if dtype == torch.bool and isinstance(value, _Lin):
                return self.as_bool(value)
            if isinstance(value, _Pick):
                return self._pick_unary(node, value)
            return value
        if target in (aten.tril.default, aten.triu.default):
            x = self.arg(args[0])
            pick = _one_valued(x, args[0])
            x = pick if pick is not None and not {pick.hi, pick.lo} <= {0.0, 1.0} else self.as_bool(x)
            d = args[1] if len(args) > 1 else kwargs.get("diagonal", 0)
            d = self.scalar(d)
            if d is None:
                raise MaskError("tril/triu with a diagonal that is not an integer")
            r = len(shape)
            coefs = [0] * r
            if target is aten.tril.default:            # x_col - x_row - d <= 0
                coefs[r - 1], coefs[r - 2] = 1, -1
                atom = ("le", tuple(coefs), -d.off)
            else:                                      # x_row - x_col + d <= 0
                coefs[r - 1], coefs[r - 2] = -1, 1
                atom = ("le", tuple(coefs), d.off)
            if isinstance(x, _Pick):                   # hi where pred and on the triangle, 0 elsewhere
                if x.pred != _TRUE and x.lo != 0.0:
                    raise MaskError(f"tril/triu of a mask with three values ({_number(x.hi)}, {_number(x.lo)}, 0)")
                return _Pick(r, _and(self.pin_ones(x, shape).pred, atom), x.hi, 0.0)
            return _Bool(r, _and(self.pin_ones(x, shape).pred, atom) if x.pred != _FALSE else _FALSE)
        if target in _NOT_OPS:
            value = self.arg(args[0])
            if isinstance(value, _Table):
                return self._table_op(node, value)
            value = self.as_bool(value)
            return _Bool(value.rank, _not(value.pred))
        if target in _AND_OPS or target in _OR_OPS or target in _XOR_OPS or target is aten.mul.Tensor:
            return self._binary_bool(node, shape)
        if target in _COMPARISONS:
            picked = self._compare_pick(node, shape, _COMPARISONS[target])
            return picked if picked is not None else self._compare(node, shape, _COMPARISONS[target])
        if target in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar,
                      aten.rsub.Tensor, aten.neg.default):
            return self._arith(node, shape)
        if target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            picked = self._select_pick(node, shape, args[0], args[1], args[2])
            if picked is not None:
                return picked
            cond = self.broadcast(self.as_bool(self.arg(args[0])), shape, self.shape(args[0]))
            a = self.broadcast(self.as_bool(self.arg(args[1])), shape, self.shape(args[1]))
            b = self.broadcast(self.as_bool(self.arg(args[2])), shape, self.shape(args[2]))
            return _Bool(len(shape), _or(_and(cond.pred, a.pred), _and(_not(cond.pred), b.pred)))
        if target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            picked = self._select_pick(node, shape, args[1], args[2], args[0])
            if picked is not None:
                return picked
            x = self.broadcast(self.as_bool(self.arg(args[0])), shape, self.shape(args[0]))
            cond = self.broadcast(self.as_bool(self.arg(args[1])), shape, self.shape(args[1]))
            fill = self.broadcast(self.as_bool(self.arg(args[2])), shape, self.shape(args[2]))
            return _Bool(len(shape), _or(_and(x.pred, _not(cond.pred)), _and(cond.pred, fill.pred)))
        view = self._view(node, shape)
        if view is not None:
            return view
        tensors = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
        if len(tensors) == 1 and tensors[0] is args[0] and torch.Tag.pointwise in getattr(target, "tags", ()):
            value = _one_valued(self.arg(args[0]), args[0])
            if value is not None:                  # exp, isinf, neg, ... of a two-valued mask: of its values
                return self._pick_unary(node, value)
        return self._unknown(node, shape)

    # ------------------------------------------------------------ two-valued masks
    def _pick_unary(self, node, value: "_Pick"):
        """A one-tensor elementwise op (a cast, exp, isinf, ...) of a two-valued mask: the op of its values."""
        src = example_value(node.args[0])
        values = torch.tensor([value.hi, value.lo], dtype=getattr(src, "dtype", torch.float64))
        kwargs = {k: v for k, v in node.kwargs.items() if k not in ("device", "layout", "pin_memory")}
        with torch.no_grad():
            out = node.target(values, *node.args[1:], **kwargs)
        if not isinstance(out, torch.Tensor) or out.shape != values.shape:
            raise MaskError(f"the mask is built with {getattr(node.target, '__name__', node.target)}")
        hi, lo = (float(x) for x in out.tolist())
        if out.dtype == torch.bool:
            return _Bool(value.rank, _choose(value.pred, bool(hi), bool(lo)))
        return _Pick(value.rank, value.pred, hi, lo)

    def _compare_pick(self, node, shape, op):
        """``m == -inf``, ``m < 0``, ... with m two-valued and the other side one number; None otherwise."""
        a_arg, b_arg = node.args[0], node.args[1]
        a, b = self.arg(a_arg), self.arg(b_arg)
        if not (isinstance(a, _Pick) or isinstance(b, _Pick)):
            return None
        m, m_arg, c, flip = (a, a_arg, _uniform(b), False) if isinstance(a, _Pick) else (b, b_arg, _uniform(a), True)
        if c is None:
            raise MaskError("the mask compares two tensors that hold more than one value each")
        fn = {"le": operator.le, "ge": operator.ge, "lt": operator.lt, "gt": operator.gt, "eq": operator.eq,
              "ne": operator.ne}[op]
        # compared in the dtype the operands promote to (a Python number takes the tensor's: float16 0.1)
        operands = [example_value(x) if isinstance(x, fx.Node) else x for x in (a_arg, b_arg)]
        dtype = torch.result_type(*operands)
        hi, lo = (_in_dtype(x, dtype) for x in _pick_values(m))
        c = _in_dtype(c, dtype)
        truth = (lambda x: fn(c, x)) if flip else (lambda x: fn(x, c))
        m = self.broadcast(m, shape, self.shape(m_arg))
        return _Bool(len(shape), _choose(m.pred, truth(hi), truth(lo)))

    def _select_pick(self, node, shape, cond_arg, yes_arg, no_arg):
        """where(cond, yes, no) / masked_fill with yes and no one number each, one of them not 0 or 1 (an
        additive mask): two-valued. None when both are 0/1 (the 0/1 reading) or when not read."""
        yes, no = self.arg(yes_arg), self.arg(no_arg)
        cy, cn = _uniform(yes), _uniform(no)
        if cy is None or cn is None or {cy, cn} <= {0.0, 1.0}:
            return None
        cond = self.broadcast(self.as_bool(self.arg(cond_arg)), shape, self.shape(cond_arg))
        dtype = getattr(example_value(node), "dtype", torch.float64)
        return _Pick(len(shape), cond.pred, _in_dtype(cy, dtype), _in_dtype(cn, dtype))

    def _not_constant(self, node) -> str:
        return passed_in_reason(self.gm, node) or "the mask is not a compile-time constant (it depends on inputs)"

    def _leaf(self, node):
        value = self.evaluate(node)
        if value is None:
            raise MaskError(self._not_constant(node))
        if not isinstance(value, torch.Tensor):
            raise MaskError(f"the mask is a {type(value).__name__}, not a tensor")
        return self.table(value.detach().cpu(), "the registered mask buffer ({shape})")

    def _table_op(self, node, value: _Table):
        """An elementwise op with scalars on a table: applied to the table itself (its own size)."""
        args = [self.tables[value.index] if a is node.args[0] else a for a in node.args]
        if any(isinstance(a, fx.Node) for a in args):
            raise MaskError(f"the mask is built with {node.target} of a buffer and a tensor")
        kwargs = {k: v for k, v in node.kwargs.items() if k not in ("device", "layout", "pin_memory")}
        with torch.no_grad():
            result = node.target(*args, **kwargs)
        self.tables.append(result)
        self.table_names.append(self.table_names[value.index])
        return _Table(value.rank, len(self.tables) - 1, value.axes, value.shifts)

    def _unknown(self, node, shape):
        """An op the reader does not know: evaluated (as a table) only when its value cannot depend on a
        symbolic size and it is small, else refused."""
        name = getattr(node.target, "__name__", str(node.target))
        concrete = all(_is_int(s) for s in shape)
        if not concrete or _reads_symbolic_size(node):
            raise MaskError(f"the mask is built with {name}, which the pass cannot read as a function of the "
                            "length (under dynamic shapes only tril/triu/arange comparisons/buffers are proven)")
        if math.prod(shape) > EVALUATE_MAX_ELEMENTS and not all(
                isinstance(self.values.get(a), _Table) for a in node.all_input_nodes
                if isinstance(example_value(a), torch.Tensor)):
            raise MaskError(f"the mask is built with {name} at {tuple(shape)}: too large to evaluate at compile "
                            "time, and not read structurally")
        value = self.evaluate(node)
        if value is None:
            raise MaskError(self._not_constant(node))
        return self.table(value.detach().cpu(), f"the mask built with {name}, evaluated at the traced size {{shape}},")

    def _binary_bool(self, node, shape):
        a_arg, b_arg = node.args[0], node.args[1]
        a, b = self.arg(a_arg), self.arg(b_arg)
        target = node.target
        if target is aten.mul.Tensor and isinstance(a, _Lin) and isinstance(b, _Lin) and \
                (any(a.coefs) or any(b.coefs)):
            return self._arith(node, shape)                           # index * integer
        if isinstance(a, _Table) and isinstance(b, _Lin) and not any(b.coefs) or \
                isinstance(b, _Table) and isinstance(a, _Lin) and not any(a.coefs):
            return self._table_op(node, a if isinstance(a, _Table) else b)
        if target is aten.mul.Tensor:
            for m, m_arg, c in ((a, a_arg, b), (b, b_arg, a)):
                if isinstance(m, _Bool) and isinstance(c, _Lin) and not any(c.coefs) and _is_int(c.off) \
                        and c.off not in (0, 1):
                    # c times a 0/1 mask (``2 * ones(T, T).tril()``): a mask of 0 and c
                    m = self.broadcast(m, shape, self.shape(m_arg))
                    return _Pick(len(shape), m.pred, float(c.off), 0.0)
        a = self.broadcast(self.as_bool(a), shape, self.shape(a_arg))
        b = self.broadcast(self.as_bool(b), shape, self.shape(b_arg))
        if target in _OR_OPS:
            pred = _or(a.pred, b.pred)
        elif target in _XOR_OPS:
            pred = _or(_and(a.pred, _not(b.pred)), _and(_not(a.pred), b.pred))
        else:
            pred = _and(a.pred, b.pred)
        return _Bool(len(shape), pred)

    def _arith(self, node, shape):
        target, args = node.target, node.args
        if target is aten.neg.default:
            a = self.as_lin(self.arg(args[0]))
            return _Lin(a.rank, tuple(-c for c in a.coefs), -a.off)
        a_arg, b_arg = args[0], args[1]
        a, b = self.arg(a_arg), self.arg(b_arg)
        if isinstance(a, _Table) and isinstance(b, _Lin) and not any(b.coefs):
            return self._table_op(node, a)
        if isinstance(a, _Bool) or isinstance(b, _Bool):
            # 1 - m (rsub(m, 1) or sub(1, m)): the complement of a 0/1 mask
            m, other = (a, b) if target in (aten.rsub.Scalar, aten.rsub.Tensor) else (b, a)
            if target in (aten.rsub.Scalar, aten.rsub.Tensor, aten.sub.Tensor, aten.sub.Scalar) and \
                    isinstance(m, _Bool) and isinstance(other, _Lin) and not any(other.coefs) and \
                    other.off == 1 and node.kwargs.get("alpha", 1) == 1:
                m = self.broadcast(m, shape, self.shape(a_arg if m is a else b_arg))
                return _Bool(len(shape), _not(m.pred))
            raise MaskError("the mask does arithmetic on a 0/1 tensor")
        a = self.broadcast(self.as_lin(a), shape, self.shape(a_arg))
        b = self.broadcast(self.as_lin(b), shape, self.shape(b_arg))
        alpha = node.kwargs.get("alpha", 1)
        if not _is_int(alpha):
            raise MaskError("the mask's index arithmetic has a non-integer alpha")
        if target is aten.mul.Tensor:
            if any(a.coefs) and any(b.coefs):
                raise MaskError("the mask multiplies two index tensors")
            const, lin = (a.off, b) if not any(a.coefs) else (b.off, a)
            if not _is_int(const):
                raise MaskError("the mask scales an index by a size")
            return _Lin(len(shape), tuple(c * const for c in lin.coefs), lin.off * const)
        if target in (aten.rsub.Scalar, aten.rsub.Tensor):          # b - alpha * a
            a, b, sa, sb = a, b, -alpha, 1
        elif target in (aten.sub.Tensor, aten.sub.Scalar):
            sa, sb = 1, -alpha
        else:
            sa, sb = 1, alpha
        return _Lin(len(shape), tuple(sa * x + sb * y for x, y in zip(a.coefs, b.coefs)), sa * a.off + sb * b.off)

    def _compare(self, node, shape, op):
        a_arg, b_arg = node.args[0], node.args[1]
        a, b = self.arg(a_arg), self.arg(b_arg)
        if isinstance(a, _Table) and isinstance(b, _Lin) and not any(b.coefs):
            return self._table_op(node, a)
        if isinstance(a, _Table) and isinstance(b, _Lin) or isinstance(b, _Table) and isinstance(a, _Lin):
            # positions compared with a table (``j <= clamp(i, max=15)`` read at the traced size): not a 0/1
            # mask, so the comparison itself is the table (static shapes), or refused
            return self._unknown(node, shape)
        if any(isinstance(x, _Table) and not self._zero_one(x) for x in (a, b)):
            # a table of numbers compared with another tensor (document ids, ``doc[:, None] == doc[None]``): the
            # comparison is the table (static shapes), not a comparison of 0/1 masks
            return self._unknown(node, shape)
        if isinstance(a, _Bool) or isinstance(b, _Bool) or isinstance(a, _Table) or isinstance(b, _Table):
            return self._compare_bool(node, shape, op, a, b)
        a = self.broadcast(self.as_lin(a), shape, self.shape(a_arg))
        b = self.broadcast(self.as_lin(b), shape, self.shape(b_arg))
        diff = tuple(x - y for x, y in zip(a.coefs, b.coefs))            # a - b = diff . x + off
        off = a.off - b.off
        neg = tuple(-c for c in diff)
        le = ("le", diff, off)                       # a - b <= 0
        ge = ("le", neg, -off)                       # b - a <= 0
        pred = {"le": le, "ge": ge,
                "lt": ("le", diff, off + 1),         # a - b + 1 <= 0
                "gt": ("le", neg, -off + 1),
                "eq": _and(le, ge),
                "ne": _not(_and(le, ge))}[op]
        return _Bool(len(shape), pred)

    def _zero_one(self, value: "_Table") -> bool:
        t = self.tables[value.index]
        return t.dtype == torch.bool or bool(((t == 0) | (t == 1)).all())

    def _compare_bool(self, node, shape, op, a, b):
        """m == 0, m != 0, m == 1, m > 0 ... on a 0/1 mask, and m == n between masks."""
        a_arg, b_arg = node.args[0], node.args[1]
        if isinstance(b, _Lin) and not any(b.coefs) and b.off in (0, 1):
            m, c, flip = a, b.off, False
            m_arg = a_arg
        elif isinstance(a, _Lin) and not any(a.coefs) and a.off in (0, 1):
            m, c, flip = b, a.off, True
            m_arg = b_arg
        else:
            x = self.broadcast(self.as_bool(a), shape, self.shape(a_arg))
            y = self.broadcast(self.as_bool(b), shape, self.shape(b_arg))
            same = _or(_and(x.pred, y.pred), _and(_not(x.pred), _not(y.pred)))
            if op == "eq":
                return _Bool(len(shape), same)
            if op == "ne":
                return _Bool(len(shape), _not(same))
            raise MaskError(f"the mask compares two masks with {op}")
        m = self.broadcast(self.as_bool(m), shape, self.shape(m_arg))
        if flip:                                      # c op m  ->  m op' c
            op = {"ge": "le", "le": "ge", "gt": "lt", "lt": "gt"}.get(op, op)
        keeps_one = {("eq", 1), ("ne", 0), ("gt", 0), ("ge", 1)}
        keeps_zero = {("eq", 0), ("ne", 1), ("lt", 1), ("le", 0)}
        if (op, c) in keeps_one:
            return _Bool(len(shape), m.pred)
        if (op, c) in keeps_zero:
            return _Bool(len(shape), _not(m.pred))
        if (op, c) in {("ge", 0), ("le", 1)}:
            return _Bool(len(shape), _TRUE)
        return _Bool(len(shape), _FALSE)

    def _view(self, node, shape):
        target, args = node.target, node.args
        if target not in (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                          aten.permute.default, aten.transpose.int, aten.t.default, aten.expand.default,
                          aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.slice.Tensor):
            return None
        src = args[0]
        value = self.arg(src)
        old = self.shape(src)
        r, rank = len(old), len(shape)
        if target is aten.slice.Tensor:
            dim = (args[1] if len(args) > 1 else 0) % max(r, 1)
            start = args[2] if len(args) > 2 else None
            step = args[4] if len(args) > 4 else 1
            if step != 1:
                raise MaskError("the mask is sliced with a step")
            given = start
            start = 0 if start is None else size_expr(start)
            if start is None or (_is_int(start) and start < 0) or _negative_at_trace(given):
                raise MaskError("the mask is sliced from the end")
            return _shift(value, dim, start) if start != 0 else value
        if target is aten.unsqueeze.default:
            dim = args[1] % rank
            return _reaxis(value, [a if a < dim else a + 1 for a in range(r)], rank)
        if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            dims = range(r) if target is aten.squeeze.default else (
                [args[1]] if target is aten.squeeze.dim else list(args[1]))
            gone = {d % r for d in dims if old[d % r] == 1}
            where, n = [], 0
            for a in range(r):
                where.append(None if a in gone else n)
                n += a not in gone
            return _reaxis(self.pin_ones(value, old), where, rank)
        if target is aten.permute.default:
            dims = [d % r for d in args[1]]
            return _reaxis(value, [dims.index(a) for a in range(r)], rank)
        if target in (aten.transpose.int, aten.t.default):
            if target is aten.t.default:
                d0, d1 = 0, min(1, r - 1)
            else:
                d0, d1 = args[1] % r, args[2] % r
            return _reaxis(value, [d1 if a == d0 else d0 if a == d1 else a for a in range(r)], rank)
        if target is aten.expand.default:
            return self.broadcast(value, shape, old)
        # view / reshape: only adding or dropping size-1 axes keeps every coordinate
        keep_old = [a for a in range(r) if old[a] != 1]
        keep_new = [a for a in range(rank) if shape[a] != 1]
        if len(keep_old) != len(keep_new) or any(_difference(old[a], shape[b]) != 0
                                                 for a, b in zip(keep_old, keep_new)):
            raise MaskError("the mask is reshaped in a way that merges or splits axes")
        where = [None] * r
        for a, b in zip(keep_old, keep_new):
            where[a] = b
        return _reaxis(self.pin_ones(value, old), where, rank)


def _negative_at_trace(start) -> bool:
    """A length-dependent slice start that was negative where the graph was traced: Python counts it
    from the end (``x[-tq:]``), not from 0 (Dynamo guards the sign its sizes were computed with)."""
    value = example_value(start) if isinstance(start, fx.Node) else start
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return hint is None or hint < 0
    return False


def _reads_symbolic_size(node: fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        val = example_value(n)
        if isinstance(val, (torch.SymInt, torch.SymFloat)) and not _is_int(size_expr(val)):
            return True
        if isinstance(val, torch.Tensor) and not all(_is_int(size_expr(s)) for s in val.shape):
            return True
        stack.extend(n.all_input_nodes)
    return False


def passed_in_reason(gm: fx.GraphModule, node) -> str | None:
    """Why a mask computed from an input of a checkpointed region that was not read where the graph
    around the call builds it (``checkpoint_operands``) is not a constant, or None for any other node."""
    outer = reads_outer_operand(gm, node)
    if outer is None:
        return None
    return (f"the mask is an input of a checkpointed region, {outer}: not a compile-time constant (a mask "
            "built from sizes or a registered buffer outside the function passed to torch.utils.checkpoint "
            "is read where it is built)")


# ---------------------------------------------------------------------- onto the weights' (i, j)

def _position_axis(role: str, single) -> str | None:
    """"i" or "j" when a mask axis of this role runs over query or key positions: the weights' query or
    key axis, or that axis at length 1 (one query, or one key: its one position is 0)."""
    if role in ("i", "j"):
        return role
    if role in ("zero-i", "zero-j") and single[0 if role == "zero-i" else 1]:
        return role[-1]
    return None


def _table_keep(table: torch.Tensor, axes, shifts, roles, sizes, single=(False, False),
                what: str = "the registered mask buffer ({shape})") -> Keep:
    """A bool table read at (x + shift) per axis, as a function of d = j - i (it must be Toeplitz on
    the part the graph can read)."""
    if any(a is not None and _position_axis(roles[a], single) and not _is_int(sh) and table.shape[k] != 1
           for k, (a, sh) in enumerate(zip(axes, shifts))):
        return _shifted_table_keep(table, axes, shifts, roles, single, what)
    index: list = []
    picks = {}
    for k, (a, sh) in enumerate(zip(axes, shifts)):
        role = "zero" if a is None else roles[a]
        role = "zero" if role in ("zero-i", "zero-j") else role
        if role in ("i", "j"):
            if role in picks:
                raise MaskError("the mask reads a buffer's diagonal")
            if not _is_int(sh):
                raise MaskError("the mask slices a buffer at a length-dependent offset")
            extent = sizes[a]
            end = table.shape[k] if not _is_int(extent) else min(table.shape[k], sh + extent)
            picks[role] = k
            index.append(slice(sh, end))
        elif role == "other":
            sub = table.narrow(k, 0, 1)
            if not bool((table == sub).all()):
                raise MaskError("mask differs between batch entries or heads")
            index.append(0)
        else:                                          # the coordinate is 0: read at the shift
            pos = 0 if table.shape[k] == 1 else sh
            if not _is_int(pos):
                raise MaskError("the mask indexes a buffer at a length-dependent position")
            index.append(pos)
    m = table[tuple(index)]
    if m.dim() != len(picks):
        raise MaskError("the mask buffer does not line up with the weights")
    if "i" not in picks and "j" not in picks:
        return Keep.const(bool(m))
    if ("i" in picks) != ("j" in picks) and single[0 if "j" in picks else 1]:
        # the other length is 1 (one query, or one key): its position is 0 and d is the other's
        m = m.reshape(1, -1) if "j" in picks else m.reshape(-1, 1)
        picks = {"i": 0, "j": 1}
    elif "i" not in picks or "j" not in picks:
        flat = m.reshape(-1)
        if flat.numel() and bool((flat == flat[0]).all()):
            return Keep.const(bool(flat[0]))
        raise MaskError("the mask depends on the " + ("key" if "j" in picks else "query") +
                        " index alone (not a function of j - i)")
    if picks["i"] > picks["j"]:
        m = m.t()
    if m.shape[0] == 0 or m.shape[1] == 0:
        return Keep.const(True)
    part = "readable part" if all(_is_int(s) for s in sizes) else "lengths"
    return Keep(0, _toeplitz_steps(m, table, part, what))


def _toeplitz_steps(m: torch.Tensor, table: torch.Tensor, part: str, what: str) -> Steps:
    """f with m[r, c] = f(c - r) (m a 2-D bool table, rows i, columns j), or MaskError."""
    rows, cols = m.shape
    for r0 in range(0, rows - 1, _TOEPLITZ_ROWS):
        r1 = min(rows - 1, r0 + _TOEPLITZ_ROWS)
        if not torch.equal(m[r0 + 1:r1 + 1, 1:], m[r0:r1, :-1]):
            raise MaskError(f"{what.format(shape=tuple(table.shape))} is not a function of j - i "
                            f"over the {part} (not a tril/triu/band pattern): its structure at other lengths "
                            "is not proven")
    f = torch.cat([m[:, 0].flip(0), m[0, 1:]]).tolist()      # f(d) for d = -(rows-1) .. cols-1
    lo = -(rows - 1)
    return Steps(bool(f[0]), tuple(lo + t for t in range(1, len(f)) if f[t] != f[t - 1]))


def _shifted_table_keep(table: torch.Tensor, axes, shifts, roles, single, what: str) -> Keep:
    """A table read at a length-dependent offset (``bias[..., Tk - Tq:Tk, :Tk]``, a KV cache's rows):
    the whole table must be a function f of its own column - row, which it then is wherever the
    graph reads it at any length (a read past its end is a shape error in the user's code); read at
    rows i + sh_i and columns j + sh_j, it keeps f(j - i - (sh_i - sh_j))."""
    index: list = []
    picks, shift = {}, {}
    for k, (a, sh) in enumerate(zip(axes, shifts)):
        role = "zero" if a is None else roles[a]
        axis = _position_axis(role, single) if a is not None else None
        if axis is not None and not (role.startswith("zero") and table.shape[k] == 1):
            if axis in picks:
                raise MaskError("the mask reads a buffer's diagonal")
            picks[axis], shift[axis] = k, sh
            index.append(slice(None))
        elif role == "other":
            sub = table.narrow(k, 0, 1)
            if not bool((table == sub).all()):
                raise MaskError("mask differs between batch entries or heads")
            index.append(0)
        else:
            pos = 0 if table.shape[k] == 1 else sh
            if not _is_int(pos):
                raise MaskError("the mask indexes a buffer at a length-dependent position")
            index.append(pos)
    if set(picks) != {"i", "j"}:
        raise MaskError("the mask slices a buffer at a length-dependent offset")
    m = table[tuple(index)]
    if picks["i"] > picks["j"]:
        m = m.t()
    if m.shape[0] == 0 or m.shape[1] == 0:
        raise MaskError("the mask slices an empty buffer at a length-dependent offset")
    return Keep(size_expr(shift["i"]) - size_expr(shift["j"]), _toeplitz_steps(m, table, "whole buffer", what))


def _keep_of_pred(pred, roles, sizes, tables, single, names=()) -> Keep:
    """``single``: (Tq == 1, Tk == 1): that position is always 0, so its coefficient is free."""
    kind = pred[0]
    if kind == "const":
        return Keep.const(pred[1])
    if kind == "not":
        return ~_keep_of_pred(pred[1], roles, sizes, tables, single, names)
    if kind in ("and", "or"):
        a = _keep_of_pred(pred[1], roles, sizes, tables, single, names)
        b = _keep_of_pred(pred[2], roles, sizes, tables, single, names)
        return a & b if kind == "and" else a | b
    if kind == "table":
        what = names[pred[1]] if pred[1] < len(names) else "the registered mask buffer ({shape})"
        return _table_keep(tables[pred[1]], pred[2], pred[3], roles, sizes, single, what)
    coefs, off = pred[1], pred[2]                     # sum(coefs * x) + off <= 0
    ci = cj = 0
    for a, c in enumerate(coefs):
        if not c:
            continue
        if roles[a] == "i":
            ci += c
        elif roles[a] == "j":
            cj += c
        elif roles[a] == "other":
            raise MaskError("mask differs between batch entries or heads")
    if single[0] and cj:
        ci = -cj                                       # i is always 0
    elif single[1] and ci:
        cj = -ci                                       # j is always 0
    if ci == 0 and cj == 0:
        if _is_int(off):
            return Keep.const(off <= 0)
        raise MaskError(f"the mask compares sizes ({off} <= 0), not positions")
    if ci != -cj:
        raise MaskError("the mask compares a query or key position with something other than the other "
                        "position (not a function of j - i)")
    k = cj                                            # k * (j - i) + off <= 0
    if abs(k) == 1:
        return Keep.causal(-off) if k == 1 else ~Keep.causal(off - 1)
    if not _is_int(off):
        raise MaskError("the mask scales positions and offsets a length-dependent amount")
    if k > 0:                                          # d <= -off / k
        return Keep.causal(math.floor(-off / k))
    return ~Keep.causal(math.ceil(off / -k) - 1)      # d >= off / |k|


def keep_of(gm: fx.GraphModule, node, weights_rank: int, axes: tuple, evaluate, *, invert: bool = False,
            lengths: tuple = ()) -> Keep:
    """What the mask ``node`` keeps of weights of rank ``weights_rank`` whose query and key axes are
    ``axes`` (the mask broadcasts against them); ``lengths``: the weights' (Tq, Tk) when known.
    ``evaluate(node)``: the concrete value of a constant leaf (a buffer), or None when it depends on
    inputs. Raises MaskError (the reason)."""
    reader = _Reader(gm, evaluate)
    value = reader.as_bool(reader.arg(node))
    shape = reader.shape(node) if isinstance(node, fx.Node) else ()
    shape = shape if shape is not None else ()
    if len(shape) > weights_rank:
        raise MaskError(f"mask of shape {shape} has more axes than the weights")
    ai, aj = axes
    roles, sizes = [], []
    for a, s in enumerate(shape):
        w = a + weights_rank - len(shape)
        roles.append(("zero-i" if w == ai else "zero-j" if w == aj else "zero") if s == 1 else
                     "i" if w == ai else "j" if w == aj else "other")
        sizes.append(s)
    single = tuple(size_expr(n) == 1 for n in lengths) if len(lengths) == 2 else (False, False)
    keep = _keep_of_pred(value.pred, roles, sizes, reader.tables, single, reader.table_names)
    return ~keep if invert else keep
