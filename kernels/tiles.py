"""Triton helpers shared by the chunked kernels: masked loads and stores of row tiles."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_rows(ptr, rows, cols, s_t, s_d, T, D):
    # [len(rows), len(cols)] tile of a [T, D] matrix with strides (s_t, s_d); zeros outside
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    return tl.load(ptr + rows[:, None] * s_t + cols[None, :] * s_d, mask=mask, other=0.0)


@triton.jit
def store_rows(ptr, x, rows, cols, s_t, s_d, T, D):
    mask = (rows[:, None] < T) & (cols[None, :] < D)
    tl.store(ptr + rows[:, None] * s_t + cols[None, :] * s_d, x.to(ptr.dtype.element_ty), mask=mask)
