"""Which feature of x each feature of phi(x) holds is proven, not assumed (graph/feature_order.py, and the
feature labels of graph/axis_labels.py): at real sizes the numerical probe is off, and the structural reading
alone decides.

A red team found maps of the right degrees and widths with their features in another order rewritten as
Based at real sizes (errors 25-85%): x (x) x written as ``x.repeat_interleave(D, -1) ** 2`` or as x_a^2
broadcast to a square; x's features regrouped by views (``unflatten``, ``transpose``, ``flatten``) in the
linear piece of one map; a whole phi(k) regrouped by views on one side only, in the quadratic, running-sum
and state forms. Each is checked here with the probe off (as at real sizes) and on: the near-misses run
no operator and keep eager's values; the accepted spellings (the outer product as a product of unsqueezes,
expanded or not, transposed (x_b x_a: the same product), as a matmul, as an einsum; both whole maps regrouped
the same way, which pairs the same features) are rewritten and exact, values and gradients, in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from compare import assert_rel_close
from based_compile.graph import feature_normaliser, verify
from pass_reports import PassReports

B, H, T, D, DV = 2, 3, 12, 4, 5
R2, RD = math.sqrt(2), math.sqrt(D)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def _map(x, x2):
    return torch.cat([x[..., :1] ** 0, x / RD ** 0.5, x2 / (R2 * RD)], -1)


def taylor(x):
    return _map(x, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2))


def taylor_matmul(x):                        # x_a x_b as a matmul over a unit axis
    return _map(x, (x.unsqueeze(-1) @ x.unsqueeze(-2)).flatten(-2))


def taylor_einsum(x):
    return _map(x, torch.einsum("...i,...j->...ij", x, x).flatten(-2))


def taylor_transposed(x):                    # x_b x_a at a * D + b: the same product (symmetric)
    return _map(x, (x.unsqueeze(-1) * x.unsqueeze(-2)).transpose(-1, -2).flatten(-2))


def taylor_expanded(x):                      # both factors expanded to the square first
    square = (*x.shape, x.shape[-1])
    return _map(x, (x.unsqueeze(-1).expand(square) * x.unsqueeze(-2).expand(square)).flatten(-2))


def outer_regrouped(x):                      # the [D, D] block read as [D * D / 2, 2] transposed
    p = x.unsqueeze(-1) * x.unsqueeze(-2)
    return _map(x, p.reshape(*x.shape[:-1], D * D // 2, 2).mT.reshape(*x.shape[:-1], D * D))


def regrouped(p):                            # a reshape of [.., F] read as [.., 3, F/3] transposed
    return p.unflatten(-1, (3, p.shape[-1] // 3)).transpose(-1, -2).flatten(-2)


def squares_repeated(x):                     # x_a^2 at every feature a * D + b
    r = x.repeat_interleave(D, -1)
    return _map(x, r * r)


def squares_broadcast(x):                    # the same, written as a broadcast product with ones
    return _map(x, ((x * x).unsqueeze(-1) * torch.ones_like(x).unsqueeze(-2)).flatten(-2))


def linear_regrouped(x):                     # x's features regrouped in the linear piece
    xp = x.unflatten(-1, (2, D // 2)).transpose(-1, -2).flatten(-2)
    return torch.cat([x[..., :1] ** 0, xp / RD ** 0.5, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (R2 * RD)],
                     -1)


def quadratic(fq, fk):
    def attention(q, k, v):
        a = torch.tril(fq(q) @ fk(k).mT)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    return attention


def running_sums(fq, fk):
    def attention(q, k, v):
        pq, pk = fq(q), fk(k)
        kv = torch.einsum("bhtf,bhtd->bhtfd", pk, v).cumsum(2)
        num = torch.einsum("bhtf,bhtfd->bhtd", pq, kv)
        return num / (torch.einsum("bhtf,bhtf->bht", pq, pk.cumsum(2))[..., None] + 1e-6)
    return attention


def state_product(fq, fk):
    def attention(q, k, v):
        s = fk(k).mT @ v
        return (fq(q) @ s) / (fq(q) @ fk(k).sum(2)[..., None] + 1e-6)
    return attention


ACCEPTED = {
    "quadratic": quadratic(taylor, taylor),
    "quadratic_matmul_outer": quadratic(taylor_matmul, taylor_matmul),
    "quadratic_einsum_outer": quadratic(taylor_einsum, taylor_einsum),
    "quadratic_transposed_outer": quadratic(taylor_transposed, taylor),
    "quadratic_expanded_outer": quadratic(taylor_expanded, taylor_expanded),
    "running_sums_transposed_outer": running_sums(taylor_transposed, taylor_transposed),
    "quadratic_both_regrouped": quadratic(lambda x: regrouped(taylor(x)), lambda x: regrouped(taylor(x))),
    "running_sums": running_sums(taylor, taylor),
    "running_sums_einsum_outer": running_sums(taylor_einsum, taylor_einsum),
    "state_product": state_product(taylor, taylor),
}

REFUSED = {
    "quadratic_squares_repeated": quadratic(squares_repeated, squares_repeated),
    "quadratic_squares_broadcast": quadratic(squares_broadcast, squares_broadcast),
    "quadratic_linear_regrouped_on_q": quadratic(linear_regrouped, taylor),
    "quadratic_outer_regrouped": quadratic(outer_regrouped, outer_regrouped),
    "quadratic_phi_k_regrouped": quadratic(taylor, lambda x: regrouped(taylor(x))),
    "running_sums_squares_repeated": running_sums(squares_repeated, squares_repeated),
    "running_sums_linear_regrouped_on_q": running_sums(linear_regrouped, taylor),
    "running_sums_phi_k_regrouped": running_sums(taylor, lambda x: regrouped(taylor(x))),
    "state_product_phi_k_regrouped": state_product(taylor, lambda x: regrouped(taylor(x))),
}


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g, dtype=torch.float64, requires_grad=True)
                 for d in (D, D, DV))


def _run(fn, probe, monkeypatch):
    if not probe:                            # the structural reading alone, as at real sizes
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    q, k, v = _inputs(7)
    with PassReports() as reports:
        compiled(q, k, v)                    # compiles (the probe may run the operator)
    with BasedOpCounter() as counter:
        out = compiled(q, k, v)
    want = fn(q, k, v)
    assert_rel_close(out, want, 1e-10, "compiled vs eager")
    cot = torch.randn_like(want)
    for name, got, ref in zip("qkv", torch.autograd.grad(out, (q, k, v), cot),
                              torch.autograd.grad(want, (q, k, v), cot)):
        assert_rel_close(got, ref, 1e-10, f"d{name}")
    return reports, sum(counter.calls.values())


@pytest.mark.parametrize("probe", [False, True], ids=["structure", "probe"])
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_maps_in_order_are_rewritten(name, probe, monkeypatch):
    reports, calls = _run(ACCEPTED[name], probe, monkeypatch)
    assert calls >= 1, str(reports)
    for explanation in reports.graphs:
        assert explanation.sites and all(s.spec.normalize for s in explanation.sites), str(explanation)


@pytest.mark.parametrize("probe", [False, True], ids=["structure", "probe"])
@pytest.mark.parametrize("name", list(REFUSED))
def test_maps_out_of_order_are_not_rewritten(name, probe, monkeypatch):
    reports, calls = _run(REFUSED[name], probe, monkeypatch)
    assert calls == 0, str(reports)
    assert all(not e.sites for e in reports.graphs), str(reports)
    if name.startswith("quadratic") and not probe:      # explain() says what is out of order
        words = "another order" if name.endswith("phi_k_regrouped") else "in order"
        assert any(words in r.reason for e in reports.graphs for r in e.refusals), str(reports)
