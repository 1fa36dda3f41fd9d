"""Counting the `based` operators a compiled model actually runs."""
from __future__ import annotations

from collections import Counter

import torch


class BasedOpCounter:
    """Counts calls of operators in the `based` namespace (based::attention, ...) while active.

    A profiler, not a TorchDispatchMode: Dynamo runs frames eagerly while a dispatch mode is
    active, which would count the eager code instead of the compiled one. Use it only around
    calls that do not compile (Dynamo's own tracing would be recorded too).
    """

    def __enter__(self):
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        self.calls = Counter(e.name for e in self._profile.events() if e.name.startswith("based::"))
        return False

    @property
    def total(self) -> int:
        return sum(self.calls.values())
