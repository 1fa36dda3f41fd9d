"""Regions that look like attention but that no reader explained.

``explain()`` must give every such region a site or a refusal with a reason, never silence. After
matching, ``unexplained(gm, answered, covered, to_dynamo)`` looks at every contraction of the
lowered region (a ``bmm`` / ``mm`` / ``baddbmm``, or a product summed over an axis: an einsum's
lowering) that no reader answered, and walks its operands back through the ops that keep a
sequence mixer a sequence mixer (views, elementwise ops, ``detach``, masks, running sums, flips,
slices, cats, pads) to what it mixes:

- quadratic: a square ``[.., T, T]`` product (the scores: ``bmm``, ``mm`` or ``baddbmm``), with at
  least one op that is not a view between (matmul -> polynomial -> matmul);
- linear: a running sum (``cumsum``) of a product of two tensors (phi(k) (x) v), or a running sum or
  a sum over a leading axis (over time) of a feature map (a ``cat`` of pieces): phi(q) . sum_j
  phi(k_j) v_j (a sum over time of a product of other tensors, projected, is pooling: not reported);
- recurrent step: a region input (a state) plus an outer product (kv_state + phi(k)^T v).

It yields one refusal per such chain, saying which of its ops the readers do not read (a
``detach`` or ``no_grad``, a running sum of the weights, a flip, a slice, a scaled update, an
in-place write into the weights, any other op that keeps a floating operand's shape, ...) and,
where the region was cut (a dropout with p > 0 in training is random and never part of a region; a
custom autograd.Function, a tensor hook, ``F.normalize(p=2)``: ``region_cuts``), goes on in
Dynamo's graph. A chain that reaches a node a reader explained (``covered``:
what the sites compute and what their refusals read) is that reader's, and not reported again;
chains that share nodes are reported once.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .canonicalize import (VIEW_OPS, hint_shape, identity_dropout, read_views, scalar_value, strip_views,
                           track_axis)
from .feature_map import describe_unread, read_feature_map
from .inputs import source_name
from . import region_cuts

aten = torch.ops.aten

_MAX_NODES = 96
_MATMULS = {aten.bmm.default, aten.mm.default, aten.baddbmm.default}
# ops a sequence mixer stays a sequence mixer through (besides views and pointwise ops)
_FOLLOW = {aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.tril.default,
           aten.triu.default, aten.detach.default, aten.cumsum.default, aten.flip.default, aten.roll.default,
           aten.slice.Tensor, aten.select.int, aten.cat.default, aten.constant_pad_nd.default,
           aten.index_select.default, aten.slice_scatter.default, aten.select_scatter.default}
# ops that write some entries of a tensor (functionalised in-place writes: a[..., i, i] = 0,
# a.diagonal().zero_(), a.scatter_(...)): the chain goes on through the tensor written into
_WRITES = {aten.slice_scatter.default, aten.select_scatter.default, aten.diagonal_scatter.default,
           aten.as_strided_scatter.default, aten.index_put.default, aten.index_fill.int_Scalar,
           aten.index_fill.int_Tensor, aten.index_copy.default, aten.index_add.default, aten.masked_scatter.default,
           aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.scatter_reduce.two}
_FOLLOW |= _WRITES
_WRITE_NAMES = {t.overloadpacket.__name__ for t in _WRITES}
# ops of a chain the readers read (sums, products, masks, views, the forms' own moves): any other op
# on the chain is named in the reason
_READ_OPS = {"add", "sub", "rsub", "mul", "div", "neg", "positive", "pow", "square", "addcmul", "addcdiv", "lerp",
             "where", "masked_fill", "tril", "triu", "detach", "cumsum", "sum", "flip", "roll", "slice", "select",
             "cat", "constant_pad_nd", "index_select", "slice_scatter", "select_scatter", "reciprocal", "copy",
             "clone", "_to_copy", "ge", "gt", "le", "lt", "eq", "ne", "bitwise_not", "bitwise_and",
             "bitwise_or", "logical_not", "logical_and", "logical_or", "arange", "ones_like", "zeros_like", "full",
             "ones", "zeros", "scalar_tensor", "fill", "expand", "view", "unsqueeze", "squeeze"}
_DYNAMO_ELEMENTWISE = {
    "mul", "add", "sub", "truediv", "div", "pow", "neg", "square", "addcmul", "addcdiv", "lerp", "where",
    "masked_fill", "masked_fill_", "mul_", "add_", "sub_", "div_", "pow_", "tril", "triu", "float", "double",
    "to", "type_as", "view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "expand",
    "clone", "iadd", "imul", "isub", "itruediv", "detach", "cumsum", "flip",
}
_DYNAMO_RANDOM = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
_DYNAMO_MATMUL = {"matmul", "bmm", "einsum", "__matmul__", "baddbmm"}
# softmax cuts a region (it is no op the readers read): the chain goes on in Dynamo's graph, and a softmax
# over scores (square, or q @ k^T against keys of another length) is softmax attention, which is said as such
_DYNAMO_SOFTMAX = {"softmax", "log_softmax", "_softmax", "_safe_softmax"}


def _name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    if t in (operator.mul, operator.add, operator.sub, operator.truediv, operator.pow, operator.neg):
        return t.__name__
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t)).split(".")[-1]


def _square(node: fx.Node) -> bool:
    shape = hint_shape(node)
    return (node.op == "call_function" and node.target in _MATMULS and shape is not None
            and len(shape) >= 2 and shape[-1] == shape[-2])


def _folded_square(node: fx.Node):
    """A matmul whose [.., T, T] shape appears only after views split one of its axes (heads or batch
    folded with time into its rows or its columns): (the view that shows it square, "rows" or
    "columns"), else None."""
    shape = hint_shape(node)
    if node.op != "call_function" or node.target not in _MATMULS or shape is None or len(shape) < 2 \
            or shape[-1] == shape[-2]:
        return None
    numel = math.prod(shape)
    stack, seen = [(node, 0)], set()
    while stack:
        current, depth = stack.pop()
        for user in current.users:
            if user in seen or user.op != "call_function" or user.target not in VIEW_OPS or depth >= 8:
                continue
            seen.add(user)
            out = hint_shape(user)
            if out is not None and len(out) >= 3 and out[-1] == out[-2] and math.prod(out) == numel:
                return user, ("rows" if shape[-1] == out[-1] else "columns")
            stack.append((user, depth + 1))
    return None


def _tensor(node) -> bool:
    shape = hint_shape(node) if isinstance(node, fx.Node) else None
    return shape is not None and any(s != 1 for s in shape)


def _product(node: fx.Node) -> bool:
    """A product of two tensors (not of a tensor and a scalar or a one-element tensor): a matmul, or
    an elementwise product of two non-constant tensors (an outer product by broadcasting, x (x) x)."""
    if node.op != "call_function":
        return False
    if node.target in _MATMULS:
        return True
    return node.target is aten.mul.Tensor and all(
        _tensor(a) and scalar_value(node.graph.owning_module, a) is None for a in node.args[:2]) \
        and all(a.op != "get_attr" for a in node.args[:2])


def _outer(node: fx.Node) -> bool:
    """An outer product: a bmm over a size-1 axis, or a product whose operands broadcast against each
    other (each has a size-1 axis where the other does not): phi(k)^T v of one token."""
    node = strip_views(node)
    if node.op != "call_function":
        return False
    if node.target is aten.bmm.default:
        return (hint_shape(node.args[0]) or (0,))[-1] == 1
    if node.target is not aten.mul.Tensor or not all(_tensor(a) for a in node.args[:2]):
        return False
    a, b = (hint_shape(x) for x in node.args[:2])
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    return any(x == 1 < y for x, y in zip(a, b)) and any(y == 1 < x for x, y in zip(a, b))


def _accumulates(node: fx.Node) -> bool:
    """A running sum, or a sum over an axis that is not the last axis of the tensor its views move
    (over time, not over the features)."""
    if node.op != "call_function":
        return False
    if node.target is aten.cumsum.default:
        return True
    if node.target is not aten.sum.dim_IntList or len(node.args) < 2 or not node.args[1]:
        return False
    rank = len(hint_shape(node.args[0]) or ())
    chain = read_views(None, node.args[0], scalars=False)
    axis = chain.lands(len(hint_shape(chain.base) or ()) - 1)     # the features: the last axis of what the views move
    return rank > 1 and axis is not None and all(d % rank != axis for d in node.args[1])


_FILLS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.full.default,
          aten.full_like.default, aten.new_full.default}


def _state_update(node: fx.Node, depth: int = 0) -> bool:
    """A state plus an outer product: kv_state + phi(k)^T v, the state a region input, a fill made in the
    graph (``torch.zeros``), or, in a loop over the tokens unrolled by Dynamo, the previous update (the
    first one, ``zeros + phi(k_0)^T v_0``, is the outer product itself once fills are read as numbers)."""
    if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor):
        return False
    a, b = node.args[:2]
    return any(isinstance(x, fx.Node) and _state(strip_views(x), depth) and isinstance(y, fx.Node) and _outer(y)
               for x, y in ((a, b), (b, a)))


def _state(node: fx.Node, depth: int) -> bool:
    if node.op == "placeholder" or (node.op == "call_function" and node.target in _FILLS) or _outer(node):
        return True
    if node.op == "call_function" and node.target is aten.add.Tensor and len(node.args) > 1 \
            and isinstance(node.args[0], fx.Node) and scalar_value(node.graph.owning_module, node.args[1]) is not None:
        return _outer(node.args[0]) or _state(strip_views(node.args[0]), depth)
    return depth < 2 and _state_update(node, depth + 1)


def _contractions(gm: fx.GraphModule):
    """(node, operands) of each contraction: a matmul, or an elementwise product summed over an axis."""
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (aten.bmm.default, aten.mm.default):
            yield node, node.args[:2]
        elif node.target is aten.baddbmm.default:
            yield node, node.args[1:3]
        elif node.target is aten.sum.dim_IntList and isinstance(node.args[0], fx.Node):
            inner = strip_views(node.args[0])
            if inner.op == "call_function" and inner.target is aten.mul.Tensor and all(
                    _tensor(a) for a in inner.args[:2]):
                yield node, inner.args[:2]


class _Chain:
    """What a walk back from a contraction found."""

    def __init__(self):
        self.nodes: list[fx.Node] = []
        self.ops: list[str] = []
        self.scores: fx.Node | None = None
        self.folded = None                      # (view, "rows" | "columns") when the scores fold an axis
        self.sums: list[fx.Node] = []
        self.products: list[fx.Node] = []
        self.updates: list[fx.Node] = []
        self.maps: list[fx.Node] = []           # feature maps the pass reads
        self.unread: list[fx.Node] = []         # cats it does not read as one
        self.nonview = False
        self.random: str | None = None
        self.softmax: str | None = None         # softmax of the scores in Dynamo's graph (softmax attention)
        self.dynamo_ops: list[str] = []
        self.unknown: list[str] = []            # ops of the region the walk went through that are no reader's
        self.cuts: tuple = ()                   # ops of Dynamo's graph between scores and weights no reader reads
        self.biases: list[fx.Node] = []         # terms added to the scores that are not functions of q.k
        self.learnable: list[fx.Node] = []      # one-element factors that are graph inputs requiring grad


def _walk(gm: fx.GraphModule, start: fx.Node, to_dynamo: dict) -> _Chain:
    chain = _Chain()
    stack, seen = [start], set()
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        chain.nodes.append(node)
        if node.op == "placeholder":
            dynamo = to_dynamo.get(node)
            found = _walk_dynamo(dynamo) if dynamo is not None else None
            if found is not None and not chain.dynamo_ops:
                chain.dynamo_ops, chain.random, chain.softmax, chain.cuts = found
            continue
        if node.op != "call_function":
            continue
        target = node.target
        if _square(node):
            chain.scores = chain.scores or node
            continue
        folded = _folded_square(node) if chain.scores is None else None
        if folded is not None:
            chain.scores, chain.folded = node, folded
            continue
        if target in VIEW_OPS:
            stack.append(node.args[0])
            continue
        if _state_update(node):
            chain.updates.append(node)
        fmap = read_feature_map(gm, node) if target is aten.cat.default else None
        if fmap is not None:
            chain.maps.append(node)             # a feature map the pass reads: its pieces are its reader's
            picked = strip_views(fmap.source)   # phi(k[:, 0]): its x picks one entry of an axis
            if isinstance(picked, fx.Node) and picked.op == "call_function" and picked.target is aten.select.int:
                chain.ops.append("select")
            continue
        if target is aten.cat.default and describe_unread(gm, node) is not None:
            chain.unread.append(node)           # a feature map the pass does not read: said why, not walked
            continue
        if _product(node):
            chain.products.append(node)
            if target in _MATMULS:
                continue
        if _accumulates(node):
            chain.sums.append(node)
        if target in _FOLLOW or _accumulates(node) or torch.Tag.pointwise in getattr(target, "tags", ()):
            chain.nonview = True
            chain.ops.append(_name(node))
            bias = _added_term(gm, node)
            if bias is not None:                # scores + bias: the bias side is not walked (not the chain's)
                chain.biases.append(bias)
                stack.extend(a for a in node.all_input_nodes if a is not bias)
                continue
            if target in _WRITES:               # the tensor written into goes on (what is written: the write's)
                stack.append(node.args[0])
                continue
            scale = _one_element_factor(node)
            if scale is not None and _requires_grad_input(strip_views(scale), to_dynamo):
                chain.learnable.append(scale)
            if scale is not None:               # x * c, x / c: what c is computed from is not the chain's
                stack.extend(a for a in node.all_input_nodes if a is not scale)
                continue
            stack.extend(node.all_input_nodes)
            continue
        # any other op that keeps the shape of a floating operand (sort, cummax, a custom op, ...): the chain
        # goes on through that operand, and the op is named
        value = node.meta.get("val")
        same = [a for a in node.all_input_nodes if hint_shape(a) == hint_shape(node)]
        if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and same:
            chain.nonview = True
            chain.ops.append(_name(node))
            chain.unknown.append(_name(node))
            stack.extend(same)
    return chain


_SIZE_OPS = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}


def _added_term(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The operand of a sum (``add`` / ``sub``) of two tensors that is not a function of the scores: one
    side is computed from a square matmul (the scores), the other reads none of what the scores are
    computed from (only sizes, constants, buffers, parameters, positions: an ALiBi or T5 bias)."""
    if node.op != "call_function" or node.target not in (aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor):
        return None
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2 or any(scalar_value(gm, a) is not None or not _tensor(a) for a in args):
        return None
    reach = [_scores_below(a) for a in args]
    if sum(r is not None for r in reach) != 1:
        return None
    scores, bias = (reach[0], args[1]) if reach[0] is not None else (reach[1], args[0])
    # what the scores are computed from: q and k themselves (inputs too), and every op above them
    operands = {strip_views(a) for a in scores.args if isinstance(a, fx.Node)}
    computed = {n for n in _ancestors(scores, _MAX_NODES * 4) if n.op == "call_function"} | {scores} | operands
    return bias if not (_value_ancestors(bias) & computed) else None


def _requires_grad_input(node, to_dynamo: dict) -> bool:
    """A graph input (Dynamo's placeholder) whose value requires grad: an nn.Parameter, never a constant."""
    if not isinstance(node, fx.Node) or node.op != "placeholder":
        return False
    dynamo = to_dynamo.get(node)
    value = dynamo.meta.get("example_value") if isinstance(dynamo, fx.Node) else None
    return isinstance(value, torch.Tensor) and value.requires_grad


def _one_element_factor(node: fx.Node) -> fx.Node | None:
    """The one-element operand of a product or quotient of a larger tensor and a one-element one
    (``s / (t.abs().sqrt() * 3)``: a scale, whose own ops are not applied to the chain), else None."""
    if node.target not in (aten.mul.Tensor, aten.div.Tensor) or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    for x, y in ((b, a), (a, b)) if node.target is aten.mul.Tensor else ((b, a),):
        if hint_shape(x) is not None and not _tensor(x) and _tensor(y):
            return x
    return None


def _scores_below(node: fx.Node) -> fx.Node | None:
    """A square matmul (the scores) that ``node`` is computed from, within the walk's bound, else None."""
    stack, seen = [node], set()
    while stack and len(seen) < _MAX_NODES:
        n = stack.pop()
        if n in seen or n.op != "call_function":
            continue
        seen.add(n)
        if _square(n):
            return n
        if n.target not in _MATMULS:
            stack.extend(n.all_input_nodes)
    return None


def _value_ancestors(node: fx.Node) -> set:
    """The nodes ``node``'s value is computed from (not through sizes: ``arange(q.shape[-2])`` reads no value)."""
    found, stack = set(), [node]
    while stack and len(found) < _MAX_NODES * 4:
        n = stack.pop()
        if n in found:
            continue
        found.add(n)
        if n.op == "call_function" and n.target in _SIZE_OPS:
            continue
        stack.extend(n.all_input_nodes)
    return found


def _walk_dynamo(start: fx.Node):
    """(ops, random op or None, softmax or None, cuts) of an elementwise chain to a matmul in Dynamo's graph,
    from where the region was cut, or None. The softmax is named only when the matmul it reads forms
    scores (``_dynamo_scores``: softmax attention, Tq == Tk or not), not for a softmax of projections (a
    feature map). ``cuts``: what the ops the chain went through that cut the region and that no reader
    reads are (``region_cuts``: a custom autograd.Function, a tensor hook, F.normalize(p=2), ...), given
    only when the matmul forms square scores of the shape of ``start`` (the weights, cut between the scores
    and their matmul with v); else ()."""
    stack, seen, ops, random, softmax, cuts = [start], set(), [], None, None, []
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node in seen or node.op not in ("call_function", "call_method"):
            continue
        seen.add(node)
        name = _name(node)
        if name in _DYNAMO_MATMUL:
            if ops:
                square = hint_shape(node) or ()
                weights = hint_shape(start) or ()
                scores = len(square) >= 2 and square[-1] == square[-2] and tuple(square[-2:]) == tuple(weights[-2:])
                # the cuts on the way from the weights to these scores (not those of a mask beside them)
                between = tuple(what for cut, what in cuts if scores and node in _ancestors(cut, _MAX_NODES))
                return ops, random, (softmax if _dynamo_scores(node) else None), between
            continue
        if name in _DYNAMO_SOFTMAX:
            ops.append(name)
            softmax = softmax or name
            stack.extend(node.all_input_nodes)
            continue
        if name in _DYNAMO_RANDOM:
            if identity_dropout(node):
                ops.append(name)
            else:
                ops.append(f"{name} (training)")
                random = random or f"{name} with p > 0 in training"
            stack.extend(node.all_input_nodes)
            continue
        if name in _DYNAMO_ELEMENTWISE:
            ops.append(name)
            stack.extend(node.all_input_nodes)
            continue
        through = region_cuts.inputs_through(node)
        if through is not None:
            what = region_cuts.describe(node)
            if what is not None:
                ops.append(name)
                cuts.append((node, what))
            stack.extend(through)
    return None


_DYNAMO_VIEWS = {"view", "reshape", "transpose", "permute", "contiguous", "unsqueeze", "squeeze", "expand", "t",
                 "mT", "float", "double", "to", "type_as", "clone", "detach", "getattr"}


def _dynamo_scores(node: fx.Node) -> bool:
    """A matmul of Dynamo's graph that forms scores: square ``[.., T, T]``, or ``[.., Tq, Tk]`` of two
    operands neither of which is a module's parameter or buffer (``q @ k.mT`` against keys of another
    length: cross-attention, a KV cache), not a projection by a weight (``softmax(x @ self.w)``: a
    feature map)."""
    shape = hint_shape(node)
    if shape is None or len(shape) < 2:
        return False
    if shape[-1] == shape[-2]:
        return True
    operands = [a for a in (node.args[1:] if _name(node) in ("einsum", "baddbmm") else node.args[:2])
                if isinstance(a, fx.Node)]
    return len(operands) == 2 and not any(_module_tensor(a) for a in operands)


def _module_tensor(node: fx.Node) -> bool:
    """``node`` is, through views and casts, a parameter or buffer of the model (a weight)."""
    for _ in range(16):
        if node.op == "get_attr":
            return True
        if node.op == "placeholder":
            return any(part in source_name(node) for part in ("_parameters[", "_buffers["))
        if node.op not in ("call_function", "call_method") or _name(node) not in _DYNAMO_VIEWS \
                or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _form(chain: _Chain) -> str | None:
    if (chain.random is not None or chain.softmax is not None or chain.cuts) and chain.dynamo_ops:
        return "quadratic"
    if chain.scores is not None and (chain.nonview or chain.scores.target is not aten.bmm.default):
        return "quadratic"
    running = any(n.target is aten.cumsum.default for n in chain.sums)
    if chain.sums and (chain.maps or chain.unread or (running and chain.products)):
        # a sum over time of phi(k) (a feature map), or a running sum of a product (a sum over time of
        # relu(x W) * v then projected is pooling, not attention)
        return "linear"
    if chain.updates:
        return "step"
    return None


def _causes(gm: fx.GraphModule, chain: _Chain, form: str) -> tuple[str, list[str]]:
    """(category, the ops of the chain the readers do not read, each with what it does)."""
    ops = set(chain.ops)
    causes, category = [], "unsupported"
    if "detach" in ops:
        causes.append("the chain is detached from q and k (.detach(), or computed under torch.no_grad()): "
                      "based::attention would differentiate through it")
    cumsums = [n for n in chain.sums if n.target is aten.cumsum.default]
    if form == "quadratic" and cumsums:
        causes.append("the weights go through a cumsum (a running sum along an axis of the T x T weights): "
                      "not an elementwise function of q.k")
        category = "mask"
    elif len(cumsums) > 1:
        causes.append("a running sum of a running sum (cumsum twice): the keys are weighted by i - j + 1, not "
                      "summed once over j <= i")
        category = "state"
    if "flip" in ops and form != "quadratic":
        causes.append("the sequence is reversed (flip) around the running sum: it sums over j >= i (anti-causal), "
                      "not over j <= i")
        category = "mask"
    if ops & {"slice", "constant_pad_nd", "cat", "roll", "index_select"} and form == "linear":
        moved = sorted(ops & {"slice", "constant_pad_nd", "cat", "roll", "index_select"})
        causes.append(f"the keys, values or running sums go through {', '.join(moved)} along an axis (a token "
                      "left out or shifted: x[:, :, :-1], torch.cat, F.pad): not the sum over every j <= i (or "
                      "every j) that the operator computes")
    if "select" in ops and form == "linear":
        causes.append("the keys, values or running sums go through select (one entry of an axis, dropping the "
                      "axis: k[:, 0] picks one key/value head, x[:, :, i] one token): the running-sum form is read "
                      "with one key/value head only where its heads axis is kept (k[:, :1], k[:, 0, None]), and "
                      "summed over every token")
    written = sorted(ops & _WRITE_NAMES)
    if written and form == "quadratic":
        causes.append(f"the weights are written in place at some entries ({', '.join(written)}: a[..., i, j] = x "
                      "after the polynomial or the mask): no longer keep * P(q.k)")
        category = "mask"
    if chain.biases and form == "quadratic":
        shapes = ", ".join(str(list(hint_shape(b) or ())) for b in dict.fromkeys(chain.biases))
        causes.append(f"a term that is not a function of q.k (a position bias?) is added to the scores (shape "
                      f"{shapes}: ALiBi, a relative-position bias, a bias buffer): the operator's weights are "
                      "P(q.k) alone")
    if chain.softmax is not None:
        causes.append(f"softmax attention: the weights are {chain.softmax} of the scores (exp normalised by its sum "
                      "over an axis), not a polynomial of q.k (Based's weights are its own polynomial, not exp)")
        category = "polynomial"
    for what in dict.fromkeys(chain.cuts):
        causes.append(f"between the scores and their matmul with v, the weights go through {what}")
    other = sorted(ops - _READ_OPS - _WRITE_NAMES - set(chain.unknown))
    if other:
        causes.append(f"the chain goes through {', '.join(other)} (not a sum or product of its inputs: "
                      "piecewise or transcendental), which no reader reads")
    if chain.unknown:
        causes.append(f"the chain goes through {', '.join(sorted(set(chain.unknown)))}, an operation no reader "
                      "reads")
    if form == "quadratic" and chain.learnable:
        # what stops the readers: the ops after it (F.normalize's clamp_min, its broadcast) are read elsewhere
        causes = [c for c in causes if not c.startswith("the chain goes through")]
        names = ", ".join(dict.fromkeys(n.name for n in chain.learnable))
        causes.insert(0, f"a coefficient of the weights is a one-element tensor that requires grad ({names}: a "
                         "learnable coefficient, an nn.Parameter): the operator takes constant coefficients of "
                         "P(q.k), read at compile time")
        return category, causes
    if form == "quadratic" and chain.folded is not None:
        causes.append(_folded_cause(chain))
    elif form == "quadratic" and chain.scores is not None:
        regrouped = _regrouping_view(chain)
        if regrouped is not None:
            causes.append(regrouped)
    if chain.scores is not None and chain.scores.target is aten.baddbmm.default:
        causes.append("the scores are torch.baddbmm(input, q, k^T) with an input the pass does not read as zero "
                      "(beta * input + alpha * q @ k^T)")
    for node in chain.updates:
        alpha = node.kwargs.get("alpha", 1)
        if node.target is aten.sub.Tensor:
            causes.append("the state update subtracts the outer product phi(k)^T v: Based's state only adds")
            category = "state"
        elif not isinstance(alpha, (int, float)) or float(alpha) != 1.0:
            causes.append(f"the state update adds the outer product phi(k)^T v scaled by alpha={alpha} "
                          "(kv_state.add_(x, alpha=...)): Based's state adds it unscaled")
            category = "state"
    if form == "linear":
        adds = [n for n in chain.nodes if n.op == "call_function" and n.target is aten.add.Tensor
                and not any(scalar_value(gm, a) is not None for a in n.args[:2])
                and any(s in _ancestors(n, 24) for s in chain.sums)]
        if len(adds) > 1:
            causes.append(f"{len(adds)} tensors are added to the running sums (an initial state added twice?): "
                          "Based's continued prefill adds one initial state")
            category = "state"
        firsts = [s for s in chain.sums if not any(p in _ancestors(s, 48) for p in chain.products)]
        if firsts and len(firsts) == len(chain.sums) and any(
                s in _ancestors(p, 48) for p in chain.products for s in chain.sums):
            causes.append("the sums over time are taken before the product (sum_t phi(k_t) (x) sum_s v_s, as an "
                          "einsum 'bhtf,bhsd->bhfd' computes): Based's state sums the products phi(k_j) (x) v_j")
        for cat in chain.unread:
            why = describe_unread(gm, cat)
            if why is not None:
                causes.append(why)
                category = "feature_map" if category == "unsupported" else category
                break
    if chain.random is not None:
        category = "unsupported"
    return category, causes


def _folded_cause(chain: _Chain) -> str:
    scores, (view, where) = chain.scores, chain.folded
    operands = " @ ".join(str(list(hint_shape(a) or ())) for a in scores.args[-2:] if isinstance(a, fx.Node))
    shown = f"{_name(scores)} {operands} -> {list(hint_shape(scores))}, viewed as {list(hint_shape(view))}"
    if where == "columns":
        return (f"the scores matmul folds several key heads (or batch entries) with the keys into its columns "
                f"({shown}): each query is scored against the keys of several heads, one query head shared by "
                "several key heads, which the operator (groups of query heads sharing one key/value head) does "
                "not compute")
    return (f"the scores matmul folds heads (or batch) with the queries into its rows ({shown}), and the pass "
            "could not unfold it into a batched matmul: it unfolds rows that split into heads and a query axis it "
            "can identify (of the keys' length, or the second-to-last axis of the scores as the code views them) "
            "against one shared key tensor")


def _regrouping_view(chain: _Chain) -> str | None:
    """Why, in words, when a view between the scores and the contraction does not keep the weights'
    query and key axes as axes (heads and time regrouped: folded into one axis, or folded and split in
    different orders); else None. Followed forward from the scores along the chain's nodes."""
    members = set(chain.nodes)
    rank = len(hint_shape(chain.scores) or ())
    stack, seen = [(chain.scores, (rank - 2, rank - 1))], set()
    while stack:
        node, axes = stack.pop()
        for user in node.users:
            if user not in members or user in seen or user.op != "call_function":
                continue
            seen.add(user)
            if user.target in VIEW_OPS:
                moved = tuple(track_axis(user, a) for a in axes)
                if None in moved:
                    after = sorted({_name(n) for n in chain.nodes if n in _descendants(user, members)
                                    and n.op == "call_function" and n.target not in VIEW_OPS})
                    acting = f"; {', '.join(after)} then act(s) on the regrouped tensor" if after else ""
                    return (f"a view ({_name(user)}: {list(hint_shape(node))} -> {list(hint_shape(user))}) does not "
                            "keep the weights' query and key axes as axes: it regroups them with heads or batch "
                            f"(folded into one axis, or folded and split in different orders){acting}; the pass "
                            "reads the weights only as [.., Tq, Tk] with heads and batch apart")
                stack.append((user, moved))
                continue
            shift = len(hint_shape(user) or ()) - len(hint_shape(node) or ())
            stack.append((user, tuple(a + shift for a in axes)))
    return None


def _descendants(node: fx.Node, within: set) -> set:
    found, stack = set(), [node]
    while stack:
        for user in stack.pop().users:
            if user in within and user not in found:
                found.add(user)
                stack.append(user)
    return found


def _ancestors(node: fx.Node, limit: int) -> set:
    found, stack = set(), [node]
    while stack and len(found) < limit:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in found:
                found.add(a)
                stack.append(a)
    return found


_READS = {
    "quadratic": "keep * P(q.k) (a mask that is a compile-time constant times a polynomial of the scores)",
    "linear": "Based's running sums, sum over j <= i (or over all j) of phi(k_j) (x) v_j with phi the Taylor "
              "feature map [c, a x, b x (x) x], contracted with phi(q)",
    "step": "Based's recurrent step, kv_state + phi(k)^T v and k_state + phi(k) read out by phi(q)",
}


def unexplained(gm: fx.GraphModule, answered: set, covered: set, to_dynamo: dict):
    """Yield (node, category, reason) for each attention-like chain of the lowered region ``gm`` that no
    reader explained: ``answered``, the contractions a reader yielded a site or a refusal for;
    ``covered``, the nodes those sites and refusals read (a chain reaching one is theirs)."""
    reported: set = set()
    for node, operands in _contractions(gm):
        if node in answered or node in covered:
            continue
        for operand in operands:
            if not isinstance(operand, fx.Node):
                continue
            chain = _walk(gm, operand, to_dynamo)
            form = _form(chain)
            if form is None:
                continue
            inner = [n for n in chain.nodes if n.op != "placeholder"]
            if any(n in covered or n in reported for n in inner):
                break
            reported.update(inner)
            reported.update(a for p in chain.products for a in p.all_input_nodes if a.op != "placeholder")
            category, causes = _causes(gm, chain, form)
            ops = chain.ops + chain.dynamo_ops
            source = {"quadratic": "scores matmul", "linear": "product", "step": "state"}[form]
            text = f"{_name(node)} <- " + " <- ".join(dict.fromkeys(ops)) + f" <- {source}" if ops else \
                f"{_name(node)} <- {source}"
            if chain.random is not None:
                yield node, "unsupported", (
                    f"the weights between the two matmuls go through {chain.random} (random: not a function of "
                    f"q.k), chain: {text}")
            elif causes:
                yield node, category, f"{'; '.join(causes)} (chain: {text})"
            else:
                yield node, "unsupported", (
                    f"{text} looks like {'attention' if form == 'quadratic' else 'linear attention' if form == 'linear' else 'a recurrent attention step'}, "
                    f"but the pass could not read it as {_READS[form]}")
            break


def covered_by(gm: fx.GraphModule, nodes) -> set:
    """The nodes of ``gm`` that ``nodes`` (sites' outputs, refused candidates) are computed from, down to
    the region's inputs: what a reader already explained."""
    found, stack = set(), [n for n in nodes if isinstance(n, fx.Node)]
    while stack:
        node = stack.pop()
        if node in found or node.op == "placeholder":
            continue
        found.add(node)
        stack.extend(node.all_input_nodes)
    return found
