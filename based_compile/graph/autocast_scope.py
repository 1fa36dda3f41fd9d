"""Whether autocast lowers a site's precision in eager, and running the operator at that precision.

Inside ``torch.autocast``, eager PyTorch runs matmuls, bmm (and an einsum that runs as one) in the autocast
dtype and leaves elementwise products, sums and cumsums in their inputs' dtype (on CUDA it widens sum, cumsum,
pow, reciprocal to float32). Which values are rounded where is read off the dtypes Dynamo traced, not off the
ops' names. The
``based`` operator is matmul-like: under autocast it casts q, k, v to the autocast dtype (``op.custom_op``),
as a site written with matmuls or einsums computes in eager. A site one of whose results is computed in
float32 along some path (``(phi(k)[..., :, None] * v[..., None, :]).cumsum(2)`` and a broadcast readout) keeps
float32 in eager even under autocast, so its rewrite runs the operator with autocast off (``keep_dtype``):
no less precise than the user's code. A result computed low and returned wider (eager's float32 row sums of
bfloat16 weights on CUDA) is computed by the operator cast as a matmul and cast to eager's dtype; a site whose
feature map or products promote to a wider dtype than q, k, v (a float32 ones column) runs in that dtype
(``computed_precision``). A site split by an autocast switch is refused (``switch_inside``).
The pass itself reads and probes a graph compiled inside autocast with autocast off
(``analysis_without_autocast``): the casts autocast would insert before matmuls are not the user's code.
A graph only autocast makes valid (q, k from ``nn.Linear`` in bfloat16 against a float32 v) is read as written
too (``autocast_lowering``). Which dtype the operator runs in, for every mix of q, k, v dtypes, is decided in one
place (``operator_precision``).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.fx as fx

from .canonicalize import example_value
from .refusal import Refused

_LOWER = (torch.float16, torch.bfloat16)


def _switches_autocast(node: fx.Node) -> bool:
    """``torch.autocast(...)`` entered or left in Dynamo's graph (``_enter_autocast`` / ``_exit_autocast``)."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    module = getattr(target, "__module__", "") or ""
    return node.op == "call_function" and "autocast" in name and module.startswith("torch")


def _enters(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return _switches_autocast(node) and "enter" in name


def _blocks_at(graph: fx.Graph) -> dict:
    """Each node of ``graph`` -> the ``torch.autocast`` blocks it runs in (the ``_enter_autocast`` nodes entered
    and not yet left, in order): two nodes run under one setting when they have the same."""
    at, entered = {}, []
    for node in graph.nodes:
        if _switches_autocast(node) and not _enters(node):
            context = node.args[0] if node.args else None
            entered = entered[:entered.index(context)] if context in entered else entered[:-1]
        elif _switches_autocast(node):
            entered = entered + [node]
        at[node] = tuple(entered)
    return at


def traced_settings() -> dict:
    """The autocast settings on now, as Dynamo traced the graph under them: device type -> autocast's dtype there."""
    return {d: torch.get_autocast_dtype(d) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)}


def settings_by_node(gm: fx.GraphModule, outer: dict) -> dict:
    """The name of each node of Dynamo's graph ``gm`` -> the autocast settings it runs under (device type ->
    dtype): ``outer`` (the caller's, ``traced_settings``) as the ``torch.autocast`` blocks entered inside the
    compiled code (``_enter_autocast(device, dtype, enabled, cache)``) change them."""
    blocks = _blocks_at(gm.graph)
    settings_of: dict = {(): dict(outer)}

    def settings(chain: tuple) -> dict:
        if chain not in settings_of:
            settings_of[chain] = dict(settings(chain[:-1]))
            enter = chain[-1]
            device, dtype, enabled = (list(enter.args) + [None, None, True])[:3]
            if enabled:
                settings_of[chain][device] = dtype if isinstance(dtype, torch.dtype) else \
                    settings_of[chain].get(device, torch.get_autocast_dtype(device))
            else:
                settings_of[chain].pop(device, None)
        return settings_of[chain]

    return {node.name: settings(chain) for node, chain in blocks.items()}


def switch_inside(outputs, inputs) -> fx.Node | None:
    """An autocast switch of Dynamo's graph under which some of the site's nodes run and others not: the nodes
    computed from ``inputs`` on the way to any of ``outputs`` (the output, returned states, a step's state updates)
    do not all run under one setting, so its matmuls and its results run under different ones (the operator,
    inserted at one place, would take that place's); or None. A switch around code the site does not run
    (``v = self.v_proj(x)`` with autocast off, between q's and v's projections) is no switch inside it."""
    outputs = [o for o in outputs if o is not None]
    graph = outputs[0].graph
    position = {n: i for i, n in enumerate(graph.nodes)}
    stop = set(inputs)
    seen, stack = set(), list(outputs)
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    site = [n for n in sorted(seen, key=position.__getitem__)]      # those computed from the inputs, in order
    computed = set()
    for node in site:
        if any(a in stop or a in computed for a in node.all_input_nodes):
            computed.add(node)
    site = [n for n in site if n in computed] + [o for o in outputs if o not in computed]
    blocks = _blocks_at(graph)
    if len({blocks[n] for n in site}) <= 1:
        return None
    first, last = min(position[n] for n in site), max(position[n] for n in site)
    return next(n for n in graph.nodes if first < position[n] < last and _switches_autocast(n))


# floating dtypes by precision (mantissa bits): bfloat16 < float16 < float32 < float64
_RANK = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, torch.float64: 3}


# ops that move or view values without arithmetic: they round nothing (a path's precision is where it computes)
_MOVES = {"getitem", "unsqueeze", "squeeze", "view", "reshape", "transpose", "permute", "expand", "expand_as",
          "flatten", "unflatten", "contiguous", "clone", "cat", "concat", "concatenate", "stack", "narrow", "select",
          "split", "chunk", "unbind", "movedim", "moveaxis", "swapaxes", "swapdims", "repeat", "repeat_interleave",
          "tile", "broadcast_to", "view_as", "reshape_as", "t", "mT", "T", "diagonal", "tril", "triu", "detach",
          "roll", "flip", "index_select", "gather", "masked_fill", "where", "pad"}


# ops that read only a tensor's shape, dtype and device (``q.new_ones(t, t)`` for a mask): no path of values
_METADATA = {"new_ones", "new_zeros", "new_full", "new_empty", "ones_like", "zeros_like", "full_like", "empty_like",
             "size", "dim", "numel", "stride"}


def _name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _moves(node: fx.Node) -> bool:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name in _MOVES


def _tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [x for x in value if isinstance(x, torch.Tensor)]
    return []


def computed_precision(returned, inputs) -> torch.dtype | None:
    """The precision the user's code computes ``returned`` (the output, returned states; Dynamo's nodes) in, as
    Dynamo traced it, from ``inputs`` (q, k, v): along each path of values from an input to a result, the
    narrowest floating dtype of the values computed on it (the input's own dtype and values only moved or viewed
    left out: the operator reads the same values); over the paths, the widest of these. A path with no value
    narrower than float32 (a float32 ones column that promotes a bfloat16 feature map, ``phi(k) * v`` in
    float32, a normaliser summed in float32 from float32 features) computes in float32 however the others
    round, so the operator runs in float32 (``operator_precision``); only when every path rounds to
    float16/bfloat16 (autocast's matmuls: on CUDA a sum, cumsum or pow widened after them is still computed from
    their rounded results) may it run there. Edges read by sizes alone (``q.shape``, ``q.new_ones(t, t)``) are
    not paths of values. None when no floating value lies on a path."""
    graph = returned[0].graph
    stop = set(inputs)
    top = object()                      # an input: no dtype yet
    best: dict = {}
    for node in graph.nodes:
        if node in stop:
            best[node] = top
            continue
        if _name(node) in _METADATA:
            continue
        reads = [best[a] for a in node.all_input_nodes if a in best and _tensors(example_value(a))]
        if not reads:
            continue
        widest = top if top in reads else max((r for r in reads if r is not None),
                                              key=_RANK.__getitem__, default=None)
        tensors = [t for t in _tensors(example_value(node)) if t.dtype in _RANK]
        if tensors and not _moves(node):
            own = min((t.dtype for t in tensors), key=_RANK.__getitem__)
            widest = own if widest is top or widest is None or _RANK[own] < _RANK[widest] else widest
        best[node] = widest
    found = [best.get(r) for r in returned if r is not None]
    found = [f for f in found if f is not None and f is not top]
    return max(found, key=_RANK.__getitem__) if found else None


def analysis_without_autocast():
    """A context with autocast off on the CPU and CUDA, for the pass's own tracing and probing: a graph
    compiled inside ``torch.autocast`` is read as the code is written (its matmuls' casts are autocast's,
    not the user's), and the rewrite keeps autocast's casts by the rules above."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def without_autocast(device_type: str):
    """A context with autocast off on ``device_type`` when it is on (else a no-op context)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class OperatorPrecision(NamedTuple):
    """How the operator standing for a site runs (``operator_precision``)."""

    keep_dtype: bool                    # with autocast off (else cast as a matmul: its autocast rule)
    dtype: torch.dtype | None = None    # q, k, v of different dtypes: the one they are cast to first


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def operator_precision(returned, q: fx.Node, k: fx.Node, v: fx.Node, settings: dict) -> OperatorPrecision:
    """The precision the operator standing for ``returned`` (the output, returned states; Dynamo's nodes) runs at,
    read from ``q``, ``k``, ``v`` (initial states passed in are not cast) as Dynamo traced them under the
    autocast ``settings`` (``settings_by_node`` at the output), or ``Refused`` with the reason. The operator
    computes no less precisely than the user's code (``computed_precision``: the widest precision any path from
    q, k, v to a result keeps):

    - Every path rounds to autocast's dtype on the device (its matmuls; a sum or cumsum autocast widens to float32
      after them on CUDA, ``a.sum(-1, dtype=torch.float32)``, ``a.float()`` before a matmul autocast lowers again):
      cast as a matmul (the operator's autocast rule; q, k, v of different dtypes cast to autocast's dtype first,
      as eager's matmuls cast them; float64 in the mix refused: autocast never casts it). Its results, rounded to
      autocast's dtype as eager's matmul results are, are then cast to the dtypes eager returns (``rewrite``).
    - Otherwise autocast off: q, k, v cast to the widest of their dtypes and the computed precision (a bfloat16 q,
      k, v whose feature map promotes to float32 run in float32), never narrower than they are; the results then
      cast to eager's dtypes."""
    values = [example_value(x) for x in (q, k, v)]
    dtypes = [x.dtype for x in values]
    output = returned[0]
    computed = computed_precision(returned, [q, k, v])   # paths from q, k, v: states passed in are not cast
    device = values[0].device.type
    if computed in _LOWER and settings.get(device) == computed:
        if len(set(dtypes)) == 1:
            return OperatorPrecision(False)
        if any(not x.is_floating_point() or x.dtype == torch.float64 or x.device.type != device for x in values):
            raise Refused("unsupported", f"q, k, v are {_names(dtypes)}: under torch.autocast the matmuls cast "
                                         "float16, bfloat16 and float32 to autocast's dtype, never float64, so they "
                                         "do not meet in one dtype the operator could take", output)
        return OperatorPrecision(False, computed)
    widest = dtypes[0]
    for d in dtypes[1:]:
        widest = torch.promote_types(widest, d)
    if computed is not None and computed not in _LOWER and widest in _RANK and _RANK[computed] > _RANK[widest]:
        widest = computed
    if all(d == widest for d in dtypes):
        return OperatorPrecision(True)
    return OperatorPrecision(True, widest)
