"""Sizes the user marked dynamic (``torch._dynamo.mark_dynamic``): Dynamo refuses a graph that specialises
one (``ConstraintViolationError`` when it builds the guards), so the pass must not guard them equal to a
number; it refuses what it could prove only at the traced value instead."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def marked_dynamic_symbols() -> frozenset:
    """The size symbols of the graph being compiled that ``mark_dynamic`` constrains (their tracked
    fakes carry a constraint on that dim); empty outside a Dynamo compilation."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        tracked = tx.output.tracked_fakes if tx is not None else ()
    except Exception as err:  # noqa: BLE001 - no Dynamo frame being compiled: nothing is marked
        log.debug("based_compile: no tracked fakes (%s: %s)", type(err).__name__, err)
        return frozenset()
    found = set()
    for fake in tracked:
        constraints = getattr(fake.symbolic_context, "constraint_sizes", None) or ()
        value = fake.fake
        if not isinstance(value, torch.Tensor):
            continue
        for size, constraint in zip(value.shape, constraints):
            if constraint is not None and isinstance(size, torch.SymInt):
                found |= size.node.expr.free_symbols
    return frozenset(found)


def is_marked_dynamic(size) -> bool:
    """``size`` (a SymInt) depends on a size the user marked dynamic."""
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols & marked_dynamic_symbols())
