"""The weights raised to the power 0 or 1: ``s ** 0`` is 1 everywhere (``pow(x, 0)`` is 1 for every x, nan and inf
included) and ``s ** 1`` is s, so a Taylor sum written as a loop, ``sum(s ** i / math.factorial(i) for i in
range(3))``, is read as the exact polynomial 1 + s + s^2 / 2 (it was refused: 'weights raised to the power 0').
A mask before the power is a mask before the polynomial: what it zeroed becomes 1 (0 ** 0), and the site is
refused unless a mask after it hides those entries again. Values and gradients compiled vs eager in float64 on
fresh random inputs, the numerical probe off.
"""
from __future__ import annotations

import math

import pytest
import torch

from compiled_compare import compile_and_compare
from based_compile.graph import verify

QKV = ((2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5))
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def probe_off(monkeypatch):
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)


class Powers(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = q @ k.mT * 0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        if self.how == "loop":
            a = sum(s ** i / math.factorial(i) for i in range(3)).tril()
        elif self.how == "torch_pow":
            a = (torch.pow(s, 0) + torch.pow(s, 1) + torch.pow(s, 2) * 0.5).tril()
        elif self.how == "float_exponents":
            a = (s ** 0.0 + s ** 1.0 + s ** 2.0 / 2).tril()
        elif self.how == "masked_before_and_after":      # zeroed entries become 1, the mask after hides them
            m = s.masked_fill(~causal, 0)
            a = (m ** 0 + m + m ** 2 / 2).masked_fill(~causal, 0)
        # near misses
        elif self.how == "masked_before":                # the masked entries are 1 + 0 + 0: not hidden
            m = s.masked_fill(~causal, 0)
            a = m ** 0 + m + m ** 2 / 2
        elif self.how == "negative":
            a = (s ** 0 + s + s ** -1).tril()
        elif self.how == "cubic":
            a = sum(s ** i / math.factorial(i) for i in range(4)).tril()
        else:
            raise ValueError(self.how)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("how", ["loop", "torch_pow", "float_exponents", "masked_before_and_after"])
@pytest.mark.parametrize("dynamic", [None, False])
def test_powers_zero_and_one_are_read(how, dynamic):
    recorder = compile_and_compare(Powers(how), QKV, (5, 9, 13), dynamic=dynamic, count=True)
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        spec = ex.sites[0].spec
        assert spec.causal and (spec.c0, spec.c1, spec.c2) == pytest.approx((1.0, 1.0, 0.5)) and spec.scale == 0.5, spec


@pytest.mark.parametrize("how,category,words", [
    ("masked_before", "mask", "before the polynomial"),
    ("negative", "polynomial", "power -1"),
    ("cubic", "polynomial", "degree 3"),
])
def test_power_near_misses_are_refused(how, category, words):
    recorder = compile_and_compare(Powers(how), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    refusals = [r for ex in recorder.reports.graphs for r in ex.refusals]
    assert refusals and all(r.category == category and words in r.reason for r in refusals), refusals
