"""The fused-chunk kernel over a sequence split into consecutive calls (context parallelism's shards).

A call starts from the states of the tokens before it (``initial``: ``state_moments`` of the earlier
parts; non-causal: of all other parts) and, in the backward, from the reverse states of the queries
after it (``later``: ``query_moments`` of the later parts). Every part's o and the gradients of its
q, k, v must equal the float64 autograd reference over the whole sequence, normalised and not,
causal and not, both layouts, GQA, two value blocks, moments over several segments of T. Every
buffer the kernels allocate is poisoned (NaN) first. CPU runs go through Triton's interpreter.
"""
from __future__ import annotations

import pytest
import torch

from based_compile.kernels import fused_chunk, naive_parallel_based
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.fused_chunk import (fused_chunk_backward, fused_chunk_backward_with_state,
                                               fused_chunk_forward_with_state, query_moments, state_moments)
from compare import assert_rel_close
from conftest import make_inputs

TOL = 2e-5
COEFFS = (0.7, 1.1, 0.45)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(fused_chunk, "POISON_OUTPUTS", True)


def _features(x):
    """float64 [..., T, D] -> [..., T, 1 + D + D^2]: [1, x, flatten(x (x) x)]."""
    return torch.cat([torch.ones_like(x[..., :1]), x, torch.einsum("...ta,...tc->...tac", x, x).flatten(-2)], -1)


def _bhtd(x, layout):
    return x.transpose(1, 2) if layout == "BTHD" else x


CASES = [
    # (t, dk, dv, kv_heads, layout, causal, normalize, cut)
    (50, 8, 24, None, "BHTD", True, True, 21),       # moments over 2 segments
    (45, 16, 80, 1, "BTHD", True, True, 30),         # two value blocks, GQA group 2
    (40, 5, 16, None, "BHTD", True, False, 17),      # odd Dk, unnormalised
    (37, 8, 24, 1, "BTHD", False, True, 16),         # non-causal, GQA
    (33, 4, 8, None, "BHTD", False, False, 20),      # non-causal, unnormalised
]


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,cut", CASES)
def test_split_forward_and_backward_equal_the_whole_sequence(t, dk, dv, kv_heads, layout, causal, normalize, cut):
    q, k, v = make_inputs(2, 2, t, dk, dv, kv_heads=kv_heads, layout=layout)
    do = torch.randn(q.shape[:-1] + (dv,), dtype=torch.float64)
    kw = dict(scale=0.6, coeffs=COEFFS, causal=causal, normalize=normalize, eps=1e-3, layout=layout)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*full, **kw)
    ref.backward(do)
    dim = 2 if layout == "BHTD" else 1
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize}"

    parts = [(0, cut), (cut, t)]
    inputs = [[x.narrow(dim, s, e - s).float() for x in (q, k, v, do)] for s, e in parts]
    args = [check_arguments(*x[:3], **kw) for x in inputs]
    states = [state_moments(x[1], x[2], a) for x, a in zip(inputs, args)]
    for (s, e), st in zip(parts, states):         # the states against float64
        kb, vb = _bhtd(k.narrow(dim, s, e - s), layout), _bhtd(v.narrow(dim, s, e - s), layout)
        want = torch.einsum("bhtm,bhtd->bhmd", _features(kb), torch.cat([vb, torch.ones_like(vb[..., :1])], -1))
        assert st.dtype == torch.float32
        assert_rel_close(st, want, TOL, f"state_moments ({what})")
    initial = [None, states[0]] if causal else [states[1], states[0]]

    outs = []
    for i, ((s, e), x, a) in enumerate(zip(parts, inputs, args)):
        o, z = fused_chunk_forward_with_state(*x[:3], a, initial=initial[i], final=False)
        assert_rel_close(o, ref.narrow(dim, s, e - s), TOL, f"o of part {i} ({what})")
        outs.append((o, z))

    reverse = [query_moments(x[0], o, z, x[3], a) for x, (o, z), a in zip(inputs, outs, args)]
    for (s, e), x, (o, z), r in zip(parts, inputs, outs, reverse):     # the reverse states against float64
        qb, dob = _bhtd(x[0].double(), layout) * 0.6, _bhtd(x[3].double(), layout)
        if normalize:
            ob = _bhtd(o.double(), layout)
            rz = 1.0 / (z.double().unsqueeze(-1) + 1e-3)
            cols = torch.cat([dob * rz, -(dob * ob).sum(-1, keepdim=True) * rz], -1)
        else:
            cols = torch.cat([dob, torch.zeros_like(dob[..., :1])], -1)
        want = torch.einsum("bhtm,bhtd->bhmd", _features(qb), cols)
        assert r.shape == want.shape and r.dtype == torch.float32
        assert_rel_close(r, want, TOL, f"query_moments ({what})")
    later = [reverse[1], None] if causal else [reverse[1], reverse[0]]

    for i, ((s, e), x, (o, z), a) in enumerate(zip(parts, inputs, outs, args)):
        grads = fused_chunk_backward_with_state(*x[:3], o, z, x[3], a, initial=initial[i], later=later[i])
        for name, g, whole in zip("qkv", grads, full):
            assert g.shape == x["qkv".index(name)].shape
            assert_rel_close(g, whole.grad.narrow(dim, s, e - s), 2 * TOL, f"d{name} of part {i} ({what})")


def test_no_states_is_the_plain_backward():
    q, k, v = (x.float() for x in make_inputs(1, 2, 30, 8, 16))
    do = torch.randn(1, 2, 30, 16)
    args = check_arguments(q, k, v)
    o, z, _ = fused_chunk_forward_with_state(q, k, v, args)
    for a, b in zip(fused_chunk_backward_with_state(q, k, v, o, z, do, args),
                    fused_chunk_backward(q, k, v, o, z, do, args)):
        assert torch.equal(a, b)


def test_bad_states_raise_naming_them():
    q, k, v = (x.float() for x in make_inputs(1, 2, 8, 4, 8, kv_heads=1))
    do = torch.randn(1, 2, 8, 8)
    args = check_arguments(q, k, v)
    o, z, _ = fused_chunk_forward_with_state(q, k, v, args)
    with pytest.raises(ValueError, match="initial"):
        fused_chunk_backward_with_state(q, k, v, o, z, do, args, initial=torch.zeros(1, 2, 21, 9))
    with pytest.raises(ValueError, match="later"):        # per query head (2), not per kv head (1)
        fused_chunk_backward_with_state(q, k, v, o, z, do, args, later=torch.zeros(1, 1, 21, 9))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
def test_gpu_split_realistic_shapes(dtype, causal, no_tf32):
    t, cut = 4099, 2050
    q, k, v = (x.to(dtype) for x in make_inputs(1, 12, t, 16, 64, device="cuda"))
    do = torch.randn(1, 12, t, 64, device="cuda", dtype=dtype)
    kw = dict(causal=causal)
    ref = [x.detach().clone().double().requires_grad_() for x in (q, k, v)]
    o_ref = naive_parallel_based(*ref, **kw)
    o_ref.backward(do.double())
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    parts = [(0, cut), (cut, t)]
    inputs = [[x[:, :, s:e] for x in (q, k, v, do)] for s, e in parts]
    args = [check_arguments(*x[:3], **kw) for x in inputs]
    states = [state_moments(x[1], x[2], a) for x, a in zip(inputs, args)]
    initial = [None, states[0]] if causal else [states[1], states[0]]
    outs = [fused_chunk_forward_with_state(*x[:3], a, initial=i, final=False) for x, a, i in zip(inputs, args, initial)]
    reverse = [query_moments(x[0], o, z, x[3], a) for x, (o, z), a in zip(inputs, outs, args)]
    later = [reverse[1], None] if causal else [reverse[1], reverse[0]]
    for i, ((s, e), x, (o, z), a) in enumerate(zip(parts, inputs, outs, args)):
        assert_rel_close(o, o_ref[:, :, s:e], tol, f"o of part {i}")
        grads = fused_chunk_backward_with_state(*x[:3], o, z, x[3], a, initial=initial[i], later=later[i])
        for name, g, whole in zip("qkv", grads, ref):
            assert_rel_close(g, whole.grad[:, :, s:e], 2 * tol, f"d{name} of part {i}")
