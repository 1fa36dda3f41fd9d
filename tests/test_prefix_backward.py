"""The prefix-state backward (kernels/prefix_backward.py) against float64 autograd, launch by launch.

Under the interpreter with state chunks of 32 tokens and 16-token tiles (T spans several chunks,
segments forced by `target`); every buffer starts as NaN. `-m gpu`: realistic shapes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile.kernels import naive_parallel_based, prefix_backward, prefix_chunked
from based_compile.kernels.arguments import check_arguments

SMALL = prefix_chunked.PrefixConfig(c=32, bt=16, bs=16, bts=16, bv=64, target=1)
SIGNED = (0.3, -0.7, 0.25)
TOL = {torch.float32: 2e-5, torch.float16: 1.2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(prefix_chunked, "POISON_OUTPUTS", True)
    monkeypatch.setattr(prefix_backward, "POISON_OUTPUTS", True)


def _check(b, h, t, dk, dv, cfg, *, kv_heads=None, layout="BHTD", causal=True, normalize=True,
           coeffs=(1.0, 1.0, 0.5), dtype=torch.float32, device="cpu", tol=None):
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=kv_heads, layout=layout, device=device)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kw = dict(coeffs=coeffs, causal=causal, normalize=normalize, layout=layout)
    args = check_arguments(q, k, v, **kw)
    o, z = prefix_chunked.prefix_forward(q, k, v, args, cfg)
    do = torch.randn_like(o)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*leaves, **kw)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    grads = prefix_backward.prefix_backward(q, k, v, o, z, do, args, cfg)
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize} {cfg}"
    for name, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_rel_close(g, r, TOL[dtype] if tol is None else tol, f"d{name} ({what})")


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,changes", [
    (77, 16, 64, None, "BHTD", True, True, {}),
    (77, 16, 64, 1, "BTHD", True, True, dict(target=100)),                 # segments: reverse scan
    (50, 8, 24, 2, "BHTD", True, True, dict(target=100)),                  # GQA group 2
    (45, 16, 40, None, "BTHD", False, True, {}),                           # non-causal
    (45, 16, 32, None, "BHTD", True, False, dict(target=100)),             # unnormalised, signed f
    (70, 32, 32, None, "BTHD", True, True, dict(target=100)),              # Dk = 32
    (33, 5, 33, 1, "BHTD", True, True, dict(c=64, bt=32, bts=32)),         # key tiles of 32, query steps of 16
    (1, 1, 3, None, "BHTD", True, False, {}),    # one token: normalised, dq and dk would be 0
    # the state kernels' features formed as [keys, rows] (transposed in the dot: Dv > 64, and the launch before)
    (77, 16, 64, 1, "BTHD", True, True, dict(reverse_trans=False, target=100)),
    (50, 8, 24, 2, "BHTD", True, True, dict(reverse_trans=False, state_trans=False)),
    (45, 16, 40, None, "BTHD", False, True, dict(reverse_trans=False)),
    (45, 16, 32, None, "BHTD", True, False, dict(reverse_trans=False, target=100)),
    (70, 32, 32, None, "BTHD", True, True, dict(reverse_trans=False)),
])
def test_gradients_match_float64(t, dk, dv, kv_heads, layout, causal, normalize, changes):
    _check(1, 4 if kv_heads else 2, t, dk, dv, dataclasses.replace(SMALL, **changes), kv_heads=kv_heads,
           layout=layout, causal=causal, normalize=normalize, coeffs=(1.0, 1.0, 0.5) if normalize else SIGNED)


@pytest.mark.parametrize("dtype,dv,error", [(torch.float16, 64, TypeError), (torch.float32, 129, ValueError)])
def test_refuses_what_it_does_not_take(dtype, dv, error):
    q, k, v = (x.to(dtype) for x in make_inputs(1, 2, 40, 16, dv))
    args = check_arguments(q, k, v)
    o, z = prefix_chunked.prefix_forward(q, k, v, args, SMALL)
    with pytest.raises(error, match="float16" if dtype == torch.float16 else "Dv up to 128"):
        prefix_backward.prefix_backward(q, k, v, o, z, torch.randn_like(o), args, SMALL)
    assert not prefix_backward.supports(args, dtype)


@pytest.mark.parametrize("dtype,dv,prefix", [(torch.float32, 64, True), (torch.float32, 128, True),
                                             (torch.float16, 64, False), (torch.float32, 130, False)])
def test_chunked_based_routes_its_backward(monkeypatch, dtype, dv, prefix):
    """chunked_based's backward is the prefix-state one where it applies, else the segment walk; both exact."""
    from based_compile.kernels import chunked
    calls = []
    real = chunked.prefix_backward
    monkeypatch.setattr(chunked, "prefix_backward", lambda *a: calls.append(1) or real(*a))
    q, k, v = (x.to(dtype).requires_grad_() for x in make_inputs(1, 2, 50, 8, dv))
    do = torch.randn(1, 2, 50, dv, dtype=dtype)
    grads = torch.autograd.grad(chunked.chunked_based(q, k, v), (q, k, v), do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torch.autograd.grad(naive_parallel_based(*leaves), leaves, do.double())
    for name, g, r in zip("qkv", grads, ref):
        assert_rel_close(g, r, TOL[dtype], f"d{name}")
    assert bool(calls) == prefix


GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.gpu
@pytest.mark.parametrize("t,dk,dv,dtype,layout,kv_heads,causal,changes", [
    (8192, 16, 64, torch.bfloat16, "BHTD", None, True, {}),
    (8191, 16, 64, torch.bfloat16, "BTHD", None, False, {}),
    (4097, 16, 128, torch.bfloat16, "BTHD", 2, True, {}),
    (4096, 16, 64, torch.bfloat16, "BTHD", None, True, dict(target=4096)),         # segments
    (2047, 16, 64, torch.float32, "BHTD", None, True, {}),
    (2048, 32, 64, torch.bfloat16, "BHTD", 2, True, {}),
    (8192, 16, 64, torch.bfloat16, "BHTD", None, True, dict(state_trans=False, reverse_trans=False)),
    (4097, 16, 128, torch.bfloat16, "BTHD", 2, False, dict(reverse_trans=False)),     # as prefix_config at Dv > 64
    (2047, 16, 64, torch.float32, "BHTD", None, True, dict(state_trans=False, reverse_trans=False)),
])
def test_gpu_realistic_shapes(t, dk, dv, dtype, layout, kv_heads, causal, changes, no_tf32):
    q, k, v = (x.to(dtype) for x in make_inputs(2, 4, t, dk, dv, kv_heads=kv_heads, layout=layout, device="cuda"))
    cfg = dataclasses.replace(prefix_chunked.PrefixConfig(), **changes)
    _check(2, 4, t, dk, dv, cfg, kv_heads=kv_heads, layout=layout, causal=causal, dtype=dtype, device="cuda",
           tol=GPU_TOL[dtype])
