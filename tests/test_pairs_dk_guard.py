"""A compressed or memory-saving Taylor map whose index-pair table is fixed at one Dk (``triu_indices(4, 4, 1)``
in a buffer, a plain attribute or inline; zoology's ``forward_mem_save`` with its ``tril_indices`` table) is Based
at that Dk alone: at Dk = 8 the table lists the pairs of the first 4 features only. Under ``dynamic=True`` the
feature size is symbolic; the pass proved the pairs at the traced Dk and reused the graph at every other Dk
(rel err 0.29 at Dk = 8). Now the pass guards the feature size equal to its traced value when it reads pairs
(a call at another Dk recompiles: refused there, the table is not (x.y)^2), and refuses, with the reason, when
the user marked the feature axis dynamic (``mark_dynamic``: Dynamo forbids specialising it). The control,
``triu_indices(D, D, 1)`` of the symbolic D, stays rewritten at every Dk.

The numerical probe is off (as at real sizes, where it does not run): the guard alone must keep the values.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from compiled_compare import Recorder, values_and_grads
from compare import assert_rel_close
from pass_reports import PassReports
import based_compile

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TABLE = torch.triu_indices(4, 4, 1)


class Compressed(nn.Module):
    """cat([1, x/2, x*x/4, sqrt(2)/4 x[iu] x[ju]]) with the pairs from ``how``'s table."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        if how == "buffer":
            self.register_buffer("iu", TABLE.clone())
        elif how == "attr":
            self.iu = TABLE.clone()

    def fm(self, x):
        if self.how == "inline4":
            iu = torch.triu_indices(4, 4, 1)
        elif self.how == "inlineD":
            d = x.shape[-1]
            iu = torch.triu_indices(d, d, 1)
        else:
            iu = self.iu
        return torch.cat([torch.ones_like(x[..., :1]), x / 2, x * x / 4,
                          math.sqrt(2) / 4 * x[..., iu[0]] * x[..., iu[1]]], -1)

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = (self.fm(q) @ self.fm(k).mT).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class MemSave(nn.Module):
    """zoology's TaylorExp.forward_mem_save: the squares on the diagonal, the products below it through a
    tril_indices table built for feature_dim = 4."""

    def __init__(self):
        super().__init__()
        self.tril_indices = torch.tril_indices(4, 4, -1)

    def fm(self, x):
        x2 = torch.einsum("...m,...n->...mn", x, x) / 2
        return torch.cat([torch.ones_like(x[..., :1]), x / math.sqrt(2),
                          torch.diagonal(x2, dim1=-2, dim2=-1) / math.sqrt(2),
                          x2[..., self.tril_indices[0], self.tril_indices[1]]], -1)

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = (self.fm(q) @ self.fm(k).mT).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.fixture
def no_probe(monkeypatch):
    monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
    monkeypatch.setattr("based_compile.graph.feature_normaliser.INDEX_MAX_ELEMENTS", 0)


def inputs(d, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, 9, n, generator=g, dtype=torch.float64) for n in (d, d, 3)]


def run(module, dks, *, dynamic=None, mark=False):
    """Compile, call at each Dk (first the table's), compare values and gradients with eager; the rewritten
    sites per compiled graph and the pass's reports."""
    recorder = Recorder("eager")
    compiled = torch.compile(module, backend=based_compile.backend(inner=recorder), dynamic=dynamic)
    with PassReports() as reports:
        for d in dks:
            xs = inputs(d, d)
            call = compiled
            if mark:
                def call(q, k, v):
                    for x in (q, k):
                        torch._dynamo.mark_dynamic(x, 3)
                    return compiled(q, k, v)
            out_c, grads_c = values_and_grads(call, xs, d)
            out_e, grads_e = values_and_grads(module, xs, d)
            assert_rel_close(out_c, out_e, 1e-10, f"Dk={d}: output, compiled vs eager")
            for j, (c, e) in enumerate(zip(grads_c, grads_e)):
                assert_rel_close(c, e, 1e-10, f"Dk={d}: gradient of input {j}, compiled vs eager")
    return recorder.sites(), reports


@pytest.mark.parametrize("how", ["buffer", "attr", "inline4"])
def test_fixed_table_recompiles_at_another_dk(no_probe, how):
    sites, _ = run(Compressed(how), (4, 8, 6, 4), dynamic=True)
    # rewritten at the table's Dk; Dk = 8 recompiles (refused: the table lists 4 features' pairs), and Dk = 6
    # runs that unrewritten graph of symbolic Dk; Dk = 4 reuses the first
    assert sites == [1, 0], sites


def test_memsave_table_recompiles_at_another_dk(no_probe):
    sites, _ = run(MemSave(), (4, 8, 6), dynamic=True)
    assert sites == [1, 0], sites


def test_symbolic_table_stays_rewritten(no_probe):
    sites, _ = run(Compressed("inlineD"), (4, 8, 6), dynamic=True)
    assert sites == [1, 1, 1], sites


def test_static_shapes_rewritten_at_the_tables_dk(no_probe):
    sites, _ = run(Compressed("buffer"), (4,))
    assert sites == [1], sites


@pytest.mark.parametrize("how", ["buffer", "inline4"])
def test_marked_dynamic_feature_axis_refused(no_probe, how):
    sites, reports = run(Compressed(how), (4, 8), mark=True)
    assert sum(sites) == 0, sites
    reasons = [r.reason for g in reports.graphs for r in g.refusals]
    assert any("marked dynamic" in r for r in reasons), reasons


def test_marked_dynamic_memsave_refused(no_probe):
    sites, reports = run(MemSave(), (4, 8), mark=True)
    assert sum(sites) == 0, sites
    assert any("marked dynamic" in r.reason for g in reports.graphs for r in g.refusals), reports
