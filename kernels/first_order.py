"""Gradients that refuse to be differentiated again: Based attention has no double backward.

``first_order(name, compute, *args)`` returns ``compute(*args)``: the backward of a kernel or an
operator, given the tensors it reads. When grad mode is on (a backward under ``create_graph=True``)
and any tensor among ``args`` requires grad, the results come out of an autograd node whose
backward raises a RuntimeError naming ``name``; a loss on them then fails instead of treating them
as constants. (``torch.autograd.function.once_differentiable`` looks only at the incoming
gradients: for a loss linear in the output they do not require grad, and dq, which depends on q,
k and v, would come back as a constant.) Otherwise the results are plain tensors.

Used by the kernels' public functions (``function.py``) and by the ``based::*_backward`` operators'
autograd kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor


class _FirstOrder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, compute, *args):
        ctx.name = name
        return compute(*args)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.name} is not differentiable: Based attention has no double backward "
                           "(gradients of gradients)")


def wants_graph(*args) -> bool:
    """True when results computed from ``args`` would be recorded: grad mode on and a tensor among
    them requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)


def first_order(name: str, compute, *args):
    """``compute(*args)``, whose results raise when differentiated (see the module docstring)."""
    if wants_graph(*args):
        return _FirstOrder.apply(name, compute, *args)
    return compute(*args)
