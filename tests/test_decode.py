"""The Triton decode kernel (kernels/decode.py): a few queries against a long KV cache, split over programs.

Reference: the float64 quadratic form with the end-aligned mask (naive_parallel_based takes Tq <= Tk).
Every buffer the kernel allocates starts as NaN (POISON_OUTPUTS). CPU runs go through Triton's
interpreter at small shapes (the split count is planned for 4 multiprocessors there, so caches of
a few tiles are split); `-m gpu` runs decode shapes, through the operator and torch.compile too.
"""
from __future__ import annotations

import pytest
import torch

from based_compile.kernels import decode
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.naive import naive_parallel_based
from compare import assert_rel_close
from conftest import make_inputs

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(decode, "POISON_OUTPUTS", True)


def _check(b, h, tq, tk, dk, dv, *, kv_heads=None, layout="BHTD", causal=True, normalize=True,
           coeffs=(1.0, 1.0, 0.5), scale=None, dtype=torch.float32, device="cpu", seed=0):
    q, _, _ = make_inputs(b, h, tq, dk, dv, layout=layout, seed=seed)
    _, k, v = make_inputs(b, h, tk, dk, dv, kv_heads=kv_heads, layout=layout, seed=seed + 1)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kw = dict(scale=scale, coeffs=coeffs, causal=causal, normalize=normalize, eps=1e-3, layout=layout)
    ref = naive_parallel_based(q.double(), k.double(), v.double(), **kw)
    args = check_arguments(q, k, v, shorter_queries=True, **kw)
    qd, kd, vd = (x.to(device) for x in (q, k, v))
    o, z = decode.decode_forward(qd, kd, vd, args)
    what = f"B={b} H={h} Hkv={kv_heads} Tq={tq} Tk={tk} Dk={dk} Dv={dv} {layout} causal={causal} {dtype}"
    assert o.shape == ref.shape and o.dtype == dtype, what
    assert_rel_close(o, ref, TOL[dtype], f"o ({what})")
    if normalize:
        ones = torch.ones_like(v[..., :1]).double()
        zref = naive_parallel_based(q.double(), k.double(), ones, **{**kw, "normalize": False})
        zref = zref.squeeze(-1) if layout == "BHTD" else zref.squeeze(-1).transpose(1, 2)
        assert z.shape == (b, h, tq) and z.dtype == torch.float32
        assert_rel_close(z, zref, TOL[dtype], f"z ({what})")
    else:
        assert z is None
    return o


@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
@pytest.mark.parametrize("tq,tk,kv_heads", [(1, 200, None), (3, 200, 2), (1, 5, None), (4, 70, 1)])
def test_decode_against_float64(layout, tq, tk, kv_heads):
    _check(2, 4, tq, tk, 4, 5, kv_heads=kv_heads, layout=layout)


@pytest.mark.parametrize("causal,normalize", [(False, True), (True, False)])
def test_decode_variants(causal, normalize):
    _check(1, 2, 2, 150, 3, 20, causal=causal, normalize=normalize, coeffs=(0.3, -0.7, 0.25), scale=0.8)


def test_decode_value_blocks():
    _check(1, 2, 2, 70, 4, 130, kv_heads=1)          # Dv = 130: two blocks of value columns, z from the first


def test_decode_float16_and_wide_rows():
    _check(1, 8, 10, 90, 4, 6, kv_heads=1, dtype=torch.float16)          # G * Tq = 80 rows: two row blocks


def test_split_plan():
    assert decode.plan_splits(16, 1024, 132) == (16, 64)          # B=1, H=16: one tile per split
    s, keys = decode.plan_splits(256, 65536, 132)                  # B=16: a few splits of whole tiles
    assert s == 3 and keys % decode.BLOCK_N == 0 and s * keys >= 65536 > (s - 1) * keys
    assert decode.plan_splits(8, 10, 4) == (1, 64)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,tq,tk", [(1, 1, 8192), (16, 1, 4096), (2, 4, 3000), (1, 16, 1000)])
def test_gpu_decode_shapes(dtype, b, tq, tk):
    _check(b, 16, tq, tk, 16, 64, dtype=dtype, device="cuda")


@pytest.mark.gpu
def test_gpu_decode_gqa_layouts_and_large_dims():
    _check(2, 8, 2, 777, 16, 64, kv_heads=2, layout="BTHD", dtype=torch.bfloat16, device="cuda")
    _check(1, 4, 1, 500, 128, 256, dtype=torch.bfloat16, device="cuda", scale=0.05)


def _decode_step(q, k, v):             # the end-aligned KV-cache form people write, [B, H, Tq, D]
    tq, tk = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    a = 1 + s + 0.5 * s ** 2
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _cache(b, h, t, dk, dv, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=torch.float64).to("cuda", dtype) for d in (dk, dk, dv)]


@pytest.mark.gpu
def test_gpu_operator_runs_the_decode_kernel(monkeypatch):
    """based_attention with Tq = 1 and Tq = 16 against a cache runs decode_forward on CUDA (inference);
    Tq = 17 and training keep the PyTorch form."""
    from based_compile import BasedSpec, based_attention
    from based_compile.op import custom_op
    calls = []
    real = decode.decode_forward
    monkeypatch.setattr(decode, "decode_forward", lambda *a: calls.append(1) or real(*a))
    custom_op._PLANS.clear()
    _, k, v = _cache(2, 4, 3000, 16, 64, 1)
    for tq, expect in ((1, 1), (16, 2), (17, 2)):
        q = _cache(2, 4, tq, 16, 64, tq)[0]
        with torch.no_grad():
            o = based_attention(q, k, v, BasedSpec(scale=0.25))
        assert len(calls) == expect, f"Tq={tq}: {len(calls)} decode calls"
        assert_rel_close(o, _decode_step(q.double(), k.double(), v.double()), 2.5e-2, f"o Tq={tq}")
    q = _cache(2, 4, 1, 16, 64, 9)[0].float().requires_grad_()
    o = based_attention(q, k.float(), v.float(), BasedSpec(scale=0.25))
    assert len(calls) == 2
    custom_op._PLANS.clear()


@pytest.mark.gpu
def test_gpu_growing_cache_compiles_at_most_twice_with_inductor():
    """Decoding against a cache that grows each step, backend="based" with Inductor: a dynamic Tk
    after the first length (at most two compilations for ten steps), every step exact."""
    import based_compile
    torch._dynamo.reset()
    frames = []
    inner = based_compile.backend(inner="inductor")

    def counting(gm, example_inputs):
        frames.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(_decode_step, backend=counting)
    q_all, k, v = _cache(1, 16, 2000, 16, 64, 3)
    with torch.no_grad():
        for tk in range(1000, 1010):
            args = (q_all[:, :, tk - 1:tk], k[:, :, :tk], v[:, :, :tk])
            out = compiled(*args)
            assert_rel_close(out, _decode_step(*(x.double() for x in args)), 2.5e-2, f"Tk={tk}")
    assert len(frames) <= 2, f"{len(frames)} compilations for 10 decode steps"
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_decode_under_cuda_graphs():
    """mode="reduce-overhead": the rewritten KV-cache step runs the decode kernel inside CUDA graphs
    (a graph per cache length; replayed lengths give the same values as fresh ones)."""
    torch._dynamo.reset()
    compiled = torch.compile(_decode_step, backend="based", mode="reduce-overhead")
    q_all, k, v = _cache(2, 16, 1200, 16, 64, 4)
    with torch.no_grad():
        for rep in range(2):
            for tk in (1000, 1001, 1002, 1100):
                args = (q_all[:, :, tk - 2:tk], k[:, :, :tk], v[:, :, :tk])
                torch.compiler.cudagraph_mark_step_begin()
                out = compiled(*args).clone()
                assert_rel_close(out, _decode_step(*(x.double() for x in args)), 2.5e-2, f"Tk={tk} rep {rep}")
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_opcheck_decode():
    """based::attention with Tq < Tk on CUDA (the decode kernel): fake implementation and dispatch agree."""
    q, k, v = _cache(1, 4, 2, 16, 64, 5, torch.float32)[0], *_cache(1, 4, 300, 16, 64, 6, torch.float32)[1:]
    torch.library.opcheck(torch.ops.based.attention.default, (q, k, v, "BHTD", 0.25, 1.0, 1.0, 0.5, True, True, 1e-6))
