"""B * H over 65535: the Triton kernels put a program per (batch, head) on a CUDA grid axis (1 or 2)
that holds at most 65535, so their entry points refuse it with a ValueError naming the limit
(checked before any launch, on every device)."""
from __future__ import annotations

import pytest
import torch

from based_compile.kernels import chunked_based, check_arguments, fused_chunk, fused_chunk_based, parallel, \
    parallel_based
from based_compile.kernels.launch import MAX_GRID_ROWS, check_grid_rows

LIMIT = r"B \* H = 32768 \* 2 = 65536 is over 65535: the Triton kernels launch a program per \(batch, head\)"


def _over_the_limit():
    """B * H = 65536 with one position and one feature: small tensors."""
    return (torch.randn(32768, 2, 1, 1) for _ in range(3))


@pytest.mark.parametrize("fn", [parallel_based, fused_chunk_based, chunked_based], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_public_kernels_refuse_more_than_65535_rows(fn, kv_heads):
    q, k, v = _over_the_limit()
    with pytest.raises(ValueError, match=LIMIT):
        fn(q, k[:, :kv_heads], v[:, :kv_heads])


def test_kernel_contract_functions_refuse_it():
    q, k, v = _over_the_limit()
    args = check_arguments(q, k, v)
    for forward in (parallel.parallel_forward, fused_chunk.fused_chunk_forward):
        with pytest.raises(ValueError, match=LIMIT):
            forward(q, k, v, args)
    with pytest.raises(ValueError, match=LIMIT):
        parallel.parallel_backward(q, k, v, q, None, q, args)


def test_the_limit_itself():
    q, k, v = (torch.randn(1, 1, 1, 1) for _ in range(3))
    one = check_arguments(q, k, v)
    for batch, heads in ((MAX_GRID_ROWS, 1), (1, MAX_GRID_ROWS), (5, 13107)):        # 65535 = 5 * 13107
        check_grid_rows(type(one)(**{**one.__dict__, "batch": batch, "heads": heads, "kv_heads": 1}))
    with pytest.raises(ValueError, match="65536 is over 65535"):
        check_grid_rows(type(one)(**{**one.__dict__, "batch": 4096, "heads": 16, "kv_heads": 1}))


@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True])
def test_the_operator_on_cuda_takes_a_pytorch_form_over_the_limit(training):
    """On CUDA the operator's policy routes B * H > 65535 to the PyTorch form of the kernel it would pick:
    the call runs and matches float64 (values, and the gradients when training)."""
    from based_compile import BasedSpec, based_attention
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(32768, 2, 5, d, device="cuda", generator=g) for d in (4, 4, 3))
    if training:
        q.requires_grad_()
    spec = BasedSpec(scale=0.5)
    out = based_attention(q, k, v, spec)
    q64, k64, v64 = (x.detach().cpu().double() for x in (q, k, v))     # the reference: float64 on the CPU
    want = based_attention(q64, k64, v64, spec)
    assert (out.cpu().double() - want).abs().max() <= 1e-4 * want.abs().max()
    if training:
        q64.requires_grad_()
        (gq,) = torch.autograd.grad(out.sum(), q)
        (wq,) = torch.autograd.grad(based_attention(q64, k64, v64, spec).sum(), q64)
        assert (gq.cpu().double() - wq).abs().max() <= 1e-4 * wq.abs().max()
