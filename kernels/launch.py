"""What every Triton launch of the Based kernels needs from its arguments.

- ``bhtd_strides``: a tensor's strides in [B, H, T, D] order, whatever its layout ("BHTD" or
  "BTHD"): the kernels index through strides, so transposed views are never copied;
- ``dot_precision``: float32 operands take exact float32 dots ("ieee", no tf32); 16-bit ones the
  tensor cores' native products;
- ``scaled_coefficients``: f(scale * r) = c0 + (c1 scale) r + (c2 scale^2) r^2 in the raw q.k;
- ``new_buffer``: an output or work buffer, filled with NaN when ``poison`` (tests set the kernel
  modules' POISON_OUTPUTS so that an element no kernel writes shows up);
- ``check_grid_rows``: B * H within ``MAX_GRID_ROWS`` (65535), the most programs a CUDA grid holds
  on its axes 1 and 2, where the kernels put their (batch, head) programs;
- ``register_cap``: the launch keyword that caps a kernel's registers per thread (``maxnreg``; none
  under the interpreter, which has no registers): fewer registers, more programs resident on an SM;
- ``cdiv``, ``next_power_of_2``: ``triton.cdiv`` and ``triton.next_power_of_2`` for host code (grids,
  block sizes). Triton 3.9 makes those ``constexpr_function`` objects that cost ~3 us a call on the
  host (a dozen per layer and step); these are plain integer arithmetic with the same results.
"""
from __future__ import annotations

import torch

from .arguments import BasedArguments, triton_interpreting


MAX_GRID_ROWS = 65535    # CUDA's limit on grid axes 1 and 2 (axis 0: 2^31 - 1)


def check_grid_rows(args: BasedArguments) -> None:
    """The kernels launch one program row per (batch, query head) (or (batch, key/value head), fewer) on
    grid axis 1 or 2, which CUDA caps at 65535: more would fail to launch. Checked on every device, so
    that a call refused on a GPU is refused under the interpreter too."""
    rows = args.batch * args.heads
    if rows > MAX_GRID_ROWS:
        raise ValueError(f"B * H = {args.batch} * {args.heads} = {rows} is over {MAX_GRID_ROWS}: the Triton kernels "
                         f"launch a program per (batch, head) on a CUDA grid axis that holds at most "
                         f"{MAX_GRID_ROWS}; split the batch (based_attention runs a PyTorch form there)")


def register_cap(maxnreg: int) -> dict:
    """Launch keywords for a register cap of ``maxnreg`` per thread (0: no cap)."""
    if maxnreg < 0:
        raise ValueError(f"maxnreg must be 0 (no cap) or a register count, got {maxnreg}")
    return {"maxnreg": maxnreg} if maxnreg and not triton_interpreting() else {}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n = 0, as triton.next_power_of_2)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def bhtd_strides(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    sb, s1, s2, sd = x.stride()
    return (sb, s1, s2, sd) if layout == "BHTD" else (sb, s2, s1, sd)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def scaled_coefficients(args: BasedArguments) -> tuple[float, float, float]:
    c0, c1, c2 = args.coeffs
    return c0, c1 * args.scale, c2 * args.scale * args.scale


def new_buffer(shape, dtype, device, *, poison: bool) -> torch.Tensor:
    x = torch.empty(shape, dtype=dtype, device=device)
    return x.fill_(float("nan")) if poison else x
