"""torch.bmm on heads folded into the batch inside the compiled code: q, k and v projected, viewed as
[B, T, H, D], transposed and reshaped to [B*H, T, D] (a copy), the Taylor map and the two bmm's on the
folded tensors, the output viewed back. Before, the feature map's linear piece was traced through the
fold down to the [B, T, H*D] projection (not x: the view splits its feature axis), v through the fold to
its 4-D view, and the output to its 4-D view: the site was refused (a reviewer's case). Near misses: a
linear piece taken from another split of the projection than the outer product's."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import based_compile
from based_calls import BasedOpCounter
from compare import assert_rel_close

pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test

H, D, DV, WIDTH = 2, 4, 5, 12


def fold(x, b, t, d, inner_heads=False):
    if inner_heads:                         # features strided across heads: another split of the projection
        return x.view(b, t, d, H).permute(0, 3, 1, 2).reshape(b * H, t, d)
    return x.view(b, t, H, d).transpose(1, 2).reshape(b * H, t, d)


class Folded(nn.Module):
    def __init__(self, near_miss=False):
        super().__init__()
        self.near_miss = near_miss
        self.wq, self.wk, self.wv = nn.Linear(WIDTH, H * D), nn.Linear(WIDTH, H * D), nn.Linear(WIDTH, H * DV)

    def fm(self, x, y):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / math.sqrt(2)
        return torch.cat([x[..., :1] ** 0, y / D ** 0.25, x2 / math.sqrt(D)], dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        pq, pk = self.wq(x), self.wk(x)
        q, k, v = fold(pq, b, t, D), fold(pk, b, t, D), fold(self.wv(x), b, t, DV)
        yq, yk = (q, k)
        if self.near_miss:
            yq, yk = fold(pq, b, t, D, inner_heads=True), fold(pk, b, t, D, inner_heads=True)
        a = torch.bmm(self.fm(q, yq), self.fm(k, yk).transpose(1, 2)).tril()
        o = torch.bmm(a, v) / (a.sum(-1, keepdim=True) + 1e-6)
        return o.view(b, H, t, DV).transpose(1, 2).reshape(b, t, H * DV)


def _compare(model, inner="aot_eager"):
    model = model.double()
    compiled = torch.compile(model, backend=based_compile.backend(inner=inner))
    g = torch.Generator().manual_seed(0)
    calls = 0
    for t in (7, 11, 13):
        x = torch.randn(2, t, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)
        want = model(x)
        compiled(x)
        with BasedOpCounter() as counter:
            got = compiled(x)
        calls += counter.total
        assert_rel_close(got, want, 1e-10, f"T={t}")
        cot = torch.randn(want.shape, generator=g, dtype=torch.float64)
        params = [x, *model.parameters()]
        for a, b in zip(torch.autograd.grad(got, params, cot), torch.autograd.grad(want, params, cot)):
            assert_rel_close(a, b, 1e-10, f"T={t} gradient")
    return calls


@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_heads_folded_into_the_batch_in_the_graph_are_rewritten(inner):
    assert _compare(Folded(), inner) >= 3
    explanation = based_compile.explain(Folded().double(), torch.randn(2, 9, WIDTH, dtype=torch.float64))
    site, = explanation.sites
    assert site.spec.causal and "could not decide" not in site.kernel, site


def test_a_linear_piece_from_another_split_of_the_projection_is_refused():
    assert _compare(Folded(near_miss=True)) == 0
    explanation = based_compile.explain(Folded(near_miss=True).double(),
                                        torch.randn(2, 9, WIDTH, dtype=torch.float64))
    assert not explanation.sites and explanation.refusals, explanation
