"""Forms of issue 13 that the pass read wrong or not at all, beyond the zoo's spelled_* entries.

- ``polynomial.fit``: elementwise functions of q.k are read by evaluating them;
- the last line of defence: a rewritten graph that the inner compiler rejects is compiled
  unrewritten, with a warning and an explain() refusal;
- dropout with p > 0 in training on the weights stays refused.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from based_calls import BasedOpCounter
from compare import assert_rel_close

import based_compile
from based_compile.graph import driver, polynomial
from based_compile.graph.rewrite import based_attention_call


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    driver.REJECTED_BY_INNER.clear()
    yield
    torch._dynamo.reset()
    driver.REJECTED_BY_INNER.clear()


def test_fit_reads_polynomials_and_refuses_the_rest():
    assert polynomial.close(polynomial.fit(lambda x: 1 + x * (1 + 0.5 * x)), (1.0, 1.0, 0.5))
    assert polynomial.close(polynomial.fit(lambda x: 0.3 * x ** 3 - 2), (-2.0, 0.0, 0.0, 0.3))
    assert polynomial.fit(lambda x: 0.0) == (0.0,)
    for not_polynomial in (math.exp, lambda x: abs(x) ** 1.5, lambda x: 1 / (1 + math.exp(-x)),
                           lambda x: max(x, 0.0), lambda x: x ** 7):
        assert polynomial.fit(not_polynomial) is None


def _grads(module, inputs, seed=3):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = module(*inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, inputs, cot)


def test_inner_compiler_rejecting_the_rewrite_compiles_the_graph_unrewritten(caplog):
    """A planted failure: the inner compiler raises on any graph holding the rewritten site."""
    seen = []

    def picky_inner(gm, example_inputs):
        rewritten = any(n.target is based_attention_call for n in gm.graph.nodes)
        seen.append(rewritten)
        if rewritten:
            raise RuntimeError("planted: the inner compiler cannot compile this graph")
        return gm.forward

    module, inputs = zoo.BY_NAME["poly_taylor"].make(torch.float64, 0)
    compiled = torch.compile(module, backend=based_compile.backend(inner=picky_inner))
    with caplog.at_level(logging.WARNING, logger="based_compile"):
        out_c, grads_c = _grads(compiled, inputs)
    assert seen == [True, False], seen
    assert any("inner compiler rejected" in r.getMessage() and "planted" in r.getMessage() for r in caplog.records)
    out_e, grads_e = _grads(module, inputs)
    assert_rel_close(out_c, out_e, 1e-12, "output compiled unrewritten vs eager")
    for gc, ge in zip(grads_c, grads_e):
        assert_rel_close(gc, ge, 1e-12, "gradient compiled unrewritten vs eager")
    with BasedOpCounter() as counter:
        compiled(*inputs)
    assert counter.total == 0

    ex = based_compile.explain(module, *inputs)
    assert not ex.sites
    assert any(r.category == "unsupported" and "inner compiler rejected" in r.reason for r in ex.refusals), ex


def test_inner_compiler_restarts_are_not_failures():
    """Dynamo's control flow (RestartAnalysis) raised by an inner compiler reaches Dynamo."""
    calls = []

    def restarting_inner(gm, example_inputs):
        calls.append(1)
        raise torch._dynamo.exc.SkipFrame("planted skip")

    module, inputs = zoo.BY_NAME["poly_taylor"].make(torch.float64, 0)
    compiled = torch.compile(module, backend=based_compile.backend(inner=restarting_inner))
    out = compiled(*inputs)                       # the frame is skipped: it runs eagerly
    assert_rel_close(out, module(*inputs), 1e-12)
    assert calls
    assert not driver.REJECTED_BY_INNER


class DropoutWeights(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = (q @ k.mT) / math.sqrt(q.shape[-1])
        a = (1 + s + 0.5 * s * s).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
        a = F.dropout(a, p=self.p, training=True)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_dropout_in_training_on_the_weights_stays_refused():
    _, inputs = zoo.BY_NAME["poly_taylor"].make(torch.float64, 0)
    ex = based_compile.explain(DropoutWeights(0.1), *inputs)
    assert not ex.sites, ex
    assert any(r.category == "unsupported" and "dropout with p > 0 in training" in r.reason
               for r in ex.refusals), ex
    ex = based_compile.explain(DropoutWeights(0.0), *inputs)
    assert len(ex.sites) == 1, ex
