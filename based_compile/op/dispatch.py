"""Which kernel a call reaches below autograd, read from its dispatch key set: lets an operator's
Autograd kernel run the CPU or CUDA implementation itself instead of a second trip through the
dispatcher (``redispatch``), which is what every call from a compiled graph or an eager call
without gradients would otherwise pay."""
from __future__ import annotations

import torch

_BACKENDS = {torch._C.DispatchKey.CPU: "CPU", torch._C.DispatchKey.CUDA: "CUDA"}
_SEEN: dict = {}


def direct_backend(keyset) -> str | None:
    """"CPU" or "CUDA" when, below autograd, a call with this dispatch key set reaches that kernel
    directly: no tracing (Dynamo, AOTAutograd, export), fake or meta tensors, functionalization,
    autocast, vmap or tensor subclass in between; else None (the call must be redispatched).

    Remembered per key set (its raw bits; a process meets a handful): working it out costs ~3 us a
    call on a slow host, most of it comparing pybind enum values."""
    bits = keyset.raw_repr()
    try:
        return _SEEN[bits]
    except KeyError:
        pass
    backend = _BACKENDS.get((keyset & torch._C._after_autograd_keyset).highestPriorityTypeId())
    if len(_SEEN) >= 64:
        _SEEN.clear()
    _SEEN[bits] = backend
    return backend
