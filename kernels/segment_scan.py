"""The scan over segment states shared by the chunked kernels (kernels/chunked.py, kernels/prefix_chunked.py).

Each (batch x head) owns NS + 1 float32 slots of W elements; the first N_IN hold segment totals. In
place, slot s becomes the exclusive prefix (the sum of the totals before it, or after it with
REVERSE) and the slot after the last total gets the sum of all N_IN: a walk over segments, not tokens.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["NS", "N_IN"])
def segment_scan_kernel(st, NS, N_IN, W, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    # slots [NS + 1, W] per (batch, head), N_IN segment totals in slots 0.. (REVERSE: NS - 1 down):
    # each becomes the sum of the totals before it (REVERSE: after it), and the slot after the last
    # (N_IN; REVERSE: NS - 1 - N_IN) gets the sum of all N_IN.
    i_bh, i_w = tl.program_id(0), tl.program_id(1)
    offs = i_w * BLOCK + tl.arange(0, BLOCK)
    mask = offs < W
    base = st + i_bh.to(tl.int64) * (NS + 1) * W
    run = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, N_IN):
        if REVERSE:
            s = NS - 1 - i
        else:
            s = i
        x = tl.load(base + s * W + offs, mask=mask, other=0.0)
        tl.store(base + s * W + offs, run, mask=mask)
        run += x
    if REVERSE:
        tl.store(base + (NS - 1 - N_IN) * W + offs, run, mask=mask)
    else:
        tl.store(base + N_IN * W + offs, run, mask=mask)
