"""The fused-chunk kernel with states: an initial state in, the final state out (issue 15).

States are float32 moments [B, Hkv, 1 + Dk + Dk^2, Dv + 1], sum over tokens of
[1, k, flatten(k (x) k)]^T [v, 1]. Checked against float64 references on fresh inputs, with every
buffer the kernel allocates poisoned (NaN) first: the final state must equal the moments of all
tokens, and a prefill continued from the state of a first part must give the outputs of the whole
sequence (the hand-off of chunked prefill). CPU runs go through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from based_compile.kernels import fused_chunk, naive_parallel_based
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.fused_chunk import fused_chunk_forward, fused_chunk_forward_with_state
from compare import assert_rel_close
from conftest import make_inputs

TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)


def moments_reference(k, v, layout="BHTD"):
    """float64 sum_t [1, k_t, k_t (x) k_t]^T [v_t, 1] per (b, kv head): [B, Hkv, 1 + Dk + Dk^2, Dv + 1]."""
    if layout == "BTHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.double(), v.double()
    feats = torch.cat([torch.ones_like(k[..., :1]), k, torch.einsum("bhta,bhtc->bhtac", k, k).flatten(-2)], -1)
    vals = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    return torch.einsum("bhtm,bhtd->bhmd", feats, vals)


CASES = [
    # (t, dk, dv, kv_heads, layout, causal, normalize, dtype)
    (33, 16, 32, None, "BHTD", True, True, torch.float32),
    (50, 16, 80, 1, "BTHD", True, True, torch.float32),          # two value blocks, GQA group 2
    (17, 5, 24, None, "BHTD", True, False, torch.float32),       # odd Dk (padded block), unnormalised
    (33, 8, 40, None, "BTHD", False, True, torch.float32),       # non-causal
    (1, 4, 8, None, "BHTD", True, True, torch.float32),
    (45, 16, 64, 1, "BHTD", True, True, torch.float16),
    (29, 8, 24, None, "BTHD", True, False, torch.float16),
]


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,dtype", CASES)
def test_final_state_and_continued_prefill_match_float64(t, dk, dv, kv_heads, layout, causal, normalize, dtype):
    q, k, v = (x.to(dtype) for x in make_inputs(2, 2, t, dk, dv, kv_heads=kv_heads, layout=layout))
    kw = dict(causal=causal, normalize=normalize, layout=layout)
    args = check_arguments(q, k, v, **kw)
    o, z, final = fused_chunk_forward_with_state(q, k, v, args)
    ref = naive_parallel_based(q.double(), k.double(), v.double(), **kw)
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize} {dtype}"
    assert_rel_close(o, ref, TOL[dtype], f"o ({what})")
    assert (z is None) == (not normalize)
    assert final.dtype == torch.float32 and final.shape == (2, k.shape[1 if layout == "BHTD" else 2],
                                                            1 + dk + dk * dk, dv + 1)
    assert_rel_close(final, moments_reference(k, v, layout), TOL[dtype], f"final state ({what})")
    # the same forward without states is unchanged
    o_plain, _ = fused_chunk_forward(q, k, v, args)
    assert_rel_close(o_plain, ref, TOL[dtype], f"o without states ({what})")
    if t < 2 or not causal:
        return
    # a prefill continued from the state of the first part: the outputs of the whole sequence
    dim = 2 if layout == "BHTD" else 1
    cut = t // 3 + 1
    first = [x.narrow(dim, 0, cut) for x in (q, k, v)]
    rest = [x.narrow(dim, cut, t - cut) for x in (q, k, v)]
    _, _, state = fused_chunk_forward_with_state(*first, check_arguments(*first, **kw))
    o2, _, final2 = fused_chunk_forward_with_state(*rest, check_arguments(*rest, **kw), initial=state)
    assert_rel_close(o2, ref.narrow(dim, cut, t - cut), TOL[dtype], f"continued o ({what})")
    assert_rel_close(final2, moments_reference(k, v, layout), TOL[dtype], f"continued final state ({what})")


def test_non_causal_initial_state_adds_to_every_query():
    q, k, v = (x.float() for x in make_inputs(1, 2, 21, 8, 16))
    k0, v0 = (x.float() for x in make_inputs(1, 2, 9, 8, 16)[1:])
    kw = dict(causal=False)
    _, _, state = fused_chunk_forward_with_state(q[:, :, :9], k0, v0, check_arguments(q[:, :, :9], k0, v0, **kw))
    o, _, _ = fused_chunk_forward_with_state(q, k, v, check_arguments(q, k, v, **kw), initial=state)
    kk, vv = torch.cat([k0, k], 2).double(), torch.cat([v0, v], 2).double()
    ref = naive_parallel_based(torch.cat([q[:, :, :9], q], 2).double(), kk, vv, causal=False)[:, :, 9:]
    assert_rel_close(o, ref, 2e-5, "non-causal o with an initial state")


def test_bad_initial_state_raises_naming_it():
    q, k, v = (x.float() for x in make_inputs(1, 2, 8, 4, 8))
    args = check_arguments(q, k, v)
    with pytest.raises(ValueError, match="initial"):
        fused_chunk_forward_with_state(q, k, v, args, initial=torch.zeros(1, 2, 21, 8))
    with pytest.raises(TypeError, match="initial must be a floating tensor .* got torch.int64"):
        fused_chunk_forward_with_state(q, k, v, args, initial=torch.zeros(1, 2, 21, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="initial must be a floating tensor .* got int"):
        fused_chunk_forward_with_state(q, k, v, args, initial=0)
    o, z = fused_chunk_forward(q, k, v, args)
    with pytest.raises(TypeError, match="later must be a floating tensor .* got torch.int64"):
        fused_chunk.fused_chunk_backward_with_state(q, k, v, o, z, torch.ones_like(o), args,
                                                    later=torch.zeros(1, 2, 21, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="one length"):
        fused_chunk_forward_with_state(q[:, :, :3], k, v, check_arguments(q[:, :, :3], k, v, shorter_queries=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout,kv_heads", [("BHTD", None), ("BTHD", 4)])
def test_gpu_final_state_realistic_shapes(dtype, layout, kv_heads, no_tf32):
    q, k, v = (x.to(dtype) for x in make_inputs(2, 8, 4099, 16, 64, kv_heads=kv_heads, layout=layout,
                                                device="cuda"))
    args = check_arguments(q, k, v, layout=layout)
    o, _, final = fused_chunk_forward_with_state(q, k, v, args)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}[dtype]
    assert_rel_close(final, moments_reference(k, v, layout), tol, "final state")
    cut = 1500
    dim = 2 if layout == "BHTD" else 1
    first = [x.narrow(dim, 0, cut) for x in (q, k, v)]
    rest = [x.narrow(dim, cut, 4099 - cut) for x in (q, k, v)]
    _, _, state = fused_chunk_forward_with_state(*first, check_arguments(*first, layout=layout))
    o2, _, _ = fused_chunk_forward_with_state(*rest, check_arguments(*rest, layout=layout), initial=state)
    assert_rel_close(o2, o.narrow(dim, cut, 4099 - cut), tol, "continued o")
