"""Compile a module with the based backend, call it at several lengths and compare values and gradients with
eager (float64 inputs): the harness of the graph-pass tests that record what the backend hands its inner
compiler (test_coverage, test_checkpointed_mask, test_memsave_map, test_additive_masks,
test_feature_map_computed_twice)."""
from __future__ import annotations

import torch
import torch.fx as fx

import based_compile
from based_calls import BasedOpCounter
from based_compile.graph.rewrite import based_attention_call
from compare import assert_rel_close
from pass_reports import PassReports


class Recorder:
    """An inner compiler that keeps the graphs the based backend hands it, then compiles with ``inner``."""

    def __init__(self, inner="eager"):
        self.graphs: list[fx.GraphModule] = []
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)

    def sites(self) -> list[int]:
        """Rewritten sites per compiled graph."""
        return [sum(n.target is based_attention_call for n in g.graph.nodes) for g in self.graphs]


def shaped_inputs(seed, t, shapes):
    """Fresh float64 tensors of ``shapes`` ("T" stands for the length ``t``)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*[t if s == "T" else s for s in shape], generator=g, dtype=torch.float64)
            for shape in shapes]


def values_and_grads(fn, inputs, seed):
    """fn's output and the gradients of every input for a random cotangent of ``seed``."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, inputs, cot)


def compile_and_compare(module, shapes, lengths, *, inner="eager", dynamic=None, tol=1e-10, count=False) -> Recorder:
    """Compile, call at each length, compare values and gradients with eager; the Recorder, with the pass's
    report of each graph in ``.reports`` and, with ``count``, the operator calls of one more forward at each
    length in ``.calls`` (at the last length, the counter itself in ``.counter``)."""
    recorder = Recorder(inner)
    recorder.calls = []
    compiled = torch.compile(module, backend=based_compile.backend(inner=recorder), dynamic=dynamic)
    with PassReports() as recorder.reports:
        for t in lengths:
            inputs = shaped_inputs(100 + t, t, shapes)
            out_c, grads_c = values_and_grads(compiled, inputs, t)
            out_e, grads_e = values_and_grads(module, inputs, t)
            assert_rel_close(out_c, out_e, tol, f"T={t}: output, compiled vs eager")
            for j, (c, e) in enumerate(zip(grads_c, grads_e)):
                assert_rel_close(c, e, tol, f"T={t}: gradient of input {j}, compiled vs eager")
            if count:       # inputs that require grad, as above: the same compiled graph, no new report
                with BasedOpCounter() as recorder.counter:
                    compiled(*[x.requires_grad_(True) for x in shaped_inputs(200 + t, t, shapes)])
                recorder.calls.append(recorder.counter.total)
    assert len(recorder.reports.graphs) >= len(recorder.graphs) >= 1, recorder.reports   # more: a restart
    return recorder
