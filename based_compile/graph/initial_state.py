"""A prefill continued from initial states: running sums that start from the states of earlier tokens.

    kv = kv_state[:, :, None] + (phi(k)[..., :, None] * v[..., None, :]).cumsum(2)   # [B, H, T, F, Dv]
    ks = k_state[:, :, None] + phi(k).cumsum(2)                                       # [B, H, T, F]
    o = (phi(q)[..., None] * kv).sum(-2) / ((phi(q) * ks).sum(-1, keepdim=True) + eps)

(the state added before or after the cumsum's views, on either side, or in place: ``kv.add_(...)``;
or as the cumsum's first row: ``torch.cat([kv_state[:, :, None], x], 2).cumsum(2)[:, :, 1:]``). Every
query then also sees the earlier tokens through the states: o gains phi(q) kv_state over
phi(q) . k_state. The linear-form reader (``linear_form.py``) and the feature normaliser
(``feature_normaliser.py``) call ``read_initial`` on the tensor added to a running sum (written beside
the quadratic form instead, ``phi(q) @ kv_state`` added to ``a @ v``, ``state_readout.py`` reads it); the site
then runs ``based::attention_with_state`` with the states, laid out as the operator takes them
([B, H, F, Dv], [B, H, F]).

What is proven on the graph (the numerical probe checks it again where it runs): the tensor added
is one tensor (``source``) read through views alone (no scale: ``0.9 * kv_state`` is a decayed
state; no cast: a rounding cast is part of what the code computes), of size one along time
(every position sees the same state; a state added to some rows only is not an initial state),
that broadcasts along time alone (a ``[B, H, F]`` key state where the ``[B, H, F, Dv]`` state
belongs broadcasts along Dv too), and reads none of q, k, v. Each axis of ``source`` is followed
through the views onto the running sum's axes: its feature and value axes must land on the sum's
(``features``, ``values``, from phi(k)'s and v's last axes), its other axes in order on the sum's
other axes (batch, then heads).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .canonicalize import VIEW_OPS, example_value, hint_shape, insert_after, read_views, scalar_factor
from .refusal import Refused

aten = torch.ops.aten

# views an initial state may be read through (a cast is not one: its rounding is part of the code)
STATE_VIEWS = VIEW_OPS - {aten._to_copy.default}


@dataclass(frozen=True)
class InitialState:
    """One initial state: the operator's tensor is ``source`` with the axes ``squeeze`` (of size one)
    dropped, then permuted by ``perm`` into [B, H, F, Dv] (kv) or [B, H, F] (k)."""

    source: fx.Node
    squeeze: tuple
    perm: tuple
    add: fx.Node               # the node that adds it to the running sum (or its readout to the quadratic form's)
    running: fx.Node | None    # the running sum (cumsum) it is added to; None: read by phi(q) (``state_readout``)

    def operator_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """The operator's state from a value of ``source``."""
        if self.squeeze:
            x = x.squeeze(self.squeeze)
        return x.permute(self.perm)


@dataclass(frozen=True)
class InitialStates:
    """What a continued prefill starts from: the feature map the states are in (the attention's keys'),
    and each state (None: that running sum starts from zero)."""

    kv: InitialState | None
    k: InitialState | None
    pieces: tuple
    k_factors: tuple


def follow(gm, node, axis: int, *, scalars: bool = True) -> tuple[fx.Node, int | None]:
    """(the node under ``node``'s views and scalar factors, where its last axis lands in ``node``):
    the axis of a feature map's or v's features in the operand of a product."""
    chain = read_views(gm, node, scalars=scalars, same_shape=True)
    rank = len(hint_shape(chain.base) or ())
    return chain.base, chain.lands(axis % rank) if rank else None


def read_initial(gm, ev, init, state: fx.Node, dim: int, labels: dict, role: str, add: fx.Node,
                 reads: set) -> InitialState:
    """The initial state ``init`` adds to the running sum ``state`` (time axis ``dim``; ``labels``:
    the sum's axis -> "F" / "Dv" for the features and values); Refused with the reason for a
    near-miss. ``reads``: nodes the state must not read (q, k, v and their feature maps)."""
    what = "kv_state" if role == "kv" else "k_state"
    shape = tuple(hint_shape(state))
    rank = len(shape)
    if not isinstance(init, fx.Node):
        raise Refused("state", f"the running sum is added to a number, not to an initial {what}", add)
    if ev.depends_on(init, reads):
        raise Refused("state", f"the tensor added to the running sums (as an initial {what}) is computed from q, k "
                               "or v: not the state of earlier tokens", add)
    chain = read_views(gm, init, view_ops=STATE_VIEWS, scalars=False)
    node = chain.base
    scaled = scalar_factor(gm, node) if isinstance(node, fx.Node) else None
    if scaled is not None:
        raise Refused("state", f"the initial {what} is scaled by {scaled[1]:g} before it is added (a decayed or "
                               f"gated state, 0.9 * {what} + ...): not Based, whose states only add", add)
    source = node
    init_shape = tuple(hint_shape(init) or ())
    while len(init_shape) < rank:
        init_shape = (1,) + init_shape
    if len(hint_shape(init) or ()) != rank:
        raise Refused("state", f"the initial {what} broadcasts over the leading (batch or head) axes of the running "
                               "sum: not one state per batch row and head", add)
    fake = example_value(init)
    symbolic = isinstance(fake, torch.Tensor) and fake.dim() == rank and not isinstance(fake.shape[dim], int)
    if (shape[dim] > 1 or symbolic) and (init_shape[dim] != 1 or symbolic):   # one row at every length
        raise Refused("state", f"the tensor added to the running sum varies along time ({init_shape[dim]} rows): "
                               f"a state added to some rows only, or per-row values, is not an initial {what}, which "
                               "every position sees alike", add)
    broadcast = [a for a in range(rank) if a != dim and init_shape[a] != shape[a]]
    if broadcast:
        names = ", ".join(labels.get(a, f"axis {a}") for a in broadcast)
        raise Refused("state", f"the initial {what} broadcasts along {names} of the running sum (size one where the "
                               f"sum has {', '.join(str(shape[a]) for a in broadcast)}): not a state of the sum's "
                               f"shape (a [B, H, F] key state where the [B, H, F, Dv] state belongs?)", add)
    src_shape = tuple(hint_shape(source) or ())
    lands = [chain.lands(axis) for axis in range(len(src_shape))]
    squeeze = tuple(a for a, at in enumerate(lands) if src_shape[a] == 1 and (at is None or at == dim))
    kept = {at: a for a, at in enumerate(lands) if a not in squeeze}
    others = [a for a in range(rank) if a != dim and a not in labels]
    order = others + [a for a in sorted(labels, key=lambda a: labels[a] != "F")]
    if None in kept or len(kept) != rank - 1 or sorted(kept) != sorted(order):
        raise Refused("state", f"the initial {what}'s axes could not be followed through its views onto the running "
                               "sum's batch, head, feature and value axes", add)
    return InitialState(source, squeeze, tuple(_ranks([kept[a] for a in order])), add, state)


def _ranks(axes: list) -> list:
    """Source axes (with size-one axes dropped, renumbered) in the order the operator wants them."""
    index = {a: i for i, a in enumerate(sorted(axes))}
    return [index[a] for a in axes]


def _int(x):
    return x if isinstance(x, int) else None


def split_prepended_states(gm: fx.GraphModule) -> None:
    """Read a state prepended as the running sum's first row as a state added to it, in the lowered
    graph ``gm`` (before matching; every node keeps its value):

        kv = cat([s, x], t).cumsum(t)        kv[:, :, 1:]  ->  s + x.cumsum(t)
                                             kv[:, :, i]   ->  (s + x.cumsum(t))[:, :, i - 1]   (i >= 1, or i < 0)

    where ``s`` has one row along t. Other reads of ``kv`` (its first row: the state itself) keep
    reading it. At static lengths only (the slices' bounds are read as numbers)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cumsum.default or len(node.args) < 2:
            continue
        cat = node.args[0]
        if not isinstance(cat, fx.Node) or cat.op != "call_function" or cat.target is not aten.cat.default \
                or len(cat.args[0]) != 2 or len(cat.users) != 1 or node.kwargs.get("dtype") is not None:
            continue
        shape = hint_shape(node)
        rank = len(shape or ())
        dim = node.args[1] % rank if rank else None
        cat_dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % rank if rank else None
        s, x = cat.args[0]
        if dim is None or dim != cat_dim or not all(isinstance(a, fx.Node) for a in (s, x)) \
                or (hint_shape(s) or (None,) * rank)[dim] != 1 or hint_shape(x) is None:
            continue
        size = shape[dim]
        rest = []
        for user in list(node.users):
            if user.op != "call_function" or len(user.args) < 2 or _int(user.args[1]) is None \
                    or user.args[1] % rank != dim:
                continue
            if user.target is aten.slice.Tensor:
                start = user.args[2] if len(user.args) > 2 else 0
                end = user.args[3] if len(user.args) > 3 else None
                step = user.args[4] if len(user.args) > 4 else 1
                end = size if end is None else _int(end)
                start = _int(start)
                if step == 1 and start is not None and end is not None and end >= size:
                    if start == 1:
                        rest.append(("rows", user))
                    elif start in (-1, size - 1):
                        rest.append(("last", user))
            elif user.target is aten.select.int and _int(user.args[2]) is not None \
                    and _int(user.args[2]) not in (0, -size):
                rest.append(("row", user))
        if not rest:
            continue
        val = example_value(node)
        mode = getattr(val, "fake_mode", None)
        if mode is None:
            continue
        running = insert_after(node, aten.cumsum.default, (x, dim), mode=mode, source=node)
        added = insert_after(running, aten.add.Tensor, (s, running), mode=mode, source=node)
        for kind, user in rest:
            if kind == "rows":
                user.replace_all_uses_with(added)
                graph.erase_node(user)
            elif kind == "row":            # row i >= 1 of kv is row i - 1 of the sums from the state
                index = user.args[2]
                user.args = (added, dim, index if index < 0 else index - 1)
            else:
                user.args = (added, dim, -1, None, 1)
        if not node.users:
            graph.erase_node(node)
            graph.erase_node(cat)
    graph.lint()
    gm.recompile()
