"""explain(): what the pass finds in a model, and why it refuses the near-misses.

``explain(model, *example_inputs, **example_kwargs)`` runs Dynamo on the model once (like
``torch._dynamo.explain``) with the pass in report-only mode (nothing is rewritten, the
model runs eagerly), then resets Dynamo so no compiled state is left behind. It returns an
``Explanation``: ``.sites`` (``Site(source, form, spec, kernel)``) and ``.refusals``
(``Refusal(source, category, reason)``); ``print(explanation)`` shows both.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .spec import BasedSpec

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n\s*([^\n]*)')


def source_of(node) -> str:
    """"file:line in function: code" of the innermost user frame recorded for an FX node."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return f"<graph node {getattr(node, 'name', '?')}>"
    frames = _FRAME.findall(trace)
    if not frames:
        return trace.strip().splitlines()[-1]
    path, line, func, code = frames[-1]
    return f"{path}:{line} in {func}: {code.strip()}"


@dataclass
class Site:
    source: str           # the user's file:line and code
    form: str             # "quadratic", "feature-map quadratic", "feature-map linear (cumsum)"
    spec: BasedSpec
    kernel: str           # the policy's choice and why

    def __str__(self) -> str:
        return f"{self.source}\n    form: {self.form}\n    spec: {self.spec}\n    kernel: {self.kernel}"


@dataclass
class Refusal:
    source: str
    category: str         # polynomial, mask, normaliser, feature_map, verify, unsupported
    reason: str

    def __str__(self) -> str:
        return f"{self.source}\n    refused ({self.category}): {self.reason}"


@dataclass
class Explanation:
    sites: list[Site] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    graphs: int = 0

    def add_refusal(self, refusal: Refusal) -> None:
        if all((r.source, r.category, r.reason) != (refusal.source, refusal.category, refusal.reason)
               for r in self.refusals):
            self.refusals.append(refusal)

    def __str__(self) -> str:
        lines = [f"based_compile.explain: {len(self.sites)} Based attention site(s), "
                 f"{len(self.refusals)} refusal(s) in {self.graphs} graph(s)"]
        for i, site in enumerate(self.sites):
            lines.append(f"[site {i}] {site}")
        for i, refusal in enumerate(self.refusals):
            lines.append(f"[refusal {i}] {refusal}")
        return "\n".join(lines)


def explain(model, *example_inputs, **example_kwargs) -> Explanation:
    """Run ``model(*example_inputs, **example_kwargs)`` under Dynamo with the pass reporting only."""
    from .backend import run_pass

    if not callable(model):
        raise TypeError(f"model must be a callable (an nn.Module or a function), got {type(model).__name__}")
    explanation = Explanation()

    def report_only(gm, example_args):
        explanation.graphs += 1
        run_pass(gm, example_args, rewrite=False, verify=True, report=explanation)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=report_only)(*example_inputs, **example_kwargs)
    finally:
        torch._dynamo.reset()
    return explanation
