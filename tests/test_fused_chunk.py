"""The Triton fused-chunk kernel against the float64 references: values, gradients, arguments.

CPU runs go through Triton's interpreter (small shapes, chunks of 16 tokens there, so T = 33 or
50 spans several chunks with a partial last one); `-m gpu` runs realistic shapes on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from based_compile.kernels import fused_chunk, naive_chunk_based, naive_parallel_based
from based_compile.kernels.arguments import check_arguments, triton_interpreting
from based_compile.kernels.fused_chunk import fused_chunk_based, fused_chunk_forward
from compare import assert_rel_close, rel_error
from conftest import make_inputs

BASED = (1.0, 1.0, 0.5)
SIGNED = (0.3, -0.7, 0.25)        # a sign-changing polynomial: only without the normaliser
UNIT = (1.0, 1.0, 1.0)
TOL = {torch.float32: 2e-5, torch.float16: 6e-3}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    """Every output and buffer the kernels allocate starts as NaN: an unwritten element fails."""
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)


def _check(b, h, t, dk, dv, *, kv_heads=None, layout="BHTD", causal=True, normalize=True, coeffs=BASED,
           dtype=torch.float32, strided_view=False, device="cpu", tol=None, reference=naive_parallel_based,
           eps=1e-6):
    """Values and q/k/v gradients of fused_chunk_based vs the float64 reference on fresh inputs."""
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=kv_heads, layout=layout, device=device)
    if strided_view:       # BHTD tensors that are transposed views of BTHD storage: read through strides
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.to(dtype).double().requires_grad_() for x in (q, k, v))   # inputs exact in dtype
    kw = dict(coeffs=coeffs, causal=causal, normalize=normalize, layout=layout, eps=eps)
    ref = reference(q, k, v, **kw)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    qx, kx, vx = (x.detach().to(dtype) for x in (q, k, v))
    if strided_view:
        qx, kx, vx = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (qx, kx, vx))
        assert not qx.is_contiguous()
    qx, kx, vx = (x.requires_grad_() for x in (qx, kx, vx))
    out = fused_chunk_based(qx, kx, vx, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype] if tol is None else tol
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize} {dtype}"
    assert_rel_close(out, ref, tol, f"o ({what})")
    grads = torch.autograd.grad(out, (qx, kx, vx), do.to(dtype))
    for name, g, r, x in zip("qkv", grads, ref_grads, (qx, kx, vx)):
        assert g.dtype == dtype and g.shape == x.shape
        if t == 1 and normalize and name in "qk":
            # one token, normalised: o = v whatever q and k are, so dq = dk = 0 exactly
            assert g.abs().max().item() < 1e-4, f"d{name} should vanish ({what})"
            continue
        assert_rel_close(g, r, tol * 2, f"d{name} ({what})")


CASES = [
    # (t, dk, dv, kv_heads, layout, causal, normalize, coeffs, dtype)
    (33, 16, 32, None, "BHTD", True, True, BASED, torch.float32),
    (50, 16, 64, None, "BTHD", True, True, BASED, torch.float32),
    (33, 16, 24, None, "BHTD", False, True, BASED, torch.float32),
    (50, 16, 40, None, "BTHD", False, False, SIGNED, torch.float32),
    (33, 8, 80, 1, "BHTD", True, True, UNIT, torch.float32),        # two value blocks, GQA group 2
    (50, 8, 20, 1, "BTHD", False, True, BASED, torch.float32),
    (7, 32, 48, None, "BHTD", True, False, SIGNED, torch.float32),
    (7, 32, 16, 1, "BTHD", False, True, UNIT, torch.float32),
    (1, 1, 3, None, "BHTD", True, True, BASED, torch.float32),
    (1, 1, 5, None, "BTHD", False, False, SIGNED, torch.float32),
    (33, 1, 17, None, "BHTD", True, True, BASED, torch.float32),
    (17, 5, 33, 1, "BHTD", True, False, UNIT, torch.float32),
    (50, 16, 64, None, "BHTD", True, True, BASED, torch.float16),
    (33, 16, 40, 1, "BTHD", False, True, UNIT, torch.float16),
    (33, 8, 72, None, "BHTD", True, False, SIGNED, torch.float16),
]


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,coeffs,dtype", CASES)
def test_values_and_gradients_match_float64(t, dk, dv, kv_heads, layout, causal, normalize, coeffs, dtype):
    _check(1, 2, t, dk, dv, kv_heads=kv_heads, layout=layout, causal=causal, normalize=normalize,
           coeffs=coeffs, dtype=dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_large_eps(causal):
    """eps = 0.5 moves o by far more than the tolerance (1e-6 would not: a kernel dropping eps passed)."""
    _check(1, 2, 33, 16, 24, causal=causal, eps=0.5)


def test_transposed_views_are_read_through_strides():
    _check(2, 2, 33, 16, 32, strided_view=True)


def test_forward_returns_the_float32_normaliser():
    q, k, v = make_inputs(1, 4, 40, 16, 24, kv_heads=2, dtype=torch.float32)
    args = check_arguments(q, k, v)
    o, z = fused_chunk_forward(q, k, v, args)
    kr = k.double().repeat_interleave(2, 1)
    ones = torch.ones(1, 4, 40, 1, dtype=torch.float64)
    z_ref = naive_parallel_based(q.double(), kr, ones, normalize=False)[..., 0]        # sum_j f(s_ij)
    assert z.dtype == torch.float32 and z.shape == (1, 4, 40)
    assert_rel_close(z, z_ref, 1e-5, "z")
    o2, z2 = fused_chunk_forward(q, k, v, check_arguments(q, k, v, normalize=False))
    assert z2 is None and o2.shape == o.shape


def test_broadcast_output_gradient():
    """out.sum().backward() hands the kernel a do with zero strides."""
    q, k, v = make_inputs(1, 2, 20, 8, 16, dtype=torch.float32, requires_grad=True)
    fused_chunk_based(q, k, v).sum().backward()
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    naive_parallel_based(qd, kd, vd).sum().backward()
    for name, g, r in zip("qkv", (q.grad, k.grad, v.grad), (qd.grad, kd.grad, vd.grad)):
        assert_rel_close(g, r, 2e-5, f"d{name}")


def test_bad_arguments_raise_naming_the_argument(monkeypatch):
    q, k, v = make_inputs(1, 2, 8, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="Dk"):
        fused_chunk_based(*make_inputs(1, 2, 8, 33, 16, dtype=torch.float32))
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        fused_chunk_based(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="floating"):
        fused_chunk_based(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="sequence length"):
        fused_chunk_based(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="layout"):
        fused_chunk_based(q, k, v, layout="BTDH")
    with pytest.raises(ValueError, match="heads"):
        fused_chunk_based(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="eps"):
        fused_chunk_based(q, k, v, eps=-1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            fused_chunk_based(q, k, v)


# ----------------------------------------------------------------------------------------------
# GPU: realistic shapes (`pytest -m gpu`)
# ----------------------------------------------------------------------------------------------
GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("t,dk,dv,dtype,layout,kv_heads,causal", [
    (8192, 16, 64, torch.bfloat16, "BHTD", None, True),
    (8192, 16, 64, torch.bfloat16, "BTHD", None, False),
    (8192, 16, 128, torch.bfloat16, "BTHD", 2, True),
    (4096, 16, 64, torch.float16, "BTHD", None, True),
    (2048, 16, 64, torch.float32, "BHTD", None, True),
    (2048, 32, 128, torch.float32, "BHTD", 2, False),
    (2048, 32, 64, torch.bfloat16, "BTHD", None, True),
])
def test_gpu_realistic_shapes(t, dk, dv, dtype, layout, kv_heads, causal, no_tf32):
    _check(2, 4, t, dk, dv, kv_heads=kv_heads, layout=layout, causal=causal, dtype=dtype, device="cuda",
           tol=GPU_TOL[dtype], reference=naive_chunk_based)


@pytest.mark.gpu
def test_gpu_forward_peak_memory_is_linear_in_t():
    """Forward peak memory above the inputs: o and z only, so 4x the tokens is 4x the bytes."""
    extra = {}
    for t in (4096, 16384):
        q, k, v = make_inputs(2, 8, t, 16, 64, dtype=torch.bfloat16, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        o, z = fused_chunk_forward(q, k, v, check_arguments(q, k, v))
        torch.cuda.synchronize()
        extra[t] = torch.cuda.max_memory_allocated() - base
        assert extra[t] <= 1.1 * (o.numel() * o.element_size() + z.numel() * 4) + (1 << 20)
        del o, z
    ratio = extra[16384] / extra[4096]
    assert 3.5 < ratio < 4.5, f"forward peak memory grew {ratio:.2f}x for 4x the tokens"


@pytest.mark.skipif(not triton_interpreting(), reason="runs the GPU tables under the interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("dk,dv", [(16, 64), (32, 48)])
def test_gpu_block_configs_under_the_interpreter(dtype, dk, dv, monkeypatch):
    """The block sizes the GPU runs (the interpreter otherwise gets its own), at a length that is no
    multiple of a chunk: values and gradients against float64."""
    q, k, v = make_inputs(1, 2, 150, dk, dv, dtype=torch.float64)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    args = check_arguments(q, k, v)
    monkeypatch.setattr(fused_chunk, "triton_interpreting", lambda: False)
    fwd_cfg, bwd_cfg = fused_chunk.forward_config(args, dtype), fused_chunk.backward_config(args, dtype)
    monkeypatch.setattr(fused_chunk, "triton_interpreting", lambda: True)
    o, z = fused_chunk._forward(q, k, v, args, fwd_cfg)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = naive_parallel_based(qd, kd, vd)
    do = torch.randn_like(ref).to(dtype)
    ref.backward(do.double())
    tol = TOL[dtype]
    assert_rel_close(o, ref, tol, f"o {fwd_cfg}")
    grads = fused_chunk._backward(q, k, v, o, z, do, args, bwd_cfg)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (qd, kd, vd)):
        assert_rel_close(g, x.grad, 2 * tol, f"{name} {bwd_cfg}")
