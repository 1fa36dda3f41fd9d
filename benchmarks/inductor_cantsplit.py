"""Work around an Inductor crash so that the Inductor baseline can be measured at all (benchmarks only).

torch 2.11's Triton code generator decides whether a kernel's iteration ranges can be split a
given way by raising ``CantSplit`` from a helper and catching it in the caller; the helper raises
the class with no arguments while ``CantSplit.__init__`` requires two, so a ``TypeError`` escapes
and compilation fails with "CantSplit.__init__() missing 2 required positional arguments"
(pytorch/pytorch#178676, fixed upstream by #178886). The naive Based LM of benchmarks/e2e.py hits
it at T=2048 (explicit feature-map spelling), for ``torch.compile(model)`` and for
``backend="based"`` alike (the rest of the model goes through Inductor in both).

``patch()`` gives the constructor defaults, so the bare raise makes the exception the caller
expects and Inductor goes on with another split, which is what the upstream fix does. It changes
nothing on a torch whose constructor already works without arguments, and nothing in based_compile.
"""
from __future__ import annotations

import inspect


def _inductor_cantsplit() -> type:
    from torch._inductor.codegen.simd import CantSplit
    return CantSplit


def needed(cls: type | None = None) -> bool:
    """True when ``CantSplit()`` (no arguments) raises TypeError; ``cls`` defaults to Inductor's."""
    try:
        (cls or _inductor_cantsplit())()
    except TypeError:
        return True
    return False


def patch(cls: type | None = None) -> str | None:
    """Apply the workaround where it is needed; returns a line for the benchmark's run record, or
    None when this torch does not need it. ``cls`` defaults to Inductor's CantSplit."""
    CantSplit = cls or _inductor_cantsplit()
    if not needed(CantSplit):
        return None
    original = CantSplit.__init__
    if len(inspect.signature(original).parameters) != 3:          # (self, expr, remaining): as in 2.11
        raise RuntimeError(f"unexpected CantSplit.__init__ signature {inspect.signature(original)}; "
                           "not patching")

    def __init__(self, expr=None, remaining=None):
        original(self, expr, remaining)

    CantSplit.__init__ = __init__
    return "torch._inductor CantSplit() without arguments allowed (pytorch#178676 workaround)"
