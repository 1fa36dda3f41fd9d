"""Matmuls whose rows fold heads (or batch) with time: rewritten, in the lowered graph, as the batched
matmuls they are.

Multi-query attention written with einsums or reshapes multiplies a matrix whose rows are (heads,
time) or (time, heads) pairs by one shared matrix: ``einsum("bthd,bsd->bhts", q, k[:, :, 0])`` lowers
to ``bmm([B, H*T, D], [B, D, S]) -> [B, H*T, S]``, and ``einsum("bhts,bsd->bthd", a, v)`` to
``bmm([B, T*H, S], [B, S, Dv])``; a [.., T, T] shape appears only after a view splits the rows. A
matmul treats every row alike, so for any split of the rows R = a_1 * ... * a_k into axes of the
tensor the rows were merged from,

    bmm(A, M) == bmm(X.flatten(batch, others), M[:, None].expand(others).flatten()) .view(..) .permute(..)

where X is A with its rows unmerged and the chosen axis moved last before the contraction: the same
products, regrouped. ``unfold_folded_rows(gm)`` rewrites such matmuls in that form (the operand
shared by every row broadcast with ``unsqueeze`` + ``expand``, as ``q @ k[:, None].mT`` lowers), so
that every reader sees an ordinary batched matmul: the quadratic reader, the numerical probe, the
axis labels (which prove, with the probe off, which axis is heads and which is time), the lookalike
report. Being an identity whatever axis it picks, it cannot make the pass read a wrong site: it only
decides which one the readers get to judge.

Which axis of the rows becomes the matmul's rows (the query time): for the weights times v (the
first operand computed, through elementwise ops and masks, from another product), the axis the
weights' own second-to-last axis lands on, else the one of the keys' length; for the scores (a product
that, made weights, is multiplied by another: matmul -> elementwise -> matmul), the one the product's
views put second to last (the scores as the code reads them, [.., Tq, Tk]), else the one of the keys'
length. Anything else (no such axis, a product that feeds no other, rows built by ``cat``) is left as
written, and the lookalike report says why it is not read (``lookalike.py``).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import VIEW_OPS, example_value, hint, hint_shape, read_views, shape_of, track_axis

aten = torch.ops.aten

# views that keep the row-major order of the elements (a permute or expand does not)
_ORDER_KEEPING = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
                  aten.contiguous.default, aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim,
                  aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints}


# meta key of the nodes the unfolding inserts: intermediate values, never a value of Dynamo's graph
UNFOLDED = "based_compile_unfolded"
# ops the weights stay the weights through, besides views and elementwise ops
_FOLLOW = {aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tril.default, aten.triu.default,
           aten.detach.default}
_SIZE_QUERIES = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}
_RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def _same(a, b) -> bool:
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return statically_known_true(a == b)
    return a == b


def _hint_prod(xs) -> int:
    return math.prod(int(hint(x)) for x in xs)


def _merged(a: fx.Node):
    """(Y, prefix, middle, suffix): the nearest tensor Y that the order-keeping views from it to ``a``
    ([.., N, R, K] or [R, K]) reshape with its axes split into ``prefix`` (product N, the batch),
    ``middle`` (product R, at least two axes of size > 1) and ``suffix`` (product K); or None."""
    shape = hint_shape(a)
    if shape is None or len(shape) not in (2, 3):
        return None
    n = shape[0] if len(shape) == 3 else 1
    r, k = shape[-2], shape[-1]
    node = a
    while isinstance(node, fx.Node) and node.op == "call_function" and isinstance(node.args[0], fx.Node) and (
            node.target in _ORDER_KEEPING or _noop_expand(node)):
        node = node.args[0]
        y = hint_shape(node)
        if y is None:
            return None
        split = _split(y, n, r, k)
        if split is not None:
            return (node,) + split
    return None


def _noop_expand(node: fx.Node) -> bool:
    """An ``expand`` to the shape it already has (``matmul`` lowers with one)."""
    return node.target is aten.expand.default and hint_shape(node) == hint_shape(node.args[0])


def _split(y, n, r, k):
    i = next((i for i in range(len(y) + 1) if _hint_prod(y[:i]) == n), None)
    j = next((j for j in range(len(y), -1, -1) if _hint_prod(y[j:]) == k), None)
    if i is None or j is None or i > j or _hint_prod(y[i:j]) != r:
        return None
    middle = [a for a in range(i, j) if y[a] != 1]
    if len(middle) < 2:
        return None
    return tuple(range(i)), tuple(middle), tuple(range(j, len(y)))


def _sized(y: fx.Node, middle: tuple, want) -> list:
    """The axes of ``y`` among ``middle`` of size ``want`` (under dynamic shapes, those of the same size
    expression first)."""
    sizes = shape_of(y)
    found = [a for a in middle if hint(sizes[a]) == hint(want)]
    if len(found) > 1:
        found = [a for a in found if _same(sizes[a], want)] or found
    return found


def _second_to_last_of_base(y: fx.Node, middle: tuple) -> int | None:
    """The axis of ``y`` that the second-to-last axis of the tensor ``y`` views lands on (the query axis of
    weights [.., Tq, Tk]), if it is one of ``middle``."""
    chain = read_views(None, y, scalars=False)
    base = shape_of(chain.base) if isinstance(chain.base, fx.Node) else None
    if base is None or len(base) < 2:
        return None
    lands = chain.lands(len(base) - 2)
    return lands if lands in middle else None


def _back(view: fx.Node, axis: int) -> int | None:
    """The axis of ``view``'s input that lands on its output axis ``axis``, or None."""
    for i in range(len(hint_shape(view.args[0]) or ())):
        if track_axis(view, i) == axis:
            return i
    return None


def _second_to_last_of_product(mm: fx.Node, y: fx.Node, middle: tuple) -> int | None:
    """The axis of ``y`` (among ``middle``) that becomes the second-to-last axis of what the views of the
    product ``mm`` make of it (the scores as the code reads them: [.., Tq, Tk]), or None. The first of
    those views must split the rows into ``middle``'s sizes, in order."""
    views, node = [], mm
    while True:
        users = [u for u in node.users if u.target not in _SIZE_QUERIES]     # not the sizes it reads
        if len(users) != 1:
            break
        user = users[0]
        if user.op != "call_function" or user.target not in VIEW_OPS or user.args[0] is not node:
            break
        views.append(user)
        node = user
    if not views:
        return None
    axis = len(hint_shape(views[-1])) - 2
    for view in reversed(views[1:]):
        axis = _back(view, axis) if axis is not None else None
    split = hint_shape(views[0])
    n = _hint_prod(hint_shape(mm)[:-2])
    i = next((i for i in range(len(split) + 1) if _hint_prod(split[:i]) == n), None)
    if axis is None or i is None:
        return None
    block, total = [], 1
    for a in range(i, len(split)):
        if total == hint_shape(mm)[-2]:
            break
        total *= split[a]
        if split[a] != 1:
            block.append(a)
    sizes = hint_shape(y)
    if total != hint_shape(mm)[-2] or [split[a] for a in block] != [sizes[a] for a in middle] \
            or axis not in block:
        return None
    return middle[block.index(axis)]


def _reads_a_product(a: fx.Node, k) -> bool:
    """``a`` is computed, through views and elementwise ops, from a matmul's output whose last axis has
    ``a``'s last size ``k`` (the weights of a product with v: P(q k^T) masked), not from q."""
    stack, seen = [a], set()
    while stack and len(seen) < 64:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node.op != "call_function":
            continue
        seen.add(node)
        if node.target in (aten.bmm.default, aten.mm.default, aten.baddbmm.default):
            if hint(shape_of(node)[-1]) == hint(k):
                return True
            continue
        if node.target in VIEW_OPS or node.target in _FOLLOW or torch.Tag.pointwise in getattr(node.target, "tags", ()):
            stack.extend(node.all_input_nodes)
    return False


def _feeds_a_product(mm: fx.Node) -> bool:
    """The product ``mm`` reaches, through views and elementwise ops, the first operand of another matmul
    (the scores, made weights, times v)."""
    stack, seen = [mm], set()
    while stack and len(seen) < 64:
        node = stack.pop()
        for user in node.users:
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in (aten.bmm.default, aten.mm.default) and user.args[0] is node:
                return True
            if user.target in VIEW_OPS or user.target in _FOLLOW or \
                    torch.Tag.pointwise in getattr(user.target, "tags", ()):
                stack.append(user)
    return False


def _rows_axis(mm: fx.Node, y: fx.Node, middle: tuple) -> int | None:
    """Which axis of the rows (``middle``, axes of ``y``) the unfolded matmul takes as its rows: the time
    axis (None: not a product of attention, left as written). For the weights times v (``a`` read
    from another product): the axis the weights' own
    second-to-last axis lands on, else the one of the weights' key length (the innermost of equals).
    For the scores: the one the product's views put second to last (the scores as the code reads
    them, [.., Tq, Tk]), else the one of the product's column count (the innermost of equals); only
    for a product that, made weights, is multiplied by another (matmul -> elementwise -> matmul)."""
    a, m = mm.args[:2]
    cols, contracted = shape_of(mm)[-1], shape_of(a)[-1]
    if _reads_a_product(a, contracted):
        rows = _second_to_last_of_base(y, middle)
        found = _sized(y, middle, contracted)
        return rows if rows is not None else (found[-1] if found else None)
    if not _feeds_a_product(mm):            # not scores: left as written
        return None
    rows = _second_to_last_of_product(mm, y, middle)
    if rows is not None:
        return rows
    found = _sized(y, middle, cols)
    return found[-1] if found else None


def unfold_folded_rows(gm: fx.GraphModule) -> dict:
    """Rewrite every ``bmm`` / ``mm`` of ``gm`` whose first operand's rows fold two or more axes into the
    batched matmul it is (see the module docstring). Returns {old matmul: the node that now computes
    its value} (for the map back to Dynamo's graph)."""
    replaced = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (aten.bmm.default, aten.mm.default):
            continue
        try:
            new = _unfold(gm, node)
        except Exception:  # noqa: BLE001 - a matmul left as written is read as written
            new = None
        if new is not None:
            replaced[node] = new
    if replaced:
        gm.graph.lint()
        gm.recompile()
    return replaced


def _unfold(gm: fx.GraphModule, mm: fx.Node) -> fx.Node | None:
    a, m = mm.args[:2]
    if not (isinstance(a, fx.Node) and isinstance(m, fx.Node)):
        return None
    found = _merged(a)
    if found is None:
        return None
    y, prefix, middle, suffix = found
    val = example_value(mm)
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return None
    rows = _rows_axis(mm, y, middle)
    if rows is None:
        return None
    users = list(mm.users)
    inserted: list[fx.Node] = []
    try:
        out, flat = _build(gm, mm, y, prefix, middle, suffix, rows, mode, inserted)
    except Exception:
        for node in reversed(inserted):
            gm.graph.erase_node(node)
        raise
    # views of the old product (and views of those: a reshape of a reshape of a contiguous tensor is one
    # reshape of it) view the unfolded product; every other user reads the old value
    stack, bypassed = [(user, mm) for user in users], []
    while stack:
        user, read = stack.pop()
        if user.op == "call_function" and user.target in _RESHAPES and user.args[0] is read:
            user.args = (out,) + tuple(user.args[1:])
            if read is not mm:
                bypassed.append(read)
            stack.extend((u, user) for u in user.users)
        elif read is mm:
            user.replace_input_with(mm, flat)
    gm.graph.erase_node(mm)
    # a view whose views now view the product directly, and that nothing else reads (the matmul's own
    # [N, R, C] view), goes: the views of the product stay one chain (``candidate.view_chain``)
    for node in reversed(bypassed):
        if not node.users:
            gm.graph.erase_node(node)
    for node in reversed(inserted):         # the old value where nothing but views read it
        if node.users or node is out:
            break
        gm.graph.erase_node(node)
    return flat


def _build(gm, mm, y, prefix, middle, suffix, rows, mode, inserted) -> tuple[fx.Node, fx.Node]:
    """The unfolded product's nodes, inserted after ``mm`` (each appended to ``inserted``): (the product
    as [prefix.., middle.., columns] in ``y``'s order, contiguous; the old matmul's value)."""
    a, m = mm.args[:2]
    sizes = shape_of(y)
    at = [mm]

    def add(target, args, **kwargs):
        with gm.graph.inserting_after(at[0]):
            node = gm.graph.call_function(target, args, kwargs)
        inserted.append(node)
        at[0] = node
        with mode:
            node.meta["val"] = target(*fx.node.map_arg(args, example_value), **kwargs)
        node.meta["stack_trace"] = mm.meta.get("stack_trace")
        node.meta[UNFOLDED] = True
        return node

    def size(node, axis):
        s = shape_of(node)[axis]
        return add(aten.sym_size.int, (node, axis)) if isinstance(s, torch.SymInt) else int(s)

    # X: y without the unit axes of its rows, [prefix.., middle.., suffix..]
    units = [ax for ax in range(prefix[-1] + 1 if prefix else 0, suffix[0] if suffix else len(sizes))
             if ax not in middle]
    x = add(aten.squeeze.dims, (y, units)) if units else y
    drop = lambda ax: ax - sum(u < ax for u in units)          # noqa: E731 - y's axis -> x's axis
    p, mids, suf = [drop(ax) for ax in prefix], [drop(ax) for ax in middle], [drop(ax) for ax in suffix]
    r = drop(rows)
    others = [ax for ax in mids if ax != r]
    order = p + others + [r] + suf
    xp = x
    if order != list(range(len(order))):
        xp = add(aten.permute.default, (x, order))
        xp = add(aten.clone.default, (xp,), memory_format=torch.contiguous_format)
    lead = len(p) + len(others)                                 # batch axes of the new matmul
    xb = add(aten.flatten.using_ints, (xp, 0, lead - 1)) if lead > 1 else xp
    if len(suf) > 1:
        xb = add(aten.flatten.using_ints, (xb, 2, 1 + len(suf)))
    elif not suf:
        xb = add(aten.unsqueeze.default, (xb, -1))
    # the shared operand, broadcast over the other row axes
    batched = mm.target is aten.bmm.default
    mb = m
    for i in range(len(others)):
        mb = add(aten.unsqueeze.default, (mb, (1 if batched else 0) + i))
    expand = ([-1] if batched else []) + [size(xp, len(p) + i) for i in range(len(others))] + [-1, -1]
    mb = add(aten.expand.default, (mb, expand))
    if len(others) + (1 if batched else 0) > 1:
        mb = add(aten.flatten.using_ints, (mb, 0, len(others) - (0 if batched else 1)))
    out = add(aten.bmm.default, (xb, mb))
    # back to [prefix.., middle.., columns] in y's order, then the old matmul's value
    shape = [size(xp, i) for i in range(lead + 1)] + [size(m, -1)]
    out = add(aten.view.default, (out, shape))
    inverse = [0] * (len(order) - len(suf) + 1)
    for position, axis in enumerate(p + others + [r]):
        inverse[axis] = position
    inverse[-1] = len(inverse) - 1
    if inverse != list(range(len(inverse))):
        out = add(aten.permute.default, (out, inverse))
        out = add(aten.clone.default, (out,), memory_format=torch.contiguous_format)
    # the old value, [.., N, R, C]: for every user but the views, which view the unfolded product
    flat = add(aten.flatten.using_ints, (out, len(p), len(p) + len(mids) - 1))
    if batched and len(p) != 1:
        flat = add(aten.flatten.using_ints, (flat, 0, len(p) - 1)) if p else add(aten.unsqueeze.default, (flat, 0))
    return out, flat
