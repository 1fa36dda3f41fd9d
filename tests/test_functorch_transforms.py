"""Attention Dynamo traces inside a functorch transform (``torch.vmap(attn)``, ``torch.func.grad``): its tensors
are the transform's (vmap's batched tensors of one example's shape), which the pass cannot lower or evaluate
outside the transform. The pass failed on such a graph with an internal error and a warning; it now leaves
the attention as written with a refusal explain() shows, no warning. Attention outside the transform in the
same graph is still rewritten. Values and gradients compiled vs eager in float64 on fresh random inputs.
"""
from __future__ import annotations

import logging

import pytest
import torch

from compiled_compare import compile_and_compare

QKV = ((2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5))
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def attend(q, k, v):
    t = q.shape[-2]
    s = q @ k.transpose(-1, -2) * 0.35
    a = (1 + s + 0.5 * s * s) * torch.ones(t, t, dtype=q.dtype).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Transformed(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        if self.how == "vmap":
            return torch.vmap(torch.vmap(attend))(q, k, v)
        if self.how == "vmap_heads":                    # over the heads of each batch entry
            return torch.vmap(attend, in_dims=1, out_dims=1)(q, k, v)
        if self.how == "vmap_beside":                   # a vmapped map of q, the attention outside it
            return attend(torch.vmap(lambda x: x * x.sum())(q), k, v)
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["vmap", "vmap_heads"])
def test_attention_under_vmap_is_refused_cleanly(how, caplog):
    with caplog.at_level(logging.WARNING, logger="based_compile"):
        recorder = compile_and_compare(Transformed(how), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    for ex in recorder.reports.graphs:
        assert not ex.sites and len(ex.refusals) == 1, ex
        reason = ex.refusals[0].reason
        assert "inside torch.vmap" in reason and "internal error" not in reason, reason


def test_attention_beside_a_vmap_is_rewritten():
    recorder = compile_and_compare(Transformed("vmap_beside"), QKV, (5, 9, 13), count=True)
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex


def test_attention_under_func_grad_is_refused_cleanly(caplog):
    def loss(q, k, v):
        return (attend(q, k, v) ** 2).sum()

    def fn(q, k, v):
        return torch.func.grad(loss)(q, k, v)

    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 7, d, generator=g, dtype=torch.float64) for d in (4, 4, 5))
    import based_compile
    with caplog.at_level(logging.WARNING, logger="based_compile"):
        ex = based_compile.explain(fn, q, k, v)
        torch._dynamo.reset()
        out = torch.compile(fn, backend="based")(q, k, v)
    ref = fn(q, k, v)
    assert (out - ref).norm() <= 1e-12 * ref.norm(), ((out - ref).abs().max(), ref.abs().max())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not ex.sites and len(ex.refusals) == 1, ex
    assert "torch.func transform" in ex.refusals[0].reason, ex.refusals
