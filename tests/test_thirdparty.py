"""Based attention written the way third-party research code writes it (issue 13).

Small modules in the styles of public Based / Taylor linear-attention repositories (a
``TaylorExp`` feature-map module, q/k/v projections viewed into heads, norms and learnable
weights before the feature map, ...). Each accepted form is compiled with backend="based"
(inner="aot_eager") and must match eager in float64 (output and every gradient, 1e-10) at two
lengths and run the ``based`` operator; each near-miss must be refused with the reason named.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from based_calls import BasedOpCounter
from compare import assert_rel_close

import based_compile

D_MODEL, H, FD, HD = 16, 2, 4, 5


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TaylorExp(nn.Module):
    """phi(x) = [1, x / d^1/4, (x (x) x) / (sqrt(2) sqrt(d))], the common module spelling."""

    def __init__(self, input_dim):
        super().__init__()
        self.r2 = math.sqrt(2)
        self.rd = math.sqrt(input_dim)
        self.rrd = math.sqrt(self.rd)

    def forward(self, x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / self.r2
        return torch.cat([x[..., :1] ** 0, x / self.rrd, x2 / self.rd], dim=-1)


class MixedTaylorExp(TaylorExp):
    """Near-miss: the outer product pairs x with another tensor y (not x (x) x)."""

    def forward(self, x, y):
        x2 = (x.unsqueeze(-1) * y.unsqueeze(-2)).flatten(start_dim=-2) / self.r2
        return torch.cat([x[..., :1] ** 0, x / self.rrd, x2 / self.rd], dim=-1)


class NormedBased(nn.Module):
    """Short causal conv, then q through an RMSNorm with a learnable weight and k through
    F.normalize (or a learnable per-channel weight on both), each before the feature map."""

    def __init__(self, style: str):
        super().__init__()
        self.style = style
        self.conv = nn.Conv1d(D_MODEL, D_MODEL, kernel_size=3, groups=D_MODEL, padding=2)
        self.q_proj = nn.Linear(D_MODEL, H * FD)
        self.k_proj = nn.Linear(D_MODEL, H * FD)
        self.v_proj = nn.Linear(D_MODEL, H * HD)
        self.norm_weight = nn.Parameter(torch.rand(FD) + 0.5)
        self.feature_map = TaylorExp(FD)
        self.mixed_map = MixedTaylorExp(FD)
        self.register_buffer("eps", torch.tensor(1e-6))

    def rms(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.norm_weight

    def forward(self, x):
        b, t, _ = x.shape
        x = self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)
        q = self.q_proj(x).view(b, t, H, FD)                  # the norms act per head, before the transpose
        k = self.k_proj(x).view(b, t, H, FD)
        v = self.v_proj(x).view(b, t, H, HD).transpose(1, 2)
        if self.style == "rmsnorm_q_normalize_k":
            q, k = self.rms(q), F.normalize(k, dim=-1)
        elif self.style in ("weight_both", "near_outer_x_weighted_x"):
            q, k = q * self.norm_weight, k * self.norm_weight
        else:
            raise ValueError(self.style)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if self.style == "near_outer_x_weighted_x":
            qf, kf = self.mixed_map(q, q * self.norm_weight), self.mixed_map(k, k * self.norm_weight)
        else:
            qf, kf = self.feature_map(q), self.feature_map(k)
        a = torch.tril(torch.matmul(qf, kf.transpose(-2, -1)))
        y = a @ v
        z = torch.reciprocal(a.sum(-1, keepdim=True) + self.eps)
        return (y * z).to(x.dtype).transpose(1, 2).reshape(b, t, -1)


def _inputs(t, seed, dtype=torch.float64):
    return torch.randn(2, t, D_MODEL, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _forward_backward(module, x, seed):
    x = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(x)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, [x] + params, cot)


def _check_against_eager(module, rewritten: bool, lengths=(12, 17)):
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    for i, t in enumerate(lengths):
        x = _inputs(t, 10 + i)
        out_c, grads_c = _forward_backward(compiled, x, seed=i)
        out_e, grads_e = _forward_backward(module, x, seed=i)
        assert_rel_close(out_c, out_e, 1e-10, f"T={t}: output")
        names = ["x"] + [n for n, p in module.named_parameters() if p.requires_grad]
        for name, gc, ge in zip(names, grads_c, grads_e):
            assert_rel_close(gc, ge, 1e-10, f"T={t}: gradient of {name}")
        with BasedOpCounter() as counter:
            compiled(x)
        assert (counter.total > 0) == rewritten, f"T={t}: based calls {dict(counter.calls)}"


@pytest.mark.parametrize("style", ["rmsnorm_q_normalize_k", "weight_both"])
def test_norm_or_weight_before_the_feature_map_is_rewritten(style):
    """q * rsqrt(mean(q^2)) * w and q * w (a tensor, not a scalar) before the map were read as a product
    of two different tensors inside the map: 'only one of q and k goes through a feature map'."""
    torch.manual_seed(0)
    module = NormedBased(style).double()
    explanation = based_compile.explain(module, _inputs(12, 0))
    assert len(explanation.sites) == 1, str(explanation)
    _check_against_eager(module, rewritten=True)


def test_outer_product_of_x_with_a_weighted_x_is_refused():
    """Near-miss of weight_both: x (x) (w * x) is not a function of q.k."""
    torch.manual_seed(0)
    module = NormedBased("near_outer_x_weighted_x").double()
    explanation = based_compile.explain(module, _inputs(12, 0))
    assert not explanation.sites and explanation.refusals, str(explanation)
    _check_against_eager(module, rewritten=False)
