"""The recurrent step with grouped-query states kept per kv head, and the unnormalised step (issue 15):
the graph pass rewrites them onto ``based::recurrent_step`` exactly (output and every state the
caller keeps, float64 against the user's code run eagerly), and refuses their near-misses with the
reason. Grouped-query: q [B, H, 1, D] with H = G * Hkv heads; k, v [B, Hkv, 1, D]; states
[B, Hkv, F, Dv] and [B, Hkv, 1, F], each updated once per kv head.
"""
from __future__ import annotations

import pytest
import torch

import based_compile
from compare import assert_rel_close
from based_compile.graph import feature_normaliser, verify
from pass_reports import PassReports
from test_recurrent_step import step_calls, taylor

B, HKV, G, D, DV = 2, 2, 3, 4, 5
F = 1 + D + D * D


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


# ----------------------------------------------------------------------------- grouped-query states

def _update(q, k, v, kv_state, k_state):
    pq, pk = taylor(q), taylor(k)
    return pq, kv_state + pk.transpose(-2, -1) @ v, k_state + pk


def gqa_repeat_interleave(q, k, v, kv_state, k_state):
    pq, kv_state, k_state = _update(q, k, v, kv_state, k_state)
    g = q.shape[1] // k.shape[1]
    kv_r, ks_r = kv_state.repeat_interleave(g, dim=1), k_state.repeat_interleave(g, dim=1)
    return (pq @ kv_r) / ((pq * ks_r).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def gqa_expand(q, k, v, kv_state, k_state):
    pq, kv_state, k_state = _update(q, k, v, kv_state, k_state)
    b, hkv, g = q.shape[0], k.shape[1], q.shape[1] // k.shape[1]
    kv_r = kv_state[:, :, None].expand(b, hkv, g, *kv_state.shape[2:]).reshape(b, hkv * g, *kv_state.shape[2:])
    ks_r = k_state[:, :, None].expand(b, hkv, g, *k_state.shape[2:]).reshape(b, hkv * g, *k_state.shape[2:])
    return (pq @ kv_r) / ((pq * ks_r).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def gqa_grouped_q(q, k, v, kv_state, k_state):            # q heads grouped as [B, Hkv, G, D]
    b, h, _, d = q.shape
    hkv = k.shape[1]
    pq, pk = taylor(q.reshape(b, hkv, h // hkv, d)), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    y = (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)
    return y.reshape(b, h, 1, -1), kv_state, k_state


def gqa_grouped_q_tiled(q, k, v, kv_state, k_state):      # head h -> kv head h % Hkv, grouped by a transpose
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, h // hkv, hkv, d).transpose(1, 2)     # [B, Hkv, G, D]: exact under the transposed reading
    pq, pk = taylor(qg), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    y = (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)
    return y.transpose(1, 2).reshape(b, h, 1, -1), kv_state, k_state


def gqa_in_place(q, k, v, kv_state, k_state):             # the caller's per-kv-head states written in place
    pq, pk = taylor(q), taylor(k)
    kv_state.add_(pk.transpose(-2, -1) @ v)
    k_state.add_(pk)
    g = q.shape[1] // k.shape[1]
    kv_r, ks_r = kv_state.repeat_interleave(g, dim=1), k_state.repeat_interleave(g, dim=1)
    return (pq @ kv_r) / ((pq * ks_r).sum(-1, keepdim=True) + 1e-6)


# near-misses
def gqa_repeat(q, k, v, kv_state, k_state):               # tiles the states: head h reads kv head h % Hkv
    pq, kv_state, k_state = _update(q, k, v, kv_state, k_state)
    g = q.shape[1] // k.shape[1]
    kv_r, ks_r = kv_state.repeat(1, g, 1, 1), k_state.repeat(1, g, 1, 1)
    return (pq @ kv_r) / ((pq * ks_r).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def gqa_mixed_grouping(q, k, v, kv_state, k_state):       # numerator interleaved, denominator tiled
    pq, kv_state, k_state = _update(q, k, v, kv_state, k_state)
    g = q.shape[1] // k.shape[1]
    kv_r, ks_r = kv_state.repeat_interleave(g, dim=1), k_state.repeat(1, g, 1, 1)
    return (pq @ kv_r) / ((pq * ks_r).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def gqa_tiled_broadcast(q, k, v, kv_state, k_state):      # q as [B, G, Hkv, D] on broadcast states: h % Hkv
    b, h, _, d = q.shape
    hkv = k.shape[1]
    pq, pk = taylor(q.reshape(b, h // hkv, hkv, d)), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    num = (pq.unsqueeze(-2) @ kv_state[:, None]).squeeze(-2)           # [B, G, Hkv, Dv]
    den = (pq * k_state[:, None, :, 0]).sum(-1, keepdim=True)
    return (num / (den + 1e-6)).reshape(b, h, 1, -1), kv_state, k_state


def gqa_reshaped_q_flat(q, k, v, kv_state, k_state):      # accepted twin: [B, G, Hkv] memory read as [B, Hkv, G]
    b, h, _, d = q.shape                                    # (a reshape keeps the flat order: h // G grouping)
    hkv = k.shape[1]
    pq, pk = taylor(q.reshape(b, h // hkv, hkv, d)), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    pq = pq.reshape(b, hkv, h // hkv, -1)
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def _gqa_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HKV * G, 1, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, HKV, 1, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, HKV, 1, DV, generator=g, dtype=torch.float64)
    kv = torch.randn(B, HKV, F, DV, generator=g, dtype=torch.float64) * 0.1
    ks = torch.rand(B, HKV, 1, F, generator=g, dtype=torch.float64) * 0.1
    ks[..., 0] += 3.0
    return q, k, v, kv, ks


def _strides(x):
    """The strides that place elements (those of axes longer than one)."""
    return [st for st, n in zip(x.stride(), x.shape) if n > 1]


def _check_rewritten(fn, args, steps=1, form="recurrent step"):
    """Compiled against eager on two draws; the pass's report of the compile (explain()'s, one trace)."""
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    reports = PassReports()
    for seed in (1, 2):                      # fresh inputs on the second call (the compiled graph reused)
        args = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + i), dtype=x.dtype) * 0.3
                for i, x in enumerate(args)]
        mine, theirs = [x.clone() for x in args], [x.clone() for x in args]
        with torch.no_grad(), reports:
            calls, out = step_calls(compiled, *mine)
        ref = fn(*theirs)
        assert calls >= steps
        out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
        assert len(out) == len(ref)
        for got, want in zip(out, ref):
            assert_rel_close(got, want, 1e-10, "output / returned state")
            assert _strides(got) == _strides(want), "a result in another memory layout than eager's"
        for got, want in zip(mine, theirs):            # the caller's tensors (in place: written)
            assert_rel_close(got, want, 1e-10, "caller's tensor")
    report = reports.merged()
    assert len(report.sites) == steps and not report.refusals, str(report)
    assert all(s.form == form for s in report.sites), str(report)
    return report


def _check_refused(fn, args, category, words):
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with torch.no_grad(), PassReports() as reports:     # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, *(x.clone() for x in args))
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert not report.sites, str(report)
        assert any(r.category == category and words in r.reason for r in report.refusals), str(report)
    assert calls == 0
    ref = fn(*(x.clone() for x in args))
    out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
    for got, want in zip(out, ref):
        assert_rel_close(got, want, 1e-13, "refused step vs eager")


@pytest.mark.parametrize("fn", [gqa_repeat_interleave, gqa_expand, gqa_grouped_q, gqa_grouped_q_tiled, gqa_in_place,
                                gqa_reshaped_q_flat],
                         ids=lambda f: f.__name__)
def test_grouped_query_states_rewritten_exactly(fn):
    _check_rewritten(fn, _gqa_inputs())


def test_grouped_query_state_updated_once_per_kv_head():
    """The operator gets k, v and the states per kv head: G times fewer rows than q."""
    q, k, v, kv, ks = _gqa_inputs()
    seen = []
    real = torch.ops.based.recurrent_step.default

    def spy(fn):
        def wrapped(*args):
            seen.append([tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args[:5]])
            return fn(*args)
        return wrapped
    from based_compile.graph import rewrite
    original = rewrite.based_recurrent_step
    rewrite.based_recurrent_step = spy(original)
    try:
        compiled = torch.compile(gqa_repeat_interleave, backend=based_compile.backend(inner="eager"))
        with torch.no_grad():
            compiled(q, k, v, kv, ks)
    finally:
        rewrite.based_recurrent_step = original
    assert real is torch.ops.based.recurrent_step.default
    assert seen and seen[0] == [(B, HKV * G, 1, D), (B, HKV, 1, D), (B, HKV, 1, DV), (B, HKV, F, DV), (B, HKV, 1, F)]


@pytest.mark.parametrize("fn,category,words", [
    (gqa_repeat, "verify", "groups them differently"),
    (gqa_mixed_grouping, "verify", "probe disagrees"),
    (gqa_tiled_broadcast, "verify", "groups them differently"),
], ids=lambda x: getattr(x, "__name__", None))
def test_grouped_query_near_misses_refused(fn, category, words):
    _check_refused(fn, _gqa_inputs(), category, words)


# ----------------------------------------------------------------------------- unnormalised steps

def unnormalised(q, k, v, kv_state):                       # no key state at all
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    return pq @ kv_state, kv_state


def unnormalised_einsum_in_place(q, k, v, kv_state):       # [B, H, 1, D], einsum over the size-1 t axis
    pq, pk = taylor(q), taylor(k)
    kv_state.add_(torch.einsum("bhtf,bhtd->bhfd", pk, v))
    return torch.einsum("bhtf,bhfd->bhtd", pq, kv_state)


def unnormalised_key_state_kept(q, k, v, kv_state, k_state):   # the key state updated, not read
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    return pq @ kv_state, kv_state, k_state


def unnormalised_gqa_scaled(q, k, v, kv_state):            # grouped, the readout scaled afterwards
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    return 0.5 * (pq @ kv_state.repeat_interleave(q.shape[1] // k.shape[1], dim=1)), kv_state


def unnormalised_broadcast_sum(q, k, v, kv_state):         # [B, H, D]: (phi_q[..., None] * kv).sum(-2)
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.unsqueeze(-1) * v.unsqueeze(-2)
    return (pq.unsqueeze(-1) * kv_state).sum(-2), kv_state


# near-misses
def unnormalised_old_state(q, k, v, kv_state):             # reads the state before the update
    pq, pk = taylor(q), taylor(k)
    return pq @ kv_state, kv_state + pk.transpose(-2, -1) @ v


def unnormalised_decayed(q, k, v, kv_state):
    pq, pk = taylor(q), taylor(k)
    kv_state = 0.9 * kv_state + pk.transpose(-2, -1) @ v
    return pq @ kv_state, kv_state


def unnormalised_key_readout(q, k, v, kv_state):           # phi(k), not phi(q), reads the state
    pk = taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    return pk @ kv_state, kv_state


def unnormalised_elu_readout(q, k, v, kv_state):           # another feature map on the query side
    pk = taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    pq = torch.cat([torch.nn.functional.elu(q) + 1, torch.zeros_like(pk[..., D:])], dim=-1)
    return pq @ kv_state, kv_state


def _plain_inputs(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = HKV * G if fn is unnormalised_gqa_scaled else HKV
    lead = (B, HKV) if fn is unnormalised_broadcast_sum else (B, HKV, 1)
    qlead = (B, h) + lead[2:]
    q = torch.randn(*qlead, D, generator=g, dtype=torch.float64)
    k = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, DV, generator=g, dtype=torch.float64)
    kv = torch.randn(B, HKV, F, DV, generator=g, dtype=torch.float64) * 0.1
    args = [q, k, v, kv]
    if fn is unnormalised_key_state_kept:
        args.append(torch.rand(B, HKV, 1, F, generator=g, dtype=torch.float64))
    return args


@pytest.mark.parametrize("fn", [unnormalised, unnormalised_einsum_in_place, unnormalised_key_state_kept,
                                unnormalised_gqa_scaled, unnormalised_broadcast_sum], ids=lambda f: f.__name__)
def test_unnormalised_step_rewritten_exactly(fn):
    report = _check_rewritten(fn, _plain_inputs(fn))
    assert "unnormalised" in str(report.sites[0].spec)


@pytest.mark.parametrize("fn,category,words", [
    (unnormalised_old_state, "unsupported", "without a readout"),
    (unnormalised_decayed, "unsupported", "decayed"),
    (unnormalised_key_readout, "unsupported", "without a readout"),
    (unnormalised_elu_readout, "unsupported", "without a readout"),
], ids=lambda x: getattr(x, "__name__", None))
def test_unnormalised_near_misses_refused(fn, category, words):
    _check_refused(fn, _plain_inputs(fn), category, words)


# ----------------------------------------------------------------------------- the kv state kept transposed
# kv_state [B, H, Dv, F], the operator's [.., F, Dv] transposed: updated by v^T phi(k) (or an einsum
# 'bhd,bhf->bhdf'), read out by phi(q) kv_state^T (or (kv_state phi(q)^T)^T, or an einsum); the key
# state as [B, H, 1, F], [B, H, F] or [B, H, F, 1]. The operator reads the transposed view and its new
# state is returned transposed back (contiguous where the user's update made a new tensor, written
# into the caller's tensor where the update was in place). Found refused ("probe disagrees") before.

def transposed_matmul(q, k, v, kv_state, k_state):        # [B, H, 1, D]; k_state [B, H, 1, F]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + v.transpose(-2, -1) @ pk
    k_state = k_state + pk
    return (pq @ kv_state.transpose(-2, -1)) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def transposed_einsum(q, k, v, kv_state, k_state):        # [B, H, D]; k_state [B, H, F]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + torch.einsum("bhd,bhf->bhdf", v, pk)
    k_state = k_state + pk
    num = torch.einsum("bhdf,bhf->bhd", kv_state, pq)
    return num / (torch.einsum("bhf,bhf->bh", pq, k_state)[..., None] + 1e-6), kv_state, k_state


def transposed_in_place(q, k, v, kv_state, k_state):      # the caller's states written; k_state [B, H, F, 1]
    pq, pk = taylor(q), taylor(k)
    kv_state.add_(v.mT @ pk)
    k_state.add_(pk.mT)
    return (kv_state @ pq.mT).mT / (pq @ k_state + 1e-6)


def transposed_key_column(q, k, v, kv_state, k_state):    # functional, k_state [B, H, F, 1]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + v.mT @ pk
    k_state = k_state + pk.mT
    return (pq @ kv_state.mT) / (pq @ k_state + 1e-6), kv_state, k_state


def transposed_unnormalised(q, k, v, kv_state):
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + v.mT @ pk
    return pq @ kv_state.mT, kv_state


def transposed_gqa(q, k, v, kv_state, k_state):           # states per kv head, q heads grouped on them
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + v.mT @ pk
    k_state = k_state + pk
    g = q.shape[1] // k.shape[1]
    num = pq @ kv_state.repeat_interleave(g, dim=1).mT
    return num / ((pq * k_state.repeat_interleave(g, dim=1)).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


# near-misses
def transposed_decayed(q, k, v, kv_state, k_state):       # twin of transposed_matmul
    pq, pk = taylor(q), taylor(k)
    kv_state = 0.9 * kv_state + v.transpose(-2, -1) @ pk
    k_state = k_state + pk
    return (pq @ kv_state.transpose(-2, -1)) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def transposed_readout_not_transposed(q, k, v, kv_state, k_state):   # Dv == F: state [Dv, F] read as [F, Dv]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + v.transpose(-2, -1) @ pk
    k_state = k_state + pk
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def transposed_update_not_transposed(q, k, v, kv_state, k_state):    # Dv == F: [F, Dv] update, [Dv, F] readout
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    return (pq @ kv_state.transpose(-2, -1)) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def transposed_elu_map(q, k, v, kv_state, k_state):       # twin of transposed_matmul: elu + 1 features
    pq, pk = (torch.cat([torch.nn.functional.elu(x) + 1, torch.zeros_like(taylor(x)[..., D:])], -1) for x in (q, k))
    kv_state = kv_state + v.transpose(-2, -1) @ pk
    k_state = k_state + pk
    return (pq @ kv_state.transpose(-2, -1)) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


_TRANSPOSED_KEY_STATE = {transposed_einsum: (F,), transposed_in_place: (F, 1), transposed_key_column: (F, 1)}


def _transposed_inputs(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = HKV * G if fn is transposed_gqa else HKV
    dv = F if fn in (transposed_readout_not_transposed, transposed_update_not_transposed) else DV
    lead = (B, HKV) if fn is transposed_einsum else (B, HKV, 1)
    q = torch.randn(B, h, *lead[2:], D, generator=g, dtype=torch.float64)
    k = torch.randn(*lead, D, generator=g, dtype=torch.float64)
    v = torch.randn(*lead, dv, generator=g, dtype=torch.float64)
    kv = torch.randn(B, HKV, dv, F, generator=g, dtype=torch.float64) * 0.1
    if fn is transposed_unnormalised:
        return [q, k, v, kv]
    ks = torch.rand(B, HKV, *_TRANSPOSED_KEY_STATE.get(fn, (1, F)), generator=g, dtype=torch.float64) * 0.1 + 1.0
    return [q, k, v, kv, ks]


@pytest.fixture(params=["probe", "structure"])
def probe(request, monkeypatch):
    """The pass as it runs, and with the attention probe's and the index tensors' limits at 0 (real
    sizes): the step's own probe (states of a few kilobytes) runs either way."""
    if request.param == "structure":
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    return request.param


@pytest.mark.parametrize("fn", [transposed_matmul, transposed_einsum, transposed_in_place, transposed_key_column,
                                transposed_unnormalised, transposed_gqa], ids=lambda f: f.__name__)
def test_transposed_kv_state_rewritten_exactly(fn, probe):
    _check_rewritten(fn, _transposed_inputs(fn), form="recurrent step (kv state [.., Dv, F])")


def test_transposed_kv_state_operator_reads_the_transposed_view(monkeypatch):
    """The operator gets the user's [B, H, Dv, F] state as its [B, H, F, Dv] view (no copy in the
    graph), and the caller's tensor written in place holds eager's values after several steps."""
    from based_compile.graph import rewrite
    q, k, v, kv, ks = _transposed_inputs(transposed_in_place)
    kv_mine, ks_mine, kv_ref, ks_ref = kv.clone(), ks.clone(), kv.clone(), ks.clone()
    seen = []
    original = rewrite.based_recurrent_step

    def spy(*args):
        if not isinstance(args[3], torch._subclasses.FakeTensor):      # the rewrite's fake run aside
            seen.append((tuple(args[3].shape), args[3].data_ptr() == kv_mine.data_ptr()))
        return original(*args)
    monkeypatch.setattr(rewrite, "based_recurrent_step", spy)
    compiled = torch.compile(transposed_in_place, backend=based_compile.backend(inner="eager"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _ in range(3):
            x = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in (q, k, v)]
            calls, out = step_calls(compiled, *x, kv_mine, ks_mine)
            assert calls >= 1
            assert_rel_close(out, transposed_in_place(*x, kv_ref, ks_ref), 1e-12, "output")
    assert seen == [((B, HKV, F, DV), True)] * 3
    assert_rel_close(kv_mine, kv_ref, 1e-12, "kv_state")
    assert_rel_close(ks_mine, ks_ref, 1e-12, "k_state")


@pytest.mark.parametrize("fn,category,words", [
    (transposed_decayed, "unsupported", "decayed"),
    (transposed_readout_not_transposed, "verify", "as its transpose [.., Dv, F] alike"),
    (transposed_update_not_transposed, "verify", "as its transpose [.., Dv, F] alike"),
    (transposed_elu_map, "feature_map", "not the Taylor feature map"),
], ids=lambda x: getattr(x, "__name__", None))
def test_transposed_kv_state_near_misses_refused(fn, category, words):
    _check_refused(fn, _transposed_inputs(fn), category, words)


def feature_major_matmul(q, k, v, kv_state, k_state):     # kv_state [B, H, F, Dv]; k_state [B, H, 1, F]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


@pytest.mark.parametrize("fn", [feature_major_matmul, transposed_matmul], ids=lambda f: f.__name__)
def test_float32_states_promoted_by_a_float64_update(fn, probe):
    """float64 q, k, v on float32 states: a functional update makes float64 states (type promotion) and
    the readout reads them unrounded; before, the operator kept them float32 (the returned states
    float32, the output off by float32 rounding, 5e-8). (In place, the caller's float32 states stay
    float32 and a matmul readout of them by float64 features is an error in eager.)"""
    q, k, v, kv, ks = _transposed_inputs(transposed_matmul)
    if fn is feature_major_matmul:
        kv = kv.mT.contiguous()
    args = [q, k, v, kv.float(), ks.float()]
    report = based_compile.explain(fn, *(x.clone() for x in args))
    assert len(report.sites) == 1 and not report.refusals, str(report)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"))
    for seed in (1, 2):
        fresh = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + i), dtype=x.dtype) * 0.3
                 for i, x in enumerate(args)]
        mine, theirs = [x.clone() for x in fresh], [x.clone() for x in fresh]
        with torch.no_grad():
            calls, out = step_calls(compiled, *mine)
            ref = fn(*theirs)
        assert calls >= 1
        out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
        for got, want in zip(out + tuple(mine), ref + tuple(theirs), strict=True):
            assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
            assert_rel_close(got, want, 1e-12, "output, returned state or caller's tensor")


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [transposed_matmul, transposed_in_place], ids=lambda f: f.__name__)
def test_gpu_transposed_kv_state(fn):
    """On CUDA (Inductor, bfloat16, Dk 16, Dv 64): the transposed state's view goes into the step kernel;
    a chain of steps follows the float64 eager chain (output and states)."""
    import math as _math
    b, h, dk, dv = 2, 4, 16, 64
    f = 1 + dk + dk * dk

    def phi(x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (_math.sqrt(2) * _math.sqrt(dk))
        return torch.cat([torch.ones_like(x[..., :1]), x / dk ** 0.25, x2], -1)

    def step(q, k, v, kv_state, k_state):
        pq, pk = phi(q), phi(k)
        if fn is transposed_in_place:
            kv_state.add_(v.mT @ pk)
            k_state.add_(pk)
            return (kv_state @ pq.mT).mT / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state
        kv_state = kv_state + v.mT @ pk
        k_state = k_state + pk
        return (pq @ kv_state.mT) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="based")
    g = torch.Generator().manual_seed(11)
    kv, ks = torch.zeros(b, h, dv, f, dtype=torch.float64), torch.zeros(b, h, 1, f, dtype=torch.float64)
    kv_c, ks_c = kv.to("cuda", torch.bfloat16), ks.to("cuda", torch.bfloat16)
    with torch.no_grad():
        for i in range(4):
            q, k = (torch.randn(b, h, 1, dk, generator=g, dtype=torch.float64) for _ in range(2))
            v = torch.randn(b, h, 1, dv, generator=g, dtype=torch.float64)
            o_ref, kv, ks = step(q, k, v, kv, ks)
            o, kv_c, ks_c = compiled(*(x.to("cuda", torch.bfloat16) for x in (q, k, v)), kv_c, ks_c)
            assert_rel_close(o, o_ref, 2e-2, f"o step {i}")
            assert_rel_close(kv_c, kv, 2e-2, f"kv_state step {i}")
            assert_rel_close(ks_c, ks, 2e-2, f"k_state step {i}")
        sites = based_compile.explain(step, *(x.to("cuda", torch.bfloat16) for x in (q, k, v)), kv_c.clone(),
                                      ks_c.clone()).sites
    assert len(sites) == 1 and sites[0].form == "recurrent step (kv state [.., Dv, F])", sites


# ----------------------------------------------------------------------------- the group size under dynamic shapes

def test_group_size_is_guarded_under_dynamic_shapes():
    """A tiling (``repeat(1, g, ..)``) is the operator's grouping at G = 1 only. Traced at G = 1 with
    q's and k's head counts as separate symbols (no duck sizing), the graph must recompile at G = 2,
    not run the operator: it did (relative error 1.0, silently) before the group was guarded."""
    from torch.fx.experimental import _config as fx_config
    if not hasattr(fx_config, "use_duck_shape"):
        pytest.skip("this torch has no use_duck_shape switch")
    with fx_config.patch(use_duck_shape=False):
        _run_group_sizes()


def _run_group_sizes():
    compiled = torch.compile(gqa_repeat, backend=based_compile.backend(inner="eager"), dynamic=True)
    for i, (b, hkv, g) in enumerate([(2, 2, 1), (2, 2, 2), (3, 3, 2), (2, 3, 1)]):
        gen = torch.Generator().manual_seed(i)
        q = torch.randn(b, hkv * g, 1, D, generator=gen, dtype=torch.float64)
        k = torch.randn(b, hkv, 1, D, generator=gen, dtype=torch.float64)
        v = torch.randn(b, hkv, 1, DV, generator=gen, dtype=torch.float64)
        kv = torch.randn(b, hkv, F, DV, generator=gen, dtype=torch.float64) * 0.1
        ks = torch.rand(b, hkv, 1, F, generator=gen, dtype=torch.float64) + 1.0
        with torch.no_grad():
            calls, out = step_calls(compiled, q, k, v, kv.clone(), ks.clone())
        if i == 0 or g == 2:      # (a later G = 1 call may reuse the G = 2 graph, unrewritten: also exact)
            assert (calls >= 1) == (g == 1), f"G={g}: based::recurrent_step ran {calls}x"
        for got, want in zip(out, gqa_repeat(q, k, v, kv.clone(), ks.clone())):
            assert_rel_close(got, want, 1e-10, f"B={b} Hkv={hkv} G={g}")


# ----------------------------------------------------------------------------- the token taken after the map
# phi applied to the token's [B, H, 1, D] slice, then the token taken out (phi(q)[:, :, 0], .select(2, -1),
# .squeeze(2)) and the step written on [B, H, F] with einsums: a select of a size-1 axis is a view of the
# map, read like the squeeze (both the numerator and the normaliser). Near miss: the map of two tokens
# and one of them taken (a part of the map, not a view of it): refused.

def _einsum_step(pq, pk, v, kv_state, k_state):
    kv_state = kv_state + torch.einsum("bhf,bhd->bhfd", pk, v)
    k_state = k_state + pk
    y = torch.einsum("bhf,bhfd->bhd", pq, kv_state) / (torch.einsum("bhf,bhf->bh", pq, k_state)[..., None] + 1e-12)
    return y, kv_state, k_state


def token_selected(q, k, v, kv_state, k_state):
    pq, pk = taylor(q), taylor(k)
    return _einsum_step(pq[:, :, 0], pk[:, :, 0], v[:, :, 0], kv_state, k_state)


def token_selected_last(q, k, v, kv_state, k_state):
    return _einsum_step(taylor(q).select(2, -1), taylor(k).select(2, -1), v.select(2, -1), kv_state, k_state)


def token_squeezed(q, k, v, kv_state, k_state):
    return _einsum_step(taylor(q).squeeze(2), taylor(k).squeeze(2), v.squeeze(2), kv_state, k_state)


def token_of_two(q, k, v, kv_state, k_state):             # the map of [B, H, 2, D], the first token taken
    q2, k2 = torch.cat([q, q], 2), torch.cat([k, k], 2)
    return _einsum_step(taylor(q2)[:, :, 0], taylor(k2)[:, :, 0], v[:, :, 0], kv_state, k_state)


def _token_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, HKV, 1, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, HKV, 1, DV, generator=g, dtype=torch.float64)
    kv = torch.randn(B, HKV, F, DV, generator=g, dtype=torch.float64) * 0.1
    return [q, k, v, kv, torch.rand(B, HKV, F, generator=g, dtype=torch.float64) + 1]


@pytest.mark.parametrize("fn", [token_selected, token_selected_last, token_squeezed], ids=lambda f: f.__name__)
def test_token_taken_after_the_map_rewritten_exactly(fn):
    report = _check_rewritten(fn, _token_inputs())
    assert "normalised (eps=1e-12)" in str(report.sites[0].spec), str(report)


def test_token_of_a_two_token_map_refused():
    _check_refused(token_of_two, _token_inputs(), "feature_map", "one token taken out of a feature map of several")
