"""Under torch.autocast, a result computed in autocast's dtype and returned wider, and a feature map that promotes
to a wider dtype than q, k, v (graph/autocast_scope.py: computed_precision, operator_precision).

On CUDA autocast runs sum, cumsum, pow and reciprocal in float32: the most basic normalised form,
``(a @ v) / (a.sum(-1, keepdim=True) + eps)`` with bfloat16 weights from autocast's matmul, returns float32 there
(a bfloat16 numerator over float32 row sums), and the pass refused it, so bf16 autocast training fell back to the
naive form. On the CPU ``a.sum(-1, keepdim=True, dtype=torch.float32)`` (or ``a.float()``, ``s.float() ** 2``)
does the same. Every path of values from q, k, v to the output rounds to autocast's dtype at its matmuls, so the
operator runs cast as a matmul and its output is cast to eager's dtype: same dtype, values and gradients no
further from float64 than 2x eager's own error + 1e-5 relative. A form where some path keeps float32 (an
elementwise numerator over a matmul's normaliser) runs the operator in float32 (autocast off).

Without autocast, zoology's TaylorExp.forward_mem_save builds its ones column as ``torch.ones(x[..., :1].shape)``
(float32): bfloat16/float16 q, k promote to float32 features and eager computes the site in float32; the operator
ran in bfloat16 (1.5e-3 against eager's 1.2e-4, red team). It now runs in the promoted dtype (q, k, v cast up).
The probe is off throughout (as at real sizes).
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from pass_reports import PassReports

B, H, T, D, DV = 2, 2, 11, 4, 5
LOW = {"bf16": torch.bfloat16, "f16": torch.float16}

pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


@pytest.fixture(autouse=True)
def _probe_off(monkeypatch):
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)


def phi(x):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25, x2], -1)


_WIDE = [torch.float32]


def wide():
    """The dtype the forms widen to: float32, float64 for the float64 reference (whose inputs are float64)."""
    return _WIDE[0]


def _causal_weights(q, k):
    t = q.shape[-2]
    s = q @ k.mT * 0.5
    return (1 + s + 0.5 * s * s).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)


def sum_dtype(q, k, v):                    # the polynomial's row sums in float32
    a = _causal_weights(q, k)
    return (a @ v) / (a.sum(-1, keepdim=True, dtype=wide()) + 1e-6)


def float_sum(q, k, v):
    a = _causal_weights(q, k)
    return (a @ v) / (a.to(wide()).sum(-1, keepdim=True) + 1e-6)


def weights_float(q, k, v):                # float32 weights: autocast lowers the numerator's matmul again
    a = _causal_weights(q, k).to(wide())
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def cuda_like(q, k, v):                    # what CUDA's autocast does to the plain form: pow, sum, reciprocal widened
    s = q @ k.mT / 2
    a = torch.tril(1 + s + 0.5 * s.to(wide()) ** 2)
    return (a @ v) * (a.sum(-1, keepdim=True, dtype=wide()) + 1e-6).reciprocal()


def non_causal_key_sum(q, k, v):
    qf, kf = phi(q), phi(k)
    return (qf @ torch.einsum("bhtf,bhtd->bhfd", kf, v)) / (
        (qf @ kf.sum(2, dtype=wide())[..., None]) .to(wide()) + 1e-6)


def taylor_map(q, k, v):                   # the feature-map quadratic form, row sums in float32
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a.sum(-1, keepdim=True, dtype=wide()) + 1e-6)


def linear_cumsum_widened(q, k, v):        # the einsum linear form, its contractions' results widened
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2, dtype=wide())
    den = torch.einsum("bhnf,bhnf->bhn", qf, kf.cumsum(2, dtype=wide())).to(wide())[..., None]
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv).to(wide()) / (den + 1e-6)


WIDENED = [sum_dtype, float_sum, weights_float, cuda_like, non_causal_key_sum, taylor_map, linear_cumsum_widened]


def _close_to_float64(got, want, reference, what, slack=1e-5):
    """eager's dtype, and no further from float64 than 2x eager's own error + ``slack`` relative."""
    assert got.dtype == want.dtype, f"{what}: {got.dtype} where eager gives {want.dtype}"
    err, eager_err = (got.double() - reference).norm(), (want.double() - reference).norm()
    assert err <= 2 * eager_err + slack * reference.norm(), f"{what}: {err:.3e} against eager's {eager_err:.3e}"


def check(fn, dtype, seed, *, autocast=None, slack=1e-5, inner="aot_eager"):
    """Compile ``fn`` on q, k, v of ``dtype`` (under CPU autocast at ``autocast`` when given): the operator runs,
    the site is reported with no refusal, the output has eager's dtype, values and q, k, v's gradients no further
    from float64 than 2x eager's. Returns the report."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(B, H, T, d, generator=g, dtype=torch.float64) * 0.7 for d in (D, D, DV)]
    qkv = [x.to(dtype).requires_grad_() for x in base]
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    with PassReports() as reports, torch.autocast("cpu", dtype=autocast or torch.bfloat16,
                                                  enabled=autocast is not None):
        want = fn(*qkv)
        compiled(*qkv)
        with BasedOpCounter() as counter:
            got = compiled(*qkv)
    report = reports.merged()
    assert counter.total >= 1 and report.sites and not report.refusals, report
    base64 = [x.to(dtype).double().requires_grad_() for x in base]
    _WIDE[0] = torch.float64
    try:
        reference = fn(*base64)
    finally:
        _WIDE[0] = torch.float32
    _close_to_float64(got, want, reference, "output", slack)
    cot = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad(out, qkv, cot.to(out.dtype)) for out in (got, want)]
    for name, a, b, r in zip("qkv", *grads, torch.autograd.grad(reference, base64, cot)):
        _close_to_float64(a, b, r, f"d{name}", slack)
    return report


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("fn", WIDENED, ids=lambda f: f.__name__)
def test_an_output_widened_after_autocasts_matmuls_is_rewritten(fn, low):
    """Every path rounds to autocast's dtype at a matmul before the widening: the operator runs cast as a matmul,
    its output cast to eager's float32 (it was refused: the GPU's bf16 autocast training fell back to naive)."""
    with torch.autocast("cpu", dtype=LOW[low]):
        assert fn(*(torch.randn(B, H, T, d) for d in (D, D, DV))).dtype == torch.float32
    check(fn, torch.float32, 3, autocast=LOW[low])


def test_the_widened_form_runs_in_autocasts_dtype():
    """The operator is cast as a matmul (its autocast rule), not run in float32: its output before the cast is
    bfloat16 as eager's numerator is."""
    from based_compile.graph import autocast_scope
    seen = []
    real = autocast_scope.operator_precision

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    import based_compile.graph.driver as driver
    orig = driver.operator_precision
    driver.operator_precision = spy
    try:
        check(sum_dtype, torch.float32, 4, autocast=torch.bfloat16)
    finally:
        driver.operator_precision = orig
    assert seen and all(not p.keep_dtype for p in seen), seen


def elementwise_numerator_matmul_normaliser(q, k, v):   # the numerator in float32, the normaliser through a matmul
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    den = (qf.unsqueeze(-2) @ kf.cumsum(2).unsqueeze(-1)).squeeze(-1)
    return (qf.unsqueeze(-1) * kv).sum(-2) / (den + 1e-6)


@pytest.mark.parametrize("low", sorted(LOW))
def test_a_widened_form_with_a_path_autocast_leaves_in_float32_runs_in_float32(low):
    """The numerator computed by products and cumsums alone keeps float32 in eager: the operator cast to autocast's
    dtype would be far less precise than eager there, so it runs with autocast off, in float32 (error at float32's
    level, not autocast's)."""
    report = check(elementwise_numerator_matmul_normaliser, torch.float32, 5, autocast=LOW[low], slack=1e-6)
    assert report.sites


def widened_with_a_switch_inside(q, k, v):
    a = _causal_weights(q, k)
    with torch.autocast("cpu", enabled=False):
        den = a.float().sum(-1, keepdim=True)
    return (a @ v) / (den + 1e-6)


def test_a_widened_form_split_by_an_autocast_switch_is_refused():
    """Near miss: the normaliser computed with autocast off inside the site: refused, with the reason; the model
    computes what eager does."""
    q, k, v = (torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(6)) for d in (D, D, DV))
    with PassReports() as reports, torch.autocast("cpu", dtype=torch.bfloat16):
        want = widened_with_a_switch_inside(q, k, v)
        got = torch.compile(widened_with_a_switch_inside, backend=based_compile.backend(inner="aot_eager"))(q, k, v)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    report = reports.merged()
    assert not report.sites, report
    assert any("autocast" in r.reason for r in report.refusals), report


# ------------------------------------------------------------------ a feature map that promotes (no autocast)
def taylor_ones_float32(x):                # zoology's TaylorExp.forward_mem_save: its ones column is float32
    x2 = torch.einsum("...m,...n->...mn", x, x) / math.sqrt(D)
    x2d = torch.diagonal(x2, dim1=-2, dim2=-1) / math.sqrt(2)
    ti = torch.tril_indices(D, D, -1)
    x2 = x2[..., ti[0], ti[1]]
    return torch.cat([torch.ones(x[..., :1].shape), x / math.sqrt(math.sqrt(D)), x2d, x2], dim=-1)


def ones_float32(x):                       # the outer-product map, its ones column float32 (torch.ones' default)
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([torch.ones(*x.shape[:-1], 1), x / D ** 0.25, x2], -1)


def ones_float64(x):                       # a float64 constant column: float32 q, k compute in float64
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([torch.ones(*x.shape[:-1], 1, dtype=torch.float64), x / D ** 0.25, x2], -1)


def linear(fm):
    def based_linear(q, k, v):             # zoology's Based.forward, causal branch
        q, k = fm(q), fm(k)
        q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)
        return (q * (k * v).cumsum(dim=2)).sum(dim=-1) / ((q * k.cumsum(dim=2)).sum(dim=-1) + 1e-12)
    based_linear.__name__ = f"linear_{fm.__name__}"
    return based_linear


def quadratic(fm):
    def based_quadratic(q, k, v):
        a = (fm(q) @ fm(k).mT).tril()
        return (a @ v.to(a.dtype)) / (a.sum(-1, keepdim=True) + 1e-6)
    based_quadratic.__name__ = f"quadratic_{fm.__name__}"
    return based_quadratic


PROMOTING = [(fm, form, low) for fm in (taylor_ones_float32, ones_float32) for form in (linear, quadratic)
             for low in sorted(LOW)]


@pytest.mark.parametrize("fm, form, low", PROMOTING, ids=lambda x: getattr(x, "__name__", x))
def test_a_feature_map_that_promotes_runs_the_operator_in_the_promoted_dtype(fm, form, low):
    """bfloat16/float16 q, k, v whose features promote to float32 (eager computes the site in float32): the operator
    runs in float32 (q, k, v cast up), its error at float32's level (it ran in bfloat16: 1.5e-3 against eager's
    1.2e-4, 12x)."""
    fn = form(fm)
    report = check(fn, LOW[low], 7, slack=1e-6)
    assert "cast to float32" in report.sites[0].form, report


@pytest.mark.parametrize("form", [linear, quadratic], ids=lambda f: f.__name__)
def test_a_float64_constant_in_the_map_runs_the_operator_in_float64(form):
    """float32 q, k, v with a float64 ones column: eager computes the site in float64, and so does the operator."""
    fn = form(ones_float64)
    report = check(fn, torch.float32, 8, slack=1e-12)
    assert "cast to float64" in report.sites[0].form, report


def test_a_feature_map_in_q_dtype_stays_in_q_dtype():
    """Control: the map's ones column in q's dtype computes in bfloat16 in eager, and the operator runs there."""
    fn = linear(lambda x: torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25,
                                     (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))],
                                    -1))
    report = check(fn, torch.bfloat16, 9)
    assert "cast to" not in report.sites[0].form, report
