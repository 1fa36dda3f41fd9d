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


def test_not_differentiable_and_bad_arguments():
    q, k, v = make_inputs(1, 2, 6, D, 3)
    spec = BasedSpec(scale=0.5)
    with pytest.raises(RuntimeError, match="not differentiable"):
        based_attention_with_state(q.requires_grad_(), k, v, spec, *BASED_MAP)
    q = q.detach()
    with pytest.raises(ValueError, match="pieces"):
        based_attention_with_state(q, k, v, spec, ["cubic"], [1.0])
    with pytest.raises(ValueError, match="k_factors"):
        based_attention_with_state(q, k, v, spec, ["linear", "outer"], [1.0])
    with pytest.raises(TypeError, match="spec"):
        based_attention_with_state(q, k, v, "BHTD", *BASED_MAP)
    with pytest.raises(ValueError, match="sequence length"):
        based_attention_with_state(q[:, :, :3], k, v, spec, *BASED_MAP)


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
