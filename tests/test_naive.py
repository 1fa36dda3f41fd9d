"""The references agree with each other and with a float64 evaluation of the formula."""
from __future__ import annotations

import itertools

import pytest
import torch

from based_compile.kernels import (naive_chunk_based, naive_chunkwise_based, naive_parallel_based,
                                   naive_recurrent_step)
from compare import assert_rel_close
from conftest import make_inputs

COEFFS = [(1.0, 1.0, 0.5), (1.0, 1.0, 1.0), (0.3, -0.7, 0.25)]


def formula(q, k, v, scale, coeffs, causal, normalize, eps):
    """Direct per-(i, j) evaluation of DESIGN.md section 1 in float64 (BHTD, no GQA); differentiable,
    so that its gradients are the reference for the references' own."""
    q, k, v = (x.double() for x in (q, k, v))
    c0, c1, c2 = coeffs
    t = q.shape[2]
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    f = c0 + c1 * s + c2 * s ** 2
    if causal:
        f = f * (torch.arange(t)[:, None] >= torch.arange(t)[None, :])
    n = torch.einsum("bhij,bhjd->bhid", f, v)
    if not normalize:
        return n
    return n / (f.sum(-1)[..., None] + eps)


LENGTHS, DKS, DVS = [1, 7, 63, 130], [1, 8, 16, 32], [1, 16, 64]
# Every pair of values of two of the dimensions (T, Dk), (T, Dv), (Dk, Dv) once (16 cases, not the 48 of
# the full product: nothing in the references couples all three).
CASES = [(t, dk, DVS[(i + j) % len(DVS)]) for i, t in enumerate(LENGTHS) for j, dk in enumerate(DKS)]


def test_cases_cover_every_pair():
    for (a, xs), (b, ys) in itertools.combinations(enumerate((LENGTHS, DKS, DVS)), 2):
        assert {(c[a], c[b]) for c in CASES} == set(itertools.product(xs, ys)), (a, b)


@pytest.mark.parametrize("t,dk,dv", CASES)
def test_references_match_formula_float64(t, dk, dv):
    for causal, normalize in itertools.product([True, False], [True, False]):
        coeffs = COEFFS[(t + dk + dv) % len(COEFFS)]
        q, k, v = make_inputs(1, 2, t, dk, dv)
        scale = dk ** -0.5
        ref = formula(q, k, v, scale, coeffs, causal, normalize, 1e-6)
        for fn in (naive_parallel_based, naive_chunk_based):
            out = fn(q, k, v, coeffs=coeffs, causal=causal, normalize=normalize)
            assert_rel_close(out, ref, 1e-10, f"{fn.__name__} causal={causal} normalize={normalize}")


@pytest.mark.parametrize("coeffs", COEFFS)
@pytest.mark.parametrize("causal,normalize", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunk_matches_parallel_values_and_grads(coeffs, causal, normalize, dtype, tol):
    if coeffs == (0.3, -0.7, 0.25) and normalize:
        pytest.skip("a normaliser with a sign-changing polynomial can cross zero: not well conditioned")
    q, k, v = make_inputs(2, 2, 130, 16, 64, dtype=torch.float64, requires_grad=True)
    do = torch.randn(2, 2, 130, 64, dtype=torch.float64)
    ref = formula(q, k, v, 16 ** -0.5, coeffs, causal, normalize, 1e-6)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    qd, kd, vd = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    for fn in (naive_parallel_based, naive_chunk_based):
        out = fn(qd, kd, vd, coeffs=coeffs, causal=causal, normalize=normalize)
        assert out.dtype == dtype
        assert_rel_close(out, ref, tol, f"{fn.__name__} values")
        grads = torch.autograd.grad(out, (qd, kd, vd), do.to(dtype))
        for name, g, r in zip("qkv", grads, ref_grads):
            assert_rel_close(g, r, tol * 10 if dtype == torch.float32 else tol, f"{fn.__name__} d{name}")


@pytest.mark.parametrize("chunk_size", [1, 5, 64, 200])
def test_chunk_any_length_and_chunk(chunk_size):
    q, k, v = make_inputs(1, 3, 77, 8, 16)
    ref = naive_parallel_based(q, k, v)
    assert_rel_close(naive_chunk_based(q, k, v, chunk_size=chunk_size), ref, 1e-10)


def test_gqa_and_bthd_layout():
    q, k, v = make_inputs(2, 4, 33, 8, 16, kv_heads=2)
    ref = naive_parallel_based(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    for fn in (naive_parallel_based, naive_chunk_based):
        assert_rel_close(fn(q, k, v), ref, 1e-12, f"{fn.__name__} gqa")
        o = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout="BTHD")
        assert_rel_close(o.transpose(1, 2), ref, 1e-12, f"{fn.__name__} BTHD")


@pytest.mark.parametrize("bad,exc,match", [
    (dict(q=torch.zeros(2, 2, 4)), ValueError, "q must be 4-D"),
    (dict(k=torch.zeros(1, 2, 5, 8)), ValueError, "sequence length"),
    (dict(k=torch.zeros(1, 3, 4, 8), v=torch.zeros(1, 3, 4, 8)), ValueError, "multiple of the heads"),
    (dict(v=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), TypeError, "one dtype"),
    (dict(q=torch.zeros(1, 2, 4, 8, dtype=torch.int32)), TypeError, "floating dtype"),
    (dict(layout="BSHD"), ValueError, "layout"),
    (dict(coeffs=(1.0, 1.0)), ValueError, "coeffs"),
    (dict(eps=-1.0), ValueError, "eps"),
    (dict(causal=1), TypeError, "causal"),
    (dict(k=torch.zeros(1, 2, 4, 8, device="meta")), ValueError, "one device"),
    (dict(v=torch.zeros(2, 2, 4, 8)), ValueError, "batch size"),
    (dict(k=torch.zeros(1, 2, 4, 6)), ValueError, "feature dim Dk"),
    (dict(k=torch.zeros(1, 1, 4, 8)), ValueError, "same number of heads"),
    (dict(scale="0.5"), TypeError, "scale"),
    (dict(normalize=None), TypeError, "normalize"),
    (dict(coeffs="125"), TypeError, "coeffs"),                  # not read as (1, 2, 5)
    (dict(coeffs=("a", "b", "c")), TypeError, "coeffs"),
    (dict(coeffs={"c0": 1.0, "c1": 1.0, "c2": 0.5}), TypeError, "coeffs"),
    (dict(q=torch.zeros(1, 2, 4, 8, dtype=torch.float8_e4m3fn)), TypeError, "floating dtype"),
])
def test_bad_arguments_are_named(bad, exc, match):
    args = dict(q=torch.randn(1, 2, 4, 8), k=torch.randn(1, 2, 4, 8), v=torch.randn(1, 2, 4, 8))
    args.update(bad)
    for fn in (naive_parallel_based, naive_chunk_based):
        with pytest.raises(exc, match=match):
            fn(**args)


@pytest.mark.parametrize("chunk_size", [True, 0, 2.0])
def test_bad_chunk_size_is_named(chunk_size):
    q, k, v = make_inputs(1, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="chunk_size"):
        naive_chunk_based(q, k, v, chunk_size=chunk_size)


@pytest.mark.parametrize("fn", [naive_parallel_based, naive_chunk_based, naive_chunkwise_based],
                         ids=lambda f: f.__name__)
@pytest.mark.parametrize("causal,normalize", [(True, True), (False, False)])
@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_empty_batch_gives_empty_outputs_and_grads(fn, causal, normalize, layout):
    """B = 0: an empty output of the right shape (and empty gradients), as every other entry point."""
    q, k, v = make_inputs(0, 2, 7, 4, 3, layout=layout, requires_grad=True)
    o = fn(q, k, v, causal=causal, normalize=normalize, layout=layout)
    assert o.shape == ((0, 2, 7, 3) if layout == "BHTD" else (0, 7, 2, 3))
    o.sum().backward()
    assert [x.grad.shape for x in (q, k, v)] == [x.shape for x in (q, k, v)]


STEP_MAP = (["const:1", "linear", "outer"], [1.0, 0.5, 0.125], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("bad,exc,match", [
    (dict(kv_state=torch.randn(1, 2, 13, 3)), ValueError, r"naive_recurrent_step: kv_state must hold rows \* F \* Dv"),
    (dict(q=torch.ones(1, 2, 1, 3, dtype=torch.long)), TypeError, "naive_recurrent_step: q must have a floating dtype"),
    (dict(q_factors=[1.0, 0.5]), ValueError, "naive_recurrent_step: q_factors must have one factor per piece"),
    (dict(q=torch.randn(1, 3, 1, 3)), ValueError, "naive_recurrent_step: q's rows .* must be a multiple G of k's"),
    (dict(k_state=None), ValueError, "naive_recurrent_step: k_state is None, which only an unnormalised step"),
    (dict(pieces="linear"), ValueError, "naive_recurrent_step: pieces must be a non-empty list"),
    (dict(eps=-1.0), ValueError, "naive_recurrent_step: eps"),
])
def test_recurrent_step_reference_checks_its_arguments(bad, exc, match):
    """naive_recurrent_step checks its arguments as based::recurrent_step does (check_step_arguments)."""
    args = dict(q=torch.randn(1, 2, 1, 3), k=torch.randn(1, 2, 1, 3), v=torch.randn(1, 2, 1, 4),
                kv_state=torch.randn(1, 2, 13, 4), k_state=torch.randn(1, 2, 1, 13), pieces=STEP_MAP[0],
                q_factors=STEP_MAP[1], k_factors=STEP_MAP[2])
    naive_recurrent_step(**args)
    args.update(bad)
    with pytest.raises(exc, match=match):
        naive_recurrent_step(**args)
