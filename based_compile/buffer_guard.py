"""Guard the registered buffers (and integer tensor attributes, graph/inputs.py) whose values a rewrite
relied on.

The pass reads some registered buffers by value at compile time: a ``tril`` mask buffer is
what makes a site causal, a scale kept in a buffer becomes the spec's scale. Dynamo guards a
buffer's shape, dtype and device, not its values, so a model that changes such a buffer after
compiling (in place, or by assigning another tensor) would keep running a rewrite that no
longer computes what the model does. ``guard_buffers`` wraps the compiled callable: every call
checks that each such buffer is a tensor already found equal, with the same version counter and
storage (a few attribute reads; the one seen at compile time, and others found equal since: blocks
compiled one by one share a graph, each with its own buffer); when one is not, its values are
compared with a copy taken at compile time (once per tensor and change; the copy is kept on the CPU),
and if they differ the call raises ``StaleBufferError`` naming the buffer, instead of returning a
wrong result.

A small buffer on the CPU (at most ``COMPARE_ALWAYS`` elements: the 0-d feature-map constants and scales
a rewrite reads as numbers) is compared by value on every call, whatever its version counter says: that
costs a few microseconds and no synchronisation, and it also sees writes the counter does not count.

Limitation: for the other buffers (masks, and small buffers on a GPU, where a comparison would wait for
the device), writes the version counter does not count (through ``.data``, ``.numpy()`` or the storage,
or into inference tensors made under ``torch.inference_mode``, which have none) are not seen; another
tensor or storage always is.
"""
from __future__ import annotations

import weakref

import torch

from .graph.inputs import BakedBuffer


# CPU buffers of at most this many elements are compared by value on every call (module docstring)
COMPARE_ALWAYS = 64


class StaleBufferError(RuntimeError):
    """A buffer the rewrite relied on has other values than when the model was compiled."""


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:                     # inference tensors track no version
        return None


class _Watched:
    """One baked buffer: its values at compile time, and the tensors already found equal to them (at their
    version and storage), so that each is compared once per change. Several are remembered: blocks
    compiled one by one share one compiled graph, each calling it with its own buffer (12 blocks, 12
    tensors); remembering only the last made every call compare (a copy to the CPU and a sync on CUDA)."""

    MAX_SEEN = 256

    def __init__(self, baked: BakedBuffer, value: torch.Tensor):
        self.baked = baked
        self.values = value.detach().to("cpu", copy=True)
        self.seen: dict[int, tuple] = {}            # id(tensor) -> (weakref, version, data_ptr)
        self._remember(value)

    def _remember(self, t: torch.Tensor) -> None:
        if len(self.seen) >= self.MAX_SEEN:
            self.seen = {k: v for k, v in self.seen.items() if v[0]() is not None}
            if len(self.seen) >= self.MAX_SEEN:
                self.seen.clear()
        self.seen[id(t)] = (weakref.ref(t), _version(t), t.data_ptr())

    def _known(self, t: torch.Tensor) -> bool:
        entry = self.seen.get(id(t))
        return entry is not None and entry[0]() is t and entry[1] == _version(t) and entry[2] == t.data_ptr()

    def _kind(self) -> str:
        return "registered buffer" if "._buffers[" in self.baked.name else "integer tensor attribute"

    def check(self, t: torch.Tensor) -> None:
        small_cpu = t.device.type == "cpu" and t.numel() <= COMPARE_ALWAYS
        if not small_cpu and self._known(t):
            return
        same = (t.shape == self.values.shape and t.dtype == self.values.dtype
                and torch.equal(t.detach().cpu(), self.values))
        if not same:
            raise StaleBufferError(
                f"based_compile: the {self._kind()} {self.baked.name} has changed since torch.compile "
                f"read it; the Based attention rewrite relied on its values ({self.baked.why}). "
                "Compile the model again (torch._dynamo.reset(), then torch.compile), or compile with "
                "based_compile.backend(rewrite=False).")
        self._remember(t)


def guard_buffers(compiled, baked: list[BakedBuffer], example_inputs):
    """``compiled`` with the checks of the module docstring before each call."""
    watched = [_Watched(b, example_inputs[b.index]) for b in baked]

    def check(args) -> None:
        for w in watched:
            w.check(args[w.baked.index])

    def run(*args):                          # Dynamo calls a backend's result with the inputs unpacked
        check(args)
        return compiled(*args)
    return run
