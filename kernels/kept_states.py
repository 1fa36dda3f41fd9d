"""The chunked kernel's forward states, kept for its backward in the normaliser's storage.

In training, the chunked kernel's forward (kernels/prefix_chunked.py) writes the prefix states S_{<c}
that its backward needs again. Recomputing them cost the backward one more run of the state kernel
(0.58 ms of 4.6 at T = 8192 on the H200, B = H = 16); keeping them costs their bytes (state_bytes: 84 a
token per kv head at Dv = 64, bf16) for as long as the forward's outputs live.

They travel with z, the float32 normaliser [B, H, T] that every caller already keeps for the backward
(the ``based::attention`` operator returns it; BasedKernelFunction saves it): one byte buffer holds z
first and the states after it, and z is a view of its start. Nothing else sees them: z's shape, dtype
and values are what they always were, and ``carried`` gives the states back only for a z whose storage
has exactly the carrier's size for these arguments and launch, starting at z. A z that went through
anything else (a copy, saved-tensor hooks that move it to the CPU, an operator that made its own z)
has its own storage, and the backward recomputes the states as before: slower, never different.
"""
from __future__ import annotations

import math

import torch

ALIGN = 256          # bytes: each part starts on a boundary the kernels' vector loads like


def _offsets(parts) -> tuple[list[int], int]:
    offsets, at = [], 0
    for shape, dtype in parts:
        offsets.append(at)
        at += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, at


def carrier(z_shape, parts, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(z, [one tensor per part]): z float32 of ``z_shape``, then each (shape, dtype) of ``parts``, all in one
    buffer (contents unset)."""
    all_parts = [(tuple(z_shape), torch.float32), *parts]
    offsets, total = _offsets(all_parts)
    buf = torch.empty(total, dtype=torch.uint8, device=device)
    views = _views(buf, all_parts, offsets)
    return views[0], views[1:]


def carried(z: torch.Tensor | None, parts) -> list[torch.Tensor] | None:
    """The parts that ``carrier`` put beside this z, or None when z does not carry them."""
    if z is None or z.dtype != torch.float32 or not z.is_contiguous():
        return None
    all_parts = [(tuple(z.shape), torch.float32), *parts]
    offsets, total = _offsets(all_parts)
    storage = z.untyped_storage()
    if z.storage_offset() != 0 or storage.nbytes() != total:
        return None
    buf = torch.empty(0, dtype=torch.uint8, device=z.device).set_(storage, 0, (total,))
    return _views(buf, all_parts, offsets)[1:]


def _views(buf: torch.Tensor, parts, offsets) -> list[torch.Tensor]:
    # one tensor per part on buf's storage (set_: one op a part where slice, dtype view and shape view were three,
    # half the host time; each offset is a multiple of ALIGN, so of the part's itemsize)
    storage, device = buf.untyped_storage(), buf.device
    return [torch.empty(0, dtype=dtype, device=device).set_(storage, at // dtype.itemsize, shape)
            for (shape, dtype), at in zip(parts, offsets)]
