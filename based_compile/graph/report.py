"""What the pass reports: each site it found (``Site``), each candidate it refused (``Refusal``),
gathered in an ``Explanation``; ``source_of`` names the user's line of an FX node."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..op.spec import BasedSpec

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
    # Dynamo's nodes of the site (role q/k/v/output -> node name), to place it in a split graph's pieces.
    nodes: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    piece: str = ""       # under DDP's graph splitting: the piece(s) of the graph the site lies in
    run_time_scale: str = ""   # a factor of q.k read at run time besides spec.scale: "(1 / self.temperature)"
    output_scale: str = ""     # a factor of the (unnormalised) output read at run time: the weights' scale

    @property
    def spec_text(self) -> str:
        describe = getattr(self.spec, "describe", None)      # a recurrent step's StepSpec says itself
        text = describe(self.run_time_scale) if describe is not None else str(self.spec)
        return f"{text}, output times {self.output_scale}" if self.output_scale else text

    def __str__(self) -> str:
        text = f"{self.source}\n    form: {self.form}\n    spec: {self.spec_text}\n    kernel: {self.kernel}"
        return text + (f"\n    graph piece: {self.piece}" if self.piece else "")


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
    splits: list[str] = field(default_factory=list)    # how DDP's graph splitting cut each graph, per piece

    def add_refusal(self, refusal: Refusal) -> None:
        if all((r.source, r.category, r.reason) != (refusal.source, refusal.category, refusal.reason)
               for r in self.refusals):
            self.refusals.append(refusal)

    def __str__(self) -> str:
        lines = [f"based_compile.explain: {len(self.sites)} Based attention site(s), "
                 f"{len(self.refusals)} refusal(s) in {self.graphs} graph(s)"]
        lines.extend(self.splits)
        for i, site in enumerate(self.sites):
            lines.append(f"[site {i}] {site}")
        for i, refusal in enumerate(self.refusals):
            lines.append(f"[refusal {i}] {refusal}")
        return "\n".join(lines)
