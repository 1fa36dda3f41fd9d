"""Weights divided by their 1-norm over the keys: ``F.normalize(a, p=1, dim=-1)``, ``torch.linalg.vector_norm(a,
ord=1)``, ``a.norm(p=1)``, ``a.abs().sum(-1)``, and row sums clamped from below (``clamp_min``).

F.normalize(a, p=1) is a / max(sum_j |a_ij|, eps). For a polynomial P that is never negative on the real line
(Based's 1 + s + s^2/2 >= 1/2) and masks that fill zeros, |a| = a; every row the operator's masks leave keeps at
least one entry (the diagonal, or the last Tk - Tq + i + 1 keys), so the row sums are at least P's least value
m, and a clamp at eps <= m never binds: the function is a / sum_j a_ij, the operator's normalised output with
eps = 0, and it is rewritten. It was left unrewritten with no report at all (0 sites, 0 refusals: F.normalize
stayed out of the region, as a "norm"). Near misses, refused with the reason: a polynomial that takes negative
values (|a| is not a), a clamp above m (F.normalize(eps=5), clamp_min(1.0): it binds on rows of small weights),
the norm over the query axis; p=2 is reported by test_lookalike.py. Every test runs with the probe off (as at
real sizes) and compares values and gradients with eager on fresh inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import based_compile
from compiled_compare import compile_and_compare

B, H, DK, DV = 2, 3, 4, 5
QKV = [(B, H, "T", DK), (B, H, "T", DK), (B, H, "T", DV)]


pytestmark = pytest.mark.usefixtures("probe_off")     # conftest.py: as at real sizes, Dynamo reset


def _phi(x):
    d = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25,
                      (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)], -1)


def _weights(q, k, c1=1.0, causal=True):
    s = q @ k.mT * DK ** -0.5
    a = 1 + c1 * s + 0.5 * s * s
    if not causal:
        return a
    tq, tk = q.shape[-2], k.shape[-2]
    return a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0)


class OneNorm(nn.Module):
    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        w = self.spelling
        if w == "feature_map":
            t = q.shape[-2]
            a = (_phi(q) @ _phi(k).mT).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0)
            return F.normalize(a, p=1, dim=-1) @ v
        a = _weights(q, k, c1=2.0 if w.startswith("negative") else 1.0, causal=w != "noncausal")
        if w in ("normalize", "noncausal", "kv_cache", "negative_normalize"):
            return F.normalize(a, p=1, dim=-1) @ v
        if w == "normalize_dim3":
            return F.normalize(a, 1.0, 3) @ v
        if w == "vector_norm":
            return (a @ v) / torch.linalg.vector_norm(a, ord=1, dim=-1, keepdim=True)
        if w == "tensor_norm":
            return (a / a.norm(p=1, dim=-1, keepdim=True)) @ v
        if w == "abs_sum":
            return (a / a.abs().sum(-1, keepdim=True)) @ v
        if w == "clamp_min":
            return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)
        if w == "clamp_min_eps":
            return (a @ v) / (a.sum(-1, keepdim=True) + 0.25).clamp(min=0.7)
        # near misses
        if w == "eps_above":
            return F.normalize(a, p=1, dim=-1, eps=5.0) @ v
        if w == "clamp_above":
            return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1.0)
        if w == "negative_abs_sum":
            return (a / a.abs().sum(-1, keepdim=True)) @ v
        if w == "query_axis":
            return F.normalize(a, p=1, dim=-2) @ v
        if w == "keys_first":         # non-causal k @ q.mT summed over its rows (the keys), transposed after
            return F.normalize(1 + (k @ q.mT / 2) + 0.5 * (k @ q.mT / 2) ** 2, p=1, dim=-2).mT @ v
        if w == "both_axes":
            return F.normalize(a, p=1, dim=(-1, -2)) @ v
        raise ValueError(w)


ACCEPTED = ["normalize", "normalize_dim3", "noncausal", "vector_norm", "tensor_norm", "abs_sum", "clamp_min",
            "clamp_min_eps", "feature_map"]


@pytest.mark.parametrize("dynamic", [None, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("spelling", ACCEPTED)
def test_one_norm_of_weights_that_are_never_negative_is_rewritten(spelling, dynamic):
    rec = compile_and_compare(OneNorm(spelling), QKV, (5, 9, 12), dynamic=dynamic)
    assert sum(rec.sites()) >= 1, rec.reports
    assert not any(r.refusals for r in rec.reports.graphs), rec.reports
    site = rec.reports.graphs[0].sites[0]
    assert site.spec.normalize and site.spec.eps == (0.25 if spelling == "clamp_min_eps" else 0.0), site


def test_one_norm_against_a_kv_cache_is_rewritten():
    rec = compile_and_compare(OneNorm("kv_cache"), [(B, H, 3, DK), (B, H, "T", DK), (B, H, "T", DV)], (5, 9))
    assert sum(rec.sites()) >= 1 and not any(r.refusals for r in rec.reports.graphs), rec.reports


def test_one_norm_in_float32():
    model = OneNorm("normalize")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, 11, d, generator=g) for d in (DK, DK, DV))
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    torch.testing.assert_close(compiled(q, k, v), model(q, k, v), rtol=1e-5, atol=1e-6)


NEAR = {
    "eps_above": ["clamped from below", "min 5", "above their least value 0.5"],
    "clamp_above": ["clamped from below", "min 1", "above their least value 0.5"],
    "negative_normalize": ["sums of their absolute values", "takes negative values"],
    "negative_abs_sum": ["sums of their absolute values", "takes negative values"],
    "query_axis": ["sums the weights over the scores' rows", "of q @ k.mT: over the queries"],
    "keys_first": ["sums the weights over the scores' rows", "of k @ q.mT transposed after the normaliser: over "
                   "the keys, a layout the pass does not read"],
    "both_axes": ["over the key axis and other axes"],
}


@pytest.mark.parametrize("spelling", list(NEAR))
def test_near_misses_are_refused_with_the_reason(spelling):
    rec = compile_and_compare(OneNorm(spelling), QKV, (5, 9))
    assert sum(rec.sites()) == 0, rec.reports
    refusals = [r for report in rec.reports.graphs for r in report.refusals]
    assert refusals and all(r.category == "normaliser" for r in refusals), rec.reports
    reasons = " | ".join(r.reason for r in refusals)
    for words in NEAR[spelling]:
        assert words in reasons, rec.reports


def test_explain_says_the_site_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 7, d, generator=g, dtype=torch.float64) for d in (DK, DK, DV))
    ex = based_compile.explain(OneNorm("normalize"), q, k, v)
    assert len(ex.sites) == 1 and not ex.refusals, ex
    assert "normalised (eps=0)" in ex.sites[0].spec_text and "causal" in ex.sites[0].spec_text, ex


class LearnableCoefficient(nn.Module):
    """1 + s + c2 s^2 with c2 an nn.Parameter: the operator takes constant coefficients."""

    def __init__(self, normaliser):
        super().__init__()
        self.c2 = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.normaliser = normaliser

    def forward(self, q, k, v):
        s = q @ k.mT * DK ** -0.5
        t = q.shape[-2]
        a = (1 + s + self.c2 * s * s).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0)
        if self.normaliser == "normalize":
            return F.normalize(a, p=1, dim=-1) @ v
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("normaliser", ["normalize", "row_sum"])
def test_a_learnable_coefficient_is_refused_as_one(normaliser):
    """Was 'the chain goes through clamp_min ... which no reader reads' (F.normalize) or 'could not read it'
    (red team): the reason names the learnable coefficient."""
    rec = compile_and_compare(LearnableCoefficient(normaliser), QKV, (5, 9))
    assert sum(rec.sites()) == 0, rec.reports
    reasons = " | ".join(r.reason for ex in rec.reports.graphs for r in ex.refusals)
    assert "a learnable coefficient, an nn.Parameter" in reasons and "clamp_min" not in reasons.split("(chain")[0], \
        rec.reports
