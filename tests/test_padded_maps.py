"""Feature maps whose constant column is written with ``F.pad``: ``F.pad(x / d ** 0.25, (1, 0), value=1.0)`` beside
x (x) x, or the whole map padded, ``F.pad(torch.cat([x / d ** 0.25, x2], -1), (1, 0), value=c)``.

A constant pad of the last axis is the cat of its constant columns and x (``constant_pad.read_constant_pads``):
phi(q) . phi(k) gains c_q c_k per column, which is c0 (the cat form with ``ones * c`` was read already). These
were refused with untrue reasons ("f = 1*x^1 has no second-order term", "a token left out or shifted"). Near
misses, refused with the reason: q's map padded on the left and k's on the right (the ones column of q meets
x_0 of k: not a function of q.k), a replicate pad (x_0 again, not a constant), a pad of the time axis (a token
shifted). Every test runs with the probe off and compares values and gradients with eager on fresh inputs.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compiled_compare import compile_and_compare

B, H, DK, DV = 2, 3, 4, 5
QKV = [(B, H, "T", DK), (B, H, "T", DK), (B, H, "T", DV)]


pytestmark = pytest.mark.usefixtures("probe_off")     # conftest.py: as at real sizes, Dynamo reset


def phi(x, how, value):
    d = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)
    if how == "whole":
        return F.pad(torch.cat([x / d ** 0.25, x2], -1), (1, 0), value=value)
    if how == "column":
        return torch.cat([F.pad(x / d ** 0.25, (1, 0), value=value), x2], -1)
    if how == "end":
        return F.pad(torch.cat([x / d ** 0.25, x2], -1), (0, 1), value=value)
    if how == "both_sides":
        return F.pad(torch.cat([x / d ** 0.25, x2], -1), (1, 2), mode="constant", value=value)
    if how == "replicate":
        return F.pad(torch.cat([x / d ** 0.25, x2], -1), (1, 0, 0, 0), mode="replicate")
    if how == "features_first":       # built [B, H, F, T] (a pad of axis -2), transposed back into [B, H, T, F]
        return torch.cat([F.pad(x.mT / d ** 0.25, (0, 0, 1, 0), value=value), x2.mT], -2).mT
    raise ValueError(how)


class PaddedMap(nn.Module):
    def __init__(self, how_q, how_k=None, vq=1.0, vk=1.0, form="quadratic"):
        super().__init__()
        self.how_q, self.how_k, self.vq, self.vk, self.form = how_q, how_k or how_q, vq, vk, form

    def forward(self, q, k, v):
        qf, kf = phi(q, self.how_q, self.vq), phi(k, self.how_k, self.vk)
        t = q.shape[-2]
        if self.form == "shifted":        # phi(k) padded along time by one token, the last one dropped
            kf = F.pad(kf, (0, 0, 1, 0), value=1.0)[:, :, :-1]
        if self.form in ("quadratic", "shifted"):
            a = (qf @ kf.mT).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0)
            return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
        kv = (kf[..., :, None] * v[..., None, :]).cumsum(2)
        return (qf[..., :, None] * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("form", ["quadratic", "linear"])
@pytest.mark.parametrize("how,vq,vk", [("whole", 1.0, 1.0), ("column", 1.0, 1.0), ("end", 1.0, 1.0),
                                       ("both_sides", 1.0, 1.0), ("whole", 2.0, 0.5), ("column", 3.0, 3.0)])
def test_constant_pad_of_the_feature_axis_is_read_as_the_cat(how, vq, vk, form):
    rec = compile_and_compare(PaddedMap(how, vq=vq, vk=vk, form=form), QKV, (5, 9, 12))
    assert sum(rec.sites()) >= 1 and not any(r.refusals for r in rec.reports.graphs), rec.reports
    spec = rec.reports.graphs[0].sites[0].spec
    columns = {"both_sides": 3}.get(how, 1)          # each constant column adds vq * vk to c0
    assert math.isclose(spec.c0, columns * vq * vk), spec


def test_padded_map_under_dynamic_shapes():
    rec = compile_and_compare(PaddedMap("whole"), QKV, (5, 9, 12), dynamic=True)
    assert sum(rec.sites()) >= 1 and not any(r.refusals for r in rec.reports.graphs), rec.reports


NEAR = {
    "sides_differ": (dict(how_q="whole", how_k="end"), "feature_map", ["different feature maps"]),
    "replicate": (dict(how_q="replicate"), "feature_map", ["goes through replication_pad"]),
    "time_shift": (dict(how_q="whole", form="shifted"), "feature_map", ["goes through constant_pad_nd, slice"]),
    # not read (red team: refused as "f = 1*x^1 has no second-order term")
    "features_first": (dict(how_q="features_first"), "feature_map", ["joins the pieces along axis -2",
                                                                     "features first"]),
}


@pytest.mark.parametrize("name", list(NEAR))
def test_near_misses_are_refused_with_the_reason(name):
    kwargs, category, words = NEAR[name]
    rec = compile_and_compare(PaddedMap(**kwargs), QKV, (5, 9))
    assert sum(rec.sites()) == 0, rec.reports
    refusals = [r for report in rec.reports.graphs for r in report.refusals]
    assert refusals, rec.reports
    reasons = " | ".join(r.reason for r in refusals)
    assert "(x = q.k) has no second-order term" not in reasons, rec.reports     # the untrue reason of old
    if category is not None:
        assert category in [r.category for r in refusals], rec.reports
    for word in words:
        assert word in reasons, rec.reports
