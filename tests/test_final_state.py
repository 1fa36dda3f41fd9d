"""Prefill that returns the final state (issue 15): recognised forms and their near-misses.

Each form is compiled with backend="based" (inner="eager") and must (1) run
based::attention_with_state, (2) return the output and the states the eager code returns
(float64 inputs: within 1e-10; the states in the user's layout, shape and dtype). Each near-miss
must keep eager's values, not run the state operator, and say why in explain() (read from the
pass's report of the compile, ``PassReports``, not from a second trace). Inputs are fresh random
tensors.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import based_compile
from compare import float32_bar
from pass_reports import PassReports, compiled_graphs

D, DV, T, H = 4, 5, 11, 2


def phi(x, d=D):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2 / (math.sqrt(2) * math.sqrt(d))], -1)


def quadratic(qf, kf, v, normalize=True):
    t = qf.shape[-2]
    a = (qf @ kf.transpose(-2, -1)).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6) if normalize else a @ v


# ---------------------------------------------------------------------------------------------- forms
def linear_cumsum_last_rows(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-2) * v.unsqueeze(-1)).cumsum(2)          # [B, H, T, Dv, F]
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-2) * kv).sum(-1) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -1], kc[:, :, -1]                          # [B, H, Dv, F], [B, H, F]


def linear_cumsum_slices(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)          # [B, H, T, F, Dv]
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -1:], kc[:, :, -1:]                        # [B, H, 1, F, Dv], [B, H, 1, F]


def quadratic_einsum_states(q, k, v):
    qf, kf = phi(q), phi(k)
    y = quadratic(qf, kf, v)
    return y, torch.einsum("bhtf,bhtd->bhfd", kf, v), kf.sum(dim=2, keepdim=True)


def broadcast_state_unnormalised(q, k, v):
    qf, kf = phi(q), phi(k)
    return quadratic(qf, kf, v, normalize=False), (kf.unsqueeze(-1) * v.unsqueeze(-2)).sum(2)


def bthd_einsum_state(q, k, v):                                    # q, k, v: [B, T, H, D]
    qf, kf = phi(q), phi(k)
    y = quadratic(qf.transpose(1, 2), kf.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return y, torch.einsum("bthf,bthd->bhfd", kf, v), kf.sum(1)


def gqa_repeated_before_phi(q, k, v):                               # k, v: one kv head
    k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
    qf, kf = phi(q), phi(k)
    return quadratic(qf, kf, v), torch.einsum("bhtf,bhtd->bhfd", kf, v), kf.sum(2)


def gqa_states_per_kv_head(q, k, v):                                 # k, v: one kv head
    kf1 = phi(k)
    kr, vr = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
    y = quadratic(phi(q), phi(kr), vr)
    return y, torch.einsum("bhtf,bhtd->bhfd", kf1, v), kf1.sum(2)


def other_taylor_scaling_for_the_state(q, k, v):
    """The state's Taylor map is scaled differently from the attention's: still exactly computed."""
    qf, kf = phi(q), phi(k)
    kf2 = phi(k, d=9)
    return quadratic(qf, kf, v), torch.einsum("bhtf,bhtd->bhfd", kf2, v)


FORMS = [
    (linear_cumsum_last_rows, None, "BHTD"),
    (linear_cumsum_slices, None, "BHTD"),
    (quadratic_einsum_states, None, "BHTD"),
    (broadcast_state_unnormalised, None, "BHTD"),
    (bthd_einsum_state, None, "BTHD"),
    (gqa_repeated_before_phi, 1, "BHTD"),
    (gqa_states_per_kv_head, 1, "BHTD"),
    (other_taylor_scaling_for_the_state, None, "BHTD"),
]


def _inputs(kv_heads, layout, dtype=torch.float64, t=T):
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    hk = H if kv_heads is None else kv_heads
    shape = (lambda h, d: (2, h, t, d)) if layout == "BHTD" else (lambda h, d: (2, t, h, d))
    return tuple(torch.randn(*shape(h, d), generator=g, dtype=torch.float64).to(dtype)
                 for h, d in ((H, D), (hk, D), (hk, DV)))


def _run(fn, args, reports=None):
    """(compiled fn(*args) without grad, based::attention_with_state calls, based::attention calls);
    ``reports``: a ``PassReports`` that gets the pass's report of the compile (explain()'s, one trace)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), fullgraph=True)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
            reports or contextlib.nullcontext():
        got = compiled(*args)
    counts = {e.key: e.count for e in prof.key_averages()}
    return got, counts.get("based::attention_with_state", 0), counts.get("based::attention", 0)


def _assert_same(got, want, tol, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} result {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        err = ((g.double() - w.double()).norm() / w.double().norm()).item()
        assert err < tol, f"{what} result {i}: relative error {err:.2e}"


@pytest.mark.parametrize("fn,kv_heads,layout", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_form_runs_the_state_operator_with_eager_values(fn, kv_heads, layout):
    args = _inputs(kv_heads, layout)
    with torch.no_grad():
        want = fn(*args)
    got, with_state, plain = _run(fn, args, reports := PassReports())
    assert with_state >= 1 and plain == 0, f"based::attention_with_state ran {with_state}x, based::attention {plain}x"
    _assert_same(got, want, 1e-10, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and "final state" in e.sites[0].form, str(e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_states_keep_the_users_dtype(dtype):
    args = _inputs(None, "BHTD", dtype, t=40)
    with torch.no_grad():
        want = quadratic_einsum_states(*(x.double() for x in args))
    got, with_state, _ = _run(quadratic_einsum_states, args)
    assert with_state >= 1
    if dtype == torch.float32:     # 1e-5, or 4x eager float32's own error where fresh inputs are ill-conditioned
        with torch.no_grad():
            eager = quadratic_einsum_states(*args)
        for i, (g, e, w) in enumerate(zip(got, eager, want)):
            _assert_same((g,), (w.to(dtype),), float32_bar(e, w), f"float32 result {i}")
    else:
        _assert_same(got, tuple(w.to(dtype) for w in want), 2e-2, str(dtype))


def test_no_cumsum_tensor_left_in_the_rewritten_graph():
    """O(T) memory: the [T, Dv, F] running sum of the linear form is gone after the rewrite."""
    code = "\n".join(gm.code for gm in compiled_graphs(linear_cumsum_last_rows, *_inputs(None, "BHTD")))
    assert "cumsum" not in code and "attention_with_state" in code, code


# ---------------------------------------------------------------------------------------------- near-misses
def row_minus_two(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-2) * v.unsqueeze(-1)).cumsum(2)
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-2) * kv).sum(-1) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -2]


def decayed_sum(q, k, v):
    qf, kf = phi(q), phi(k)
    w = 0.9 ** torch.arange(k.shape[2] - 1, -1, -1, dtype=k.dtype)
    return quadratic(qf, kf, v), ((kf * w[:, None]).unsqueeze(-1) * v.unsqueeze(-2)).sum(2)


def elu_features(q, k, v):
    qf, kf = phi(q), phi(k)
    ef = torch.nn.functional.elu(k) + 1
    return quadratic(qf, kf, v), torch.einsum("bhtf,bhtd->bhfd", ef, v)


def sum_over_heads(q, k, v):
    qf, kf = phi(q), phi(k)
    return quadratic(qf, kf, v), (kf.unsqueeze(-1) * v.unsqueeze(-2)).sum(1)


NEAR_MISSES = [
    (row_minus_two, "row -2"),
    (decayed_sum, "weighted sum"),
    (elu_features, "not the Taylor feature map"),
    (sum_over_heads, "not over time"),
]


@pytest.mark.parametrize("fn,reason", NEAR_MISSES, ids=[n[0].__name__ for n in NEAR_MISSES])
def test_near_miss_is_refused_with_a_reason(fn, reason):
    args = _inputs(None, "BHTD")
    with torch.no_grad():
        want = fn(*args)
    got, with_state, plain = _run(fn, args, reports := PassReports())
    assert with_state == 0 and plain >= 1, "the attention is rewritten, the state is not"
    _assert_same(got, want, 1e-10, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert any(reason in r.reason for r in e.refusals), str(e)


@pytest.mark.parametrize("fn", [quadratic_einsum_states, linear_cumsum_last_rows], ids=lambda f: f.__name__)
def test_states_that_require_grad_are_differentiated(fn):
    """based::attention_with_state has a backward: the site and its states are rewritten, and the
    gradients through the output and the returned states are eager's (they were left to the inner
    compiler, refused as 'require grad')."""
    args = tuple(x.requires_grad_() for x in _inputs(None, "BHTD"))
    want = fn(*args)
    cots = [torch.randn_like(w) for w in want]
    gw = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), args)
    torch._dynamo.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, PassReports() as reports:
        got = torch.compile(fn, backend=based_compile.backend(inner="eager"))(*args)
        gg = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), args)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("based::attention_with_state", 0) >= 1
    assert counts.get("based::attention_with_state_backward", 0) >= 1
    _assert_same(got, want, 1e-10, "values")
    _assert_same(gg, gw, 1e-10, "gradients")
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and "final state" in e.sites[0].form and not e.refusals, str(e)


def fixed_row(q, k, v):                                              # row 10: the last one only at T = 11
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, 10], kc[:, :, 10:11]


@pytest.mark.parametrize("fn,with_state", [(fixed_row, False), (linear_cumsum_last_rows, True)],
                         ids=lambda x: getattr(x, "__name__", None))
def test_last_row_is_proven_for_every_length_of_a_dynamic_graph(fn, with_state):
    """T marked dynamic and traced at T = 11: row 10 is the last row there and only there (it was taken
    for the last row: the states were off by 0.2-0.3 at T = 12, 13)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    for t in (11, 12, 13):
        args = _inputs(None, "BHTD", t=t)
        for x in args:
            torch._dynamo.maybe_mark_dynamic(x, 2)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(*args)
            want = fn(*args)
        calls = sum(e.count for e in prof.key_averages() if e.key == "based::attention_with_state")
        assert (calls >= 1) == with_state, f"T={t}: attention_with_state ran {calls}x"
        _assert_same(got, want, 1e-10, f"T={t}")


@pytest.mark.parametrize("fn", [linear_cumsum_last_rows, linear_cumsum_slices], ids=lambda f: f.__name__)
def test_linear_form_with_states_under_dynamic_true(fn):
    """torch.compile(dynamic=True) lowers kv[:, :, -1] with whole-axis slices that stay in the lowered
    graph unused: the running sum looked like it had other users, and the site was neither rewritten
    nor refused (explain: zero sites, zero refusals)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), dynamic=True)
    for t in (11, 12):
        args = _inputs(None, "BHTD", t=t)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(*args)
            want = fn(*args)
        calls = sum(e.count for e in prof.key_averages() if e.key == "based::attention_with_state")
        assert calls >= 1, f"T={t}: not rewritten"
        _assert_same(got, want, 1e-10, f"T={t}")


# ------------------------------------------------------------------- a prefill continued from initial states
# The states of an earlier part (kv0 [B, H, F, Dv], k0 [B, H, F]) carried into this prefill.

def _initial_states(args):
    g = torch.Generator().manual_seed(5)
    f = 1 + D + D * D
    return (torch.randn(2, H, f, DV, generator=g, dtype=torch.float64) * 0.1,
            torch.rand(2, H, f, generator=g, dtype=torch.float64) + 1.0)


def linear_continued(q, k, v, kv0, k0):                   # the running sums start from the initial states
    pq, pk = phi(q), phi(k)
    kv = kv0.unsqueeze(2) + torch.cumsum(pk.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
    ks = k0.unsqueeze(2) + torch.cumsum(pk, dim=2)
    y = (pq.unsqueeze(-1) * kv).sum(-2) / ((pq * ks).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -1], ks[:, :, -1]


def quadratic_continued(q, k, v, kv0, k0):                # the quadratic form plus phi(q) times the initial states
    pq, pk = phi(q), phi(k)
    a = torch.tril(pq @ pk.transpose(-2, -1))
    num = a @ v + pq @ kv0
    den = a.sum(-1, keepdim=True) + (pq * k0.unsqueeze(2)).sum(-1, keepdim=True)
    return num / (den + 1e-6), kv0 + torch.einsum("bhtf,bhtd->bhfd", pk, v), k0 + pk.sum(2)


def test_prefill_continued_from_initial_states():
    """Both spellings run based::attention_with_state from the states and return the operator's states:
    the quadratic one (its a @ v, phi(q) kv0, the row sums and phi(q) . k0: nothing of the T x T weights
    left) and the linear one (running sums from the initial states). tests/test_continued_prefill.py has
    their forms."""
    args = _inputs(None, "BHTD")
    args = (*args, *_initial_states(args))
    with torch.no_grad():
        want = quadratic_continued(*args)
    got, with_state, _ = _run(quadratic_continued, args, reports := PassReports())
    assert with_state >= 1
    _assert_same(got, want, 1e-10, "quadratic_continued")
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and "from initial state" in e.sites[0].form and "final state" in e.sites[0].form, \
            str(e)

    with torch.no_grad():
        want = linear_continued(*args)
    got, with_state, _ = _run(linear_continued, args, reports := PassReports())
    assert with_state >= 1
    _assert_same(got, want, 1e-10, "linear_continued")
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and "from initial state" in e.sites[0].form and "final state" in e.sites[0].form, \
            str(e)
