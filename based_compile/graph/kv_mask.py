"""Masks of a query block against a KV cache: a keep-pattern [Tq, Tk] with Tq <= Tk.

The op's causal mask for Tq < Tk is aligned to the end: query i (of Tq) sees keys
j <= i + offset with offset = Tk - Tq (``ones(Tq, Tk).tril(Tk - Tq)``). Square patterns
(Tq == Tk) are classified by ``mask.classify``; this module reads the rectangular ones:

- end-aligned causal (j - i <= Tk - Tq): "causal";
- everything kept: "none" (Tq = 1 decoding against its whole cache);
- top-left-aligned causal (j <= i, the keys after Tq never seen): a different function, refused;
- any other offset, anti-causal, windowed or other patterns: refused with a reason.

The reading is of the pattern at the traced sizes, as a predicate j - i <= offset; ``offset``
is returned so that the symbolic check (``offset_follows_sizes``) and the mask engineer's
symbolic classification can take it over.
"""
from __future__ import annotations

import torch

from . import mask as masks


def classify(keep: torch.Tensor) -> tuple[str, str]:
    """("causal", ""), ("none", "") or ("refuse", why) for a bool [Tq, Tk] keep-pattern."""
    tq, tk = keep.shape[-2], keep.shape[-1]
    if tq == tk:
        return masks.classify(keep)
    if tq > tk:
        return "refuse", f"more queries ({tq}) than keys ({tk})"
    if keep.all():
        return "none", ""
    offset = diagonal_of(keep)
    if offset == tk - tq:
        return "causal", ""
    if offset == 0:
        return "refuse", (f"causal mask aligned to the top left with Tq={tq} < Tk={tk} (query i sees keys j <= i, "
                          f"the last {tk - tq} keys unseen): not the KV-cache mask ones(Tq, Tk).tril(Tk - Tq)")
    if offset is not None:
        return "refuse", (f"causal mask with offset {offset} (query i sees keys j <= i + {offset}), not Tk - Tq = "
                          f"{tk - tq}: not aligned to the end of the keys")
    first = int(keep[0].sum())
    if torch.equal(keep, torch.ones(tq, tk, dtype=torch.bool).triu(tk - first)):
        return "refuse", "anti-causal mask (keeps j >= i + offset)"
    return "refuse", f"the [{tq}, {tk}] mask is not the causal pattern aligned to the end of the keys"


def diagonal_of(keep: torch.Tensor) -> int | None:
    """d when ``keep`` is ``tril(ones, d)`` with some row neither empty nor full, else None.

    Row i of tril(ones, d) keeps min(max(i + d + 1, 0), Tk) keys: d is read off the first or the
    last row and the whole pattern compared once."""
    tq, tk = keep.shape[-2], keep.shape[-1]
    ones = torch.ones(tq, tk, dtype=torch.bool)
    for d in (int(keep[0].sum()) - 1, int(keep[-1].sum()) - tq):
        if torch.equal(keep, torch.tril(ones, d)):
            return d
    return None
