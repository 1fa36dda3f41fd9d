"""The program under construction: the lines of a ``Model`` module, as text, and what they mean.

A ``Source`` collects the lines of ``Model.__init__``, of the attention ``core`` (the part after
the layout and head handling), of ``Model.forward``, and module-level helpers, together with the
choices made along each axis and the Based function the lines compute when no mutation is
applied (scale, coefficients, causal, normalise, eps). The generators in ``axes.py`` append to it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field


def num(x: float) -> str:
    """A float literal that reads back exactly."""
    return repr(float(x))


@dataclass
class Source:
    case: int
    force: dict = field(default_factory=dict)       # axis -> choice, instead of the random one
    b: int = 1
    h: int = 1
    hkv: int = 1
    dk: int = 4
    dv: int = 4
    mutation: str | None = None
    init: list[str] = field(default_factory=list)
    helpers: list[str] = field(default_factory=list)
    prologue: list[str] = field(default_factory=list)    # forward: layout, heads (before the core)
    core: list[str] = field(default_factory=list)        # attention core: q, k, v (BHTD) -> o
    epilogue: list[str] = field(default_factory=list)    # forward: layout back, residual
    choices: dict[str, str] = field(default_factory=dict)
    extra_inputs: list[str] = field(default_factory=list)
    # the Based function the unmutated program computes
    scale: float = 1.0
    c0: float = 1.0
    c1: float = 1.0
    c2: float = 0.5
    causal: bool = True
    normalize: bool = True
    eps: float = 1e-6

    _streams: dict = field(default_factory=dict, repr=False)

    def stream(self, axis: str) -> random.Random:
        """The random numbers of one axis, seeded by (case, axis): forcing the choice of one axis
        (``force``) leaves every other axis as it was."""
        if axis not in self._streams:
            self._streams[axis] = random.Random(f"{self.case}/{axis}")
        return self._streams[axis]

    def pick(self, axis: str, options):
        """Choose one of ``options`` (a sequence, or a dict option -> weight) and record it."""
        rng = self.stream(axis)
        if isinstance(options, dict):
            names, weights = list(options), list(options.values())
            choice = rng.choices(names, weights)[0]
        else:
            choice = rng.choice(list(options))
        if axis in self.force:
            choice = self.force[axis]
        self.choices[axis] = choice if isinstance(choice, str) else repr(choice)
        return choice

    def mutated(self, *names: str) -> bool:
        return self.mutation in names

    def buffer(self, name: str, expr: str) -> str:
        self.init.append(f'self.register_buffer("{name}", {expr})')
        return f"self.{name}"
