"""The chunkwise-parallel kernel (kernels/chunked.py) and its references against float64.

CPU runs go through Triton's interpreter with chunks of 16 tokens and segments of 2 chunks, so
T = 37..70 spans several segments with a partial last chunk; `-m gpu` runs realistic shapes.
Every buffer the kernels allocate starts as NaN (POISON_OUTPUTS).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile.kernels import chunked, naive_chunkwise_based, naive_parallel_based, prefix_chunked
from based_compile.kernels.arguments import check_arguments, triton_interpreting
from based_compile.kernels.chunked import chunked_based, chunked_forward
from based_compile.kernels.symmetric_basis import (
    distinct_feature_count,
    feature_count,
    key_features,
    query_features,
)

BASED = (1.0, 1.0, 0.5)
SIGNED = (0.3, -0.7, 0.25)        # a sign-changing polynomial: only without the normaliser
UNIT = (1.0, 1.0, 1.0)
TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(chunked, "POISON_OUTPUTS", True)
    monkeypatch.setattr(prefix_chunked, "POISON_OUTPUTS", True)


def _check(b, h, t, dk, dv, *, kv_heads=None, layout="BHTD", causal=True, normalize=True, coeffs=BASED,
           dtype=torch.float32, device="cpu", tol=None, eps=1e-6, scale=None, reference=naive_parallel_based):
    """Values and q/k/v gradients of chunked_based vs the float64 reference on fresh inputs."""
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=kv_heads, layout=layout, device=device)
    q, k, v = (x.to(dtype).double().requires_grad_() for x in (q, k, v))   # inputs exact in dtype
    kw = dict(coeffs=coeffs, causal=causal, normalize=normalize, layout=layout, eps=eps, scale=scale)
    ref = reference(q, k, v, **kw)
    do = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    qx, kx, vx = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = chunked_based(qx, kx, vx, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype] if tol is None else tol
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize} {dtype}"
    assert_rel_close(out, ref, tol, f"o ({what})")
    grads = torch.autograd.grad(out, (qx, kx, vx), do.to(dtype))
    for name, g, r, x in zip("qkv", grads, ref_grads, (qx, kx, vx)):
        assert g.dtype == dtype and g.shape == x.shape
        assert_rel_close(g, r, tol * 2, f"d{name} ({what})")


# ---------------------------------------------------------------------------------------------- the basis

def test_symmetric_basis_counts():
    """161 features at Dk = 16, 153 distinct monomials (1, x_a, x_a x_b for a <= b), each weighted once."""
    assert feature_count(16) == 161 and distinct_feature_count(16) == 153
    assert feature_count(5) == distinct_feature_count(5) == 21          # odd Dk: no pair twice
    x = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    feats = query_features(x)
    assert feats.shape == (161,)
    assert len({round(f, 9) for f in feats.tolist()}) == 153


@pytest.mark.parametrize("dk", [1, 2, 5, 16, 32])
def test_feature_maps_reproduce_the_polynomial(dk):
    q, k, _ = make_inputs(1, 1, 9, dk, 1)
    got = query_features(q) @ key_features(k, 0.37, SIGNED).transpose(-2, -1)
    s = 0.37 * q @ k.transpose(-2, -1)
    assert_rel_close(got, SIGNED[0] + SIGNED[1] * s + SIGNED[2] * s * s, 1e-12, "phi_q . phi_k")


@pytest.mark.parametrize("causal,normalize,layout,kv_heads", [
    (True, True, "BHTD", None), (True, False, "BTHD", 1), (False, True, "BTHD", 2), (False, False, "BHTD", None)])
def test_chunkwise_reference_matches_the_quadratic_form(causal, normalize, layout, kv_heads):
    """The float64 chunkwise algorithm (values and gradients) against the quadratic form."""
    q, k, v = make_inputs(2, 4, 45, 5, 7, kv_heads=kv_heads, layout=layout, requires_grad=True)
    kw = dict(causal=causal, normalize=normalize, layout=layout, coeffs=UNIT if normalize else SIGNED)
    ref = naive_parallel_based(q, k, v, **kw)
    out = naive_chunkwise_based(q, k, v, chunk_size=8, **kw)
    assert_rel_close(out, ref, 1e-12, "o")
    do = torch.randn_like(ref)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), do), torch.autograd.grad(ref, (q, k, v), do)):
        assert_rel_close(g, r, 1e-12, "grad")


# ---------------------------------------------------------------------------------------------- the kernel

CASES = [
    # (t, dk, dv, kv_heads, layout, causal, normalize, coeffs, dtype)
    (37, 16, 32, None, "BHTD", True, True, BASED, torch.float32),
    (70, 16, 64, 1, "BTHD", True, True, BASED, torch.float32),         # GQA group 2, 3 segments
    (33, 16, 24, None, "BTHD", False, True, BASED, torch.float32),
    (50, 16, 40, None, "BHTD", False, False, SIGNED, torch.float32),
    (33, 8, 80, 1, "BHTD", True, False, SIGNED, torch.float32),
    (17, 5, 33, None, "BTHD", True, True, UNIT, torch.float32),
    (1, 1, 3, None, "BHTD", True, False, BASED, torch.float32),
    (7, 32, 20, None, "BHTD", True, True, BASED, torch.float32),
    (40, 16, 130, 1, "BTHD", True, True, BASED, torch.float32),       # three value blocks
    (50, 16, 64, None, "BHTD", True, True, BASED, torch.float16),
    (33, 16, 40, 1, "BTHD", False, False, SIGNED, torch.float16),
]


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,coeffs,dtype", CASES)
def test_values_and_gradients_match_float64(t, dk, dv, kv_heads, layout, causal, normalize, coeffs, dtype):
    _check(1, 2, t, dk, dv, kv_heads=kv_heads, layout=layout, causal=causal, normalize=normalize,
           coeffs=coeffs, dtype=dtype)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_way_of_forming_the_pair_factors(mode, dtype, monkeypatch):
    """Gathered loads, tl.gather and the one-hot dot (the GPU picks per direction) against float64."""
    real = chunked.chunked_config
    monkeypatch.setattr(chunked, "chunked_config",
                        lambda *a, **kw: dataclasses.replace(real(*a, **kw), features=mode))
    _check(1, 2, 37, 16, 24, kv_heads=1, dtype=dtype, layout="BTHD")


@pytest.mark.parametrize("stored,out_seg,state_bv,t,dv,kv_heads,layout,causal,normalize,dtype", [
    (True, 1, 0, 37, 24, 1, "BTHD", True, True, torch.float32),
    (True, 3, 16, 50, 40, None, "BHTD", True, False, torch.float16),      # state kernels: 4 value blocks
    (True, 2, 0, 70, 130, 1, "BHTD", True, True, torch.float32),          # 3 value blocks, 3 segments
    (True, 2, 16, 33, 24, None, "BTHD", False, True, torch.float32),      # non-causal: nothing stored
    (False, 1, 16, 45, 64, 1, "BTHD", True, True, torch.float16),         # carried, narrower state kernels
])
def test_stored_path_and_state_value_blocks(stored, out_seg, state_bv, t, dv, kv_heads, layout, causal, normalize,
                                            dtype, monkeypatch):
    """The stored path (every chunk's state written by a walk, output kernels reading them) and state
    kernels with their own value block, values and all gradients against float64."""
    real = chunked.chunked_config
    monkeypatch.setattr(chunked, "chunked_config", lambda *a, **kw: dataclasses.replace(
        real(*a, **kw), stored=stored, out_seg=out_seg, state_bv=state_bv))
    _check(1, 2, t, 16, dv, kv_heads=kv_heads, layout=layout, causal=causal, normalize=normalize,
           coeffs=BASED if normalize else SIGNED, dtype=dtype)


def test_launch_tuples_resolve_to_configs():
    q, k, v = make_inputs(2, 4, 4096, 16, 64, kv_heads=2, dtype=torch.float32)
    args = check_arguments(q, k, v)
    old = chunked.config_from_launch(args, (64, 64, 8, 2, 1024, 1))
    assert (old.stored, old.out_seg, old.state_bv, old.state_warps) == (False, 1, 0, 0)
    new = chunked.config_from_launch(args, (64, 64, 4, 2, 64, 1, 1, 4, 32, 8))
    assert (new.bt, new.bv, new.stored, new.out_seg, new.state_bv, new.state_warps) == (64, 64, True, 4, 32, 8)
    assert new.seg == 8            # 64 chunks, 2 x 4 heads: segments of 8 chunks give the 64 programs wanted
    for launch in (chunked.BACKWARD_LAUNCH, chunked.FLOAT32_LAUNCH):
        chunked.config_from_launch(args, launch)
    with pytest.raises(ValueError, match="stored path takes chunks of at most 64"):    # crashed on the H200
        chunked.config_from_launch(args, (128, 64, 8, 1, 1024, 1, 1))


@pytest.mark.parametrize("causal", [True, False])
def test_large_eps_and_scale(causal):
    """eps = 0.5 and scale = 0.37 move o far more than the tolerance."""
    _check(1, 2, 35, 16, 24, causal=causal, eps=0.5, scale=0.37)


def test_forward_returns_the_float32_normaliser():
    q, k, v = make_inputs(1, 4, 40, 16, 24, kv_heads=2, dtype=torch.float32)
    o, z = chunked_forward(q, k, v, check_arguments(q, k, v))
    kr = k.double().repeat_interleave(2, 1)
    ones = torch.ones(1, 4, 40, 1, dtype=torch.float64)
    z_ref = naive_parallel_based(q.double(), kr, ones, normalize=False)[..., 0]
    assert z.dtype == torch.float32 and z.shape == (1, 4, 40)
    assert_rel_close(z, z_ref, 1e-5, "z")
    o2, z2 = chunked_forward(q, k, v, check_arguments(q, k, v, normalize=False))
    assert z2 is None and o2.shape == o.shape


def test_state_bytes_count_the_segments():
    q, k, v = make_inputs(2, 4, 4096, 16, 64, kv_heads=2, dtype=torch.float32)
    args = check_arguments(q, k, v)
    cfg = chunked.ChunkedConfig(bt=64, seg=8, bv=64)
    per_slot = 161 * 65 * 4
    assert chunked.state_bytes(args, cfg) == 2 * 2 * (8 + 1) * per_slot   # 4096 / (64 * 8) = 8 segments
    stored = dataclasses.replace(cfg, stored=True)             # + 64 chunk states, bf16 values, float32 z
    assert chunked.state_bytes(args, stored) == 2 * 2 * ((8 + 1) * per_slot + 64 * 161 * (64 * 2 + 4))
    non_causal = check_arguments(q, k, v, causal=False)
    assert chunked.state_bytes(non_causal, stored) == chunked.state_bytes(non_causal, cfg)


def test_bad_arguments_raise_naming_the_argument(monkeypatch):
    q, k, v = make_inputs(1, 2, 8, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="Dk"):
        chunked_based(*make_inputs(1, 2, 8, 33, 16, dtype=torch.float32))
    with pytest.raises(ValueError, match="Dv"):
        chunked_based(*make_inputs(1, 2, 8, 16, 257, dtype=torch.float32))
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        chunked_based(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="sequence length"):
        chunked_based(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="layout"):
        chunked_based(q, k, v, layout="BTDH")
    with pytest.raises(ValueError, match="heads"):
        chunked_based(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16))
    with pytest.raises(ValueError, match="eps"):
        chunked_based(q, k, v, eps=-1.0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            chunked_based(q, k, v)


@pytest.mark.skipif(not triton_interpreting(), reason="runs the GPU block sizes under the interpreter")
def test_gpu_block_sizes_under_the_interpreter(monkeypatch):
    """The GPU's tiles (forward: 64-token tiles, two state chunks in two segments; backward: its chunk
    length in two segments), at a T that is no multiple of a chunk."""
    q, k, v = make_inputs(1, 2, 150, 16, 64, dtype=torch.float64)
    q, k, v = (x.to(torch.float16) for x in (q, k, v))
    args = check_arguments(q, k, v)
    monkeypatch.setattr(chunked, "triton_interpreting", lambda: False)
    monkeypatch.setattr(prefix_chunked, "triton_interpreting", lambda: False)
    fwd_cfg, bwd_cfg = prefix_chunked.prefix_config(args, q.dtype), chunked.chunked_config(args, torch.float16)
    monkeypatch.setattr(chunked, "triton_interpreting", lambda: True)
    monkeypatch.setattr(prefix_chunked, "triton_interpreting", lambda: True)
    assert fwd_cfg.bv == 64 and fwd_cfg.c >= 128 and bwd_cfg.bv == 64 and bwd_cfg.bt >= 32
    bwd_cfg = chunked.ChunkedConfig(bwd_cfg.bt, 2, bwd_cfg.bv)                          # 2 segments: a scan
    o, z = prefix_chunked.prefix_forward(q, k, v, args, dataclasses.replace(fwd_cfg, c=128, target=1 << 20))
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = naive_parallel_based(qd, kd, vd)
    do = torch.randn_like(ref).to(torch.float16)
    ref.backward(do.double())
    assert_rel_close(o, ref, TOL[torch.float16], "o")
    grads = chunked._backward(q, k, v, o, z, do, args, bwd_cfg)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (qd, kd, vd)):
        assert_rel_close(g, x.grad, 2 * TOL[torch.float16], f"{name} {bwd_cfg}")


# ---------------------------------------------------------------------------------------------- GPU

GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("t,dk,dv,dtype,layout,kv_heads,causal", [
    (8192, 16, 64, torch.bfloat16, "BHTD", None, True),
    (8191, 16, 64, torch.bfloat16, "BTHD", None, False),
    (4097, 16, 128, torch.bfloat16, "BTHD", 2, True),
    (4096, 16, 64, torch.float16, "BTHD", None, True),
    (2047, 16, 64, torch.float32, "BHTD", None, True),
    (2048, 32, 64, torch.bfloat16, "BHTD", 2, True),
])
def test_gpu_realistic_shapes(t, dk, dv, dtype, layout, kv_heads, causal, no_tf32):
    _check(2, 4, t, dk, dv, kv_heads=kv_heads, layout=layout, causal=causal, dtype=dtype, device="cuda",
           tol=GPU_TOL[dtype], reference=naive_chunkwise_based)
