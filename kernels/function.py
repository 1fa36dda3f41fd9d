"""The autograd wrapper shared by the Triton kernels' public functions.

Each kernel module provides a ``forward(q, k, v, args) -> (o, z)`` and a
``backward(q, k, v, o, z, do, args) -> (dq, dk, dv)`` (z: the float32 normaliser
[B, H, T] for ``normalize=True``, else None); this turns such a pair into a
differentiable function, once: the backward is not differentiable itself, so gradients taken
with ``create_graph=True`` raise when differentiated again instead of silently counting as
constants (``first_order.py``, whenever q, k, v or the incoming gradient require grad). The
``torch.ops.based`` operator registers the same pair with ``torch.library`` instead (and refuses
double backward through the same ``first_order``).
"""
from __future__ import annotations

import torch

from .arguments import BasedArguments
from .first_order import first_order


class BasedKernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, args: BasedArguments, forward, backward):
        o, z = forward(q, k, v, args)
        ctx.save_for_backward(q, k, v, o, z)
        ctx.args, ctx.kernel_backward = args, backward
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, z = ctx.saved_tensors
        backward = ctx.kernel_backward
        dq, dk, dv = first_order(getattr(backward, "__name__", "the kernel's backward"), backward,
                                 q, k, v, o, z, do, ctx.args)
        return dq, dk, dv, None, None, None
