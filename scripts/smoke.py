"""Smoke check: the package imports and its two references agree (until the demo exists)."""
import torch

from based_compile.kernels import naive_chunk_based, naive_parallel_based

q, k, v = (torch.randn(2, 4, 300, d, dtype=torch.float64) for d in (16, 16, 64))
a = naive_parallel_based(q, k, v)
b = naive_chunk_based(q, k, v)
err = ((a - b).norm() / a.norm()).item()
print(f"based_compile imports; quadratic vs chunked reference: relative difference {err:.2e}")
assert err < 1e-10
