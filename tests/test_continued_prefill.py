"""A prefill continued from initial states (issue 15): the linear form whose running sums start from
the states of earlier tokens (chunked prefill, a conversation continued from saved states).

Each form is compiled with backend="based" (inner="eager") and must (1) run
based::attention_with_state with the states, (2) return what the eager code returns (float64:
within 1e-10; output and new states in the user's layout, shape and dtype), with the numerical
probe on and off (the structure alone must not mistake axes), (3) give eager's gradients in q, k,
v and both initial states when they require grad. Each near-miss must keep eager's values, not run
the state operator, and say why in explain() (read from the pass's report of the compile,
``PassReports``, not from a second trace). Inputs are fresh random tensors.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

import based_compile
from compare import float32_bar
from pass_reports import PassReports, compiled_graphs
from based_compile.graph import feature_normaliser, verify

D, DV, T, H = 4, 5, 11, 2
F = 1 + D + D * D


def phi(x, d=D):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2 / (math.sqrt(2) * math.sqrt(d))], -1)


# ---------------------------------------------------------------------------------------------- forms
def brief(q, k, v, kv_state, k_state):
    """As people write it: phi called where it is used, states added after the cumsum."""
    kv = kv_state[:, :, None] + (phi(k)[..., :, None] * v[..., None, :]).cumsum(2)     # [B, H, T, F, Dv]
    ks = k_state[:, :, None] + phi(k).cumsum(2)
    o = (phi(q)[..., None] * kv).sum(-2) / ((phi(q) * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def einsums(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2) + kv_state.unsqueeze(2)      # the state on the right
    ks = kf.cumsum(2) + k_state.unsqueeze(2)
    o = torch.einsum("bhtf,bhtfd->bhtd", qf, kv) / (torch.einsum("bhtf,bhtf->bht", qf, ks)[..., None] + 1e-5)
    return o, kv[:, :, -1:], ks[:, :, -1:]


def in_place(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    kv += kv_state[:, :, None]
    ks = kf.cumsum(2)
    ks.add_(k_state.unsqueeze(2))
    o = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def value_major(q, k, v, kv_state, k_state):                       # kv kept as [.., Dv, F], kv_state [B, H, Dv, F]
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf.unsqueeze(-2) * v.unsqueeze(-1)).cumsum(2)          # [B, H, T, Dv, F]
    ks = k_state[:, :, None] + kf.cumsum(2)
    o = (qf.unsqueeze(-2) * kv).sum(-1) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def bthd(q, k, v, kv_state, k_state):                               # q, k, v: [B, T, H, D]
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, None] + (kf[..., :, None] * v[..., None, :]).cumsum(1)             # [B, T, H, F, Dv]
    ks = k_state[:, None] + kf.cumsum(1)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, -1], ks[:, -1]


def unnormalised(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    return (qf[..., None] * kv).sum(-2), kv[:, :, -1]


def output_only(q, k, v, kv_state, k_state):                       # the states are not returned
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state[:, :, None] + kf.cumsum(2)
    return (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)


def states_with_time_axis(q, k, v, kv_state, k_state):             # states kept as [B, H, 1, F, Dv], [B, H, 1, F]
    qf, kf = phi(q), phi(k)
    kv = kv_state + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state + kf.cumsum(2)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1:], ks[:, :, -1:]


def prepended(q, k, v, kv_state, k_state):                        # the states as the running sums' first row
    qf, kf = phi(q), phi(k)
    kv = torch.cat([kv_state[:, :, None], kf[..., :, None] * v[..., None, :]], 2).cumsum(2)   # [B, H, T + 1, F, Dv]
    ks = torch.cat([k_state[:, :, None], kf], 2).cumsum(2)
    o = (qf[..., None] * kv[:, :, 1:]).sum(-2) / ((qf * ks[:, :, 1:]).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def gqa_repeated_before_phi(q, k, v, kv_state, k_state):           # k, v: one kv head; states per query head
    k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state[:, :, None] + kf.cumsum(2)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


# (fn, state layout: "BHFD" [B, H, F, Dv] | "BHDF" | "BH1FD" (a time axis of one), q/k/v layout ("GQA":
# BHTD with one kv head))
FORMS = [
    (brief, "BHFD", "BHTD"),
    (einsums, "BHFD", "BHTD"),
    (in_place, "BHFD", "BHTD"),
    (value_major, "BHDF", "BHTD"),
    (bthd, "BHFD", "BTHD"),
    (unnormalised, "BHFD", "BHTD"),
    (output_only, "BHFD", "BHTD"),
    (states_with_time_axis, "BH1FD", "BHTD"),
    (prepended, "BHFD", "BHTD"),
    (gqa_repeated_before_phi, "BHFD", "GQA"),
]


def _inputs(layout="BHTD", states="BHFD", dtype=torch.float64, t=T):
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    shape = (lambda d, h=H: (2, h, t, d)) if layout != "BTHD" else (lambda d, h=H: (2, t, h, d))
    hk = 1 if layout == "GQA" else H
    q, k, v = (torch.randn(*shape(d, h), generator=g, dtype=torch.float64) for d, h in ((D, H), (D, hk), (DV, hk)))
    kv0 = torch.randn(2, H, F, DV, generator=g, dtype=torch.float64)
    k0 = torch.rand(2, H, F, generator=g, dtype=torch.float64) + 1.0
    if states == "BHDF":
        kv0 = kv0.transpose(-2, -1).contiguous()
    elif states == "BH1FD":
        kv0, k0 = kv0.unsqueeze(2), k0.unsqueeze(2)
    return tuple(x.to(dtype) for x in (q, k, v, kv0, k0))


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


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _assert_same(got, want, tol, what):
    for i, (g, w) in enumerate(zip(_tuple(got), _tuple(want), strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what} result {i}: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        err = ((g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-300)).item()
        assert err < tol, f"{what} result {i}: relative error {err:.2e}"


@pytest.fixture(params=["probe", "structure"])
def probe(request, monkeypatch):
    """The pass with its numerical probe, and without it (the probe's and the index tensors' limits at
    0: the structure alone, as at real sizes)."""
    if request.param == "structure":
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("fn,states,layout", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_form_runs_the_state_operator_with_eager_values(fn, states, layout, probe):
    args = _inputs(layout, states)
    with torch.no_grad():
        want = fn(*args)
    got, with_state, _ = _run(fn, args, reports := PassReports())
    assert with_state >= 1, f"based::attention_with_state ran {with_state}x"   # (on the CPU it runs based::attention)
    _assert_same(got, want, 1e-10, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and "from initial state" in e.sites[0].form and not e.refusals, str(e)


@pytest.mark.parametrize("fn,states,layout", [FORMS[0], FORMS[3], FORMS[4], FORMS[5]],
                         ids=["brief", "value_major", "bthd", "unnormalised"])
def test_gradients_in_q_k_v_and_the_initial_states(fn, states, layout):
    """Everything requires grad: values and gradients (through the output and the returned states)
    against eager's autograd in float64."""
    _check_gradients(fn, states, layout)


def _check_gradients(fn, states, layout):
    """fn compiled (eager inner) with q, k, v and both states requiring grad: based::attention_with_state
    and its backward run; values and every gradient equal float64 eager's."""
    base = _inputs(layout, states)
    args = [x.clone().requires_grad_() for x in base]
    ref_args = [x.clone().requires_grad_() for x in base]
    want = _tuple(fn(*ref_args))
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), fullgraph=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = _tuple(compiled(*args))
        cots = [torch.randn_like(w) for w in want]
        grads = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cots)), args, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(args, grads)]
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("based::attention_with_state", 0) >= 1 and counts.get("based::attention_with_state_backward", 0) >= 1
    _assert_same(got, want, 1e-10, "values")
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args, allow_unused=True)
    wants = [torch.zeros_like(a) if w is None else w for a, w in zip(ref_args, wants)]
    for name, g, w in zip(("q", "k", "v", "kv_state", "k_state"), grads, wants):
        _assert_same(g, w, 1e-10, f"d{name}")


def test_gradients_through_aot_autograd_and_inductor():
    """The default inner compiler (Inductor) traces the operator and its backward: float32 values and
    gradients against float64 eager."""
    base = _inputs(dtype=torch.float32)
    args = [x.clone().requires_grad_() for x in base]
    ref_args = [x.double().requires_grad_() for x in base]
    want = brief(*ref_args)
    torch._dynamo.reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = torch.compile(brief, backend="based")(*args)
        cots = [torch.randn_like(w) for w in want]
        grads = torch.autograd.grad(sum((g * c.float()).sum() for g, c in zip(got, cots)), args)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("based::attention_with_state", 0) >= 1 and counts.get("based::attention_with_state_backward", 0) >= 1
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
    eager_args = [x.clone().requires_grad_() for x in base]       # the float32 bars (compare.float32_bar)
    eager = brief(*eager_args)
    eager_grads = torch.autograd.grad(sum((e * c.float()).sum() for e, c in zip(eager, cots)), eager_args)
    for i, (g, e, w) in enumerate(zip(got, eager, want)):
        _assert_same(g, w.float(), float32_bar(e, w), f"values {i}")
    for name, g, e, w in zip(("q", "k", "v", "kv_state", "k_state"), grads, eager_grads, wants):
        _assert_same(g, w.float(), float32_bar(e, w), f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_keeps_the_users_dtype(dtype):
    args = _inputs(dtype=dtype, t=40)
    with torch.no_grad():
        want = brief(*(x.double() for x in args))
    got, with_state, _ = _run(brief, args)
    assert with_state >= 1
    if dtype == torch.float32:     # 1e-5, or 4x eager float32's own error where fresh inputs are ill-conditioned
        with torch.no_grad():
            eager = brief(*args)
        for i, (g, e, w) in enumerate(zip(got, eager, want)):
            _assert_same((g,), (w.to(dtype),), float32_bar(e, w), f"float32 result {i}")
    else:
        _assert_same(got, tuple(w.to(dtype) for w in want), 3e-2, str(dtype))


@pytest.mark.parametrize("fn", [brief, einsums, in_place, prepended], ids=lambda f: f.__name__)
def test_no_running_sum_left_in_the_rewritten_graph(fn):
    """O(T) memory: no [T, F, Dv] running sum (no cumsum at all) after the rewrite."""
    code = "\n".join(gm.code for gm in compiled_graphs(fn, *_inputs()))
    assert "cumsum" not in code and "attention_with_state" in code, code


def test_chunked_prefill_equals_one_prefill():
    """Two compiled chunks, the second from the first's states, give the whole sequence's output and
    states (the eager linear form from zero states over all T)."""
    q, k, v, _, _ = _inputs(t=2 * T)
    zeros = (torch.zeros(2, H, F, DV, dtype=torch.float64), torch.zeros(2, H, F, dtype=torch.float64))
    with torch.no_grad():
        want = brief(q, k, v, *zeros)
        torch._dynamo.reset()
        compiled = torch.compile(brief, backend=based_compile.backend(inner="eager"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            o1, kv1, k1 = compiled(q[:, :, :T], k[:, :, :T], v[:, :, :T], *zeros)
            o2, kv2, k2 = compiled(q[:, :, T:], k[:, :, T:], v[:, :, T:], kv1, k1)
    assert sum(e.count for e in prof.key_averages() if e.key == "based::attention_with_state") >= 2
    _assert_same((torch.cat([o1, o2], 2), kv2, k2), want, 1e-10, "chunked")


# ---------------------------------------------------------------------------------------------- near-misses
def gqa_decayed_key_state(q, k, v, kv_state, k_state):              # twin of gqa_repeated_before_phi
    k, v = k.repeat_interleave(H, dim=1), v.repeat_interleave(H, dim=1)
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = 0.5 * k_state[:, :, None] + kf.cumsum(2)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def decayed(q, k, v, kv_state, k_state):                            # twin of brief
    kv = 0.9 * kv_state[:, :, None] + (phi(k)[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state[:, :, None] + phi(k).cumsum(2)
    o = (phi(q)[..., None] * kv).sum(-2) / ((phi(q) * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def k_state_as_kv_state(q, k, v, kv_state, k_state):                # twin of einsums: k_state in kv_state's role
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2) + k_state[:, :, None, :, None]
    ks = kf.cumsum(2) + k_state.unsqueeze(2)
    o = torch.einsum("bhtf,bhtfd->bhtd", qf, kv) / (torch.einsum("bhtf,bhtf->bht", qf, ks)[..., None] + 1e-5)
    return o, kv[:, :, -1:], ks[:, :, -1:]


def some_rows_only(q, k, v, kv_state, k_state):                     # twin of in_place: the state from row 1 on
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    rows = (torch.arange(q.shape[2]) > 0).to(q.dtype)[:, None, None]
    kv += kv_state[:, :, None] * rows
    ks = kf.cumsum(2)
    ks.add_(k_state.unsqueeze(2))
    o = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def some_rows_written_in_place(q, k, v, kv_state, k_state):        # twin of in_place: kv[:, :, 1:] += ...
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    kv[:, :, 1:] += kv_state[:, :, None]
    ks = kf.cumsum(2)
    ks.add_(k_state.unsqueeze(2))
    o = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def state_of_another_map(q, k, v, kv_state, k_state):               # twin of value_major: the returned state's map
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf.unsqueeze(-2) * v.unsqueeze(-1)).cumsum(2)
    ks = k_state[:, :, None] + kf.cumsum(2)
    o = (qf.unsqueeze(-2) * kv).sum(-1) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv_state + torch.einsum("bhtf,bhtd->bhdf", phi(k, d=9), v), ks[:, :, -1]


def subtracted(q, k, v, kv_state, k_state):                         # twin of bthd
    qf, kf = phi(q), phi(k)
    kv = (kf[..., :, None] * v[..., None, :]).cumsum(1) - kv_state[:, None]
    ks = k_state[:, None] + kf.cumsum(1)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, -1], ks[:, -1]


def decayed_by_alpha(q, k, v, kv_state, k_state):                   # twin of unnormalised
    qf, kf = phi(q), phi(k)
    kv = torch.add((kf[..., :, None] * v[..., None, :]).cumsum(2), kv_state[:, :, None], alpha=0.5)
    return (qf[..., None] * kv).sum(-2), kv[:, :, -1]


def key_state_from_another_map(q, k, v, kv_state, k_state):         # twin of output_only
    qf, kf = phi(q), phi(k)
    kv = kv_state[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state[:, :, None] + phi(k, d=9).cumsum(2)
    return (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)


def state_without_its_start(q, k, v, kv_state, k_state):            # twin of states_with_time_axis
    qf, kf = phi(q), phi(k)
    sums = (kf[..., :, None] * v[..., None, :]).cumsum(2)
    kv = kv_state + sums
    ks = k_state + kf.cumsum(2)
    o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
    return o, sums[:, :, -1:], ks[:, :, -1:]


def prepended_row_before_last(q, k, v, kv_state, k_state):         # twin of prepended: not the state after the prefill
    qf, kf = phi(q), phi(k)
    kv = torch.cat([kv_state[:, :, None], kf[..., :, None] * v[..., None, :]], 2).cumsum(2)
    ks = torch.cat([k_state[:, :, None], kf], 2).cumsum(2)
    o = (qf[..., None] * kv[:, :, 1:]).sum(-2) / ((qf * ks[:, :, 1:]).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -2], ks[:, :, -1]


# (fn, state layout, q/k/v layout, what explain() must say, what is refused: the site, or the returned
# state alone (the attention from the initial states is still exact and rewritten))
NEAR_MISSES = [
    (decayed, "BHFD", "BHTD", "scaled by 0.9", "site"),
    (k_state_as_kv_state, "BHFD", "BHTD", "broadcasts along Dv", "site"),
    (some_rows_only, "BHFD", "BHTD", "varies along time", "site"),
    (some_rows_written_in_place, "BHFD", "BHTD", "written in place on some entries only", "site"),
    (state_of_another_map, "BHDF", "BHTD", "another feature map than the attention's keys", "state"),
    (subtracted, "BHFD", "BTHD", "subtracted", "site"),
    (decayed_by_alpha, "BHFD", "BHTD", "alpha=0.5", "site"),
    (key_state_from_another_map, "BHFD", "BHTD", "different key feature map", "site"),
    (state_without_its_start, "BH1FD", "BHTD", "without the initial state", "state"),
    (prepended_row_before_last, "BHFD", "BHTD", "row -2 of the running sum", "state"),
    (gqa_decayed_key_state, "BHFD", "GQA", "k_state is scaled by 0.5", "site"),
]


@pytest.mark.parametrize("fn,states,layout,reason,refused", NEAR_MISSES, ids=[n[0].__name__ for n in NEAR_MISSES])
def test_near_miss_is_refused_with_a_reason(fn, states, layout, reason, refused, probe):
    args = _inputs(layout, states)
    with torch.no_grad():
        want = fn(*args)
    got, with_state, _ = _run(fn, args, reports := PassReports())
    _assert_same(got, want, 1e-10, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert any(reason in r.reason for r in e.refusals), str(e)
        if refused == "site":
            assert not any("from initial state" in s.form for s in e.sites), str(e)
        else:                   # the kv state is left to the inner compiler (the key state may still be returned)
            assert not any("final state (kv_state" in s.form for s in e.sites), str(e)
    if refused == "site":
        assert with_state == 0, "based::attention_with_state must not run"


GPU_DK = 16


def _check_compiled_on_gpu(code, dtype):
    """code(q, k, v, kv_state, k_state) -> (o, kv_state', k_state') compiled with the based backend on CUDA
    (B=2 H=4 T=1000 Dk=16 Dv=64, states of 1 + Dk + Dk^2 features from random earlier tokens): values and
    the gradients in q, k, v and both states against float64 eager."""
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    b, h, t, dk, dv = 2, 4, 1000, GPU_DK, 64
    f = 1 + dk + dk * dk
    base = [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) * s for d, s in ((dk, 0.5), (dk, 0.5), (dv, 1))]
    base += [torch.randn(b, h, f, dv, generator=g, dtype=torch.float64) * 0.1,
             (torch.rand(b, h, f, generator=g, dtype=torch.float64) + 0.5) * 100]
    args = [x.to("cuda", dtype).requires_grad_() for x in base]
    ref_args = [x.detach().double().requires_grad_() for x in args]
    want = code(*ref_args)
    torch._dynamo.reset()
    got = torch.compile(code, backend="based")(*args)
    cots = [torch.randn_like(w) for w in want]
    grads = torch.autograd.grad(sum((x * c.to(x.dtype)).sum() for x, c in zip(got, cots)), args)
    wants = torch.autograd.grad(sum((w * c).sum() for w, c in zip(want, cots)), ref_args)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    _assert_same(got, tuple(w.to(x.dtype) for w, x in zip(want, got)), tol, "values")
    for name, x, w in zip(("q", "k", "v", "kv_state", "k_state"), grads, wants):
        _assert_same(x, w.to(x.dtype), 2 * tol, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_continued_prefill(dtype, no_tf32):
    """On CUDA: the brief's code compiled (Inductor inner) at Dk = 16, Dv = 64, T = 1000, from random
    states; output, new states and gradients in q, k, v and both states against float64 eager."""
    dk = GPU_DK

    def phi16(x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
        return torch.cat([torch.ones_like(x[..., :1]), x / dk ** 0.25, x2 / (math.sqrt(2) * math.sqrt(dk))], -1)

    def code(q, k, v, kv_state, k_state):
        kv = kv_state[:, :, None] + (phi16(k)[..., :, None] * v[..., None, :]).cumsum(2)
        ks = k_state[:, :, None] + phi16(k).cumsum(2)
        o = (phi16(q)[..., None] * kv).sum(-2) / ((phi16(q) * ks).sum(-1, keepdim=True) + 1e-6)
        return o, kv[:, :, -1], ks[:, :, -1]

    _check_compiled_on_gpu(code, dtype)


# ---------------------------------------------------------------------------------------------- the quadratic spelling
# The block's own tokens through the T x T weights, the earlier tokens through the states:
#     num = a @ v + phi(q) @ kv_state,  den = a.sum(-1) + phi(q) . k_state + eps
# Before, only a @ v ran the operator (unnormalised) and the row sums kept the T x T weights in the
# graph; now the whole site runs based::attention_with_state from the states, and the returned
# kv_state + phi(k)^T v, k_state + phi(k).sum(t) are the operator's.

def quad_feature_maps(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.transpose(-2, -1))
    num = a @ v + qf @ kv_state
    den = a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6
    return num / den, kv_state + kf.transpose(-2, -1) @ v, k_state + kf.sum(2)


def quad_polynomial(q, k, v, kv_state, k_state):             # the weights from q.k, phi(q) only for the states
    s = q @ k.transpose(-2, -1) / 2
    a = (1 + s + 0.5 * s * s).masked_fill(~torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(), 0)
    qf, kf = phi(q), phi(k)
    num = a @ v + qf @ kv_state
    den = a.sum(-1, keepdim=True) + (qf * k_state[:, :, None]).sum(-1, keepdim=True)
    return num / (den + 1e-6), kv_state + torch.einsum("bhtf,bhtd->bhfd", kf, v), k_state + kf.sum(2)


def quad_einsums(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    a = torch.einsum("bhif,bhjf->bhij", qf, kf) * torch.tril(torch.ones(q.shape[2], q.shape[2]))
    num = torch.einsum("bhij,bhjd->bhid", a, v) + torch.einsum("bhif,bhfd->bhid", qf, kv_state)
    den = a.sum(-1) + torch.einsum("bhif,bhf->bhi", qf, k_state) + 1e-6
    return num / den[..., None], kv_state + torch.einsum("bhtf,bhtd->bhfd", kf, v), k_state + kf.sum(2)


def quad_unnormalised(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.transpose(-2, -1))
    return a @ v + qf @ kv_state, kv_state + kf.transpose(-2, -1) @ v


def quad_value_major(q, k, v, kv_state, k_state):            # kv_state [B, H, Dv, F]
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    num = a @ v + qf @ kv_state.mT
    return num / (a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6), kv_state + v.mT @ kf, k_state + kf.sum(2)


def quad_bthd(q, k, v, kv_state, k_state):                   # q, k, v: [B, T, H, D]
    qf, kf = phi(q), phi(k)
    t = q.shape[1]
    a = torch.einsum("bihf,bjhf->bhij", qf, kf).tril()
    num = torch.einsum("bhij,bjhd->bihd", a, v) + torch.einsum("bthf,bhfd->bthd", qf, kv_state)
    den = a.sum(-1).transpose(1, 2) + torch.einsum("bthf,bhf->bth", qf, k_state) + 1e-6
    return num / den[..., None], kv_state + torch.einsum("bthf,bthd->bhfd", kf, v), k_state + kf.sum(1)


def quad_states_with_time_axis(q, k, v, kv_state, k_state):  # states [B, H, 1, F, Dv], [B, H, 1, F]
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    num = a @ v + (qf[..., :, None] * kv_state).sum(-2)
    den = a.sum(-1, keepdim=True) + (qf * k_state).sum(-1, keepdim=True) + 1e-6
    new_kv = kv_state + (kf[..., :, None] * v[..., None, :]).sum(2, keepdim=True)
    return num / den, new_kv, k_state + kf.sum(2, keepdim=True)


def quad_output_only(q, k, v, kv_state, k_state):
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    return (a @ v + qf @ kv_state) / (a.sum(-1, keepdim=True) + qf @ k_state.unsqueeze(-1) + 1e-6)


def quad_non_causal(q, k, v, kv_state, k_state):             # every query sees every key of the block
    qf, kf = phi(q), phi(k)
    a = qf @ kf.mT
    return (a @ v + qf @ kv_state) / (a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6)


def quad_in_place(q, k, v, kv_state, k_state):               # the states' terms added in place
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    num = a @ v
    num += qf @ kv_state
    den = a.sum(-1, keepdim=True)
    den.add_(qf @ k_state[..., None])
    return num / (den + 1e-6), kv_state + kf.mT @ v, k_state + kf.sum(2)


def quad_reordered(q, k, v, kv_state, k_state):              # terms in another order, times the reciprocal
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    z = 1.0 / (1e-6 + qf @ k_state[..., None] + a.sum(-1, keepdim=True))
    return (qf @ kv_state + a @ v) * z


QUADRATIC_FORMS = [
    (quad_feature_maps, "BHFD", "BHTD", True),
    (quad_polynomial, "BHFD", "BHTD", True),
    (quad_einsums, "BHFD", "BHTD", True),
    (quad_unnormalised, "BHFD", "BHTD", True),
    (quad_value_major, "BHDF", "BHTD", True),
    (quad_bthd, "BHFD", "BTHD", True),
    (quad_states_with_time_axis, "BH1FD", "BHTD", True),
    (quad_output_only, "BHFD", "BHTD", False),
    (quad_non_causal, "BHFD", "BHTD", False),
    (quad_in_place, "BHFD", "BHTD", True),
    (quad_reordered, "BHFD", "BHTD", False),
]


def _no_t_by_t(fn, args) -> str:
    """The compiled graphs' code, asserted to hold no [.., T, T] tensor (the weights are gone)."""
    seen = compiled_graphs(fn, *args)
    for gm in seen:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[-1] == value.shape[-2] == T:
                raise AssertionError(f"a T x T tensor is left in the graph: {node.format_node()}")
    return "\n".join(gm.code for gm in seen)


@pytest.mark.parametrize("fn,states,layout,returns", QUADRATIC_FORMS, ids=[f[0].__name__ for f in QUADRATIC_FORMS])
def test_quadratic_spelling_runs_the_state_operator(fn, states, layout, returns, probe):
    args = _inputs(layout, states)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), fullgraph=True)
    reports = PassReports()                         # explain()'s report, from the compile's own trace
    for _ in range(2):                              # fresh values, the compiled graph reused
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, \
                reports:
            got = compiled(*args)
            want = fn(*args)
        assert sum(e.count for e in prof.key_averages() if e.key == "based::attention_with_state") >= 1
        _assert_same(got, want, 1e-10, fn.__name__)
        args = _inputs(layout, states)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert len(e.sites) == 1 and not e.refusals, str(e)
        assert "from initial state" in e.sites[0].form and ("final state" in e.sites[0].form) == returns, str(e)
        assert ("non-causal" in str(e.sites[0].spec)) == (fn is quad_non_causal), str(e)


@pytest.mark.parametrize("fn", [quad_feature_maps, quad_polynomial, quad_value_major, quad_output_only],
                         ids=lambda f: f.__name__)
def test_quadratic_spelling_leaves_no_t_by_t_weights(fn):
    args = _inputs("BHTD", "BHDF" if fn is quad_value_major else "BHFD")
    code = _no_t_by_t(fn, args)
    assert "attention_with_state" in code and "tril" not in code, code


@pytest.mark.parametrize("fn,states,layout", [(quad_feature_maps, "BHFD", "BHTD"), (quad_value_major, "BHDF", "BHTD"),
                                              (quad_bthd, "BHFD", "BTHD")], ids=lambda x: getattr(x, "__name__", x))
def test_quadratic_spelling_gradients(fn, states, layout):
    """Values and gradients in q, k, v and both initial states (through the output and the returned
    states) against eager autograd in float64."""
    _check_gradients(fn, states, layout)


def test_quadratic_spelling_chunked_prefill_equals_one_prefill():
    """Two compiled chunks of the quadratic spelling, the second from the first's states, give the whole
    sequence's output and states."""
    q, k, v, _, _ = _inputs(t=2 * T)
    zeros = (torch.zeros(2, H, F, DV, dtype=torch.float64), torch.zeros(2, H, F, dtype=torch.float64))
    with torch.no_grad():
        want = brief(q, k, v, *zeros)
        torch._dynamo.reset()
        compiled = torch.compile(quad_feature_maps, backend=based_compile.backend(inner="eager"))
        o1, kv1, k1 = compiled(q[:, :, :T], k[:, :, :T], v[:, :, :T], *zeros)
        o2, kv2, k2 = compiled(q[:, :, T:], k[:, :, T:], v[:, :, T:], kv1, k1)
    _assert_same((torch.cat([o1, o2], 2), kv2, k2), want, 1e-10, "chunked")


@pytest.mark.parametrize("fn", [brief, prepended, quad_feature_maps, quad_polynomial], ids=lambda f: f.__name__)
def test_dynamic_lengths(fn):
    """torch.compile(dynamic=True): one graph for every T, rewritten from the states at each length (the
    state's one row along time is a 1 at every length, not the traced T), linear and quadratic spellings."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), dynamic=True)
    for t in (11, 12, 13):
        args = _inputs(t=t)
        with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(*args)
            want = fn(*args)
        calls = sum(e.count for e in prof.key_averages() if e.key == "based::attention_with_state")
        assert calls >= 1, f"T={t}: not rewritten"
        _assert_same(got, want, 1e-10, f"T={t}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_compiled_quadratic_continued_prefill(dtype, no_tf32):
    """On CUDA: the quadratic spelling compiled (Inductor inner) at Dk = 16, Dv = 64, T = 1000, from
    random states; output, new states and gradients in q, k, v and both states against float64 eager."""
    dk = GPU_DK

    def code(q, k, v, kv_state, k_state):
        qf, kf = phi(q, dk), phi(k, dk)
        a = torch.tril(qf @ kf.mT)
        num = a @ v + qf @ kv_state
        den = a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6
        return num / den, kv_state + kf.mT @ v, k_state + kf.sum(2)

    _check_compiled_on_gpu(code, dtype)


# near-misses
def quad_decayed_state(q, k, v, kv_state, k_state):         # twin of quad_feature_maps
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.transpose(-2, -1))
    num = a @ v + qf @ (0.9 * kv_state)
    den = a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6
    return num / den, kv_state + kf.transpose(-2, -1) @ v, k_state + kf.sum(2)


def quad_decayed_term(q, k, v, kv_state, k_state):          # twin of quad_output_only
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    return (a @ v + qf @ kv_state) / (a.sum(-1, keepdim=True) + 0.5 * (qf @ k_state.unsqueeze(-1)) + 1e-6)


def quad_state_read_by_k(q, k, v, kv_state, k_state):       # twin of quad_unnormalised: phi(k), not phi(q)
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.transpose(-2, -1))
    return a @ v + kf @ kv_state, kv_state + kf.transpose(-2, -1) @ v


def quad_square_map_state(q, k, v, kv_state, k_state):      # twin of quad_output_only: [1, x, x * x] reads
    def sq(x):                                              # the states (kept as [B, H, 1 + 2 D, ...])
        return torch.cat([torch.ones_like(x[..., :1]), x, x * x], -1)
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    return (a @ v + sq(q) @ kv_state) / (a.sum(-1, keepdim=True) + sq(q) @ k_state.unsqueeze(-1) + 1e-6)


def quad_two_maps(q, k, v, kv_state, k_state):              # twin of quad_output_only: k_state read by another map
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    return (a @ v + qf @ kv_state) / (a.sum(-1, keepdim=True) + phi(q, d=9) @ k_state.unsqueeze(-1) + 1e-6)


def quad_state_not_transposed(q, k, v, kv_state, k_state):  # twin of quad_value_major (Dv == F): numerator reads
    qf, kf = phi(q), phi(k)                                 # kv_state as [F, Dv], the returned state is [Dv, F]
    a = torch.tril(qf @ kf.mT)
    num = a @ v + qf @ kv_state
    return num / (a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6), kv_state + v.mT @ kf, k_state + kf.sum(2)


def quad_key_state_over_heads(q, k, v, kv_state, k_state):  # twin of quad_feature_maps: the returned k_state
    qf, kf = phi(q), phi(k)                                 # sums over the heads (H == T here)
    a = torch.tril(qf @ kf.transpose(-2, -1))
    num = a @ v + qf @ kv_state
    den = a.sum(-1, keepdim=True) + qf @ k_state[..., None] + 1e-6
    return num / den, kv_state + kf.transpose(-2, -1) @ v, k_state + kf.sum(1)


def quad_rows_transposed(q, k, v, kv_state, k_state):       # twin of quad_output_only at H == T: the row sums
    qf, kf = phi(q), phi(k)                                 # transposed between heads and time
    a = torch.tril(qf @ kf.mT)
    den = a.sum(-1, keepdim=True).transpose(1, 2) + qf @ k_state.unsqueeze(-1) + 1e-6
    return (a @ v + qf @ kv_state) / den


# (fn, state layout, q/k/v layout, T, category, what explain() says, refused: the site or the state)
QUADRATIC_NEAR_MISSES = [
    (quad_decayed_state, "BHFD", "BHTD", T, "state", "scaled by 0.9", "site"),
    (quad_decayed_term, "BHFD", "BHTD", T, "state", "scaled by 0.5", "site"),
    (quad_state_read_by_k, "BHFD", "BHTD", T, "state", "another query than the attention's", "site"),
    (quad_square_map_state, "SQUARE_MAP", "BHTD", T, "unsupported", "not [c, a x, b x (x) x]", "site"),
    (quad_two_maps, "BHFD", "BHTD", T, "state", "two different feature maps", "site"),
    (quad_state_not_transposed, "SQUARE", "BHTD", T, "verify", "disagrees with the operator's in every layout",
     "state"),
    (quad_key_state_over_heads, "BHFD", "BHTD", H, "verify", "disagrees with the operator's in every layout",
     "state"),
    (quad_rows_transposed, "BHFD", "BHTD", H, "normaliser", "query axis does not run along", "site"),
]


@pytest.mark.parametrize("fn,states,layout,t,category,reason,refused", QUADRATIC_NEAR_MISSES,
                         ids=[n[0].__name__ for n in QUADRATIC_NEAR_MISSES])
def test_quadratic_spelling_near_miss_is_refused_with_a_reason(fn, states, layout, t, category, reason, refused,
                                                                probe):
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    if states == "SQUARE":                      # Dv == F: the state [B, H, F, F], either orientation fits
        q, k, _, _, k0 = _inputs(layout, "BHFD", t=t)
        v = torch.randn(*q.shape[:-1], F, generator=g, dtype=torch.float64)
        args = (q, k, v, torch.randn(2, H, F, F, generator=g, dtype=torch.float64), k0)
    elif states == "SQUARE_MAP":                # the states in [1, x, x * x]'s 1 + 2 D features
        q, k, v, _, _ = _inputs(layout, "BHFD", t=t)
        args = (q, k, v, torch.randn(2, H, 1 + 2 * D, DV, generator=g, dtype=torch.float64),
                torch.rand(2, H, 1 + 2 * D, generator=g, dtype=torch.float64) + 1.0)
    else:
        args = _inputs(layout, states, t=t)
    with torch.no_grad():
        want = fn(*args)
    got, with_state, _ = _run(fn, args, reports := PassReports())
    _assert_same(got, want, 1e-10, fn.__name__)
    assert reports.graphs, str(reports)
    for e in reports.graphs:
        assert any(r.category == category and reason in r.reason for r in e.refusals), str(e)
        if refused == "site":
            assert not any("from initial state" in s.form for s in e.sites), str(e)
        else:                   # the site runs from its initial states; its states are left to the inner compiler
            assert len(e.sites) == 1 and "from initial state" in e.sites[0].form, str(e)
            assert "final state" not in e.sites[0].form, str(e)
    if refused == "site":
        assert with_state == 0, "based::attention_with_state must not run"
