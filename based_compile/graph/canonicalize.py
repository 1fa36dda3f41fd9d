"""Canonicalise a Dynamo graph for matching: lower it to ATen, then read through views and scalars.

Lowering (``lower_to_aten``) uses PyTorch's own machinery: ``make_fx`` under the fake mode
of Dynamo's example values, functionalised (in-place ``masked_fill_`` becomes
``masked_fill``) and ``preserve_node_meta`` (every ATen node keeps the user's stack trace).
After lowering, ``@``, ``matmul``, ``einsum`` and ``bmm`` are all ``bmm`` between views,
``.mT`` / ``transpose`` / ``permute`` are ``permute``/``transpose``, ``repeat_interleave``
is ``expand`` + ``clone`` + ``view``.

Reading helpers (one axis each):
- ``VIEW_OPS``: ops that only rearrange or broadcast a tensor's elements;
- ``scalar_value``: the Python float of a scalar operand (number, SymInt/SymFloat node,
  0-d constant tensor), or None;
- ``walk_operand``: from a matmul operand back through views and scalar factors, to the
  tensor the user multiplied, collecting the scalar factor on the way.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import guard_int, guard_scalar, statically_known_true

from .writes import written_arguments

aten = torch.ops.aten

VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.clone.default,
    aten.alias.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.flatten.using_ints, aten.contiguous.default,
    aten._to_copy.default, aten.lift_fresh_copy.default,
}

# Graph-level state (grad mode) that must stay in Dynamo's graph: never part of a region.
_STATEFUL_TARGETS = {torch._C._set_grad_enabled}


def example_value(node: fx.Node):
    """The fake value (tensor, SymInt, ...) FX recorded for a node, or None."""
    return node.meta.get("val", node.meta.get("example_value"))


def insert_after(after: fx.Node, target, args: tuple, *, mode, source: fx.Node) -> fx.Node:
    """A new node ``target(*args)`` right after ``after``: its fake value computed under the fake
    ``mode``, its stack trace ``source``'s (the user's line it rewrites)."""
    graph = after.graph
    with graph.inserting_after(after):
        node = graph.call_function(target, args)
    with mode:
        node.meta["val"] = target(*fx.node.map_arg(args, example_value))
    node.meta["stack_trace"] = source.meta.get("stack_trace")
    return node


def shape_of(node) -> tuple | None:
    val = example_value(node) if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def hint(x) -> int | float:
    """Concrete value of an int/float or the example value of a SymInt/SymFloat."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.hint is not None else x.node.require_hint()
    return x


def hint_shape(node) -> tuple[int, ...] | None:
    shape = shape_of(node)
    return None if shape is None else tuple(int(hint(s)) for s in shape)




def has_inplace_ops(gm: fx.GraphModule) -> bool:
    """True when a Dynamo graph calls in-place tensor ops (``masked_fill_``, ``+=``, ``x[i] = ...``)."""
    for node in gm.graph.nodes:
        if writes_in_place(node):
            return True
    return False


def _from_functional(x):
    if isinstance(x, FunctionalTensor):
        torch._sync(x)
        return torch._from_functional_tensor(x.elem)
    return x


class _AtTime(fx.Interpreter):
    """Runs a graph under functionalisation and returns, for each output, the functional value its
    node had right after it ran, not the value its storage holds at the end.

    In Dynamo's graph a node names a storage: ``o = a @ v; o /= z`` reads the same node ``o``
    before and after the division. The lowered graph's output for a node must be what that node
    computed (the numerator for ``o``, the quotient for the ``/=``), so that a lowered value the
    matcher picks maps back to the Dynamo node that computed it (``rewrite`` then replaces that
    node, and ``inplace`` judges every later read and write of its storage)."""

    def run(self, *args):
        self.at_time: dict[fx.Node, object] = {}
        return super().run(*args)

    def run_node(self, node):
        result = super().run_node(node)
        if node.op != "output":
            self.at_time[node] = pytree.tree_map(_from_functional, result)
            return result
        return pytree.tree_map(lambda n: self.at_time[n] if isinstance(n, fx.Node) else n, node.args[0])


_PURE_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
               aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
               aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}


def same_value_source(node: fx.Node) -> fx.Node | None:
    """The node ``node`` equals elementwise when it is a chain of views back to that node's memory
    layout (functionalisation regenerates ``o`` after ``o.div_(z)`` on a view of a matmul's output
    as ``transpose(view(view(transpose(div))))``: the same elements as ``div``), else None.

    Equal elementwise: the same storage, shape, strides and offset in the traced fake values; sizes
    and strides under dynamic shapes are equal when the shape environment proves them equal without
    a guard (``Max(1, 2*s)`` and ``2*s``), and the stride of a size-1 axis does not count."""
    layout = _layout(node)
    current = node
    while (layout is not None and isinstance(current, fx.Node) and current.op == "call_function"
           and current.target in _PURE_VIEWS and isinstance(current.args[0], fx.Node)):
        current = current.args[0]
        if _same_layout(_layout(current), layout):
            return current
    return None


def _layout(node: fx.Node):
    """(storage, shape, strides, offset, dtype) of a node's traced value (sizes are ints or SymInts);
    None when unknown."""
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return (value.untyped_storage()._cdata, tuple(value.shape), tuple(value.stride()), value.storage_offset(),
                value.dtype)
    except Exception:  # noqa: BLE001 - a tensor without strides or storage: no claim
        return None


def _known_equal(a, b) -> bool:
    """a == b for every value of the symbols, decided without adding a guard."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - undecidable here: not known equal
        return False


def _same_layout(a, b) -> bool:
    if a is None or b is None:
        return False
    (storage_a, shape_a, strides_a, offset_a, dtype_a), (storage_b, shape_b, strides_b, offset_b, dtype_b) = a, b
    if storage_a != storage_b or dtype_a != dtype_b or len(shape_a) != len(shape_b):
        return False
    if not all(_known_equal(x, y) for x, y in zip(shape_a, shape_b)) or not _known_equal(offset_a, offset_b):
        return False
    # the stride of a size-1 axis never moves to another element: views disagree on it freely
    return all(_known_equal(size, 1) or _known_equal(x, y) for size, x, y in zip(shape_a, strides_a, strides_b))


def lower_to_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Dynamo graph -> functional ATen graph with the same placeholders and outputs.

    Traced with the fake (possibly symbolic) example values Dynamo recorded, so dynamic
    shapes stay symbolic. Nodes keep their ``stack_trace`` meta.
    """
    return finish_lowering(trace_to_aten(gm))


class _Around(fx.Interpreter):
    """An interpreter that runs each node inside the context ``around(node)`` gives (``trace_to_aten``)."""

    def __init__(self, gm, around):
        super().__init__(gm)
        self.around = around

    def run_node(self, node):
        with self.around(node):
            return super().run_node(node)


class _AroundAtTime(_AtTime, _Around):
    pass


def trace_to_aten(gm: fx.GraphModule, around=None) -> fx.GraphModule:
    """The first step of ``lower_to_aten``: Dynamo graph -> functional ATen graph as traced, before the reading
    of reductions' dtypes and of casts (``finish_lowering``). Each node's ``from_node`` names the Dynamo node it
    was traced for. ``around``: node -> a context each node of ``gm`` is traced in (the autocast it ran under)."""
    fake_args = [example_value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    fake_mode = next((a.fake_mode for a in fake_args if isinstance(a, torch._subclasses.FakeTensor)), None)
    if fake_mode is None:
        raise ValueError("lower_to_aten: the Dynamo graph has no fake tensor example values")

    def run(*args):
        if not has_inplace_ops(gm):           # functionalising costs ~40% of the lowering time
            return (fx.Interpreter(gm) if around is None else _Around(gm, around)).run(*args)
        # Functionalise the way AOTAutograd does (FunctionalTensorMode): in-place ops become
        # their functional forms. Each output is the value its node had when it ran (``_AtTime``).
        with FunctionalTensorMode():
            wrapped = [FunctionalTensor.to_functional(a) if isinstance(a, torch.Tensor) else a for a in args]
            return (_AtTime(gm) if around is None else _AroundAtTime(gm, around)).run(*wrapped)

    # The Python dispatcher keeps size queries symbolic (as AOTAutograd does): without it a
    # dynamic length would be specialised to the example's.
    # decomposition_table={}: torch >= 2.14's make_fx otherwise records ``detach`` as ``aten.alias``,
    # a plain view, and the pass read a ``.detach()``ed normaliser as differentiable (gradients of q
    # and k off by 0.6-0.9); an explicit table, even empty, keeps ``aten.detach`` (torch 2.13 always did).
    with fx_traceback.preserve_node_meta(), fake_mode, enable_python_dispatcher():
        return make_fx(run, tracing_mode="real", decomposition_table={})(*fake_args)


def finish_lowering(lowered: fx.GraphModule) -> fx.GraphModule:
    """The second step of ``lower_to_aten``: full slices dropped, reductions' ``dtype=`` spelled out as casts and
    value-changing casts marked, by the dtypes the nodes' fake values hold."""
    _drop_full_slices(lowered)
    split_reduction_dtypes(lowered)
    _mark_value_changing_casts(lowered)
    return lowered


def exact_cast(src: torch.dtype, dst: torch.dtype) -> bool:
    """True when a cast from ``src`` to ``dst`` may be read through as a view: the same dtype only.
    A cast to an integer, bool or narrower float rounds; a cast from an integer or bool stops the
    gradient; and even a widening (float32 -> float64) is not read through, since the site would
    then read the narrower tensor and compute in its precision (8e-8 off a float64 eager result)."""
    return src == dst


def _dtype_of(node) -> torch.dtype | None:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _mark_value_changing_casts(gm: fx.GraphModule) -> None:
    """``aten._to_copy`` is a view (``VIEW_OPS``) only when it keeps the dtype (``exact_cast``); any
    other one (``k.to(torch.int8)``, ``x.bfloat16()`` from float32, ``.long()``, ``.double()``) is recorded as
    ``prims.convert_element_type``, which no reader sees through: q, k, v, scores and normalisers are
    then read from the cast's output, or the site is refused. One place for every reader of the
    lowered graph (``walk_operand``, ``view_chain``, the feature-map, normaliser and linear-form readers)."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten._to_copy.default or not node.args:
            continue
        src, dst = _dtype_of(node.args[0]), _dtype_of(node)
        if src is None or dst is None or not exact_cast(src, dst):
            node.target = torch.ops.prims.convert_element_type.default
            node.args, node.kwargs = (node.args[0], dst if dst is not None else torch.float32), {}


# Reductions whose ``dtype=`` casts the input before reducing (PyTorch's definition, the same bits on CPU:
# ``x.sum(d, dtype=t)`` == ``x.to(t).sum(d)``, ``x.cumsum(d, dtype=t)`` == ``x.to(t).cumsum(d)``). ``mean``
# is not one: it divides in its accumulation type before rounding, and no reader reads a mean.
_CAST_FIRST_REDUCTIONS = {aten.sum.dim_IntList, aten.sum.default, aten.cumsum.default}

# meta key of a cast ``split_reduction_dtypes`` wrote: the reduction whose ``dtype=`` it spells out
REDUCTION_DTYPE = "based_compile.reduction_dtype"


def split_reduction_dtypes(gm: fx.GraphModule) -> None:
    """A sum or running sum of a floating tensor with a floating ``dtype=`` other than its input's becomes the
    explicit cast it is followed by the reduction without ``dtype=``; one with its input's own dtype drops the
    argument (a no-op). The readers of sums (normalisers, running sums, state products) never look at
    ``dtype=``: they then see the cast, which no reader reads through (``exact_cast``), and ``precision``
    judges it like any ``.to()`` (a narrowing inside a site is a lossy round trip). A reduction of an integer
    or bool tensor, or to one, is left as written (its default dtype is not its input's)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CAST_FIRST_REDUCTIONS or "dtype" not in node.kwargs:
            continue
        dst, x = node.kwargs["dtype"], node.args[0] if node.args else None
        src, value = _dtype_of(x), example_value(x) if isinstance(x, fx.Node) else None
        if not isinstance(dst, torch.dtype) or src is None or not (src.is_floating_point and dst.is_floating_point):
            continue
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        if src != dst:
            mode = getattr(value, "fake_mode", None)
            if mode is None:
                continue
            with gm.graph.inserting_before(node):
                cast = gm.graph.call_function(torch.ops.prims.convert_element_type.default, (x, dst))
            with mode:
                cast.meta["val"] = torch.ops.prims.convert_element_type.default(value, dst)
            cast.meta["stack_trace"] = node.meta.get("stack_trace")
            cast.meta[REDUCTION_DTYPE] = node
            node.args = (cast, *node.args[1:])
        node.kwargs = kwargs
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _drop_full_slices(gm: fx.GraphModule) -> None:
    """``x[..., :, None]`` lowers to a slice over the whole axis: use x itself (the node stays
    in the graph, unused, so a map from nodes to Dynamo's graph keeps working). So does a slice that
    covers an axis of constant size whatever its spelling: ``k[:, :, -1:]`` of a [B, H, 1, D] token (the
    last token of one) is k itself. A slice of a symbolic size is whole only as ``[0:]``: ``[-1:]`` of a
    length T is a part of it at T > 1."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.slice.Tensor:
            continue
        if _whole_axis_slice(node):
            node.replace_all_uses_with(node.args[0], delete_user_cb=lambda user: user.op != "output")


def _whole_axis_slice(node: fx.Node) -> bool:
    args = list(node.args) + [None] * (5 - len(node.args))
    x, dim, start, end, step = args[:5]
    dim = 0 if dim is None else dim
    if step not in (None, 1):
        return False
    if start in (None, 0) and (end is None or (isinstance(end, int) and end >= (1 << 62))):
        return True
    value = example_value(x) if isinstance(x, fx.Node) else None
    if not isinstance(value, torch.Tensor) or not isinstance(dim, int) or not -value.dim() <= dim < value.dim():
        return False
    size = value.shape[dim]
    if not isinstance(size, int) or not all(b is None or isinstance(b, int) for b in (start, end)):
        return False
    return range(size)[slice(start, end)] == range(size)


# Queries of a tensor's sizes: under dynamic shapes a view's target shape reads them (``sym_size``).
SIZE_QUERIES = {aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default}


def live_users(node: fx.Node) -> list:
    """The users of ``node`` that read its values: less views nobody uses (the whole-axis slices
    ``_drop_full_slices`` leaves in place: under dynamic shapes ``kv[:, :, -1]`` lowers with two of them,
    which read nothing) and less queries of its sizes (under dynamic shapes a division's output view
    reads the numerator's length: ``sym_size``)."""
    return [u for u in node.users
            if not _unused_read(u) and not (u.op == "call_function" and u.target in SIZE_QUERIES)]


def _unused_read(node: fx.Node) -> bool:
    """A view (or slice, select) whose users, through views, read nothing (functionalising an in-place
    write leaves such chains: ``kv += s`` re-derives every view of ``kv`` taken before)."""
    return node.op == "call_function" and node.target in _UNUSED_READS and all(_unused_read(u) for u in node.users)


_UNUSED_READS = VIEW_OPS | {aten.slice.Tensor, aten.select.int}


def constant_tensor(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The real tensor behind a get_attr node (a lifted constant), else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


_BUFFER_VALUES = "based_compile.buffer_values"


def declare_buffer_values(gm: fx.GraphModule, values: dict) -> None:
    """Record the compile-time values of ``gm``'s placeholders that are registered buffers (``values``:
    placeholder -> tensor). Readers that need a constant operand by value (``buffer_value``: an index
    tensor of a feature map) read them; a rewrite that relies on one guards it (``inputs.baked_buffers``
    lists every buffer a rewritten site reads)."""
    gm.meta[_BUFFER_VALUES] = dict(values)


def buffer_value(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The compile-time value of a placeholder declared a registered buffer, else None."""
    if isinstance(node, fx.Node) and node.op == "placeholder":
        return getattr(gm, "meta", {}).get(_BUFFER_VALUES, {}).get(node)
    return None


_OUTER_OPERANDS = "based_compile.outer_operands"


def declare_outer_operands(gm: fx.GraphModule, reasons: dict) -> None:
    """Record which placeholders of ``gm`` (a checkpointed body's region) are tensors computed in the
    graph around the ``torch.utils.checkpoint`` call and passed in without their computation
    (``checkpoint_operands`` copies in those built from sizes and buffers), each with why
    (``reads_outer_operand`` gives it to a refusal)."""
    gm.meta[_OUTER_OPERANDS] = dict(reasons)


def reads_outer_operand(gm: fx.GraphModule, node) -> str | None:
    """Why the value of ``node`` is not known: it is computed from a placeholder declared by
    ``declare_outer_operands`` (that placeholder's reason), else None."""
    outer = getattr(gm, "meta", {}).get(_OUTER_OPERANDS)
    if not outer or not isinstance(node, fx.Node):
        return None
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in outer:
            return outer[n]
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return None


def size_hints(shape_env) -> dict:
    """A shape environment's example value of each backed size symbol. torch >= 2.13 names the map
    ``backed_var_to_val`` (``var_to_val`` warns there as deprecated); torch 2.11-2.12 has ``var_to_val``."""
    values = getattr(shape_env, "backed_var_to_val", None)
    return shape_env.var_to_val if values is None else values


def specialised_value(val) -> float:
    """The value of a symbolic scalar, with every size it depends on specialised (guarded equal to
    its example value): the spec bakes this number in, so a call at another size (another Dk under
    ``dynamic=True``, where ``q.shape[-1] ** -0.25`` is symbolic) recompiles instead of reusing it.

    The guards are on the integer sizes (``Eq(s0, 16)``), not on the float (a float guard compares
    against a printed, rounded constant); afterwards those sizes are constants in the shape env,
    so a probe that moves the symbolic sizes (``verify._probe_other_lengths``) keeps them. The value
    is the example's own Python arithmetic (the SymNode's hint), as eager computes it. A value that
    also depends on a symbolic float (a module's float attribute under ``dynamic=True``) is guarded
    as a whole (``guard_scalar``)."""
    node = val.node
    env = node.shape_env
    values = size_hints(env)
    others = False
    for sym in sorted(node.expr.free_symbols, key=str):
        if sym.is_integer and sym in values:
            guard_int(env.create_symintnode(sym, hint=int(values[sym])))
        else:
            others = True
    if others or node.hint is None:     # a float input (a module's float attribute): guard the value itself
        return float(guard_scalar(val))
    return float(node.hint)


def scalar_value(gm: fx.GraphModule, arg) -> float | None:
    """A scalar operand as a float: a Python number, a sym node (guarded), or a 0-d constant (a lifted
    constant, or a registered buffer: ``buffer_value``, read at compile time like any buffer a rewrite relies
    on, and guarded by ``inputs.baked_buffers`` when a rewritten site or step reads it)."""
    if isinstance(arg, bool):
        return None
    if isinstance(arg, (int, float)):
        return float(arg)
    if not isinstance(arg, fx.Node):
        return None
    val = example_value(arg)
    if isinstance(val, (torch.SymInt, torch.SymFloat)):
        return specialised_value(val)
    if isinstance(val, (int, float)) and not isinstance(val, bool):
        return float(val)
    const = constant_tensor(gm, arg)
    if const is None:
        const = buffer_value(gm, arg)
    if const is not None and const.numel() == 1 and const.dim() == 0:
        return float(const.item())
    if arg.op == "call_function" and arg.target in (aten.scalar_tensor.default, aten.lift_fresh_copy.default):
        if arg.target is aten.scalar_tensor.default:
            return scalar_value(gm, arg.args[0])
        return scalar_value(gm, arg.args[0])
    if arg.op == "call_function" and arg.target in (aten.full.default,) and not arg.args[0]:
        return scalar_value(gm, arg.args[1])
    if arg.op == "call_function" and arg.target in (operator.truediv, operator.mul, operator.pow,
                                                     operator.add, operator.sub, operator.neg):
        vals = [scalar_value(gm, a) for a in arg.args]
        if any(v is None for v in vals):
            return None
        return float(arg.target(*vals))
    return None


# Tensors filled with one value whatever their shape: the value is the fill argument's position.
_FILL_ARG = {aten.zeros_like.default: 0.0, aten.zeros.default: 0.0, aten.new_zeros.default: 0.0,
             aten.ones_like.default: 1.0, aten.ones.default: 1.0, aten.new_ones.default: 1.0,
             aten.full_like.default: 1, aten.full.default: 1, aten.new_full.default: 2,
             aten.scalar_tensor.default: 0, aten.fill.Scalar: 1}


def fill_value(gm: fx.GraphModule, arg) -> float | None:
    """The one value every element of ``arg`` holds, whatever spelling made it, or None.

    Constant fills are constants: a scalar (``scalar_value``), ``zeros_like(a)``, ``full_like(a, 0)``,
    ``a.new_zeros(...)``, ``torch.zeros(...)`` (through views, copies and casts), and ``0 * a``
    (0 for every finite a; an infinite or NaN a gives NaN in eager).
    """
    value = scalar_value(gm, arg)
    if value is not None or not isinstance(arg, fx.Node):
        return value
    node = arg
    while node.op == "call_function" and node.target in VIEW_OPS and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if node.op != "call_function":
        return None
    where = _FILL_ARG.get(node.target)
    if isinstance(where, float):
        return where
    if isinstance(where, int):
        return scalar_value(gm, node.args[where]) if len(node.args) > where else None
    if node.target is aten.mul.Tensor:
        if any(fill_value(gm, a) == 0.0 for a in node.args[:2]):
            return 0.0
    return None


_SCALE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.neg.default}


def scalar_factor(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float] | None:
    """If ``node`` is ``x * c``, ``c * x``, ``x / c`` or ``-x`` with a scalar c: (x, factor), else None."""
    if node.op != "call_function" or node.target not in _SCALE_OPS:
        return None
    if node.target is aten.neg.default:
        return node.args[0], -1.0
    a, b = node.args[0], node.args[1]
    if node.target is aten.div.Tensor:
        c = scalar_value(gm, b)
        return (a, 1.0 / c) if c not in (None, 0.0) and isinstance(a, fx.Node) else None
    cb = scalar_value(gm, b)
    if cb is not None and isinstance(a, fx.Node) and shape_of(a) is not None:
        return a, cb
    ca = scalar_value(gm, a)
    if ca is not None and isinstance(b, fx.Node) and shape_of(b) is not None:
        return b, ca
    return None


@dataclass
class ViewChain:
    """A node read down through views (and scalar factors) to where the walk stopped.

    trail: every node visited with the product of the scalar factors above it, the node first and
    ``base`` last; views: the view nodes passed, outermost first; factor: the product of all the
    scalar factors passed.
    """

    base: object
    trail: list
    views: list
    factor: float

    @property
    def steps(self) -> list:
        """The views and scalar factors passed, outermost first."""
        return [n for n, _ in self.trail[:-1]]

    def lands(self, axis: int | None) -> int | None:
        """Where axis ``axis`` of ``base`` lands in the node the walk started at."""
        return through_views(self.views, axis)


def strip_views(node, view_ops=VIEW_OPS):
    """``node`` under its views: the tensor they read."""
    return read_views(None, node, view_ops=view_ops, scalars=False).base


def through_views(views, axis: int | None) -> int | None:
    """Where axis ``axis`` of the views' base lands after ``views`` (outermost first, as ``read_views``
    lists them); None where a view merges, splits or reduces it."""
    for view in reversed(views):
        if axis is None:
            return None
        axis = track_axis(view, axis)
    return axis


def read_views(gm: fx.GraphModule | None, node, *, view_ops=VIEW_OPS, scalars: bool = True, same_shape: bool = False,
               until=None) -> ViewChain:
    """Walk from ``node`` down through ``view_ops`` and, with ``scalars``, scalar factors (``same_shape``:
    only those that keep the shape, no broadcasting), stopping at ``until`` or at the first node that is
    neither (``gm`` is read for the scalars only). Every reader of "x through views and scalar factors" in
    the pass walks with this."""
    trail, views, factor = [], [], 1.0
    while True:
        trail.append((node, factor))
        if node is until or not isinstance(node, fx.Node) or node.op != "call_function":
            break
        if node.target in view_ops and isinstance(node.args[0], fx.Node):
            views.append(node)
            node = node.args[0]
            continue
        scaled = scalar_factor(gm, node) if scalars else None
        if scaled is None or (same_shape and hint_shape(scaled[0]) != hint_shape(node)):
            break
        factor *= scaled[1]
        node = scaled[0]
    return ViewChain(base=node, trail=trail, views=views, factor=factor)


@dataclass
class Operand:
    """What a matmul operand is once views and scalar factors are read through.

    source: the tensor the user multiplied (the deepest 4-D tensor on the chain, else the
    deepest tensor); factor: product of the scalar factors between source and the matmul;
    stop: the first node that is neither a view nor a scalar factor (where the walk ended).
    """

    source: fx.Node
    factor: float
    stop: fx.Node
    alternatives: tuple = ()      # other 4-D tensors on the chain with the same factor, nearest first, then
                                  # a 3-D tensor the chain starts from ([B, T, D]: one key/value head), then
                                  # the 3-D tensor nearest the 4-D source ([B*H, T, D]: heads folded)


def walk_operand(gm: fx.GraphModule, node: fx.Node, *, through_scalars: bool = True) -> Operand:
    chain = read_views(gm, node, scalars=through_scalars)
    four_d = [(n, f) for n, f in chain.trail if shape_of(n) is not None and len(shape_of(n)) == 4]
    source, f = four_d[-1] if four_d else chain.trail[-1]
    alternatives = tuple(n for n, g in four_d[:-1] if g == f)
    base, g = chain.trail[-1]
    if four_d and base is not source and g == f and shape_of(base) is not None and len(shape_of(base)) in (2, 3):
        alternatives += (base,)     # [B, T, D] under views that add unit axes (one head without its axis)
    if four_d:                      # [B*H, T, D] the matmul reads, folded from a 4-D source (torch.bmm on heads
        folded = [n for n, g in chain.trail[:chain.trail.index(four_d[0])]          # folded into the batch)
                  if g == f and shape_of(n) is not None and len(shape_of(n)) == 3 and n not in alternatives]
        alternatives += tuple(folded[-1:])
    return Operand(source=source, factor=f, stop=chain.base, alternatives=alternatives)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def track_axis(node: fx.Node, axis: int) -> int | None:
    """Where axis ``axis`` of a view op's input lands in its output (None: merged, split or reduced)."""
    src = hint_shape(node.args[0])
    out = hint_shape(node)
    if src is None or out is None:
        return None
    target, args = node.target, node.args
    if target is aten.permute.default:
        dims = [d % len(src) for d in args[1]]
        return dims.index(axis)
    if target is aten.transpose.int:
        d0, d1 = args[1] % len(src), args[2] % len(src)
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if target is aten.t.default:
        return (1 - axis) if len(src) == 2 else axis
    if target in (aten.clone.default, aten.alias.default, aten._to_copy.default, aten.contiguous.default,
                  aten.lift_fresh_copy.default):
        return axis
    if target is aten.expand.default:
        return axis + (len(out) - len(src)) if src[axis] == out[axis + len(out) - len(src)] else None
    if target is aten.unsqueeze.default:
        d = args[1] % len(out)
        return axis if axis < d else axis + 1
    if target in (aten.squeeze.dim, aten.squeeze.dims):
        dims = {d % len(src) for d in ([args[1]] if target is aten.squeeze.dim else args[1]) if src[d % len(src)] == 1}
        return None if axis in dims else axis - sum(d < axis for d in dims)
    # view / reshape / squeeze / flatten: match by the product of the axes before it; size-1 axes after the
    # same product keep their order (the second of [.., 1, 1] is the second, not the first again: at T = 1 the
    # weights' [T, T] axes are two such axes)
    before = _prod(src[:axis])
    rank = sum(1 for a in range(axis) if src[a] == 1 and _prod(src[:a]) == before) if src[axis] == 1 else 0
    for x in range(len(out)):
        if _prod(out[:x]) == before and out[x] == src[axis]:
            if out[x] == 1 and src[axis] != 1:
                continue
            if rank:
                rank -= 1
                continue
            return x
    return None


# ---------------------------------------------------------------------- attention regions
#
# Lowering a whole 12-layer graph costs about a second, so only the neighbourhoods of
# possible sites are lowered: nodes within REGION_DEPTH hops (either direction) of an
# anchor (a matmul, einsum, bmm or cumsum), not crossing "barrier" ops (linear layers,
# convolutions, embeddings, norms) nor anything stateful. The region becomes a small
# GraphModule whose outputs are every region node, so each ATen value found by the matcher
# maps back to the Dynamo node that computes it.

REGION_DEPTH = 16
_ANCHOR_WORDS = ("matmul", "bmm", "einsum", "cumsum")
_BARRIER_WORDS = ("linear", "conv", "embedding", "norm", "dropout", "softmax", "attention", "lstm", "gru",
                  "autocast", "grad", "rng", "seed")


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


_DROPOUT_SIGNATURES = {            # function -> names of (p, training) in its signature, with defaults
    torch.nn.functional.dropout: (("p", 1, 0.5), ("training", 2, True)),
    torch.dropout: (("p", 1, None), ("train", 2, None)),
    torch.nn.functional.alpha_dropout: (("p", 1, 0.5), ("training", 2, False)),
    torch.nn.functional.feature_alpha_dropout: (("p", 1, 0.5), ("training", 2, False)),
}


def identity_dropout(node: fx.Node) -> bool:
    """True for a dropout call of Dynamo's graph that is the identity: p = 0, or not training
    (``F.dropout(a, p=0.0)``, ``nn.Dropout`` in eval mode). A dropout with p > 0 in training is
    random and stays out of every region."""
    if node.op != "call_function" or node.target not in _DROPOUT_SIGNATURES:
        return False
    values = []
    for name, position, default in _DROPOUT_SIGNATURES[node.target]:
        value = node.kwargs.get(name, node.args[position] if len(node.args) > position else default)
        if isinstance(value, fx.Node) or value is None:
            return False
        values.append(value)
    p, training = values
    return isinstance(p, (int, float)) and (float(p) == 0.0 or training is False)


def _checkpointed_map(node: fx.Node) -> bool:
    """A ``torch.utils.checkpoint`` call (``tag_activation_checkpoint``) whose body has no matmul (a
    checkpointed feature map): lowering inlines it, so the attention it feeds is read through it. A
    body with a matmul is a region of its own (the driver runs the pass on it)."""
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    if hop is None or node.target is not hop or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    body = getattr(node.graph.owning_module, str(node.args[0].target), None)
    if not isinstance(body, fx.GraphModule):
        return False
    return not any(_contracts(n) for n in body.graph.nodes if n.op in ("call_function", "call_method"))


def _contracts(node: fx.Node) -> bool:
    """A matmul, or an einsum that sums over an index (``'...i,...j->...ij'`` does not: an outer product)."""
    name = _target_name(node)
    if "einsum" in name:
        equation = node.args[0] if node.args and isinstance(node.args[0], str) else None
        if equation is None or "->" not in equation:
            return True
        inputs, output = equation.replace(" ", "").split("->")
        return bool(set(inputs.replace(",", "").replace(".", "")) - set(output.replace(".", "")))
    return any(w in name for w in ("matmul", "bmm", "cumsum"))


def _wrapped(node) -> bool:
    value = example_value(node) if isinstance(node, fx.Node) else None
    return isinstance(value, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(value)


def under_transform(node: fx.Node) -> bool:
    """A node Dynamo traced inside a functorch transform (``torch.vmap``, ``torch.func.grad``, ``jvp``): its
    example value, or a tensor it reads, is one the transform wraps (vmap's batched tensor of one example's
    shape), which exists only inside the transform: the pass can neither lower nor evaluate it, nor give the
    operator its shapes (the node that unwraps the result, ``_remove_batch_dim``, reads one)."""
    return _wrapped(node) or any(_wrapped(a) for a in node.all_input_nodes)


def eligible(node: fx.Node) -> bool:
    """A node that may join an attention region (pure, not a projection or another barrier, not inside a
    functorch transform)."""
    if node.op not in ("call_function", "call_method", "get_attr"):
        return False
    if under_transform(node):
        return False
    if identity_dropout(node):
        return True
    if node.op == "call_function":
        if _checkpointed_map(node):
            return True
        if node.target is operator.getitem and node.args and isinstance(node.args[0], fx.Node) \
                and node.args[0].op == "call_function" and isinstance(example_value(node.args[0]), (tuple, list)) \
                and not eligible(node.args[0]):
            # an element of the tuple a barrier returns (q of a custom autograd.Function, of torch.cond: a
            # higher-order operator's value) is a tensor input of the region, not the tuple (x[i] of a tensor,
            # an index table's row, stays in the region)
            return False
        if node.target in _STATEFUL_TARGETS or isinstance(node.target, torch._ops.HigherOrderOperator):
            return False
        if node.is_impure():
            return False
    if _norm_call(node):
        return _one_norm(node)
    name = _target_name(node).lower()
    return not any(word in name for word in _BARRIER_WORDS)


# calls that take a p-norm along an axis (the name of p, its default): with p = 1 the row sums of weights that are
# never negative (``match`` reads them), not a norm layer; other p stay out of the region
_NORMS = {torch.nn.functional.normalize: ("p", 2.0), torch.linalg.vector_norm: ("ord", 2.0),
          torch.norm: ("p", "fro"), "norm": ("p", "fro")}


def _norm_call(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "norm") or (
        node.op == "call_function" and not isinstance(node.target, str) and node.target in _NORMS)


def _one_norm(node: fx.Node) -> bool:
    """``F.normalize(a, p=1, dim=...)``, ``torch.linalg.vector_norm(a, ord=1, ...)``, ``a.norm(p=1, ...)``."""
    if "out" in node.kwargs:
        return False
    name, default = _NORMS[node.target]
    p = node.kwargs.get(name, node.args[1] if len(node.args) > 1 else default)
    return isinstance(p, (int, float)) and not isinstance(p, bool) and float(p) == 1.0


def attention_region(gm: fx.GraphModule) -> list[fx.Node]:
    """The region nodes in graph order ([] when the graph has no anchor)."""
    names = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            names[node] = _target_name(node)
    anchors = [n for n, name in names.items() if any(w in name for w in _ANCHOR_WORDS) and eligible(n)]
    if not anchors and any("cat" in s for s in names.values()):
        # the non-causal linear form: a feature map (cat) contracted with sums
        anchors = [n for n, name in names.items() if name in ("sum", "cat") and eligible(n)]
    region = set(anchors)
    frontier = list(anchors)
    for _ in range(REGION_DEPTH):
        nxt = []
        for node in frontier:
            for other in list(node.all_input_nodes) + list(node.users):
                if other not in region and eligible(other):
                    region.add(other)
                    nxt.append(other)
        frontier = nxt
    # A write into a region tensor that is not eligible itself (``x[i] = y`` is impure) belongs to
    # the region too: without it, the region's copy would read that tensor unwritten.
    for node in gm.graph.nodes:
        if node not in region and any(x in region for x in written_arguments(node)):
            region.add(node)
    return [n for n in gm.graph.nodes if n in region]


def writes_in_place(node: fx.Node) -> bool:
    """True when ``node`` writes into one of its arguments (``x[i] = y``, ``x += y``, ``x.fill_(...)``,
    ``torch.ops.aten.copy_.default(x, y)``, a checkpointed function that writes its input: ``writes.py``)."""
    return bool(written_arguments(node))


def computed_without_grad(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes of Dynamo's graph that run with gradients off: inside ``with torch.no_grad()`` or
    ``torch.inference_mode()`` in the compiled code (``_set_grad_enabled`` / ``_enter_inference_mode``
    nodes), or everywhere but inside ``torch.enable_grad()`` when the graph is compiled with
    gradients off. The graph starts in the grad mode it is compiled in (Dynamo guards on it)."""
    enabled, saved, off = torch.is_grad_enabled(), [], set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch._C._set_grad_enabled and node.args:
            enabled = bool(node.args[0])
        elif node.op == "call_function" and node.target is torch.autograd.grad_mode._enter_inference_mode:
            saved.append(enabled)
            enabled = enabled and not (node.args[0] if node.args else True)
        elif node.op == "call_function" and node.target is torch.autograd.grad_mode._exit_inference_mode:
            enabled = saved.pop() if saved else enabled
        elif not enabled:
            off.add(node)
    return off


def extract_region(gm: fx.GraphModule, region: list[fx.Node]):
    """(sub GraphModule, its inputs (Dynamo nodes), its outputs (Dynamo nodes)) for ``region``.

    Grad mode is state of Dynamo's graph that the copy and its ATen lowering do not carry
    (``_set_grad_enabled`` is never part of a region): a value computed with gradients off (``with
    torch.no_grad(): z = a.sum(-1)``) reaches each node that runs with gradients on through an
    explicit ``detach``, which is what autograd sees and what every reader of the lowered graph
    reads (a detached normaliser, weights or map), instead of a differentiable value."""
    inside = set(region)
    no_grad = computed_without_grad(gm)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    detached: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def read(arg: fx.Node, user: fx.Node) -> fx.Node:
        if arg not in no_grad or user in no_grad or not isinstance(example_value(arg), torch.Tensor):
            return env[arg]
        if arg not in detached:
            detached[arg] = graph.call_function(torch.Tensor.detach, (env[arg],))
            detached[arg].meta = dict(arg.meta)
        return detached[arg]

    for node in region:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in env:
                placeholder = graph.placeholder(arg.name)
                placeholder.meta = dict(arg.meta)
                env[arg] = placeholder
                inputs.append(arg)
        env[node] = graph.node_copy(node, lambda a, node=node: read(a, node))
    outputs = [n for n in region if isinstance(example_value(n), torch.Tensor)]
    graph.output(tuple(env[n] for n in outputs))
    return fx.GraphModule(gm, graph), inputs, outputs
