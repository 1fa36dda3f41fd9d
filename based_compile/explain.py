"""explain(): what the pass finds in a model, and why it refuses the near-misses.

``explain(model, *example_inputs, **example_kwargs)`` runs Dynamo on the model once (like
``torch._dynamo.explain``) with the pass reporting every site and refusal, then resets Dynamo so
no compiled state is left behind. To run the model once, each graph runs eagerly with its sites
rewritten, as the compiled model would (a naive model at a long context would otherwise build its
T x T weights: 4 GB each at T = 32768). It returns an
``Explanation``: ``.sites`` (``Site(source, form, spec, kernel)``) and ``.refusals``
(``Refusal(source, category, reason)``); ``print(explanation)`` shows both.
"""
from __future__ import annotations

import torch

from .graph.driver import run_pass
from .graph.report import Explanation


def explain(model, *example_inputs, **example_kwargs) -> Explanation:
    """Run ``model(*example_inputs, **example_kwargs)`` under Dynamo with the pass reporting (the sites
    rewritten for this one run, eagerly)."""
    if not callable(model):
        raise TypeError(f"model must be a callable (an nn.Module or a function), got {type(model).__name__}")
    explanation = Explanation()

    def report_only(gm, example_args):
        explanation.graphs += 1
        result = run_pass(gm, example_args, rewrite=True, verify=True, report=explanation)
        return gm.forward if result is None else result[0].forward

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=report_only)(*example_inputs, **example_kwargs)
    finally:
        torch._dynamo.reset()
    return explanation
