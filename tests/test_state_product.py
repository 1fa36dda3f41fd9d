"""Non-causal Based attention whose total is taken from a state (issue 15): S = sum over every key of
phi(k)^T v, o = phi(q) S / (phi(q) . sum_t phi(k) + eps), which is non-causal normalised Based, in
every spelling of its two contractions (a matmul, an einsum, a broadcast product summed over time;
the state kept as [.., F, Dv] or [.., Dv, F]; the readout transposed), also returning the state(s)
for decoding (the site then runs based::attention_with_state, which returns them).

Each form is compiled with backend="based" (inner="eager") and must run the operator and give eager's
values, returned states and gradients in float64 on fresh random inputs, with the numerical probe
on and off (the structure alone, as at real sizes). Each near-miss keeps eager's values, runs no
operator, and explain() says why (read from the pass's report of the compile, ``PassReports``).
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_compile.graph import feature_normaliser, verify
from pass_reports import PassReports, compiled_graphs

B, H, T, D, DV = 2, 2, 7, 4, 5
F = 1 + D + D * D


def phi(x):
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], -1)


# ---------------------------------------------------------------------------------------------- forms
def matmuls(q, k, v):                                   # (was recognised before: the reference spelling)
    qf, kf = phi(q), phi(k)
    kv = kf.transpose(-1, -2) @ v
    return (qf @ kv) / (qf @ kf.sum(2).unsqueeze(-1) + 1e-6)


def broadcast_products(q, k, v):                        # the state a product summed over time, no keepdim
    qf, kf = phi(q), phi(k)
    kv = (kf[..., :, None] * v[..., None, :]).sum(2)                        # [B, H, F, Dv]
    ks = kf.sum(2)
    num = (qf[..., :, None] * kv[:, :, None]).sum(-2)
    return num / ((qf * ks[:, :, None]).sum(-1, keepdim=True) + 1e-6)


def broadcast_state_matmul_readout(q, k, v):            # returns the states
    qf, kf = phi(q), phi(k)
    kv = (kf[..., :, None] * v[..., None, :]).sum(2)
    ks = kf.sum(2)
    return (qf @ kv) / ((qf * ks[:, :, None]).sum(-1, keepdim=True) + 1e-6), kv, ks


def bthd_einsums(q, k, v):                              # q, k, v: [B, T, H, D]
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bthf,bthd->bhfd", kf, v)
    ks = kf.sum(1)
    num = torch.einsum("bthf,bhfd->bthd", qf, kv)
    return num / (torch.einsum("bthf,bhf->bth", qf, ks)[..., None] + 1e-6), kv, ks


def readout_transposed(q, k, v):                        # (S^T phi(q)^T)^T
    qf, kf = phi(q), phi(k)
    kv = kf.mT @ v
    return (kv.mT @ qf.mT).mT / (qf @ kf.sum(-2)[..., None] + 1e-6)


def value_major_einsums(q, k, v):                       # the state kept as [B, H, Dv, F]
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtd,bhtf->bhdf", v, kf)
    ks = kf.sum(2)
    num = torch.einsum("bhdf,bhtf->bhtd", kv, qf)
    return num / (torch.einsum("bhtf,bhf->bht", qf, ks)[..., None] + 1e-6), kv, ks


def value_major_matmuls(q, k, v):                       # v^T phi(k), read out by (S phi(q)^T)^T
    qf, kf = phi(q), phi(k)
    kv = v.mT @ kf
    return (kv @ qf.mT).mT / (qf @ kf.sum(2)[..., None] + 1e-6)


def returns_the_states(q, k, v):                        # the prefill's states for decoding
    qf, kf = phi(q), phi(k)
    kv = kf.transpose(-1, -2) @ v
    ks = kf.sum(2, keepdim=True)                                               # [B, H, 1, F]
    return (qf @ kv) / ((qf * ks).sum(-1, keepdim=True) + 1e-6), kv, ks


def key_state_column(q, k, v):                          # ks [B, H, F, 1], read by a matmul
    qf, kf = phi(q), phi(k)
    kv = kf.mT @ v
    ks = kf.mT.sum(-1, keepdim=True)
    return (qf @ kv) / (qf @ ks + 1e-6), kv, ks


def unnormalised_returns_state(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = (kf[..., :, None] * v[..., None, :]).sum(2)
    return (qf[..., :, None] * kv[:, :, None]).sum(-2), kv


def wide_values(q, k, v):                               # Dv > F: phi(k)^T v is a wide matrix
    qf, kf = phi(q), phi(k)
    kv = kf.mT @ v
    return (qf @ kv) / (qf @ kf.sum(2)[..., None] + 1e-6), kv


# (fn, q/k/v layout, Dv, returns states)
FORMS = [
    (matmuls, "BHTD", DV, False),
    (broadcast_products, "BHTD", DV, False),
    (broadcast_state_matmul_readout, "BHTD", DV, True),
    (bthd_einsums, "BTHD", DV, True),
    (readout_transposed, "BHTD", DV, False),
    (value_major_einsums, "BHTD", DV, True),
    (value_major_matmuls, "BHTD", DV, False),
    (returns_the_states, "BHTD", DV, True),
    (key_state_column, "BHTD", DV, True),
    (unnormalised_returns_state, "BHTD", DV, True),
    (wide_values, "BHTD", 32, True),
]


def _inputs(layout="BHTD", dv=DV, t=T, h=H, requires_grad=False):
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    shape = (lambda d: (B, h, t, d)) if layout == "BHTD" else (lambda d: (B, t, h, d))
    out = [torch.randn(*shape(d), generator=g, dtype=torch.float64) for d in (D, D, dv)]
    return [x.requires_grad_(requires_grad) for x in out]


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _assert_same(got, want, tol, what):
    for i, (g, w) in enumerate(zip(_tuple(got), _tuple(want), strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} result {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300)).item()
        assert err < tol, f"{what} result {i}: relative error {err:.2e}"


def _calls(prof) -> int:
    counts = {e.key: e.count for e in prof.key_averages()}
    return counts.get("based::attention", 0) + counts.get("based::attention_with_state", 0)


def _same_as_eager(compiled, fn, args, reports) -> int:
    """The compiled fn's outputs and gradients at ``args`` are eager's (1e-10); the operator calls it made."""
    ref_args = [x.detach().clone().requires_grad_() for x in args]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, reports:
        got = _tuple(compiled(*args))
    want = _tuple(fn(*ref_args))
    _assert_same(got, want, 1e-10, fn.__name__)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), args)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
    for name, g, w in zip("qkv", grads, wants):
        _assert_same(g, w, 1e-10, f"d{name}")
    return _calls(prof)


@pytest.fixture(params=["probe", "structure"])
def probe(request, monkeypatch):
    """The pass with its numerical probe, and without it (the probe's and the index tensors' limits at
    0: the structure alone, as at real sizes)."""
    if request.param == "structure":
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("fn,layout,dv,states", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_form_is_rewritten_with_eager_values_and_gradients(fn, layout, dv, states, probe):
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), fullgraph=True)
    reports = PassReports()                         # explain()'s report, from the compile's own trace
    for _ in range(2):                              # fresh inputs, the compiled graph reused
        args = _inputs(layout, dv, requires_grad=True)
        assert _same_as_eager(compiled, fn, args, reports) >= 1, "the operator did not run"
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and not e.refusals, str(e)
        assert "state product" in e.sites[0].form and "non-causal" in str(e.sites[0].spec), str(e)
        assert ("final state" in e.sites[0].form) == states, str(e)


def _cross_inputs(layout, tq, tk, requires_grad=True):
    g = torch.Generator().manual_seed(tq * 100 + tk)
    shape = (lambda t, d: (B, H, t, d)) if layout == "BHTD" else (lambda t, d: (B, t, H, d))
    out = [torch.randn(*shape(t, d), generator=g, dtype=torch.float64) for t, d in ((tq, D), (tk, D), (tk, DV))]
    return [x.requires_grad_(requires_grad) for x in out]


@pytest.mark.parametrize("fn,layout", [(matmuls, "BHTD"), (bthd_einsums, "BTHD"), (returns_the_states, "BHTD")],
                         ids=["matmuls", "bthd_einsums", "returns_the_states"])
@pytest.mark.parametrize("extra_keys", [4, -3], ids=["more_keys", "fewer_keys"])
def test_state_product_of_queries_against_keys_of_another_length(fn, layout, extra_keys, probe):
    """Cross attention: q of length Tq against k, v of length Tk. With Tq < Tk (the operator's non-causal
    Tq <= Tk, as the quadratic form reads it) the state product was refused as 'could not read it as
    Based's running sums'; with Tq > Tk it stays refused (the operator does not take it), exact."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    reports = PassReports()
    ran = 0
    for tq in (T, T + 2):
        args = _cross_inputs(layout, tq, tq + extra_keys)
        ran += _same_as_eager(compiled, fn, args, reports)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        if extra_keys > 0:
            assert len(e.sites) == 1 and not e.refusals, str(e)
        else:
            assert not e.sites and e.refusals, str(e)
    assert (ran > 0) == (extra_keys > 0), ran


def test_a_refusal_for_more_queries_than_keys_is_guarded():
    """Under dynamic shapes, a first call with Tq > Tk (refused) does not leave every later length unrewritten:
    the refused graph is guarded to Tq > Tk, and Tq <= Tk recompiles and is rewritten (it was not: one call
    at Tq > Tk turned the operator off for all later calls, values still exact)."""
    torch._dynamo.reset()
    compiled = torch.compile(matmuls, backend=based_compile.backend(inner="eager"), dynamic=True)
    calls = []
    for tq, tk in ((5, 9), (6, 10), (9, 5), (5, 9), (6, 10), (7, 7)):
        args = _cross_inputs("BHTD", tq, tk)
        compiled(*args)                                         # compiles where it must
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(*args)
        calls.append(_calls(prof))
        _assert_same(_tuple(got), _tuple(matmuls(*args)), 1e-10, f"Tq={tq} Tk={tk}")
    assert [c > 0 for c in calls] == [True, True, False, True, True, True], calls


@pytest.mark.parametrize("fn", [broadcast_state_matmul_readout, value_major_einsums, returns_the_states],
                         ids=lambda f: f.__name__)
def test_returned_state_is_the_operators(fn):
    """The returned states come from based::attention_with_state: the user's state product is not left
    in the graph (it is computed once, in the operator)."""
    code = "\n".join(gm.code for gm in compiled_graphs(fn, *_inputs()))
    assert "attention_with_state" in code and "einsum" not in code and "matmul" not in code, code


# ---------------------------------------------------------------------------------------------- near-misses
def decayed_state(q, k, v):                             # twin of matmuls: older keys weighted down
    qf, kf = phi(q), phi(k)
    w = 0.9 ** torch.arange(q.shape[2] - 1, -1, -1, dtype=q.dtype)
    kv = (kf * w[:, None]).mT @ v
    return (qf @ kv) / (qf @ (kf * w[:, None]).sum(2)[..., None] + 1e-6)


def scaled_state(q, k, v):                              # twin of matmuls: 0.9 * state, normaliser not
    qf, kf = phi(q), phi(k)
    kv = 0.9 * (kf.mT @ v)
    return (qf @ kv) / (qf @ kf.sum(2)[..., None] + 1e-6)


def state_over_heads(q, k, v):                          # twin of bthd_einsums: the state sums the heads
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtf,bhtd->btfd", kf, v)
    num = torch.einsum("bhtf,btfd->bhtd", qf, kv)
    return num / (qf @ kf.sum(2)[..., None] + 1e-6)


def state_over_batch(q, k, v):                          # twin of unnormalised_returns_state
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtf,bhtd->htfd", kf, v)
    return torch.einsum("bhtf,htfd->bhtd", qf, kv)


def value_major_read_as_feature_major(q, k, v):        # twin of value_major_matmuls, Dv == F
    qf, kf = phi(q), phi(k)
    kv = v.mT @ kf
    return (qf @ kv) / (qf @ kf.sum(2)[..., None] + 1e-6)


def elementwise_square_map(q, k, v):                   # twin of matmuls: [1, x, x * x], not a map of q.k
    def sq(x):
        return torch.cat([torch.ones_like(x[..., :1]), x, x * x], -1)
    qf, kf = sq(q), sq(k)
    kv = kf.mT @ v
    return (qf @ kv) / (qf @ kf.sum(2)[..., None] + 1e-6)


def cubic_map(q, k, v):                                 # twin of matmuls: a third-order term
    def cube(x):
        x3 = (x[..., :, None, None] * x[..., None, :, None] * x[..., None, None, :]).flatten(-3)
        return torch.cat([phi(x), x3], -1)
    qf, kf = cube(q), cube(k)
    kv = kf.mT @ v
    return (qf @ kv) / (qf @ kf.sum(2)[..., None] + 1e-6)


# (fn, q/k/v shape (layout, Dv, T, H), category, what explain() must say)
NEAR_MISSES = [
    (decayed_state, ("BHTD", DV, T, H), "unsupported", "could not read it as Based's running sums"),
    (scaled_state, ("BHTD", DV, T, H), "normaliser", "do not sum the same weights"),
    (state_over_heads, ("BHTD", DV, 3, 3), "normaliser", "sums phi(k) over another axis"),
    (state_over_batch, ("BHTD", DV, B, 3), "verify", ""),     # T == B: read as attention over time, disproved
    (state_over_batch, ("BHTD", DV, 3, 3), "unsupported", "attention layout"),
    (value_major_read_as_feature_major, ("BHTD", F, T, H), "feature_map", "contracted with the state's values"),
    (elementwise_square_map, ("BHTD", DV, T, H), "feature_map", "not a function of q.k"),
    (cubic_map, ("BHTD", DV, T, H), "polynomial", "degree 3"),
]


@pytest.mark.parametrize("fn,shape,category,reason", NEAR_MISSES,
                         ids=[f"{n[0].__name__}-T{n[1][2]}" for n in NEAR_MISSES])
def test_near_miss_is_refused_with_a_reason(fn, shape, category, reason, probe):
    layout, dv, t, h = shape
    args = _inputs(layout, dv, t, h)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            PassReports() as reports:               # explain()'s report, from the compile's own trace
        got = compiled(*args)
    assert _calls(prof) == 0
    _assert_same(got, fn(*args), 1e-12, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert not e.sites, str(e)
        assert any(r.category == category and reason in r.reason for r in e.refusals), str(e)


@pytest.mark.parametrize("fn", [returns_the_states, value_major_einsums], ids=lambda f: f.__name__)
def test_fused_chunk_kernel_forward_and_backward_with_states(fn, monkeypatch):
    """The fused-chunk kernel with its final states, non-causal, forward and backward (through Triton's
    interpreter on the CPU; the path CUDA takes): float32 values, returned states and gradients against
    float64 eager."""
    monkeypatch.setattr(based_compile.config, "kernel", "fused_chunk")
    base = _inputs()
    args = [x.float().requires_grad_() for x in base]
    ref_args = [x.clone().requires_grad_() for x in base]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), fullgraph=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = compiled(*args)
        want = fn(*ref_args)
        cots = [torch.randn_like(w) for w in want]
        grads = torch.autograd.grad(sum((g * c.float()).sum() for g, c in zip(got, cots)), args)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("based::attention_with_state", 0) >= 1 and counts.get("based::attention_with_state_backward", 0) >= 1
    _assert_same(got, tuple(w.float() for w in want), 2e-5, "values")
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
    for name, g, w in zip("qkv", grads, wants):
        _assert_same(g, w.float(), 2e-5, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_non_causal_state_product_with_states(dtype, no_tf32):
    """On CUDA (Inductor, the fused-chunk kernel with its final states, non-causal): values, returned
    states and gradients against float64 eager at Dk 16, Dv 64, T 1000."""
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    base = [torch.randn(2, 4, 1000, d, generator=g, dtype=torch.float64) for d in (16, 16, 64)]
    args = [x.to("cuda", dtype).requires_grad_() for x in base]
    ref_args = [x.detach().double().requires_grad_() for x in args]      # the inputs as rounded
    torch._dynamo.reset()
    got = torch.compile(returns_the_states, backend="based")(*args)
    want = returns_the_states(*ref_args)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((x * c.to(dtype)).sum() for x, c in zip(got, cots)), args)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, x, w in zip(("o", "kv_state", "k_state"), got, want):
        _assert_same((x,), (w.to(x.dtype),), tol, name)
    for name, x, w in zip("qkv", grads, wants):
        _assert_same((x,), (w.to(dtype),), 2 * tol, f"d{name}")


def returns_the_state_flattened(q, k, v):               # the state returned as [B * H, F, Dv], k state [B * H * F]
    qf, kf = phi(q), phi(k)
    kv = kf.mT @ v
    ks = kf.sum(2)
    return (qf @ kv) / (qf @ ks[..., None] + 1e-6), kv.flatten(0, 1), ks.reshape(-1)


def test_state_returned_reshaped_is_not_the_operators(probe):
    """A returned state the code reshapes (flatten(0, 1)): its values are the operator's state read as
    another shape, but the rewrite places a state only by transposing and adding or removing size-1 axes.
    Before, the compiled model returned [B, H, F, Dv] where eager returns [B * H, F, Dv]. Now that
    state is refused (the user's code computes it) and the site still runs the operator."""
    e = based_compile.explain(returns_the_state_flattened, *_inputs())
    assert len(e.sites) == 1 and "final state" not in e.sites[0].form, str(e)
    assert any(r.category == "state" and f"reshaped to [{B * H}, {F}, {DV}]" in r.reason for r in e.refusals), str(e)
    torch._dynamo.reset()
    compiled = torch.compile(returns_the_state_flattened, backend=based_compile.backend(inner="aot_eager"))
    for t in (T, T + 3):                          # the second length recompiles with a symbolic length
        args = _inputs(t=t, requires_grad=True)
        ref_args = [x.detach().clone().requires_grad_() for x in args]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(*args)
        assert _calls(prof) >= 1, "the operator did not run"
        want = returns_the_state_flattened(*ref_args)
        _assert_same(got, want, 1e-10, "values")
        cots = [torch.randn_like(w) for w in want]
        grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), args)
        wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
        for name, g, w in zip("qkv", grads, wants):
            _assert_same((g,), (w,), 1e-10, f"d{name}")
