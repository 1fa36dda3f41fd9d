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
from test_recurrent_step import step_calls, taylor

B, HKV, G, D, DV = 2, 2, 3, 4, 5
F = 1 + D + D * D


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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


def _check_rewritten(fn, args, steps=1):
    report = based_compile.explain(fn, *(x.clone() for x in args))
    assert len(report.sites) == steps and not report.refusals, str(report)
    assert all(s.form == "recurrent step" for s in report.sites)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    for seed in (1, 2):                      # fresh inputs on the second call (the compiled graph reused)
        args = [torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + i), dtype=x.dtype) * 0.3
                for i, x in enumerate(args)]
        mine, theirs = [x.clone() for x in args], [x.clone() for x in args]
        with torch.no_grad():
            calls, out = step_calls(compiled, *mine)
        ref = fn(*theirs)
        assert calls >= steps
        out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
        assert len(out) == len(ref)
        for got, want in zip(out, ref):
            assert_rel_close(got, want, 1e-10, "output / returned state")
        for got, want in zip(mine, theirs):            # the caller's tensors (in place: written)
            assert_rel_close(got, want, 1e-10, "caller's tensor")
    return report


def _check_refused(fn, args, category, words):
    report = based_compile.explain(fn, *(x.clone() for x in args))
    assert not report.sites, str(report)
    assert any(r.category == category and words in r.reason for r in report.refusals), str(report)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with torch.no_grad():
        calls, out = step_calls(compiled, *(x.clone() for x in args))
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
