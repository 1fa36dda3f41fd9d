"""explain(): what the pass finds in a model, and why it refuses the near-misses.

``explain(model, *example_inputs, **example_kwargs)`` runs Dynamo on the model once (like
``torch._dynamo.explain``) with the pass reporting every site and refusal, then resets Dynamo so
no compiled state is left behind. To run the model once, each graph runs eagerly with its sites
rewritten, as the compiled model would (a naive model at a long context would otherwise build its
T x T weights: 4 GB each at T = 32768). It returns an
``Explanation``: ``.sites`` (``Site(source, form, spec, kernel)``) and ``.refusals``
(``Refusal(source, category, reason)``); ``print(explanation)`` shows both.

On a ``DistributedDataParallel`` model, Dynamo's DDP optimizer cuts each graph into pieces at
gradient-bucket boundaries; explain() reports on the whole graph, as the backend rewrites it
(``ddp_split``), and ``.splits`` lists each piece with the sites it holds; a site that a cut
spreads over pieces says so in its ``piece`` (which of q, k, v and the output lie where). The run
itself then splits the rewritten graph again, as the compiled model runs.
"""
from __future__ import annotations

import torch

from .ddp_split import describe_split, in_split, mark_presplit
from .graph.driver import run_pass
from .graph.report import Explanation
from .logs import one_handler


def explain(model, *example_inputs, **example_kwargs) -> Explanation:
    """Run ``model(*example_inputs, **example_kwargs)`` under Dynamo with the pass reporting (the sites
    rewritten for this one run, eagerly)."""
    one_handler()
    if not callable(model):
        raise TypeError(f"model must be a callable (an nn.Module or a function), got {type(model).__name__}")
    explanation = Explanation()

    def report_only(gm, example_args):
        if in_split():        # a piece of a graph already reported whole (presplit below)
            return gm.forward
        explanation.graphs += 1
        result = run_pass(gm, example_args, rewrite=True, verify=True, report=explanation)
        return gm.forward if result is None else result[0].forward

    def presplit(gm, example_args, split):
        """Under DDP's graph splitting: report on the whole graph (as backend="based" rewrites it), then
        place each site in the pieces DDP cuts the unrewritten graph into, naming the sites a cut splits."""
        first = len(explanation.sites)
        explanation.graphs += 1
        run_pass(gm, example_args, rewrite=False, verify=True, report=explanation)
        compiled, pieces = split(gm)
        sites = explanation.sites[first:]
        for site in sites:
            site.piece = pieces.where(site.nodes)
        explanation.splits.extend(f"graph {explanation.graphs}: {line}" if i == 0 else line
                                  for i, line in enumerate(describe_split(pieces, sites, first)))
        # The one run, as the compiled model would run it: the rewritten graph, split again.
        result = run_pass(gm, example_args, rewrite=True, verify=True) if sites else None
        return compiled if result is None else split(result[0])[0]

    mark_presplit(report_only, presplit)

    torch._dynamo.reset()
    try:
        torch.compile(model, backend=report_only)(*example_inputs, **example_kwargs)
    finally:
        torch._dynamo.reset()
    return explanation
