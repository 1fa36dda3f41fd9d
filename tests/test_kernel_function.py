"""The kernels' public functions under ``create_graph=True``: exact first-order gradients, and a loss
that differentiates them again raises instead of silently treating them as constants."""
from __future__ import annotations

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile.kernels import chunked_based, fused_chunk_based, naive_parallel_based, parallel_based


@pytest.mark.parametrize("fn", [parallel_based, fused_chunk_based, chunked_based], ids=lambda f: f.__name__)
def test_create_graph_gives_first_order_grads_and_refuses_the_second(fn):
    q, k, v = make_inputs(1, 2, 40, 8, 16, dtype=torch.float32, requires_grad=True)
    grads = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v), create_graph=True)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(naive_parallel_based(*leaves).square().sum(), leaves)
    for name, g, r in zip("qkv", grads, ref):
        assert_rel_close(g, r, 2e-5, f"d{name}")
    # a second-order term beside a first-order one: without the refusal, the dq term would drop out
    loss = grads[0].square().sum() + q.sum()
    with pytest.raises(RuntimeError, match="no double backward"):
        loss.backward()


@pytest.mark.parametrize("requires_grad", ["q", "k", "v"])
@pytest.mark.parametrize("fn", [parallel_based, fused_chunk_based, chunked_based], ids=lambda f: f.__name__)
def test_create_graph_of_a_loss_linear_in_o_refuses_the_second(fn, requires_grad):
    """For a loss linear in o the incoming gradient does not require grad, but the gradients still
    depend on q, k and v: they must not come back as constants."""
    q, k, v = make_inputs(1, 2, 9, 4, 4, dtype=torch.float32)
    x = dict(zip("qkv", (q, k, v)))[requires_grad].requires_grad_()
    g, = torch.autograd.grad(fn(q, k, v).sum(), x, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match=f"{fn.__name__.removesuffix('_based')}_backward is not differentiable: "
                                           "Based attention has no double backward"):
        (g.square().sum() + x.sum()).backward()


def test_gradients_without_create_graph_are_plain():
    q, k, v = make_inputs(1, 2, 9, 4, 4, dtype=torch.float32, requires_grad=True)
    grads = torch.autograd.grad(parallel_based(q, k, v).sum(), (q, k, v))
    assert not any(g.requires_grad for g in grads)
