"""What the based backend did while a test compiled: explain()'s report without a second trace of the
model (``PassReports``), and the rewritten graphs themselves (``compiled_graphs``).

``explain(model, *inputs)`` traces the model with Dynamo and runs the pass (``run_pass``, rewrite and
verify on) with a report; the based backend runs that same pass, with a report of its own, on every
graph it compiles. A test that compiles the model anyway reads the backend's reports instead of
tracing the model once more for explain() (a Dynamo trace and a lowering each: most of such a test's
time). explain() itself keeps its own tests (tests/test_patterns.py: every zoo entry).
"""
from __future__ import annotations

import sys

import torch

import based_compile
from based_compile.graph.report import Explanation


def compiled_graphs(fn, *args) -> list:
    """The graph modules the based backend hands its inner compiler when ``fn(*args)`` is compiled (no
    grad, Dynamo reset first): the graphs after the rewrite, to read what is left in them."""
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=based_compile.backend(inner=inner))(*args)
    return seen


class PassReports:
    """While active, ``.graphs`` gets the report (an ``Explanation``: ``.sites``, ``.refusals``) of each
    graph a based backend compiles with ``rewrite=True, verify=True`` (explain()'s settings), in order,
    including refusals the backend adds after the pass (an inner compiler that rejected the rewrite)."""

    def __init__(self):
        self.graphs: list[Explanation] = []

    def __enter__(self):
        backend = sys.modules["based_compile.backend"]
        self._module, self._run_pass = backend, backend.run_pass

        def run_pass(gm, example_inputs, *, rewrite, verify, report=None, **kwargs):
            if report is not None and rewrite and verify:
                self.graphs.append(report)
            return self._run_pass(gm, example_inputs, rewrite=rewrite, verify=verify, report=report, **kwargs)

        backend.run_pass = run_pass
        return self

    def __exit__(self, *exc):
        self._module.run_pass = self._run_pass
        return False

    def merged(self) -> Explanation:
        """One report of every graph, as explain() gives for a model Dynamo compiles in several graphs."""
        merged = Explanation(graphs=len(self.graphs))
        for report in self.graphs:
            merged.sites.extend(report.sites)
            for refusal in report.refusals:
                merged.add_refusal(refusal)
        return merged

    def sites(self) -> list[int]:
        """Sites found per compiled graph."""
        return [len(r.sites) for r in self.graphs]

    def categories(self) -> list[list[str]]:
        """Refusal categories per compiled graph."""
        return [[r.category for r in report.refusals] for report in self.graphs]

    def __str__(self) -> str:
        return "\n".join(f"graph {i}: {report}" for i, report in enumerate(self.graphs)) or "no graph compiled"
