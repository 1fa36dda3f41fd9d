"""``based::attention_with_state``: the prefill's output and the final states in the user's features.

Against float64 references on fresh inputs: o = naive Based attention, kv_state = sum_t phi(k_t)^T v_t
and k_state = sum_t phi(k_t) with the feature map written out by hand from its pieces and
factors. CPU (both PyTorch forms), the fused-chunk kernel under Triton's interpreter (forced), and
`-m gpu` on CUDA with bfloat16.
"""
from __future__ import annotations

import math

import pytest
import torch

from based_compile.kernels import fused_chunk, naive_parallel_based
from based_compile.op import config
from based_compile.op.attention_with_state import based_attention_with_state
from based_compile.op.spec import BasedSpec
from compare import assert_rel_close
from conftest import make_inputs

D = 4
BASED_MAP = (["const:1", "linear", "outer"], [1.0, D ** -0.25, 1 / (math.sqrt(2) * math.sqrt(D))])


def phi_reference(x, pieces, factors):
    """The feature map, written out: cat of factor * (ones | x | flatten(x (x) x))."""
    parts = []
    for piece, f in zip(pieces, factors):
        if piece == "linear":
            parts.append(f * x)
        elif piece == "outer":
            parts.append(f * torch.einsum("...a,...b->...ab", x, x).flatten(-2))
        else:
            parts.append(f * torch.ones(*x.shape[:-1], int(piece[6:]), dtype=x.dtype, device=x.device))
    return torch.cat(parts, -1)


def _references(q, k, v, spec, pieces, factors):
    q, k, v = (x.double() for x in (q, k, v))
    o = naive_parallel_based(q, k, v, scale=spec.scale, coeffs=spec.coeffs, causal=spec.causal,
                             normalize=spec.normalize, eps=spec.eps, layout=spec.layout)
    if spec.layout == "BTHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    fk = phi_reference(k, pieces, factors)                     # [B, Hkv, T, F]
    return o, torch.einsum("bhtf,bhtd->bhfd", fk, v), fk.sum(2)


CASES = [
    # (t, kv_heads, layout, causal, normalize, dtype, pieces/factors)
    (9, None, "BHTD", True, True, torch.float64, BASED_MAP),
    (600, None, "BHTD", True, True, torch.float32, BASED_MAP),      # the chunked CPU form (T >= 512)
    (13, 1, "BTHD", True, True, torch.float64, BASED_MAP),          # GQA: states per kv head
    (11, None, "BHTD", False, False, torch.float64, (["linear", "const:2", "outer"], [0.5, 0.3, -0.2])),
    (1, None, "BTHD", True, True, torch.float32, BASED_MAP),
]


@pytest.mark.parametrize("t,kv_heads,layout,causal,normalize,dtype,fmap", CASES)
def test_cpu_output_and_states_match_float64(t, kv_heads, layout, causal, normalize, dtype, fmap):
    q, k, v = (x.to(dtype) for x in make_inputs(2, 2, t, D, 5, kv_heads=kv_heads, layout=layout))
    spec = BasedSpec(layout=layout, scale=0.5, causal=causal, normalize=normalize, eps=1e-3)
    o, kv, ks = based_attention_with_state(q, k, v, spec, *fmap)
    o_ref, kv_ref, ks_ref = _references(q, k, v, spec, *fmap)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert o.dtype == dtype and kv.dtype == ks.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_rel_close(o, o_ref, tol, "o")
    assert_rel_close(kv, kv_ref, tol, "kv_state")
    assert_rel_close(ks, ks_ref, tol, "k_state")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout,kv_heads", [("BHTD", None), ("BTHD", 1)])
def test_kernel_under_the_interpreter(dtype, layout, kv_heads, monkeypatch):
    """Forced fused_chunk under TRITON_INTERPRET=1: the kernel's final states, converted at the boundary."""
    from based_compile.kernels.arguments import triton_interpreting
    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    monkeypatch.setattr(config, "kernel", "fused_chunk")
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)
    q, k, v = (x.to(dtype) for x in make_inputs(1, 2, 37, D, 24, kv_heads=kv_heads, layout=layout))
    spec = BasedSpec(layout=layout, scale=0.5)
    o, kv, ks = based_attention_with_state(q, k, v, spec, *BASED_MAP)
    o_ref, kv_ref, ks_ref = _references(q, k, v, spec, *BASED_MAP)
    tol = 2e-5 if dtype == torch.float32 else 6e-3
    assert_rel_close(o, o_ref, tol, "o")
    assert_rel_close(kv, kv_ref, tol, "kv_state")
    assert_rel_close(ks, ks_ref, tol, "k_state")


def test_opcheck_and_fake():
    q, k, v = make_inputs(1, 2, 6, D, 3)
    args = (q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6, ["const:1", "linear", "outer"], [1.0, 0.5, 0.25])
    torch.library.opcheck(torch.ops.based.attention_with_state.default, args)


def test_bad_arguments():
    q, k, v = make_inputs(1, 2, 6, D, 3)
    spec = BasedSpec(scale=0.5)
    with pytest.raises(ValueError, match="pieces"):
        based_attention_with_state(q, k, v, spec, ["cubic"], [1.0])
    with pytest.raises(ValueError, match="k_factors"):
        based_attention_with_state(q, k, v, spec, ["linear", "outer"], [1.0])
    with pytest.raises(TypeError, match="spec"):
        based_attention_with_state(q, k, v, "BHTD", *BASED_MAP)
    with pytest.raises(ValueError, match="sequence length"):
        based_attention_with_state(q[:, :, :3], k, v, spec, *BASED_MAP)
    kv0, k0 = _initial(q, k, v, BASED_MAP)
    with pytest.raises(ValueError, match="kv0 must be a \\[1, 2, 21, 3\\] tensor"):
        based_attention_with_state(q, k, v, spec, *BASED_MAP, kv0.transpose(-2, -1), k0)
    with pytest.raises(ValueError, match="k0 must be"):
        based_attention_with_state(q, k, v, spec, *BASED_MAP, kv0, k0[..., :-1])
    with pytest.raises(TypeError, match="k0 must be a floating"):
        based_attention_with_state(q, k, v, spec, *BASED_MAP, kv0, k0.long())
    with pytest.raises(ValueError, match="nonzero factors"):
        based_attention_with_state(q, k, v, spec, ["const:1", "linear", "outer"], [1.0, 0.0, 1.0], kv0, k0)
    with pytest.raises(TypeError, match=r"pieces must be a list of feature-map pieces .* got 'linear'"):
        based_attention_with_state(q, k, v, spec, "linear", [1.0] * 6)     # not six pieces 'l', 'i', ...
    with pytest.raises(TypeError, match="k_factors must be a list of numbers"):
        based_attention_with_state(q, k, v, spec, ["linear"], 1.0)
    with pytest.raises(TypeError, match=r"pieces must be a list of feature-map pieces .* got \[1\]"):
        based_attention_with_state(q, k, v, spec, [1], [1.0])


# ------------------------------------------------------------ initial states: a prefill continued from them
def _initial(q, k, v, fmap, layout="BHTD"):
    """Fresh random initial states (kv0 [B, Hkv, F, Dv], k0 [B, Hkv, F] > 0), like q's dtype."""
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    hk = k.shape[1] if layout == "BHTD" else k.shape[2]
    f = sum(D if p == "linear" else D * D if p == "outer" else int(p[6:]) for p in fmap[0])
    kv0 = torch.randn(q.shape[0], hk, f, v.shape[-1], generator=g, dtype=torch.float64)
    k0 = torch.rand(q.shape[0], hk, f, generator=g, dtype=torch.float64) + 0.5
    return kv0.to(q.dtype), k0.to(q.dtype)


def _continued_reference(q, k, v, kv0, k0, spec, pieces, factors):
    """The linear form from the states, float64, written out: running sums start at kv0, k0."""
    q, k, v, kv0, k0 = (None if x is None else x.double() for x in (q, k, v, kv0, k0))
    if spec.layout == "BTHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    # the query side of the pairing: each piece's factor is the coefficient over the key factor
    coeff = {"linear": spec.c1 * spec.scale, "outer": spec.c2 * spec.scale ** 2}
    q_factors = [coeff.get(p, 0.0) / f if p in coeff else spec.c0 / (f * int(p[6:])) for p, f in zip(pieces, factors)]
    fq, fk = phi_reference(q, pieces, q_factors), phi_reference(k, pieces, factors)
    kv = (fk.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    ks = fk.cumsum(2)
    kv = kv + (kv0.unsqueeze(2) if kv0 is not None else 0)
    ks = ks + (k0.unsqueeze(2) if k0 is not None else 0)
    kvq, ksq = (x.repeat_interleave(g, dim=1) for x in (kv, ks))
    o = (fq.unsqueeze(-1) * kvq).sum(-2)
    if spec.normalize:
        o = o / ((fq * ksq).sum(-1, keepdim=True) + spec.eps)
    if spec.layout == "BTHD":
        o = o.transpose(1, 2)
    return o, kv[:, :, -1], ks[:, :, -1]


CONTINUED = [
    # (t, kv_heads, layout, normalize, fmap, which initial states)
    (9, None, "BHTD", True, BASED_MAP, "both"),
    (7, 1, "BTHD", True, BASED_MAP, "both"),                      # GQA: states per kv head
    (11, None, "BHTD", False, (["linear", "const:2", "outer"], [0.5, 0.3, -0.2]), "both"),
    (8, None, "BHTD", False, BASED_MAP, "kv0"),                   # the unnormalised form keeps no k state
    (600, None, "BHTD", True, BASED_MAP, "both"),                 # the chunked CPU form (T >= 512)
]


@pytest.mark.parametrize("t,kv_heads,layout,normalize,fmap,which", CONTINUED)
def test_continued_from_initial_states_values_and_gradients(t, kv_heads, layout, normalize, fmap, which):
    """Output and both states against the float64 linear form from the states; gradients in q, k, v,
    kv0 and k0 through all three results against autograd of that reference."""
    q, k, v = make_inputs(2, 2, t, D, 5, kv_heads=kv_heads, layout=layout)
    kv0, k0 = _initial(q, k, v, fmap, layout)
    k0 = k0 if which == "both" else None
    spec = BasedSpec(layout=layout, scale=0.5, normalize=normalize, eps=1e-3)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, kv0, k0) if x is not None]
    got = based_attention_with_state(*inputs[:3], spec, *fmap, *inputs[3:] + [None] * (5 - len(inputs)))
    ref_inputs = [x.clone().requires_grad_() for x in inputs]
    want = _continued_reference(*ref_inputs[:3], *ref_inputs[3:] + [None] * (5 - len(inputs)), spec, *fmap)
    for name, g_, w in zip(("o", "kv_state", "k_state"), got, want):
        assert_rel_close(g_, w, 1e-11, name)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g_ * c).sum() for g_, c in zip(got, cots)), inputs)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_inputs)
    for name, g_, w in zip(("dq", "dk", "dv", "dkv0", "dk0"), grads, wants):
        assert_rel_close(g_, w, 1e-11, name)


def test_final_states_alone_are_differentiable():
    """Without initial states the returned states carry gradients to k and v too."""
    q, k, v = make_inputs(1, 2, 10, D, 3, requires_grad=True)
    spec = BasedSpec(scale=0.5)
    got = based_attention_with_state(q, k, v, spec, *BASED_MAP)
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    want = _references(*ref, spec, *BASED_MAP)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g_ * c).sum() for g_, c in zip(got, cots)), (q, k, v))
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref)
    for name, g_, w in zip(("dq", "dk", "dv"), grads, wants):
        assert_rel_close(g_, w, 1e-11, name)


@pytest.mark.parametrize("layout,kv_heads", [("BHTD", None), ("BTHD", 1)])
def test_kernel_from_initial_states_under_the_interpreter(layout, kv_heads, monkeypatch):
    """Forced fused_chunk under TRITON_INTERPRET=1, starting from the initial states (converted to its
    moments), with NaN-poisoned outputs; float32 against float64."""
    from based_compile.kernels.arguments import triton_interpreting
    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    monkeypatch.setattr(config, "kernel", "fused_chunk")
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)
    q, k, v = (x.float() for x in make_inputs(1, 2, 37, D, 24, kv_heads=kv_heads, layout=layout))
    fmap = (["const:2", "linear", "outer"], [0.7, D ** -0.25, 1 / (math.sqrt(2) * math.sqrt(D))])
    kv0, k0 = _initial(q, k, v, fmap, layout)
    spec = BasedSpec(layout=layout, scale=0.5)
    o, kv, ks = based_attention_with_state(q, k, v, spec, *fmap, kv0, k0)
    o_ref, kv_ref, ks_ref = _continued_reference(q, k, v, kv0, k0, spec, *fmap)
    assert_rel_close(o, o_ref, 2e-5, "o")
    assert_rel_close(kv, kv_ref, 2e-5, "kv_state")
    assert_rel_close(ks, ks_ref, 2e-5, "k_state")


@pytest.mark.parametrize("layout,kv_heads,initial", [("BHTD", None, True), ("BTHD", 1, True), ("BHTD", None, False)])
def test_kernel_backward_under_the_interpreter(layout, kv_heads, initial, monkeypatch):
    """Forced fused_chunk under TRITON_INTERPRET=1: the backward through the kernels (the gradient in
    the final states as later queries' reverse states, query_moments for the initial states), with
    NaN-poisoned outputs; float32 gradients in q, k, v, kv0, k0 against autograd of the float64
    reference, through the output and both returned states."""
    from based_compile.kernels.arguments import triton_interpreting
    if not triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    monkeypatch.setattr(config, "kernel", "fused_chunk")
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)
    calls = []
    monkeypatch.setattr(fused_chunk, "fused_chunk_backward_with_state",
                        lambda *a, **kw: calls.append(1) or _REAL_BACKWARD(*a, **kw))
    q, k, v = (x.float() for x in make_inputs(1, 2, 21, D, 6, kv_heads=kv_heads, layout=layout))
    fmap = (["const:1", "linear", "outer"], [1.0, D ** -0.25, 1 / (math.sqrt(2) * math.sqrt(D))])
    kv0, k0 = _initial(q, k, v, fmap, layout) if initial else (None, None)
    spec = BasedSpec(layout=layout, scale=0.5)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, kv0, k0) if x is not None]
    starts = inputs[3:] + [None] * (5 - len(inputs))
    got = based_attention_with_state(*inputs[:3], spec, *fmap, *starts)
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want = _continued_reference(*ref_inputs[:3], *(ref_inputs[3:] + [None] * (5 - len(inputs))), spec, *fmap)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g_ * c.float()).sum() for g_, c in zip(got, cots)), inputs)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_inputs)
    assert calls, "the backward did not run the fused-chunk kernels"
    for name, g_, w in zip(("dq", "dk", "dv", "dkv0", "dk0"), grads, wants):
        assert_rel_close(g_, w, 1e-4, name)


_REAL_BACKWARD = fused_chunk.fused_chunk_backward_with_state


def test_opcheck_with_initial_states():
    q, k, v = make_inputs(1, 2, 6, D, 3, requires_grad=True)
    kv0, k0 = (x.requires_grad_() for x in _initial(q, k, v, BASED_MAP))
    args = (q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6, ["const:1", "linear", "outer"], [1.0, 0.5, 0.25],
            kv0, k0)
    torch.library.opcheck(torch.ops.based.attention_with_state.default, args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_states_match_float64(dtype, no_tf32):
    q, k, v = (x.to(dtype) for x in make_inputs(2, 8, 2051, 16, 64, kv_heads=4, layout="BTHD", device="cuda"))
    fmap = (["const:1", "linear", "outer"], [1.0, 0.5, 1 / (4 * math.sqrt(2))])
    spec = BasedSpec(layout="BTHD", scale=0.25)
    o, kv, ks = based_attention_with_state(q, k, v, spec, *fmap)
    o_ref, kv_ref, ks_ref = _references(q, k, v, spec, *fmap)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}[dtype]
    assert_rel_close(o, o_ref, tol, "o")
    assert_rel_close(kv, kv_ref, tol, "kv_state")
    assert_rel_close(ks, ks_ref, tol, "k_state")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_continued_from_initial_states(dtype, no_tf32):
    """The fused chunk from initial states on CUDA (values), and the gradients of the recomputation."""
    q, k, v = (x.to(dtype) for x in make_inputs(2, 8, 2051, 16, 64, kv_heads=4, layout="BTHD", device="cuda"))
    fmap = (["const:1", "linear", "outer"], [1.0, 0.5, 1 / (4 * math.sqrt(2))])
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    kv0 = torch.randn(2, 4, 273, 64, generator=g, dtype=torch.float64).cuda() * 0.05
    k0 = (torch.rand(2, 4, 273, generator=g, dtype=torch.float64).cuda() + 0.5) * 50
    spec = BasedSpec(layout="BTHD", scale=0.25)
    inputs = [x.clone().requires_grad_() for x in (q, k, v, kv0.float(), k0.float())]
    got = based_attention_with_state(*inputs[:3], spec, *fmap, *inputs[3:])
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want = _continued_reference(*ref_inputs[:3], *ref_inputs[3:], spec, *fmap)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2}[dtype]
    for name, g_, w in zip(("o", "kv_state", "k_state"), got, want):
        assert_rel_close(g_, w, tol, name)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g_ * c.to(g_.dtype)).sum() for g_, c in zip(got, cots)), inputs)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_inputs)
    for name, g_, w in zip(("dq", "dk", "dv", "dkv0", "dk0"), grads, wants):
        assert_rel_close(g_, w, 2 * tol, name)
