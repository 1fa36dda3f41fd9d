"""The Triton parallel kernel (kernels/parallel.py) against the float64 naive reference.

CPU: the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py) at
small shapes; fp32 and fp16 (the interpreter mishandles bf16). GPU (-m gpu): realistic shapes
in fp32 (tf32 off), fp16 and bf16. Outputs are poisoned (NaN) before the kernels write them.
"""
from __future__ import annotations

import pytest
import torch
from compare import assert_rel_close, poison_, rel_error
from conftest import make_inputs

from based_compile.kernels import naive_parallel_based, parallel_based
from based_compile.kernels.arguments import check_arguments, triton_interpreting
from based_compile.kernels.parallel import parallel_backward, parallel_forward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASED = (1.0, 1.0, 0.5)
OTHER = (0.3, -0.7, 0.25)          # any coefficients: not positive, not the Taylor map
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled memory, so an output element the kernels never write fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **kw):
        x = real_empty(*a, **kw)
        return poison_(x) if x.dtype.is_floating_point else x

    def empty_like(*a, **kw):
        x = real_empty_like(*a, **kw)
        return poison_(x) if x.dtype.is_floating_point else x

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)


def _check(b, h, t, dk, dv, *, kv_heads=None, dtype=torch.float32, layout="BHTD", causal=True, normalize=True,
           coeffs=BASED, scale=None, grads=True, tol=None, eps=1e-6):
    """Values and gradients of q, k, v against float64, fresh random inputs."""
    tol = tol or TOL[dtype]
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=kv_heads, dtype=torch.float64, device=DEVICE, layout=layout)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))   # inputs exact in dtype: the error measured is the kernel's
    kw = dict(scale=scale, coeffs=coeffs, causal=causal, normalize=normalize, layout=layout, eps=eps)
    q64, k64, v64 = (x.clone().requires_grad_(grads) for x in (q, k, v))
    ref = naive_parallel_based(q64, k64, v64, **kw)
    qx, kx, vx = (x.to(dtype).requires_grad_(grads) for x in (q, k, v))
    out = parallel_based(qx, kx, vx, **kw)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_rel_close(out, ref, tol, "o")
    if not grads:
        return
    do = torch.randn_like(ref).to(dtype).double()
    ref.backward(do)
    out.backward(do.to(dtype))
    for name, x, x64 in (("dq", qx, q64), ("dk", kx, k64), ("dv", vx, v64)):
        assert x.grad.dtype == dtype and x.grad.shape == x64.shape
        assert_rel_close(x.grad, x64.grad, tol, name)


# ---------------------------------------------------------------------------------------------- CPU (interpreter)

@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_layouts_causal_normalize(layout, causal, normalize):
    _check(2, 2, 33, 16, 24, layout=layout, causal=causal, normalize=normalize)


@pytest.mark.parametrize("causal", [True, False])
def test_large_eps(causal):
    """eps = 0.5 moves o by far more than the tolerance (1e-6 would not: a kernel dropping eps passed)."""
    _check(1, 2, 33, 16, 24, causal=causal, eps=0.5)


@pytest.mark.parametrize("t", [1, 7, 16, 47])
def test_odd_lengths(t):
    # T=1 normalised: o = v up to eps, so dq, dk are eps-sized and ill-conditioned; test them unnormalised.
    _check(1, 2, t, 16, 32, normalize=t > 1, causal=True)


# A sign-changing polynomial (OTHER) only unnormalised: its normaliser can cross zero, which makes the
# normalised output ill-conditioned for any implementation.
@pytest.mark.parametrize("coeffs,normalize", [(BASED, True), (OTHER, False), ((1.0, 1.0, 1.0), True)])
@pytest.mark.parametrize("causal", [True, False])
def test_coefficients_and_scale(coeffs, normalize, causal):
    _check(1, 2, 40, 16, 16, coeffs=coeffs, normalize=normalize, causal=causal, scale=0.37)


@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_gqa(layout):
    _check(2, 4, 35, 16, 16, kv_heads=2, layout=layout)
    _check(1, 3, 20, 8, 16, kv_heads=1, layout=layout, causal=False)


@pytest.mark.parametrize("dk,dv", [(1, 16), (32, 40), (64, 64), (5, 3)])
def test_feature_dims(dk, dv):
    _check(1, 1, 36, dk, dv)


@pytest.mark.parametrize("layout,kv_heads,causal", [("BHTD", 2, True), ("BTHD", 1, False)])
def test_split_backward(monkeypatch, layout, kv_heads, causal):
    """The split backward (a dq kernel and a dk/dv kernel, no atomics) against float64 too."""
    import based_compile.kernels.parallel as mod
    monkeypatch.setattr(mod, "ATOMIC_DQ_DEFAULT", False)
    _check(1, 2, 37, 5, 24, kv_heads=kv_heads, layout=layout, causal=causal)
    _check(1, 2, 30, 16, 16, layout=layout, causal=causal, normalize=False)


def test_deterministic_algorithms_select_the_split_backward(monkeypatch):
    import based_compile.kernels.parallel as mod
    launches = []
    real = mod._parallel_dq_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(mod, "_parallel_dq_kernel", Spy())
    q, k, v = make_inputs(1, 2, 20, 16, 8, dtype=torch.float32, device=DEVICE)
    args = check_arguments(q, k, v)
    o, z = parallel_forward(q, k, v, args)
    do = torch.randn_like(o)
    monkeypatch.setattr(mod, "ATOMIC_DQ_DEFAULT", True)
    parallel_backward(q, k, v, o, z, do, args)
    assert launches == [], "the default backward adds dq atomically"
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = parallel_backward(q, k, v, o, z, do, args)
        second = parallel_backward(q, k, v, o, z, do, args)
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(launches) == 2, "deterministic mode must use the dq kernel, not atomics"
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_large_dims():
    _check(1, 1, 20, 128, 256, causal=True)


def test_float16():
    _check(1, 2, 48, 16, 32, dtype=torch.float16)
    _check(1, 2, 33, 32, 24, dtype=torch.float16, layout="BTHD", causal=False, normalize=False, kv_heads=1)


def test_strided_bthd_view_is_not_copied():
    """A BHTD view of [B, T, H, D] memory passes through its strides, and so does BTHD's transposed view."""
    b, h, t, dk, dv = 1, 2, 24, 16, 16
    q, k, v = make_inputs(b, h, t, dk, dv, dtype=torch.float32, device=DEVICE, layout="BTHD")
    ref = naive_parallel_based(*(x.double() for x in (q, k, v)), layout="BTHD")
    views = [x.transpose(1, 2) for x in (q, k, v)]         # BHTD-shaped views, not contiguous
    assert not views[0].is_contiguous()
    pointers = [x.data_ptr() for x in views]
    args = check_arguments(*views, layout="BHTD")
    seen = []
    import based_compile.kernels.parallel as mod
    real = mod._parallel_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                seen.extend(x.data_ptr() for x in a[:3])
                return real[grid](*a, **kw)
            return launch

    mod._parallel_fwd_kernel = Spy()
    try:
        o, _ = parallel_forward(*views, args)
    finally:
        mod._parallel_fwd_kernel = real
    assert seen == pointers, "the kernel must read the strided views themselves, not copies"
    assert_rel_close(o.transpose(1, 2), ref, 1e-4, "o of the strided view")
    # The differentiable entry point on views too: gradients right, and contiguous (the op returns
    # them as they are; its fake implementation promises contiguous ones).
    views = [x.detach().transpose(1, 2) for x in (q, k, v)]
    do = torch.randn(b, h, t, dv, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad(parallel_based(*(x.requires_grad_() for x in views), layout="BHTD"), views,
                                do.float())
    refs = [x.detach().double().requires_grad_() for x in views]
    ref_grads = torch.autograd.grad(naive_parallel_based(*refs), refs, do)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert g.is_contiguous(), name
        assert_rel_close(g, r, 1e-4, name)


def test_forward_z_and_contract():
    q, k, v = make_inputs(2, 2, 19, 16, 8, dtype=torch.float32, device=DEVICE)
    args = check_arguments(q, k, v)
    o, z = parallel_forward(q, k, v, args)
    s = (q.double() @ k.double().transpose(-1, -2)) * args.scale
    w = (1 + s + 0.5 * s * s).tril()
    assert z.dtype == torch.float32 and z.shape == (2, 2, 19)
    assert_rel_close(z, w.sum(-1), 1e-5, "z")
    o2, z2 = parallel_forward(q, k, v, check_arguments(q, k, v, normalize=False))
    assert z2 is None
    assert_rel_close(o, (w @ v.double()) / (w.sum(-1, keepdim=True) + args.eps), 1e-5, "o")
    do = torch.randn_like(o)
    dq, dk, dv = parallel_backward(q, k, v, o, z, do, args)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(naive_parallel_based(*refs), refs, do.double())
    for name, g, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads):
        assert_rel_close(g, r, 1e-4, name)


def test_bad_arguments():
    q, k, v = make_inputs(1, 2, 8, 16, 8, dtype=torch.float32, device=DEVICE)
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        parallel_based(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="dtype"):
        parallel_based(q, k.half(), v)
    with pytest.raises(ValueError, match="sequence length"):
        parallel_based(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="heads"):
        parallel_based(q, k.repeat(1, 3, 1, 1)[:, :3], v.repeat(1, 3, 1, 1)[:, :3])
    with pytest.raises(ValueError, match="layout"):
        parallel_based(q, k, v, layout="BHDT")
    with pytest.raises(ValueError, match="Dk"):
        big = torch.randn(1, 1, 4, 129, device=DEVICE)
        parallel_based(big, big, torch.randn(1, 1, 4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="Dv"):
        parallel_based(q, k, torch.randn(1, 2, 8, 257, device=DEVICE))
    with pytest.raises(ValueError, match="coeffs"):
        parallel_based(q, k, v, coeffs=(1.0, 2.0))
    with pytest.raises(TypeError, match="q"):
        parallel_based(q.numpy() if DEVICE == "cpu" else q.cpu().numpy(), k, v)


@pytest.mark.skipif(not triton_interpreting(), reason="CPU tensors are refused only without the interpreter")
def test_cpu_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_inputs(1, 1, 4, 16, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        parallel_based(q, k, v)


def test_poisoned_outputs_are_overwritten():
    """The poisoning is live (torch.empty gives NaN) and the kernels overwrite every element."""
    assert torch.isnan(torch.empty(4)).all()
    q, k, v = make_inputs(1, 2, 21, 16, 8, dtype=torch.float32, device=DEVICE)
    o, z = parallel_forward(q, k, v, check_arguments(q, k, v))
    assert torch.isfinite(o).all() and torch.isfinite(z).all()
    assert rel_error(torch.full((2,), float("nan")), torch.ones(2)) == float("inf")


# ---------------------------------------------------------------------------------------------- GPU

# Each case compiles its own kernels (dtype, Dk, Dv): a handful of cases covers the realistic shapes.
@pytest.mark.gpu
@pytest.mark.parametrize("t,dk,dv,dtype", [
    (8192, 16, 64, torch.bfloat16), (8192, 16, 64, torch.float32), (8192, 16, 64, torch.float16),
    (4096, 64, 128, torch.bfloat16), (4096, 64, 128, torch.float32), (2000, 16, 128, torch.float16),
    (1537, 64, 64, torch.bfloat16),
])
def test_gpu_realistic(no_tf32, t, dk, dv, dtype):
    _check(1, 2, t, dk, dv, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("atomic_dq", [False, True])
def test_gpu_backward_schemes(no_tf32, monkeypatch, atomic_dq):
    import based_compile.kernels.parallel as mod
    monkeypatch.setattr(mod, "ATOMIC_DQ_DEFAULT", atomic_dq)
    _check(2, 4, 8192, 16, 64, dtype=torch.bfloat16, kv_heads=2, layout="BTHD")


@pytest.mark.gpu
def test_gpu_variants(no_tf32):
    dtype = torch.bfloat16
    _check(2, 4, 1000, 16, 64, kv_heads=2, dtype=dtype, layout="BTHD")
    _check(1, 2, 777, 16, 64, dtype=dtype, causal=False, normalize=False, coeffs=OTHER)
    _check(1, 2, 513, 128, 256, dtype=dtype, layout="BTHD")
    _check(1, 2, 1, 16, 64, dtype=dtype, normalize=False)


@pytest.mark.skipif(not triton_interpreting(), reason="runs the GPU tables under the interpreter")
# float16: each head-size table (small keys, small, medium, large) with each dk/dv kernel (split, atomic dq); float32
# has one table whatever the head size: each (Dk, Dv) once, both dk/dv kernels among them.
@pytest.mark.parametrize("dtype,dk,dv,atomic_dq", [
    *[(torch.float16, dk, dv, atomic) for dk, dv in [(16, 64), (32, 64), (64, 128), (128, 256)] for atomic in (True, False)],
    (torch.float32, 16, 64, True), (torch.float32, 64, 128, False), (torch.float32, 128, 256, True),
], ids=lambda x: str(x).replace("torch.", ""))
def test_gpu_launch_configs_under_the_interpreter(dtype, dk, dv, atomic_dq, monkeypatch):
    """The block sizes the GPU runs (the interpreter otherwise gets its own small ones), at a length
    that is no multiple of any block: values and gradients against float64."""
    from based_compile.kernels import parallel
    q, k, v = make_inputs(1, 2, 150, dk, dv, dtype=torch.float64)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    args = check_arguments(q, k, v)
    monkeypatch.setattr(parallel, "triton_interpreting", lambda: False)
    configs = parallel.launch_configs(args, dtype)
    monkeypatch.setattr(parallel, "triton_interpreting", lambda: True)     # not undo(): that lifts the poison too
    assert configs["fwd"].block_t >= 64
    o, z = parallel_forward(q, k, v, args, configs)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = naive_parallel_based(qd, kd, vd)
    do = torch.randn_like(ref).to(dtype)
    ref.backward(do.double())
    tol = TOL[dtype]
    assert_rel_close(o, ref, tol, "o")
    grads = parallel_backward(q, k, v, o, z, do, args, configs, atomic_dq=atomic_dq)
    for name, g, x in zip(("dq", "dk", "dv"), grads, (qd, kd, vd)):
        assert_rel_close(g, x.grad, 2 * tol, name)
