"""A checkpointed body's operands that the graph around it builds from sizes and buffers (a mask).

HF-style gradient checkpointing builds the causal mask once, outside the layers, and passes it into
each checkpointed function: ``checkpoint(layer, hidden, mask, use_reentrant=False)``. Dynamo records
the call as ``tag_activation_checkpoint(body, *operands)``, and inside the body the mask is a
placeholder. Its value is read where it is built: ``splice`` copies the outer graph's computation of
such an operand into the body, in front of its uses, so that the body reads as if the mask were built
inside the function (the same readers, proofs and dynamic-shape guards as any mask; a registered buffer
it reads stays a compile-time constant and is guarded as the graph input it is).

Only an operand whose computation reads no input's values is copied: every op pure and of the kinds a
region may hold, its leaves sizes, registered buffers the graph does not write, or tensors read for
their sizes alone, at most ``MAX_NODES`` ops (in-place writes into its memory before the call
included). Any other operand computed outside stays a placeholder, with the reason
(``Splice.reasons``) that the mask reader gives if it is the mask.

An operand that is a view of another tensor (``k.mT``: Dynamo evaluates an attribute of the function's
argument outside the body and passes the view in; or ``checkpoint(f, q, k.transpose(-2, -1), v)``) is
copied in too, as that view of the tensor it views (``_view_slice``): the body then reads q, k, v as the
function would had it taken the view itself.

After a rewrite, ``Splice.settle`` puts the body back to reading its placeholders (the copies are
dropped), and an operand the rewritten body no longer reads is dropped from the call, and the outer
computation of it erased when nothing else reads it: the T x T mask that only fed the rewritten site
is gone from both graphs; the body stays checkpointed. A tensor a copied view viewed that the rewritten
body reads (k, where the call passed k.mT) is passed to the call as an operand of its own.
``Splice.undo`` restores the body unread.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .canonicalize import eligible, example_value
from .graph_copy import copy_graph
from .inplace import UNKNOWN, Storages, erasable, written_nodes

MAX_NODES = 64
_SIZE_WORDS = ("size", "numel", "dim", "stride")


def _name(node: fx.Node) -> str:
    """``ones``, ``masked_fill_``, ``sym_size.int``, ``mul``: what a node calls, for a reason."""
    if node.op == "call_method":
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _size_query(node: fx.Node) -> bool:
    """``x.size(2)``, ``sym_size(x, 2)``, ``x.dim()``: a node that reads a tensor's shape, not its values."""
    return (node.op in ("call_function", "call_method") and not isinstance(example_value(node), torch.Tensor)
            and any(w in _name(node).lower() for w in _SIZE_WORDS))


def _not_copied(node: fx.Node) -> str | None:
    """Why an op of the outer computation is not copied into the body, or None."""
    if node.op not in ("call_function", "call_method"):
        return f"computed outside it by {node.op} {node.name}"
    if node.is_impure():
        return f"computed outside it with {_name(node)}, which is random or has side effects"
    if isinstance(node.target, torch._ops.HigherOrderOperator) or not eligible(node):
        return f"computed outside it with {_name(node)}, which the pass does not read across the call"
    return None


def _outer_slice(gm: fx.GraphModule, root: fx.Node, hop: fx.Node, constant: dict, storages: Storages):
    """(the nodes computing ``root``, in graph order; its leaves) or the reason it is not copied."""
    inside: set = set()
    leaves: set = set()
    writes: set = set()                  # writes into its memory (``mask[i] = 0`` is impure, and copied)
    stack = [root]
    while True:
        while stack:
            node = stack.pop()
            if node in inside or node in leaves:
                continue
            if node.op in ("placeholder", "get_attr"):
                leaves.add(node)
                continue
            why = None if node in writes else _not_copied(node)
            if why is not None:
                return why
            inside.add(node)
            if len(inside) > MAX_NODES:
                return f"computed outside it by more than {MAX_NODES} ops (not read across the call)"
            if _size_query(node):
                leaves.update(a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)
                              and a not in inside)
                stack.extend(a for a in node.all_input_nodes if not isinstance(example_value(a), torch.Tensor))
                continue
            stack.extend(node.all_input_nodes)
        # in-place writes into the memory of what it computes, before the call, are part of its value
        keys = {storages.of(n) for n in inside} - {None}
        if UNKNOWN in keys:
            return "computed outside it into memory the pass cannot name"
        found = [n for n in gm.graph.nodes if storages.position[n] < storages.position[hop] and n not in inside
                 and any(storages.of(t) in keys | {UNKNOWN} for t in written_nodes(n))]
        if not found:
            break
        for write in found:                  # a write the copy cannot take: a checkpointed function's, ...
            if isinstance(write.target, torch._ops.HigherOrderOperator) or write.op not in ("call_function",
                                                                                            "call_method"):
                return f"written before the call by {_name(write)}, which the pass does not read across"
            if len(written_nodes(write)) != 1:
                return f"written before the call by {_name(write)}, which writes more than one tensor"
        writes.update(found)
        stack.extend(found)
    for leaf in leaves:
        value = example_value(leaf)
        if not isinstance(value, torch.Tensor) or leaf.op == "get_attr" or constant.get(leaf, False):
            continue
        if any(u in inside and not _size_query(u) for u in leaf.users):
            return "computed outside it from values of inputs"
    leaves -= inside
    return [n for n in gm.graph.nodes if n in inside], leaves


def _view_slice(gm: fx.GraphModule, root: fx.Node, hop: fx.Node, constant: dict, storages: Storages):
    """(the views computing ``root``, in graph order; the tensor they view and the leaves of any sizes they
    read) when ``root`` is a view of one tensor through views alone, else None.

    Dynamo evaluates an attribute of a checkpointed function's argument (``k.mT``, ``k.T``) outside the
    body and passes the view in, and code may pass ``k.transpose(-2, -1)`` itself: the body then reads
    the view as a tensor of its own. A view aliases what it views (the same memory: ``Storages``), so
    computing it inside the body from that tensor reads the same values at the call, writes before the
    call included, and the body reads as if the function had taken the view itself."""
    chain: list = []
    leaves: set = set()
    node = root
    while node.op in ("call_function", "call_method") and _not_copied(node) is None and not written_nodes(node):
        tensors = [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]
        key = storages.of(node)
        if len(tensors) != 1 or key in (None, UNKNOWN) or key != storages.of(tensors[0]):
            break
        for size in node.all_input_nodes:            # sizes a view reads (``k.view(b, h, t, d)``, dynamic)
            if size is tensors[0]:
                continue
            if size.op == "placeholder":
                leaves.add(size)
                continue
            found = _outer_slice(gm, size, hop, constant, storages)
            if isinstance(found, str):
                return None
            chain.extend(found[0])
            leaves.update(found[1])
        chain.append(node)
        node = tensors[0]
    if not chain or node.op == "get_attr":      # a view of a constant of the graph: ``_outer_slice``'s
        return None
    leaves.add(node)
    inside = set(chain)
    return [n for n in gm.graph.nodes if n in inside], leaves - inside


@dataclass
class Splice:
    """The outer computations copied into ``body`` for the call ``hop``."""

    gm: fx.GraphModule
    hop: fx.Node
    body: fx.GraphModule
    original: fx.Graph | None = None                   # the body before the copy (None: nothing copied)
    roots: dict = field(default_factory=dict)          # operand position -> its copy in the body
    outer: dict = field(default_factory=dict)          # operand position -> outer nodes computing it
    leaves: list = field(default_factory=list)         # outer nodes given new body placeholders, in order
    copies: list = field(default_factory=list)         # body nodes copied in, in order
    views: set = field(default_factory=set)            # those copied from a view's chain (``_view_slice``) alone
    reasons: dict = field(default_factory=dict)        # operand position -> why it was not copied
    outer_replaced: bool = False                       # settle failed and put back a copy of the outer graph

    def undo(self) -> None:
        """The body as it was (nothing rewritten)."""
        if self.original is None:
            return
        self.body.graph = self.original
        self.body.recompile()

    def settle(self) -> fx.Graph | None:
        """After a rewrite of the body: the copies dropped (what still reads an operand's copy reads the
        operand again; a copied view of a chain that the rewrite still reads, ``k.transpose(0, 1)`` of
        ``k.transpose(0, 1).mT``, stays, a view of the tensor passed in), operands the body no longer reads dropped from the call and from the body, and
        their outer computations erased where nothing else reads them. Returns a copy of the outer graph
        before it changed, or None when it did not. Raises RuntimeError when a copy is still read; on any
        error the outer graph is left as it was."""
        if self.original is None:
            return None
        graph = self.body.graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for position, copy_ in self.roots.items():
            copy_.replace_all_uses_with(placeholders[position])
        live = set(graph.nodes)                   # the rewrite erased the copies its region held
        for node in reversed(self.copies):
            if node not in live:
                continue
            if node.users and node not in self.views:
                raise RuntimeError(f"the copy of {node.name} from the outer graph is still read after the rewrite")
            if not node.users:
                graph.erase_node(node)
        kept = []                                 # leaves the rewritten body reads: the tensor a view viewed
        for leaf, placeholder in zip(self.leaves, placeholders[len(placeholders) - len(self.leaves):]):
            if placeholder.users:
                kept.append(leaf)
            else:
                graph.erase_node(placeholder)
        if kept and not self._sole_caller():
            raise RuntimeError(f"the outer values {[n.name for n in kept]} are still read after the rewrite of a "
                               "body another call shares")
        unused = [p for p in self.roots if not placeholders[p].users]
        if not kept and (not unused or not self._sole_caller()):
            self.body.recompile()
            return None
        before = copy_graph(self.gm.graph)
        try:
            self.hop.args = (*self.hop.args, *kept)    # passed after the operands, as the body reads them
            self._drop_operands(unused, placeholders)
        except Exception:
            self.gm.graph = copy_graph(before)         # the outer graph as it was; the caller undoes the body
            self.gm.recompile()
            self.outer_replaced = True                 # its nodes are new: the caller's nodes are stale
            raise
        self.body.recompile()
        self.gm.recompile()
        return before

    def _drop_operands(self, unused: list[int], placeholders: list[fx.Node]) -> None:
        if not unused:
            return
        storages = Storages(self.gm)
        for p in unused:
            self.body.graph.erase_node(placeholders[p])
        operands = list(self.hop.args[1:])
        dropped = [operands[p] for p in unused]
        self.hop.args = (self.hop.args[0], *(a for i, a in enumerate(operands) if i not in unused))
        candidates = set(dropped).union(*(self.outer[p] for p in unused))
        erased: set = set()
        changed = True
        while changed:
            changed = False
            for node in reversed(list(self.gm.graph.nodes)):
                if node in candidates and erasable(node, storages, erased):
                    self.gm.graph.erase_node(node)
                    candidates.discard(node)
                    erased.add(node)
                    changed = True

    def _sole_caller(self) -> bool:
        """The body is called by this call alone (its signature may change)."""
        attr = self.hop.args[0]
        calls = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == attr.target]
        return len(calls) == 1 and list(attr.users) == [self.hop]


def splice(gm: fx.GraphModule, hop: fx.Node, body: fx.GraphModule, constant: dict) -> Splice:
    """Copy into ``body`` the outer computation of each tensor operand of ``hop`` built in ``gm`` from sizes
    and buffers (``constant``: outer placeholder -> compile-time constant). New placeholders for the
    copies' leaves that are not operands already are appended after the body's own (``Splice.leaves``:
    pass their values after the operands')."""
    result = Splice(gm, hop, body)
    operands = list(hop.args[1:])
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return result
    storages = Storages(gm)
    slices, views = {}, set()
    for position, operand in enumerate(operands):
        if operand.op in ("placeholder", "get_attr") or not isinstance(example_value(operand), torch.Tensor):
            continue
        found = _outer_slice(gm, operand, hop, constant, storages)
        if isinstance(found, str):
            view = _view_slice(gm, operand, hop, constant, storages)
            if view is not None:
                views.add(position)
            found = view or found
        if isinstance(found, str):
            result.reasons[position] = found
        else:
            slices[position] = found
    if not slices:
        return result
    result.original = copy_graph(body.graph)
    try:
        _copy_in(result, gm, body, operands, placeholders, slices, views)
    except Exception:
        result.undo()
        raise
    return result


def _copy_in(result: Splice, gm, body, operands, placeholders, slices, views: set) -> None:
    """Copy the slices into ``body`` (new placeholders for their leaves), in front of its first op, and
    point each copied operand's uses at its copy. ``views``: the positions whose slice is a view's chain."""
    env: dict = {}
    for position, operand in enumerate(operands):
        env.setdefault(operand, placeholders[position])
    nodes = set().union(*(set(s[0]) for s in slices.values()))
    leaves = [n for n in gm.graph.nodes if any(n in s[1] for s in slices.values()) and n not in env
              and n not in nodes]
    graph = body.graph
    with graph.inserting_after(placeholders[-1]):
        for leaf in reversed(leaves):             # each inserted right after the last operand
            new = graph.placeholder(f"outer_{leaf.name}")
            new.meta = dict(leaf.meta)
            env[leaf] = new
    result.leaves = leaves
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        for node in gm.graph.nodes:
            if node in nodes:
                env[node] = graph.node_copy(node, lambda a: env[a])
                result.copies.append(env[node])
    in_views = set().union(*(set(s[0]) for p, s in slices.items() if p in views))
    in_others = set().union(*(set(s[0]) for p, s in slices.items() if p not in views))
    result.views = {env[n] for n in in_views - in_others}
    for position, (computed, _) in slices.items():
        root = env[operands[position]] if operands[position] in nodes else None
        if root is None:
            continue
        placeholders[position].replace_all_uses_with(root)
        result.roots[position] = root
        result.outer[position] = set(computed)
    body.recompile()
