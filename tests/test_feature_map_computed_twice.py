"""A feature map computed twice (once for the scores, once for the normaliser) is one value.

``phi(q)`` called in the numerator's scores and again in a feature-side normaliser
``einsum('bhtf,bhtf->bht', phi(q), phi(k).cumsum(2))`` builds two nodes of the same map of the same
tensor: they are read as one (the same pieces, constants, order and shape), in the quadratic form as
in the linear one. Each spelling is rewritten (the ``based`` operator runs) and exact against eager
float64, values and gradients, at a static and then a symbolic length. Two maps that differ (another
constant on a piece, the map of another tensor) are refused, and the reason says so.
"""
from __future__ import annotations

import math

import pytest
import torch

from compiled_compare import compile_and_compare

D = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def phi(x, const=1.0, linear=1 / math.sqrt(math.sqrt(D))):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / math.sqrt(2) / math.sqrt(D)
    return torch.cat([const * x[..., :1] ** 0, x * linear, x2], dim=-1)


def _quadratic(q, k, v, phi_q_den=phi, phi_k_den=phi):
    a = (phi(q) @ phi(k).mT).tril()
    den = torch.einsum("bhtf,bhtf->bht", phi_q_den(q), phi_k_den(k).cumsum(2))
    return (a @ v) / (den[..., None] + 1e-6)


def _linear(q, k, v, phi_q_den=phi):
    kv = torch.einsum("bhnf,bhnd->bhnfd", phi(k), v).cumsum(2)
    num = torch.einsum("bhnf,bhnfd->bhnd", phi(q), kv)
    den = torch.einsum("bhnf,bhnf->bhn", phi_q_den(q), phi(k).cumsum(2)) + 1e-6
    return num / den[..., None]


QKV = [(2, 3, "T", D), (2, 3, "T", D), (2, 3, "T", 3)]


def _run(model, lengths=(5, 9)):
    recorder = compile_and_compare(model, QKV, lengths, inner="aot_eager", tol=1e-9, count=True)
    return recorder.calls, recorder.reports


@pytest.mark.parametrize("model", [_quadratic, _linear], ids=["quadratic", "linear"])
def test_phi_of_q_computed_twice_is_read_as_one_map(model):
    calls, reports = _run(model)
    assert all(calls), (calls, str(reports))
    assert reports.graphs and all(reports.sites()), str(reports)


NEAR_MISSES = {   # name: (model, what the refusal says)
    "another_constant_column": (lambda q, k, v: _quadratic(q, k, v, phi_q_den=lambda x: phi(x, const=0.5)),
                                "the normaliser sums 0.5 + 0.5*x^1"),
    "another_linear_factor": (lambda q, k, v: _quadratic(q, k, v, phi_q_den=lambda x: phi(x, linear=0.5)),
                              "the normaliser sums 1 + 0.353553*x^1"),
    # the same polynomial of q.k from two other maps (constants 0.5 and 2): refused on the maps, not summed
    "constants_that_cancel": (lambda q, k, v: _quadratic(q, k, v, phi_q_den=lambda x: phi(x, const=0.5),
                                                         phi_k_den=lambda x: phi(x, const=2.0)),
                              "the normaliser's query feature map is not the one the numerator's scores read"),
    "map_of_another_query": (lambda q, k, v: _quadratic(q, k, v, phi_q_den=lambda x: phi(x.flip(2))),
                             "as the numerator does, but of other queries"),
}


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_two_different_maps_of_q_or_k_are_refused(name):
    model, reason = NEAR_MISSES[name]
    calls, reports = _run(model)
    assert not any(calls), calls
    assert reports.graphs and not any(reports.sites()), str(reports)
    for ex in reports.graphs:
        assert any(reason in r.reason for r in ex.refusals), (name, [r.reason for r in ex.refusals])
        assert "querys" not in str(ex), ex
