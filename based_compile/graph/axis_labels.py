"""Which axis is which, proven by identity rather than by size (the structural reading's axes).

Without the numerical probe (above its size limit: every real model) the pass must know from the
graph alone which axes of q, k, v and of the output are batch, heads, time and features. Sizes
cannot tell them apart: T == H, B == H or T == Dk, also at the length a dynamic graph was first
traced at. ``why_not`` labels every axis of q, k and v with the role the reading gives it (batch,
heads, query time, key time, q/k features, v features), follows the labels through every node from
them to the site's output, and requires them to line up:

- elementwise operands (broadcast), concatenated tensors off the concatenation axis, and a matmul's
  batch axes carry the same labels; a matmul contracts equal labels;
- a running sum along key time is indexed by query time (sum over j <= i); along another axis it
  is no role at all;
- the output's axes carry exactly the roles the rewrite gives them ([B, H, T, Dv], or the
  reading's transposed or flattened variant).

An axis is a sequence of pieces ``(atom, stride, size)``, outermost first: views split and merge
atoms by their sizes as expressions (symbolic under dynamic shapes), so a reshape that is the
identity only at the traced length ([B, H, T, D] -> [B, T, H, D] at T == H) is a reinterpretation
here. Axes that vary only with constants (a mask, ``torch.ones``) and axes broadcast by ``expand``
are wildcards (GQA's repeated heads are k's heads times a wildcard). Features built by feature maps
(concatenations, index gathers of the q/k feature axis) are checked to come from the feature axis
alone (a diagonal, or a gather by index pairs, of two feature axes included), and to meet the other
side's features in the same order (a view that regroups one map's feature
axis pairs feature f with another); which features a map holds where is the feature-map reader's proof
(``feature_order``). An op not known here gives an
opaque label, which fails where it is checked: the site is refused with the reason, not guessed.
"""
from __future__ import annotations

import weakref

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.functions import FloorDiv

from .canonicalize import example_value, shape_of

aten = torch.ops.aten

WILD = "*"          # an axis along which the value does not depend on q, k or v's indices
_ROLE_WORDS = {"B": "batch", "H": "heads", "Tq": "query time", "Tk": "key time", "T": "time",
               "Dk": "q/k features", "Dv": "v features"}


class Mismatch(Exception):
    """The labels do not line up: the message says where and how."""


# ---------------------------------------------------------------------------- sizes


def _exact_floor_div(expr):
    """``FloorDiv(a, b)`` as ``a / b`` where b divides a for every value of the symbols
    (``(s0**2) // s0`` is s0)."""
    def exact(e):
        quotient = sympy.cancel(e.args[0] / e.args[1])
        return quotient if sympy.fraction(quotient)[1] == 1 else e
    return expr.replace(lambda e: isinstance(e, FloorDiv), exact)


_PINNED = weakref.WeakKeyDictionary()       # shape env -> (number of guards read, {symbol: value})


def _pinned(env) -> dict:
    """Symbols a guard of ``env`` fixes to one value (``Eq(2*s0, s0**2)``: s0 = 2, where a batched
    matmul of [s0 * s0] by [2 * s0] matrices was traced): the graph runs only at that value. Dynamo
    records such a guard without replacing the symbol."""
    guards = [g.expr for g in getattr(env, "guards", ())]
    try:
        cached = _PINNED.get(env)
    except TypeError:           # not weakly referenceable: not cached
        cached = None
    if cached is not None and cached[0] == len(guards):
        return cached[1]
    pinned = {}
    for expr in guards:
        if not isinstance(expr, sympy.Eq) or len(expr.free_symbols) != 1:
            continue
        (sym,) = expr.free_symbols
        difference = expr.lhs - expr.rhs
        if not difference.is_polynomial(sym) or sympy.degree(difference, sym) > 4:
            continue
        roots = [r for r in sympy.solve(difference, sym) if r.is_integer and r.is_positive]
        if len(roots) == 1:
            pinned[sym] = roots[0]
    try:
        _PINNED[env] = (len(guards), pinned)
    except TypeError:
        pass
    return pinned


def _size(x):
    if isinstance(x, torch.SymInt):
        expr = x.node.expr
        pinned = _pinned(x.node.shape_env)
        if pinned and expr.free_symbols & set(pinned):
            expr = sympy.sympify(expr.xreplace(pinned))
        return _exact_floor_div(expr)
    return sympy.Integer(int(x))


def _sizes(node) -> tuple | None:
    shape = shape_of(node) if isinstance(node, fx.Node) else None
    return None if shape is None else tuple(_size(s) for s in shape)


def _eq(a, b) -> bool:
    return a == b or sympy.expand(a - b) == 0


def _is_one(a) -> bool:
    return _eq(a, sympy.Integer(1))


def _ratio(a, b):
    """a / b when it is a positive integer for every value of the symbols (as far as sympy can
    tell), else None."""
    r = sympy.cancel(a / b)
    return r if r.is_integer and r.is_positive else None


# ---------------------------------------------------------------------------- labels


def _norm(pieces) -> tuple:
    """Drop size-1 pieces; merge neighbours that are consecutive parts of one atom."""
    out = []
    for piece in pieces:
        atom, stride, size = piece
        if _is_one(size):
            continue
        if out:
            a0, s0, n0 = out[-1]
            if a0 == atom == WILD:
                out[-1] = (WILD, sympy.Integer(1), n0 * size)
                continue
            if a0 == atom and _eq(s0, stride * size):
                out[-1] = (atom, stride, n0 * size)
                continue
        out.append((atom, sympy.Integer(1), size) if atom == WILD else (atom, stride, size))
    return tuple(out)


def _total(label):
    total = sympy.Integer(1)
    for _, _, size in label:
        total = total * size
    return total


def _split(piece, outer):
    """``piece`` as (its outer part of size ``outer``, the rest), or None when ``outer`` does not divide it."""
    atom, stride, size = piece
    inner = _ratio(size, outer)
    if inner is None:
        return None
    return (atom, stride * inner, outer), (atom, stride, inner)


def _refine(a, b):
    """``a`` and ``b`` (labels of axes of equal size) cut at the same boundaries, or None."""
    a, b, out_a, out_b = list(a), list(b), [], []
    while a and b:
        pa, pb = a.pop(0), b.pop(0)
        if _eq(pa[2], pb[2]):
            out_a.append(pa)
            out_b.append(pb)
            continue
        if _ratio(pa[2], pb[2]) is not None:
            outer, inner = _split(pa, pb[2])
            out_a.append(outer)
            out_b.append(pb)
            a.insert(0, inner)
        elif _ratio(pb[2], pa[2]) is not None:
            outer, inner = _split(pb, pa[2])
            out_a.append(pa)
            out_b.append(outer)
            b.insert(0, inner)
        else:
            return None
    if a or b:
        return None
    return out_a, out_b


def _features_only(label) -> bool:
    """Built from the q/k feature axis alone (a feature map's concatenation or gather of it)."""
    for atom, _, _ in label:
        if atom in (WILD, "Dk", "F"):        # F: an initial state's features (the keys' feature map)
            continue
        if isinstance(atom, tuple) and atom and atom[0] in ("cat", "index", "slice"):
            if not all(_features_only(inner) for inner in atom[1]):
                return False
            continue
        return False
    return True


def _compound(label) -> bool:
    return any(atom == "F" or isinstance(atom, tuple) and atom and atom[0] in ("cat", "index", "slice")
               for atom, _, _ in label)


def unify(a, b, where: str):
    """The label of an axis that carries ``a`` in one operand and ``b`` in another (wildcards give
    way), or Mismatch."""
    if a == b:
        return a
    if _compound(a) or _compound(b):
        if _features_only(a) and _features_only(b) and _eq(_total(a), _total(b)):
            if not _same_order(a, b):
                raise Mismatch(f"{where}: features meet features in another order (a view splits and regroups "
                               "the feature axis on one side only: feature f of one map meets another feature "
                               "of the other)")
            return a if _compound(a) else b
        raise Mismatch(f"{where}: {describe(a)} meets {describe(b)}")
    refined = _refine(a, b)
    if refined is None:
        raise Mismatch(f"{where}: {describe(a)} meets {describe(b)} (their sizes do not line up)")
    out = []
    for pa, pb in zip(*refined):
        if pa[0] == WILD:
            out.append(pb)
        elif pb[0] == WILD or pa == pb:
            out.append(pa)
        else:
            raise Mismatch(f"{where}: {describe(a)} meets {describe(b)}")
    return _norm(out)


def _same_order(a, b) -> bool:
    """Two feature labels of the same size walk their features in the same order: cut at the same
    boundaries, each pair of pieces has the same stride (its place in its map), broadcast pieces aside."""
    refined = _refine(a, b)
    return refined is not None and all(pa[0] == WILD or pb[0] == WILD or _eq(pa[1], pb[1])
                                       for pa, pb in zip(*refined))


def describe(label) -> str:
    if not label:
        return "a unit axis"
    parts = []
    for atom, stride, size in label:
        if atom == WILD:
            parts.append("a broadcast axis")
        elif isinstance(atom, str) and atom in _ROLE_WORDS:
            whole = _ROLE_WORDS[atom]
            parts.append(whole if _is_one(stride) and len(label) == 1 else f"part of {whole}")
        elif atom == "F" or isinstance(atom, tuple) and atom and atom[0] in ("cat", "index", "slice"):
            parts.append("features")
        else:
            parts.append("an axis the pass does not follow")
    return " x ".join(parts)


def _wild(sizes) -> tuple:
    return tuple(_norm([(WILD, sympy.Integer(1), s)]) for s in sizes)


def _opaque(node: fx.Node, sizes) -> tuple:
    return tuple(_norm([(("?", node.name, i), sympy.Integer(1), s)]) for i, s in enumerate(sizes))


# ---------------------------------------------------------------------------- ops


_IDENTITY = {aten.clone.default, aten.alias.default, aten._to_copy.default, aten.contiguous.default,
             aten.lift_fresh_copy.default, aten.detach.default, aten.tril.default, aten.triu.default,
             aten.masked_fill.Tensor, aten.masked_fill.Scalar}
_RESHAPE = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints}
_REDUCE = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
           aten.amin.default, aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim, aten.prod.dim_int,
           aten.var.correction, aten.std.correction, aten.logsumexp.default}
_FILLS = {aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default,
          aten.new_zeros.default, aten.new_ones.default, aten.new_full.default, aten.new_empty.default,
          aten.rand_like.default, aten.randn_like.default, aten.sym_size.int, aten.sym_numel.default,
          aten.sym_stride.int, aten.sym_storage_offset.default}


def _reshape(labels, out_sizes, where: str):
    flat = [p for axis in labels for p in axis]
    out = []
    for size in out_sizes:
        need, dim = size, []
        while not _is_one(need):
            if not flat:
                raise Mismatch(f"{where}: a reshape the pass cannot follow")
            piece = flat.pop(0)
            if _eq(piece[2], need):
                dim.append(piece)
                need = sympy.Integer(1)
            elif _ratio(need, piece[2]) is not None:
                dim.append(piece)
                need = _ratio(need, piece[2])
            else:
                split = _split(piece, need)
                if split is None:
                    raise Mismatch(f"{where}: a reshape splits {describe((piece,))} at a size that does not "
                                   "divide it for every length")
                dim.append(split[0])
                flat.insert(0, split[1])
                need = sympy.Integer(1)
        out.append(_norm(dim))
    if flat:
        raise Mismatch(f"{where}: a reshape the pass cannot follow")
    return tuple(out)


def _dims(dims, rank: int) -> list[int]:
    if dims is None:
        return list(range(rank))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % rank for d in dims}) if dims else list(range(rank))


def _broadcast(operands, out_sizes, where: str):
    """Labels of an elementwise op's output from its operands' (labels, sizes), aligned at the right."""
    rank = len(out_sizes)
    out = []
    for axis in range(rank):
        label = _wild([out_sizes[axis]])[0]
        for labels, sizes in operands:
            at = axis - (rank - len(sizes))
            if at < 0 or _is_one(sizes[at]):
                continue
            label = unify(label, labels[at], f"{where}, axis {axis}")
        out.append(label)
    return tuple(out)


def _step(node: fx.Node, label_of, out_sizes):
    """The labels of ``node``'s output (``label_of(arg)`` gives an argument's labels)."""
    target, args = node.target, node.args
    where = node.name
    if target in _FILLS:
        return None
    if target in _IDENTITY:
        return label_of(args[0])
    if target in _RESHAPE:
        return _reshape(label_of(args[0]), out_sizes, where)
    if target in (aten.permute.default, aten.transpose.int, aten.t.default):
        labels = list(label_of(args[0]))
        rank = len(labels)
        if target is aten.permute.default:
            order = [d % rank for d in args[1]]
        else:
            order = list(range(rank))
            d0, d1 = (args[1] % rank, args[2] % rank) if target is aten.transpose.int else (0, 1 if rank > 1 else 0)
            order[d0], order[d1] = order[d1], order[d0]
        return tuple(labels[d] for d in order)
    if target is aten.unsqueeze.default:
        labels = list(label_of(args[0]))
        labels.insert(args[1] % (len(labels) + 1), ())
        return tuple(labels)
    if target in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        labels, sizes = label_of(args[0]), _sizes(args[0])
        dims = _dims(args[1] if len(args) > 1 else None, len(sizes))
        return tuple(lab for i, lab in enumerate(labels) if not (i in dims and _is_one(sizes[i])))
    if target is aten.expand.default:
        labels, sizes = label_of(args[0]), _sizes(args[0])
        shift = len(out_sizes) - len(sizes)
        out = list(_wild(out_sizes[:shift]))
        for i, lab in enumerate(labels):
            out.append(_wild([out_sizes[i + shift]])[0] if _is_one(sizes[i]) else lab)
        return tuple(out)
    if target is aten.slice.Tensor:
        labels, sizes = list(label_of(args[0])), _sizes(args[0])
        dim = (args[1] if len(args) > 1 else 0) % len(sizes)
        if not _eq(sizes[dim], out_sizes[dim]):
            rest = tuple(a for a in args[2:])
            labels[dim] = _norm([(("slice", (labels[dim],), str(rest)), sympy.Integer(1), out_sizes[dim])])
        return tuple(labels)
    if target is aten.select.int:
        labels = list(label_of(args[0]))
        del labels[args[1] % len(labels)]
        return tuple(labels)
    if target is aten.index.Tensor:
        labels, indices = list(label_of(args[0])), list(args[1])
        used = [i for i, ix in enumerate(indices) if ix is not None]
        if len(used) == 1 and isinstance(indices[used[0]], fx.Node) and len(_sizes(indices[used[0]]) or ()) == 1:
            d = used[0]
            ix = indices[d]
            labels[d] = _norm([(("index", (labels[d],), ix.name), sympy.Integer(1), out_sizes[d])])
            return tuple(labels)
        if len(used) == 2 and used[1] == used[0] + 1 and all(
                isinstance(indices[d], fx.Node) and len(_sizes(indices[d]) or ()) == 1 for d in used):
            # P[..., I, J] (adjacent index tensors): pairs of the two axes' entries along one axis, in place
            d = used[0]
            pair = (("index", (labels[d], labels[d + 1]), tuple(indices[i].name for i in used)),
                    sympy.Integer(1), out_sizes[d])
            return tuple(labels[:d]) + (_norm([pair]),) + tuple(labels[d + 2:])
        return _opaque(node, out_sizes)
    if target is aten.diagonal.default:
        labels = label_of(args[0])
        rank = len(labels)
        offset, dim1, dim2 = (list(args[1:]) + [0, 0, 1][len(args) - 1:])[:3]
        dims = (dim1 % rank, dim2 % rank)
        kept = tuple(lab for i, lab in enumerate(labels) if i not in dims)
        diag = (("index", (labels[dims[0]], labels[dims[1]]), f"diagonal{offset}"), sympy.Integer(1), out_sizes[-1])
        return kept + (_norm([diag]),)
    if target in _REDUCE:
        labels = label_of(args[0])
        dims_arg = args[1] if len(args) > 1 else None
        if target is aten.linalg_vector_norm.default:
            dims_arg = args[2] if len(args) > 2 else node.kwargs.get("dim")
            keep = args[3] if len(args) > 3 else node.kwargs.get("keepdim", False)
        elif target in (aten.sum.default, aten.mean.default):
            dims_arg, keep = None, False
        else:
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
        dims = _dims(dims_arg, len(labels))
        if keep:
            return tuple(() if i in dims else lab for i, lab in enumerate(labels))
        return tuple(lab for i, lab in enumerate(labels) if i not in dims)
    if target is aten.cumsum.default:
        labels = list(label_of(args[0]))
        dim = args[1] % len(labels)
        pieces = labels[dim]
        if len(pieces) == 1 and pieces[0][0] == "Tk":
            labels[dim] = (("Tq",) + pieces[0][1:],)      # sum_{j <= i}: indexed by the query
        elif len(pieces) == 1 and pieces[0][0] == "T":
            pass
        elif pieces and not all(p[0] == WILD for p in pieces):
            labels[dim] = _norm([(("cumsum", pieces), sympy.Integer(1), out_sizes[dim])])
        return tuple(labels)
    if target in (aten.bmm.default, aten.mm.default):
        a, b = label_of(args[0]), label_of(args[1])
        unify(a[-1], b[-2], f"{where} (the axis the matmul contracts)")
        if target is aten.mm.default:
            return (a[0], b[1])
        batch = unify(a[0], b[0], f"{where} (the matmul's batch axis)")
        return (batch, a[1], b[2])
    if target is aten.cat.default:
        tensors = [t for t in args[0] if isinstance(t, fx.Node)]
        dim = (args[1] if len(args) > 1 else node.kwargs.get("dim", 0)) % len(out_sizes)
        parts, out = [], list(_wild(out_sizes))
        for t in tensors:
            labels, sizes = label_of(t), _sizes(t)
            if len(sizes) != len(out_sizes):        # the legacy empty tensor of cat
                continue
            for axis in range(len(out_sizes)):
                if axis == dim:
                    parts.append(labels[axis])
                elif not _is_one(sizes[axis]):
                    out[axis] = unify(out[axis], labels[axis], f"{where}, axis {axis}")
        out[dim] = _norm([(("cat", tuple(parts)), sympy.Integer(1), out_sizes[dim])])
        return tuple(out)
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        operands = [(label_of(a), _sizes(a)) for a in node.all_input_nodes if _sizes(a) is not None]
        return _broadcast(operands, out_sizes, where)
    return _opaque(node, out_sizes)


# ---------------------------------------------------------------------------- the check


def _role_labels(reading, m):
    """Initial labels of q, k, v under ``reading``, and the labels the output must carry."""
    one = sympy.Integer(1)
    shared_t = m.q is m.k or m.q is m.v
    tq, tk = ("T", "T") if shared_t else ("Tq", "Tk")
    dv = "Dk" if (m.v is m.k or m.v is m.q) else "Dv"
    group = reading.spec.group
    order = ("H", "T", "D") if reading.unsqueeze_inputs else (
        ("B", "H", "T", "D") if reading.spec.layout == "BHTD" else ("B", "T", "H", "D"))

    headless = getattr(reading, "unsqueeze_kv", (False, False))

    def labels(node, t_atom, d_atom, kv: bool):
        sizes = _sizes(node)
        # one key/value head without its axis ([B, T, D] next to a 4-d q): no heads label
        roles = tuple(r for r in order if r != "H") if kv and headless[node is m.v] else order
        if sizes is None or len(sizes) != len(roles):
            raise Mismatch(f"{node.name} is not of rank {len(roles)}")
        out = []
        for role, size in zip(roles, sizes):
            if role == "H":
                out.append(_norm([("H", sympy.Integer(group) if kv else one, size)]))
            else:
                out.append(_norm([({"B": "B", "T": t_atom, "D": d_atom}[role], one, size)]))
        return tuple(out)

    initial = {}
    for node, t_atom, d_atom, kv in ((m.v, tk, dv, True), (m.k, tk, "Dk", True), (m.q, tq, "Dk", False)):
        initial[node] = labels(node, t_atom, d_atom, kv)     # q last: q's heads win when q is k (group 1)
    states = getattr(m, "initial", None)       # a continued prefill: the states it starts from
    for st, roles in ((getattr(states, "kv", None), ("B", "H", "F", dv)), (getattr(states, "k", None), ("B", "H", "F"))):
        if st is not None:
            initial[st.source] = _state_labels(st, roles)
    q = initial[m.q]
    b = () if reading.unsqueeze_inputs else q[order.index("B")]
    h, t = q[order.index("H")], q[order.index("T")]
    v_sizes = _sizes(m.v)
    d = _norm([(dv, one, v_sizes[-1])])
    expected = [b, h, t, d] if reading.spec.layout == "BHTD" or reading.unsqueeze_inputs else [b, t, h, d]
    if reading.transpose_out:
        expected[1], expected[2] = expected[2], expected[1]
    if reading.flatten_out:
        expected = [_norm(expected[0] + expected[1])] + expected[2:]
    return initial, tuple(expected)


def _state_labels(st, roles) -> tuple:
    """An initial state's source labelled as the operator reads it: its ``squeeze`` axes dropped (unit
    axes), the rest permuted by ``perm`` onto ``roles`` ([B, H, F, Dv] or [B, H, F])."""
    sizes = _sizes(st.source)
    kept = [a for a in range(len(sizes)) if a not in st.squeeze]
    out = [()] * len(sizes)
    for role, position in zip(roles, st.perm):
        axis = kept[position]
        out[axis] = _norm([(role, sympy.Integer(1), sizes[axis])])
    return tuple(out)


def _ancestors(output: fx.Node) -> set:
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen


def why_not(m, reading) -> str | None:
    """Why the labels of ``reading`` (verify.Settled) do not line up from q, k, v to the site's
    output in the lowered graph, or None when they do."""
    try:
        _check(m, reading)
    except Mismatch as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - a defect here refuses the site, never breaks the model
        return f"the axes could not be followed ({type(err).__name__}: {err})"
    return None


def _check(m, reading) -> None:
    initial, expected = _role_labels(reading, m)
    wanted = _ancestors(m.output)
    labelled: dict[fx.Node, tuple] = {}

    def label_of(arg):
        if arg in labelled:
            return labelled[arg]
        return _wild(_sizes(arg) or ())

    for node in m.output.graph.nodes:
        if node not in wanted:
            continue
        if node in initial:
            labelled[node] = initial[node]
            continue
        if node.op != "call_function" or not any(a in labelled for a in node.all_input_nodes):
            continue
        if not isinstance(example_value(node), torch.Tensor):
            continue
        out_sizes = _sizes(node)
        labels = _step(node, label_of, out_sizes)
        if labels is None:
            continue
        if len(labels) != len(out_sizes):
            raise Mismatch(f"{node.name}: the pass lost track of its axes")
        labelled[node] = labels
    got = labelled.get(m.output)
    if got is None:
        raise Mismatch("the output is not computed from q, k and v")
    if len(got) != len(expected) or any(g != e for g, e in zip(got, expected)):
        raise Mismatch("the output's axes are " + ", ".join(describe(g) for g in got) + " where the rewrite "
                       "gives " + ", ".join(describe(e) for e in expected))
