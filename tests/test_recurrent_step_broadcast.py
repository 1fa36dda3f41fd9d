"""The recurrent step written with broadcast 5-d states (HazyResearch zoology's Based
``recurrent_forward``): the graph pass reads it as ``based::recurrent_step`` and the compiled step
is exact (output and every state, several steps with the states carried), and its near-misses are
refused with the reason.

    q, k, v = phi(q).unsqueeze(-2), phi(k).unsqueeze(-2), v.unsqueeze(-1)
    kv_state += k[:, :, -1:] * v[:, :, -1:]           # [B, H, 1, Dv, F]
    k_state += k[:, :, -1:]                           # [B, H, 1, 1, F]
    y = (q * kv_state).sum(-1) / ((q * k_state).sum(-1) + eps)

What kept it out was not the 5-d states (the step's probe reads any leading axes as rows) but the
last token taken as ``x[:, :, -1:]`` of a one-token axis: a slice covering the whole axis, which the
lowering now reads as the tensor itself (``canonicalize._drop_full_slices``), as it did ``x[:, :, 0:]``.
A state stored back by ``state.copy_(state + update)`` is read as the update written in place.
"""
from __future__ import annotations

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from based_compile.kernels.naive import naive_parallel_based
from compare import assert_rel_close
from pass_reports import PassReports
from test_recurrent_step import taylor

B, H, D, DV = 2, 3, 4, 5
F = 1 + D + D * D
EPS = 1e-6

pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


# ----------------------------------------------------------------------------- read

def zoology_in_place(q, k, v, kv_state, k_state):         # zoology's spelling: kv [B, H, 1, Dv, F], k [B, H, 1, 1, F]
    q, k = taylor(q), taylor(k)
    b, h, l, _ = q.shape
    q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)
    kv_state += k[:, :, -1:] * v[:, :, -1:]
    k_state += k[:, :, -1:]
    num = (q * kv_state).sum(dim=-1)
    y = num / ((q * k_state).sum(dim=-1) + EPS)
    return y.transpose(1, 2).reshape(b, l, -1)           # rearrange 'b h l d -> b l (h d)'


def functional(q, k, v, kv_state, k_state):               # kv [B, H, 1, Dv, F], k [B, H, 1, F], returned
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    den = (qf * k_state).sum(-1, keepdim=True)
    return num / (den + EPS), kv_state, k_state


def feature_major(q, k, v, kv_state, k_state):            # kv [B, H, 1, F, Dv]: summed over -2
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + kf[:, :, -1:, :, None] * v[:, :, -1:, None, :]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[..., :, None] * kv_state).sum(-2)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def unsqueezed(q, k, v, kv_state, k_state):               # the caller keeps kv [B, H, Dv, F]
    qf, kf = taylor(q), taylor(k)
    kv = kv_state.unsqueeze(2) + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv.squeeze(2), k_state


def unsqueezed_in_place(q, k, v, kv_state, k_state):      # kv [B, H, Dv, F] written through its 5-d view
    qf, kf = taylor(q), taylor(k)
    kv = kv_state.unsqueeze(2)
    kv.add_(kf[:, :, -1:, None, :] * v[:, :, -1:, :, None])
    k_state.add_(kf[:, :, -1:])
    num = (qf[:, :, :, None, :] * kv).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS)


def copied(q, k, v, kv_state, k_state):                   # states stored back by copy_
    qf, kf = taylor(q), taylor(k)
    kv_state.copy_(kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None])
    k_state.copy_(k_state + kf[:, :, -1:])
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS)


def copied_matmul(q, k, v, kv_state, k_state):            # the 4-d matmul step stored back by copy_
    qf, kf = taylor(q), taylor(k)
    kv_state.copy_(kv_state + kf.mT @ v)
    k_state.copy_(k_state + kf)
    return (qf @ kv_state) / ((qf * k_state).sum(-1, keepdim=True) + EPS)


def unnormalised(q, k, v, kv_state):                      # no key state
    qf, kf = taylor(q), taylor(k)
    kv_state.add_(kf[:, :, -1:, None, :] * v[:, :, -1:, :, None])
    return (qf[:, :, :, None, :] * kv_state).sum(-1)


# ----------------------------------------------------------------------------- near-misses

def readout_wrong_axis(q, k, v, kv_state, k_state):       # sums the values, keeps the features
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv_state).sum(-2)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def readout_wrong_axis_square(q, k, v, kv_state, k_state):   # Dv == F: the state read as [F, Dv]
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, :, None] * kv_state).sum(-2)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def query_in_update(q, k, v, kv_state, k_state):          # phi(q), not phi(k), in the kv update
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + qf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def other_token(q, k, v, kv_state, k_state):              # two tokens: phi(k) of the last, v of the first
    qf, kf = taylor(q), taylor(k)
    kv_state = kv_state + kf[:, :, -1:, None, :] * v[:, :, :1, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def decayed(q, k, v, kv_state, k_state):
    qf, kf = taylor(q), taylor(k)
    kv_state = 0.9 * kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None]
    k_state = k_state + kf[:, :, -1:]
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS), kv_state, k_state


def copied_with_a_cast(q, k, v, kv_state, k_state):       # float64 update copied into float32 states: rounded
    qf, kf = taylor(q), taylor(k)
    kv_state.copy_(kv_state + kf[:, :, -1:, None, :] * v[:, :, -1:, :, None])
    k_state.copy_(k_state + kf[:, :, -1:])
    num = (qf[:, :, :, None, :] * kv_state).sum(-1)
    return num / ((qf * k_state).sum(-1, keepdim=True) + EPS)


# ----------------------------------------------------------------------------- inputs

_KV_SHAPE = {feature_major: (B, H, 1, F, DV), unsqueezed: (B, H, DV, F), unsqueezed_in_place: (B, H, DV, F),
             copied_matmul: (B, H, F, DV), readout_wrong_axis_square: (B, H, 1, F, F)}
_RETURNS_STATES = {functional, feature_major, unsqueezed}


def _states(fn, gen, dtype=torch.float64):
    """Fresh random states (a key state that keeps the normaliser away from zero)."""
    kv = torch.randn(*_KV_SHAPE.get(fn, (B, H, 1, DV, F)), generator=gen, dtype=dtype) * 0.3
    if fn is unnormalised:
        return [kv]
    shape = (B, H, 1, 1, F) if fn is zoology_in_place else (B, H, 1, F)
    ks = torch.rand(*shape, generator=gen, dtype=dtype) * 0.3
    ks[..., 0] += 2.0
    return [kv, ks]


def _token(fn, gen, dtype=torch.float64):
    t = 2 if fn is other_token else 1
    dv = F if fn is readout_wrong_axis_square else DV
    q = torch.randn(B, H, 1, D, generator=gen, dtype=dtype)
    k = torch.randn(B, H, t, D, generator=gen, dtype=dtype)
    return [q, k, torch.randn(B, H, t, dv, generator=gen, dtype=dtype)]


def _run_steps(step, fn, tokens, states):
    """Run ``step`` over ``tokens``, carrying the states (returned ones, or the tensors written in
    place); the outputs and the final states."""
    outs = []
    for token in tokens:
        result = step(*token, *states)
        if fn in _RETURNS_STATES:
            out, *states = result
        else:
            out = result
        outs.append(out)
    return outs, states


# ----------------------------------------------------------------------------- tests

ACCEPTED = [zoology_in_place, functional, feature_major, unsqueezed, unsqueezed_in_place, copied, copied_matmul,
            unnormalised]


# Inductor on the three ways a state comes back (written in place, returned, copied back)
@pytest.mark.parametrize("fn,inner", [(fn, "aot_eager") for fn in ACCEPTED] +
                         [(fn, "inductor") for fn in (zoology_in_place, functional, copied)],
                         ids=lambda x: getattr(x, "__name__", x))
def test_broadcast_step_rewritten_exactly(fn, inner):
    """Compiled against eager (float64, fresh random states and tokens), four steps with the states
    carried: every output and the final states agree; the operator runs at every step; the pass
    reports one site and no refusal."""
    gen = torch.Generator().manual_seed(7)
    states = _states(fn, gen)
    tokens = [_token(fn, gen) for _ in range(4)]
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    mine, theirs = [s.clone() for s in states], [s.clone() for s in states]
    with torch.no_grad(), PassReports() as reports:
        compiled(*tokens[0], *[s.clone() for s in states])           # compile (not counted)
    report = reports.merged()
    assert len(report.sites) == 1 and not report.refusals, str(report)
    assert report.sites[0].form.startswith("recurrent step"), str(report)
    with torch.no_grad(), BasedOpCounter() as counter:
        outs, final = _run_steps(compiled, fn, tokens, mine)
    with torch.no_grad():
        ref_outs, ref_final = _run_steps(fn, fn, tokens, theirs)
    assert counter.calls["based::recurrent_step"] == len(tokens), counter.calls
    for i, (got, want) in enumerate(zip(outs, ref_outs)):
        assert got.shape == want.shape
        assert_rel_close(got, want, 1e-12, f"output of step {i}")
    for got, want in zip(final, ref_final, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_rel_close(got, want, 1e-12, "state after the steps")


def test_zoology_step_chain_is_based_attention():
    """From zero states, T steps of the compiled zoology step in float32 give causal Based attention of
    the T tokens, computed in float64 by the quadratic reference (phi(q).phi(k) = 1 + s + s^2/2 with
    s = q.k / sqrt(D))."""
    gen = torch.Generator().manual_seed(3)
    t = 6
    q, k = (torch.randn(B, H, t, D, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, t, DV, generator=gen, dtype=torch.float64)
    kv = torch.zeros(B, H, 1, DV, F, dtype=torch.float32)
    ks = torch.zeros(B, H, 1, 1, F, dtype=torch.float32)
    compiled = torch.compile(zoology_in_place, backend=based_compile.backend(inner="aot_eager"))
    tokens = [[x[:, :, i:i + 1].float() for x in (q, k, v)] for i in range(t)]
    with torch.no_grad():
        outs = [compiled(*tokens[0], kv, ks)]                 # compiles (not counted)
        with BasedOpCounter() as counter:
            outs += [compiled(*token, kv, ks) for token in tokens[1:]]
    assert counter.calls["based::recurrent_step"] == t - 1, counter.calls
    ref = naive_parallel_based(q, k, v, scale=D ** -0.5, eps=EPS)       # [B, H, T, Dv]
    got = torch.cat(outs, 1).reshape(B, t, H, DV).transpose(1, 2)
    assert_rel_close(got.double(), ref, 1e-5, "outputs of the step chain")
    assert_rel_close(kv[:, :, 0].double(), (v.mT @ taylor(k)), 1e-5, "kv state")
    assert_rel_close(ks[:, :, 0, 0].double(), taylor(k).sum(2), 1e-5, "key state")


@pytest.mark.parametrize("fn,category,words", [
    (readout_wrong_axis, "verify", "the step's output has shape"),
    (readout_wrong_axis_square, "verify", "probe disagrees on the output"),
    (query_in_update, "unsupported", "without a readout"),
    (other_token, "feature_map", "one token taken out of a feature map of several tokens"),
    (decayed, "unsupported", "decayed kv state"),
    (copied_with_a_cast, "unsupported", "writes in place, while the recurrent step runs"),
], ids=lambda x: getattr(x, "__name__", None))
def test_broadcast_step_near_misses_refused(fn, category, words):
    """Refused with the reason, the operator never called, and the compiled model exact."""
    gen = torch.Generator().manual_seed(5)
    dtype = torch.float32 if fn is copied_with_a_cast else torch.float64
    states = _states(fn, gen, dtype)
    token = _token(fn, gen)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"))
    mine, theirs = [s.clone() for s in states], [s.clone() for s in states]
    with torch.no_grad(), PassReports() as reports:
        compiled(*token, *[s.clone() for s in states])              # compile (not counted)
    with torch.no_grad(), BasedOpCounter() as counter:
        out = compiled(*token, *mine)
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert not report.sites, str(report)
        assert any(r.category == category and words in r.reason for r in report.refusals), str(report)
    assert counter.total == 0, counter.calls
    with torch.no_grad():
        ref = fn(*token, *theirs)
    out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
    for got, want in zip(out + tuple(mine), ref + tuple(theirs), strict=True):
        assert_rel_close(got, want, 1e-6 if dtype is torch.float32 else 1e-13, "refused step vs eager")


def test_zoology_step_under_dynamic_shapes():
    """Compiled with dynamic=True: the one-token axis stays a constant 1 (Dynamo specialises sizes 0
    and 1), so ``[:, :, -1:]`` is the whole axis at every batch and head count the graph runs at;
    each call runs the operator and is exact."""
    compiled = torch.compile(zoology_in_place, backend=based_compile.backend(inner="aot_eager"), dynamic=True)
    for b, h in ((2, 3), (3, 2), (1, 4)):
        gen = torch.Generator().manual_seed(b * 10 + h)
        q, k = (torch.randn(b, h, 1, D, generator=gen, dtype=torch.float64) for _ in range(2))
        v = torch.randn(b, h, 1, DV, generator=gen, dtype=torch.float64)
        kv = torch.randn(b, h, 1, DV, F, generator=gen, dtype=torch.float64) * 0.3
        ks = torch.rand(b, h, 1, 1, F, generator=gen, dtype=torch.float64) + 1.0
        mine, theirs = [kv.clone(), ks.clone()], [kv.clone(), ks.clone()]
        with torch.no_grad():
            compiled(q, k, v, kv.clone(), ks.clone())                     # compiles when it must
            with BasedOpCounter() as counter:
                out = compiled(q, k, v, *mine)
            ref = zoology_in_place(q, k, v, *theirs)
        assert counter.calls["based::recurrent_step"] == 1, (b, h, counter.calls)
        for got, want in zip((out, *mine), (ref, *theirs)):
            assert_rel_close(got, want, 1e-12, f"B={b} H={h}")
