"""The spec: the small explicit record that the graph pass derives and the op consumes."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass

from ..kernels.arguments import LAYOUTS


@dataclass(frozen=True)
class BasedSpec:
    """Everything that defines one Based attention site (../shared/DESIGN.md section 3).

    layout: "BHTD" ([B, H, T, D]) or "BTHD" ([B, T, H, D]) of q, k, v and the output.
    scale: multiplies q . k (an explicit float; the matcher resolves defaults).
    c0, c1, c2: f(s) = c0 + c1 s + c2 s^2.
    causal, normalize, eps: o_i = n_i / (z_i + eps) when normalize, else n_i.
    group: query heads per key/value head (1 without grouped-query attention); the
    operator infers it from the shapes, the spec records it for explain().
    """

    layout: str = "BHTD"
    scale: float = 0.25
    c0: float = 1.0
    c1: float = 1.0
    c2: float = 0.5
    causal: bool = True
    normalize: bool = True
    eps: float = 1e-6
    group: int = 1

    def __post_init__(self):
        # The operator's spec arguments (ops.py), computed once: based_attention passes them on
        # every call, and converting nine fields each time costs a noticeable part of a small call.
        for name in ("scale", "c0", "c1", "c2", "eps"):
            if not isinstance(getattr(self, name), numbers.Real) or isinstance(getattr(self, name), bool):
                raise TypeError(f"BasedSpec.{name} must be a number, got {getattr(self, name)!r}")
        for name in ("causal", "normalize"):
            if not isinstance(getattr(self, name), bool):       # bool("no") is True: no coercion
                raise TypeError(f"BasedSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"BasedSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"BasedSpec.eps must be a finite number >= 0, got {self.eps!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, numbers.Integral) or self.group < 1:
            raise ValueError(f"BasedSpec.group must be an int >= 1, got {self.group!r}")
        object.__setattr__(self, "op_arguments", (
            self.layout, float(self.scale), float(self.c0), float(self.c1), float(self.c2), self.causal,
            self.normalize, float(self.eps)))

    @property
    def coeffs(self) -> tuple[float, float, float]:
        return (self.c0, self.c1, self.c2)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.describe()

    def describe(self, run_time_scale: str = "") -> str:
        """The spec in words; ``run_time_scale``: a factor of q.k read at run time besides ``scale``
        (the graph pass's reading of a learnable temperature, ``(1 / self.temperature)``)."""
        poly = f"{self.c0:g} + {self.c1:g}*s + {self.c2:g}*s^2"
        norm = f"normalised (eps={self.eps:g})" if self.normalize else "unnormalised"
        gqa = f", GQA group {self.group}" if self.group != 1 else ""
        times = f"{self.scale:.6g} * {run_time_scale + ' * ' if run_time_scale else ''}q.k"
        return (f"{self.layout}, s = {times}, f(s) = {poly}, "
                f"{'causal' if self.causal else 'non-causal'}, {norm}{gqa}")
