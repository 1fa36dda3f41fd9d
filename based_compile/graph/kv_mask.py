"""Which mask a site has, for square scores and for a query block against a KV cache (Tq <= Tk).

The op's causal mask is aligned to the end: query i (of Tq) sees keys j <= i + (Tk - Tq)
(``ones(Tq, Tk).tril(Tk - Tq)``; Tq == Tk: j <= i). ``classify(keep, tq, tk)`` decides on the
``mask.Keep`` predicate the matcher read, proven for every size the graph runs at (tq, tk: ints,
or size expressions under dynamic shapes; see ``mask.py`` for the rule):

- causal aligned to the end (j - i <= Tk - Tq): "causal";
- everything kept: "none" (Tq = 1 decoding against its whole cache);
- top-left-aligned causal (j <= i with Tq < Tk, the last keys never seen): a different function, refused;
- any other offset, anti-causal, windowed or other patterns: refused with a reason.
"""
from __future__ import annotations

import logging

import torch
from torch.fx.experimental.symbolic_shapes import guard_bool

from .mask import Keep, guard_equal_sizes, size_expr, size_text

log = logging.getLogger("based_compile")


def guard_more_queries(tq, tk) -> None:
    """Under dynamic shapes, guard Tq > Tk (ints or SymInts) for a site refused for it, as Dynamo guards what it
    traced: this graph, left as written, then runs only at such lengths, and a call with Tq <= Tk recompiles and
    is read on its own (unguarded, the first Tq > Tk call's graph served every later length unrewritten)."""
    if isinstance(tq, torch.SymInt) or isinstance(tk, torch.SymInt):
        try:
            guard_bool(tq > tk)
        except Exception as err:  # noqa: BLE001 - the shape environment refused: nothing guarded, still exact
            log.debug("based_compile: could not guard Tq > Tk (%s: %s)", type(err).__name__, err)


def tie_offset(keep: Keep, tq, tk) -> bool:
    """A causal mask whose offset is a size other than Tk - Tq but equal to it at the traced sizes (a
    mask built for the first layer's cache length, ``arange(past + Tq) <= cache_position[:, None]``,
    sliced to each layer's keys, ``mask[..., :k.shape[-2]]``, where Dynamo gives each layer's cache
    length its own symbol): guard the two equal (``mask.guard_equal_sizes``), so that this graph runs
    only where the mask is the operator's, and other sizes recompile. Returns whether it did."""
    tq, tk = size_expr(tq), size_expr(tk)
    if tq is None or tk is None:
        return False
    pieces = keep.steps.intervals()
    if len(pieces) != 1 or pieces[0][0] is not None or pieces[0][1] is None:
        return False                              # not j - i <= offset
    return guard_equal_sizes(keep.base + pieces[0][1], tk - tq)


def classify(keep: Keep, tq, tk) -> tuple[str, str]:
    """("causal", ""), ("none", "") or ("refuse", why) for what a site's masks keep of [tq, tk] weights."""
    tq, tk = size_expr(tq), size_expr(tk)
    if isinstance(tq, int) and isinstance(tk, int) and tq > tk:
        return "refuse", f"more queries ({tq}) than keys ({tk})"
    end = tk - tq
    if keep.equals_on(Keep.causal(end), tq, tk):
        return "causal", ""
    if keep.equals_on(Keep.const(True), tq, tk):
        return "none", ""
    if end == 0:
        return "refuse", keep.refusal()
    if keep.equals_on(Keep.causal(0), tq, tk):
        return "refuse", (f"causal mask aligned to the top left with Tq={size_text(tq)} < Tk={size_text(tk)} (query i "
                          f"sees keys j <= i, the last {size_text(end)} keys unseen): not the KV-cache mask "
                          "ones(Tq, Tk).tril(Tk - Tq)")
    pieces = keep.steps.intervals()
    if len(pieces) == 1 and pieces[0][0] is None:
        offset = keep.base + pieces[0][1]
        return "refuse", (f"causal mask with offset {size_text(offset)} (query i sees keys j <= i + offset), not "
                          f"Tk - Tq = {size_text(end)}: not aligned to the end of the keys")
    return "refuse", (f"{keep.refusal()} (Tq={size_text(tq)}, Tk={size_text(tk)}: the causal mask is aligned to the "
                      "end of the keys)")
