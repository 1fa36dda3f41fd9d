"""Storage in Dynamo's graph: which nodes name the same memory, and what a rewrite may do to it.

Dynamo's graph is not functional. A node names a storage: ``o /= z`` returns the node's first
argument again, ``o.div_(z)`` is a node whose result nobody uses while ``o`` is read later, and a
view shares its base's memory. The pass matches on a functional lowering of a region, where each
Dynamo node maps to the value it had *when it ran* (``canonicalize._AtTime``); every question about
what happens to that memory afterwards is answered here, from one fact PyTorch records for us: the
fake example value of each node, whose untyped storage is shared exactly by the nodes that alias.

- ``Storages``: position and storage of every node; who writes and who reads each storage.
- ``written_before_output``: a write, between the node a site reads (q, k, v, a buffer) and the
  site's output, into that memory: the operator would read the written values (refused);
  ``first_write_between`` the same question for any reads and end (a recurrent step's, driver).
- ``plan_output``: what replacing the site's output node by a fresh tensor needs: reads of the
  output's memory through another view of the same geometry are re-pointed to the new tensor, a
  read through a view of another geometry is refused, and a later in-place write into the output
  makes the new tensor a clone (the operator saves its output for the backward).
- ``erasable``: the one rule for dead code: a node is erased when no node uses it and, if it
  writes in place, no surviving node reads that memory after it and it is not a graph input's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .candidate import site_inputs
from .canonicalize import example_value
from .writes import written_arguments
from .report import source_of

UNKNOWN = "unknown"       # a tensor whose storage cannot be read: aliases anything


def storage_key(node: fx.Node):
    """The identity of the memory a node's value lives in (None: not a tensor; UNKNOWN: a tensor
    without a readable storage)."""
    value = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata       # the example values (kept in the graph) keep it alive
    except Exception:  # noqa: BLE001 - a tensor without storage (a subclass): treated as unknown
        return UNKNOWN


def written_nodes(node: fx.Node) -> list[fx.Node]:
    """The nodes whose memory ``node`` writes into (``x`` of ``x.add_(y)``, ``x += y``, ``x[i] = y``,
    ``torch.add(a, b, out=x)``, every input a checkpointed function writes: ``writes.py``), [] for none."""
    out = node.kwargs.get("out") if node.op in ("call_function", "call_method") else None
    found = written_arguments(node)
    return [out, *(x for x in found if x is not out)] if isinstance(out, fx.Node) else found


def written_node(node: fx.Node) -> fx.Node | None:
    """The first of ``written_nodes`` (what most writes write: one tensor), or None."""
    found = written_nodes(node)
    return found[0] if found else None


@dataclass
class Storages:
    """Positions and storages of Dynamo's graph, taken before any edit (example values are not
    updated by the rewrite; ``alias`` records which new nodes stand for an old storage)."""

    gm: fx.GraphModule
    position: dict = field(default_factory=dict)
    key: dict = field(default_factory=dict)
    inputs: set = field(default_factory=set)        # storages that outlive the graph: never dead

    def __post_init__(self):
        for i, node in enumerate(self.gm.graph.nodes):
            self.position[node] = i
            self.key[node] = storage_key(node)
            if node.op in ("placeholder", "get_attr"):
                self.inputs.add(self.key[node])
        self.inputs.discard(None)

    def add(self, node: fx.Node, *, before: fx.Node) -> None:
        """A node the rewrite inserts just before ``before``."""
        self.position[node] = self.position[before] - 0.5
        self.key[node] = storage_key(node)

    def of(self, node) -> object:
        return self.key.get(node) if isinstance(node, fx.Node) else None

    def same(self, a, b) -> bool:
        ka, kb = self.of(a), self.of(b)
        return ka is not None and kb is not None and (ka == kb or UNKNOWN in (ka, kb))

    def writes_into(self, node: fx.Node, key) -> bool:
        return any(self.of(target) == key or UNKNOWN in (self.of(target), key) or self.of(target) is None
                   for target in written_nodes(node))

    def reads(self, node: fx.Node, key) -> bool:
        """Does ``node`` read memory ``key`` (through any input, the output node included)?"""
        return any(self.of(x) == key or self.of(x) == UNKNOWN for x in node.all_input_nodes)


def written_before_output(gm: fx.GraphModule, site, to_dynamo: dict, storages: Storages | None = None) -> str | None:
    """The source of an in-place write, after a node the site reads (q, k, v or a buffer such as a
    mask, through any view of them) and before the site's output in Dynamo's graph, into that
    node's memory, or None.

    The operator replaces the site at its output, so it reads q, k, v as they are there; the user's
    code read them where they were computed. A write in between (``v.mul_(2)`` after ``a @ v``,
    ``self.mask.fill_(1)`` before the mask is used, ``q *= 2`` after the scores) would change what
    is computed. Writes before that node are part of its value (the lowering maps each Dynamo node
    to the value it had when it ran)."""
    storages = storages or Storages(gm)
    reads = [to_dynamo[n] for n in site_inputs(site.match) if n in to_dynamo]
    return first_write_between(gm, reads, to_dynamo[site.match.output], storages)


def first_write_between(gm: fx.GraphModule, reads, end: fx.Node, storages: Storages,
                        exempt: dict | None = None) -> str | None:
    """The source of the first in-place write into the memory of a node of ``reads`` (through any view),
    after that node and before ``end`` in Dynamo's graph, or None. ``exempt``: read node -> writer nodes
    allowed to write its memory (a recurrent step's own state updates, which the operator performs)."""
    exempt = exempt or {}
    stop = storages.position[end]
    for read in reads:
        key = storages.of(read)
        if key is None:
            continue
        allowed = exempt.get(read, ())
        for node in gm.graph.nodes:
            if storages.position[node] >= stop:
                break
            if storages.position[node] > storages.position[read] and node not in allowed \
                    and storages.writes_into(node, key):
                return source_of(node)
    return None


_COPIES = {"copy_", torch.Tensor.copy_, torch.ops.aten.copy_.default}


def copies_over(gm: fx.GraphModule, value: fx.Node, target: fx.Node, storages: Storages) -> set:
    """The ``x.copy_(value)`` nodes of Dynamo's graph that write ``value`` over all of ``target``'s memory
    as it is viewed (the same shape, strides, offset and dtype: a copy that broadcasts, casts or
    writes a part of it is not one): ``kv_state.copy_(kv_state + phi_k.mT @ v)`` stores a state
    update where ``kv_state`` was, which an operator that computes that update may do itself."""
    found = set()
    geometry = _geometry(target)
    if geometry is None:
        return found
    for node in value.users:
        if node.op not in ("call_method", "call_function") or node.target not in _COPIES or node.kwargs \
                or len(node.args) != 2 or node.args[1] is not value:
            continue
        dest = node.args[0]
        if isinstance(dest, fx.Node) and storages.same(dest, target) and storages.of(dest) != UNKNOWN \
                and _geometry(dest) == geometry and _geometry(value) is not None \
                and _geometry(value)[0] == geometry[0] and _geometry(value)[3] == geometry[3]:
            found.add(node)
    return found


@dataclass
class OutputPlan:
    """How the site's output node is replaced: ``repoint``: (reader, old input) pairs to read the new
    tensor instead; ``derived``: nodes after the output that alias it through it; ``clone``: the new
    tensor is written in place later (the operator saved it for the backward)."""

    repoint: list
    derived: set
    clone: bool


class OutputAliased(Exception):
    """The site's output memory is written in place and read through a view of another geometry."""


def _geometry(node: fx.Node):
    value = example_value(node)
    try:
        return (tuple(map(str, value.shape)), tuple(map(str, value.stride())), str(value.storage_offset()),
                value.dtype)                     # as expressions: comparing them adds no shape guard
    except Exception:  # noqa: BLE001 - no strides (a sparse or opaque tensor): never the same view
        return None


def plan_output(gm: fx.GraphModule, output: fx.Node, storages: Storages) -> OutputPlan:
    """What replacing ``output`` (Dynamo's node of the site's output) by a fresh tensor needs.

    Memory nobody writes at or after ``output`` keeps the values the surviving user code computes,
    whoever reads it. When it is written there (``output`` is ``o /= z`` or ``o.div_(z)``, or a
    later ``o += x``), every later read of it must see the new tensor: reads through ``output`` and
    the views and in-place results made from it (``derived``) do once ``output``'s uses are
    replaced; a read through another node of the same geometry (``o`` after ``o.div_(z)``) is
    re-pointed; any other read raises ``OutputAliased``."""
    key = storages.of(output)
    start = storages.position[output]
    later = [n for n in gm.graph.nodes if storages.position[n] > start]
    written = key is not None and (written_node(output) is not None or any(storages.writes_into(n, key)
                                                                            for n in later))
    derived = {output}
    repoint = []
    if not written:
        return OutputPlan(repoint, derived, clone=False)
    if key == UNKNOWN:
        raise OutputAliased(f"{source_of(output)}: the site's output has no readable storage and is written "
                            "in place")
    geometry = _geometry(output)
    clone = False
    for node in later:
        for x in node.all_input_nodes:
            if x in derived or not storages.same(x, output):
                continue
            if geometry is None or _geometry(x) != geometry:
                raise OutputAliased(f"{source_of(node)} reads the site's output memory through another view "
                                    f"({x.name}) while it is written in place")
            repoint.append((node, x))
        if storages.of(node) == key:
            derived.add(node)
        if any(storages.same(target, output) for target in written_nodes(node)):
            clone = True
    return OutputPlan(repoint, derived, clone)


def erasable(node: fx.Node, storages: Storages, erased: set) -> bool:
    """Whether ``node`` (of a matched region) is dead once nothing uses it.

    A node that writes in place is dead only when no surviving node reads the written memory after
    it (``a.mul_(0.5)`` stays while ``torch.where(keep, a, 0)`` is computed later) and that memory is
    not a graph input's (a buffer or an argument the caller sees). Other side effects never die."""
    if node.users:
        return False
    targets = written_nodes(node)
    if not targets:
        return not node.is_impure() and node.op in ("call_function", "call_method", "get_attr")
    here = storages.position[node]
    for target in targets:
        key = storages.of(target)
        if key is None or key == UNKNOWN or key in storages.inputs:
            return False
        for other, pos in storages.position.items():
            if pos > here and other not in erased and storages.reads(other, key):
                return False
    return True
