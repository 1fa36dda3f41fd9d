"""q, k or v produced by a higher-order operator: a custom ``torch.autograd.Function`` (a fused rotary
embedding or RMSNorm, as flash-attn, fla, Liger and Apex write them) or ``torch.cond``. Dynamo records the
operator as one node whose value is a tuple and q as its ``getitem``. The getitem joined the attention region
and the tuple became the region's input: the lowered q mapped to the tuple-valued node, and the rewrite
raised (BackendCompilerFailed: 'tuple' object has no attribute 'device' for q, 'k must be a torch.Tensor,
got tuple' for k or v), in torch.compile and in explain(). Now an element of what a node outside the region
returns is a tensor input of the region: these models are rewritten, exact in values and gradients.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import based_compile
from compiled_compare import compile_and_compare

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SHAPES = [(2, 3, "T", 8)] * 3


class RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        x1, x2 = x.chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        g1, g2 = g.chunk(2, -1)
        return torch.cat([g1 * cos + g2 * sin, g2 * cos - g1 * sin], -1), None, None


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        ctx.save_for_backward(x, r)
        return x * r

    @staticmethod
    def backward(ctx, g):
        x, r = ctx.saved_tensors
        return r * (g - x * r * r * (g * x).mean(-1, keepdim=True))


def based(q, k, v, *, weights_fn=None):
    t = q.shape[-2]
    s = q @ k.mT / q.shape[-1] ** 0.5
    a = (1 + s + 0.5 * s * s).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
    if weights_fn is not None:
        a = weights_fn(a)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Attn(nn.Module):
    def __init__(self, op, where):
        super().__init__()
        self.op, self.where = op, where

    def apply(self, x):
        if self.op == "rotary":
            t, d = x.shape[-2], x.shape[-1]
            pos = torch.arange(t, dtype=x.dtype)[:, None] * 10000 ** (-torch.arange(d // 2, dtype=x.dtype) / (d // 2))
            return RotaryFn.apply(x, pos.cos(), pos.sin())
        if self.op == "rmsnorm":
            return RMSNormFn.apply(x)
        return torch.cond(x.sum() > 1e9, lambda y: y * 2, lambda y: y * 1.0, (x,))

    def forward(self, q, k, v):
        q = self.apply(q) if "q" in self.where else q
        k = self.apply(k) if "k" in self.where else k
        v = self.apply(v) if "v" in self.where else v
        return based(q, k, v)


@pytest.mark.parametrize("op,where", [("rotary", "q"), ("rotary", "k"), ("rotary", "qk"), ("rmsnorm", "v"),
                                      ("rmsnorm", "qkv"), ("cond", "q")])
def test_operands_of_higher_order_ops_rewritten(op, where):
    recorder = compile_and_compare(Attn(op, where), SHAPES, (5, 9))
    assert recorder.sites()[0] == 1, recorder.sites()


def test_explain_reports_the_site():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    ex = based_compile.explain(Attn("rotary", "qk"), q, k, v)
    assert len(ex.sites) == 1 and not ex.refusals, ex


class WeightsFn(torch.autograd.Function):
    """An opaque function of the weights: not a Based site (the pass cannot see what it computes)."""
    @staticmethod
    def forward(ctx, a):
        return a * 1.0

    @staticmethod
    def backward(ctx, g):
        return g


class OnWeights(nn.Module):
    def forward(self, q, k, v):
        return based(RotaryFn.apply(q, *_trig(q)), k, v, weights_fn=WeightsFn.apply)


def _trig(x):
    t, d = x.shape[-2], x.shape[-1]
    pos = torch.arange(t, dtype=x.dtype)[:, None] * 10000 ** (-torch.arange(d // 2, dtype=x.dtype) / (d // 2))
    return pos.cos(), pos.sin()


def test_function_on_the_weights_not_rewritten():
    """Near miss: the autograd.Function sits between the weights and their readers: left as written, exact."""
    recorder = compile_and_compare(OnWeights(), SHAPES, (5, 9))
    assert sum(recorder.sites()) == 0, recorder.sites()
