"""Registration of the operators that have no backward (a decoding step, a prefill that returns
its states): on inputs that require grad, under grad mode, they raise a clear error rather than
return tensors that autograd cannot differentiate."""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import direct_backend

# The CPU and CUDA implementation of each operator registered here, by name (what the Autograd
# kernel calls directly; benchmarks/host_overhead.py swaps one to take the compute out).
IMPLEMENTATIONS: dict[str, dict] = {}


def register(library: torch.library.Library, name: str, *, cpu, cuda, fake, what: str):
    """Implement ``based::name`` on CPU and CUDA, its fake, and an Autograd kernel that refuses
    gradients and otherwise runs the CPU or CUDA implementation itself where the call reaches it
    directly (``dispatch.direct_backend``); ``what`` says what the operator is for. Returns the
    operator's overload."""
    op = getattr(torch.ops.based, name).default

    impls = IMPLEMENTATIONS[name] = {"CPU": cpu, "CUDA": cuda}

    def refuse_grad(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            raise RuntimeError(f"based::{name} is not differentiable ({what}): call it under torch.no_grad() "
                               "or with inputs that do not require grad")
        backend = direct_backend(keyset)
        if backend is not None:            # plain CPU / CUDA tensors: no second trip through the dispatcher
            return impls[backend](*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)

    library.impl(name, cpu, "CPU")
    library.impl(name, cuda, "CUDA")
    library.impl(name, refuse_grad, "Autograd", with_keyset=True)
    torch.library.register_fake(f"based::{name}", fake, lib=library)
    return op
