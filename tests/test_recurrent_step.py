"""The recurrent step of Based attention: ``based::recurrent_step`` and the pass that rewrites onto it.

References: float64 loops over earlier tokens (the quadratic Based function of all tokens so far is
what a chain of steps must compute), and the user's own code run eagerly (output and both states).
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_compile.kernels.naive import naive_parallel_based
from based_compile.op.recurrent_step import based_recurrent_step, feature_map
from compare import assert_rel_close
from pass_reports import PassReports

B, H, D, DV = 2, 3, 4, 5
PIECES = ("const:1", "linear", "outer")
FACTORS = (1.0, D ** -0.25, 1 / (math.sqrt(2) * math.sqrt(D)))      # phi(q).phi(k) = 1 + s + s^2/2, s = q.k/2


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def taylor(x):
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / (math.sqrt(2) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


def test_op_chain_of_steps_is_based_attention_float64():
    """T steps from zero states: outputs equal causal Based attention of the T tokens; states equal
    sum_j phi(k_j) v_j^T and sum_j phi(k_j)."""
    g = torch.Generator().manual_seed(0)
    t = 6
    q, k = (torch.randn(B, H, t, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, t, DV, generator=g, dtype=torch.float64)
    f = 1 + D + D * D
    kv, ks = torch.zeros(B, H, f, DV, dtype=torch.float64), torch.zeros(B, H, 1, f, dtype=torch.float64)
    outs = []
    for i in range(t):
        o, kv, ks = based_recurrent_step(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], kv, ks,
                                         PIECES, FACTORS, FACTORS, eps=1e-6)
        outs.append(o)
    ref = naive_parallel_based(q, k, v, scale=0.5, eps=1e-6)
    assert_rel_close(torch.cat(outs, 2), ref, 1e-12, "outputs")
    phi_k = taylor(k)
    assert_rel_close(kv, phi_k.transpose(-2, -1) @ v, 1e-12, "kv state")
    assert_rel_close(ks, phi_k.sum(2, keepdim=True), 1e-12, "k state")


def test_op_arguments_and_fake():
    q = torch.randn(2, 3, 4)
    kv, ks = torch.randn(2, 3, 21, 5), torch.randn(2, 3, 21)
    with pytest.raises(ValueError, match="kv_state"):
        based_recurrent_step(q, q, torch.randn(2, 3, 5), kv[..., :4], ks, PIECES, FACTORS, FACTORS)
    with pytest.raises(ValueError, match="pieces"):
        based_recurrent_step(q, q, torch.randn(2, 3, 5), kv, ks, ("cube",), (1.0,), (1.0,))
    with pytest.raises(ValueError, match="q_factors"):
        based_recurrent_step(q, q, torch.randn(2, 3, 5), kv, ks, PIECES, (1.0,), FACTORS)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        based_recurrent_step(q, q, None, kv, ks, PIECES, FACTORS, FACTORS)
    torch.library.opcheck(torch.ops.based.recurrent_step.default,
                          (q, q.clone(), torch.randn(2, 3, 5), kv, ks, list(PIECES), list(FACTORS), list(FACTORS),
                           True, 1e-6))
    assert feature_map(q, PIECES, FACTORS).shape == (2, 3, 21)


def test_op_refuses_grad():
    q = torch.randn(2, 3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        based_recurrent_step(q, q, torch.randn(2, 3, 5), torch.randn(2, 3, 21, 5), torch.randn(2, 3, 21),
                             PIECES, FACTORS, FACTORS)


# ----------------------------------------------------------------------------- the graph pass


def step_matmul(q, k, v, kv_state, k_state):          # [B, H, 1, D], states [B, H, F, Dv], [B, H, 1, F]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    num = pq @ kv_state
    den = (pq * k_state).sum(-1, keepdim=True)
    return num / (den + 1e-6), kv_state, k_state


def step_einsum(q, k, v, kv_state, k_state):          # [B, H, D], states [B, H, F, Dv], [B, H, F]
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + torch.einsum("bhf,bhd->bhfd", pk, v)
    k_state = k_state + pk
    num = torch.einsum("bhf,bhfd->bhd", pq, kv_state)
    den = torch.einsum("bhf,bhf->bh", pq, k_state)[..., None]
    return num / (den + 1e-6), kv_state, k_state


def step_inplace(q, k, v, kv_state, k_state):         # the caller's states are written in place
    pq, pk = taylor(q), taylor(k)
    kv_state.add_(torch.einsum("bhf,bhd->bhfd", pk, v))
    k_state += pk
    num = torch.einsum("bhf,bhfd->bhd", pq, kv_state)
    den = torch.einsum("bhf,bhf->bh", pq, k_state)[..., None]
    return num / (den + 1e-6)


def step_transposed_state(q, k, v, kv_state, k_state):   # kv_state [B, H, Dv, F], the transposed layout
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + (pk.transpose(-2, -1) @ v).transpose(-2, -1)
    k_state = k_state + pk
    num = pq @ kv_state.transpose(-2, -1)
    return num / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


# near-misses
def step_decayed(q, k, v, kv_state, k_state):
    pq, pk = taylor(q), taylor(k)
    kv_state = 0.9 * kv_state + pk.transpose(-2, -1) @ v
    k_state = 0.9 * k_state + pk
    num = pq @ kv_state
    return num / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def step_gated(q, k, v, kv_state, k_state):
    pq, pk = taylor(q), taylor(k)
    gate = torch.sigmoid(q.sum(-1, keepdim=True))
    kv_state = gate * kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    num = pq @ kv_state
    return num / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def step_old_state_readout(q, k, v, kv_state, k_state):   # reads the states before the update
    pq, pk = taylor(q), taylor(k)
    num = pq @ kv_state
    den = (pq * k_state).sum(-1, keepdim=True)
    return num / (den + 1e-6), kv_state + pk.transpose(-2, -1) @ v, k_state + pk


def step_cubic_map(q, k, v, kv_state, k_state):
    def phi(x):
        x3 = (x[..., :, None, None] * x[..., None, :, None] * x[..., None, None, :]).flatten(-3)
        return torch.cat([taylor(x), x3], dim=-1)
    pq, pk = phi(q), phi(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    num = pq @ kv_state
    return num / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def _inputs(fn, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = 1 + D + D * D
    three_d = fn in (step_einsum, step_inplace)
    lead = (B, H) if three_d else (B, H, 1)
    q, k = (torch.randn(*lead, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*lead, DV, generator=g, dtype=torch.float64)
    ks_shape = (B, H, f) if three_d else (B, H, 1, f)
    kv_shape = (B, H, DV, f) if fn is step_transposed_state else (B, H, f, DV)
    if fn is step_cubic_map:
        ks_shape, kv_shape = (B, H, 1, f + D ** 3), (B, H, f + D ** 3, DV)
    # states of a few earlier tokens (positive normalisers, as decoding has them)
    kv = torch.randn(kv_shape, generator=g, dtype=torch.float64) * 0.1
    ks = torch.rand(ks_shape, generator=g, dtype=torch.float64) * 0.1
    ks[..., 0] += 3.0
    return q, k, v, kv, ks


def step_calls(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == "based::recurrent_step"), out


@pytest.mark.parametrize("fn", [step_matmul, step_einsum, step_inplace, step_transposed_state],
                         ids=lambda f: f.__name__)
def test_step_forms_are_rewritten_and_exact(fn):
    args = _inputs(fn)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    mine, theirs = [x.clone() for x in args], [x.clone() for x in args]
    with torch.no_grad(), PassReports() as reports:     # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, *mine)
    report = reports.merged()
    assert len(report.sites) == 1 and not report.refusals, str(report)
    assert report.sites[0].form == ("recurrent step (kv state [.., Dv, F])" if fn is step_transposed_state
                                    else "recurrent step")
    ref = fn(*theirs)
    assert calls >= 1
    out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
    for got, want in zip(out, ref):
        assert_rel_close(got, want, 1e-13, "output / returned state")
    for got, want, old in zip(mine[3:], theirs[3:], args[3:]):     # the caller's tensors (in place: written)
        assert_rel_close(got, want, 1e-13, "caller's state")
        assert fn is not step_inplace or not torch.equal(got, old)


@pytest.mark.parametrize("fn,category,words", [
    (step_decayed, "unsupported", "decayed"),
    (step_gated, "unsupported", "gated"),
    (step_old_state_readout, "unsupported", "without a readout"),
    (step_cubic_map, "feature_map", "not the Taylor feature map"),
], ids=lambda x: getattr(x, "__name__", None))
def test_step_near_misses_are_refused(fn, category, words):
    args = _inputs(fn)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with PassReports() as reports:                  # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, *(x.clone() for x in args))
    report = reports.merged()
    assert not report.sites, str(report)
    assert any(r.category == category and words in r.reason for r in report.refusals), str(report)
    assert calls == 0
    for got, want in zip(out, fn(*(x.clone() for x in args))):
        assert_rel_close(got, want, 1e-13, "refused step vs eager")


# ----------------------------------------------------------------------------- writes while the step runs
# The operator reads q, k, v and both states once, where the first state update was; the user's code
# reads each where it is used. A write in place into any of them in between changes what the user's
# code computed (found by the red team: the step was rewritten and silently wrong).


def step_q_written_between_updates(q, k, v, kv_state, k_state):     # phi(q) of the written q
    pk = taylor(k)
    k_state.add_(pk)
    q.mul_(2.0)
    pq = taylor(q)
    kv_state.add_(pk.transpose(-2, -1) @ v)
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)


def step_state_reset_between_updates(q, k, v, kv_state, k_state):   # a row of kv reset after the op's read
    pq, pk = taylor(q), taylor(k)
    k_state.add_(pk)
    kv_state[0].zero_()
    kv_state.add_(pk.transpose(-2, -1) @ v)
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)


def step_k_written_after_its_features(q, k, v, kv_state, k_state):  # phi(k) of the old k, op would read the new
    pq, pk = taylor(q), taylor(k)
    k.mul_(3.0)
    kv_state.add_(pk.transpose(-2, -1) @ v)
    k_state.add_(pk)
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)


def step_writes_after_the_step(q, k, v, kv_state, k_state):          # accepted twin: the writes come after
    pq, pk = taylor(q), taylor(k)
    k_state.add_(pk)
    kv_state.add_(pk.transpose(-2, -1) @ v)
    y = (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6)
    q.mul_(2.0)
    kv_state[0].mul_(0.5)
    return y


@pytest.mark.parametrize("fn,rewritten", [
    (step_q_written_between_updates, False),
    (step_state_reset_between_updates, False),
    (step_k_written_after_its_features, False),
    (step_writes_after_the_step, True),
], ids=lambda x: getattr(x, "__name__", None))
def test_writes_into_step_inputs_while_it_runs(fn, rewritten):
    args = _inputs(fn)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    mine, theirs = [x.clone() for x in args], [x.clone() for x in args]
    with torch.no_grad(), PassReports() as reports:     # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, *mine)
    report = reports.merged()
    assert len(report.sites) == int(rewritten), str(report)
    if not rewritten:
        assert any(r.category == "unsupported" and "writes in place" in r.reason for r in report.refusals), str(report)
    assert (calls >= 1) == rewritten
    assert_rel_close(out, fn(*theirs), 1e-13, "output")
    for got, want, name in zip(mine, theirs, ("q", "k", "v", "kv_state", "k_state")):
        assert_rel_close(got, want, 1e-13, f"caller's {name}")


def step_no_grad_inside(q, k, v, kv_state, k_state):                 # accepted twin: the step under no_grad
    with torch.no_grad():
        return step_matmul(q, k, v, kv_state, k_state)


@pytest.mark.parametrize("fn,rewritten", [(step_matmul, False), (step_no_grad_inside, True)],
                         ids=lambda x: getattr(x, "__name__", None))
def test_step_with_inputs_that_require_grad(fn, rewritten):
    """Grad mode with q requiring grad: the step is refused (the operator has no backward), never a
    crash at compile time (the lowered graph's fake inputs do not carry requires_grad: the check read
    them and let the step through, then the operator raised inside the backend)."""
    args = _inputs(fn)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    q1, q2 = args[0].clone().requires_grad_(), args[0].clone().requires_grad_()
    with PassReports() as reports:                  # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, q1, *(x.clone() for x in args[1:]))
    report = reports.merged()
    assert len(report.sites) == int(rewritten), str(report)
    if not rewritten:
        assert any(r.category == "unsupported" and "require grad" in r.reason for r in report.refusals), str(report)
    ref = fn(q2, *(x.clone() for x in args[1:]))
    assert (calls >= 1) == rewritten
    for got, want in zip(out, ref):
        assert_rel_close(got, want, 1e-13, "output / returned state")
    if not rewritten:
        g = torch.randn_like(ref[0])
        assert_rel_close(torch.autograd.grad((out[0] * g).sum(), q1)[0], torch.autograd.grad((ref[0] * g).sum(), q2)[0],
                         1e-13, "dq")


# ----------------------------------------------------------------------------- several steps in one graph
# A loop over tokens, or the layers of a model, in one compiled function: each step reads the
# states an earlier step updated (the second was refused, 'without a readout', because phi(q) was
# searched through the states, which hold the earlier step's phi(k); rewriting both then crashed the
# compile: the second operator read the first update's erased node).


def steps_loop_functional(q, k, v, kv_state, k_state):             # q, k, v: [B, H, 3, D], one step per token
    outs = []
    for t in range(q.shape[2]):
        o, kv_state, k_state = step_matmul(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], kv_state, k_state)
        outs.append(o)
    return torch.cat(outs, 2), kv_state, k_state


def steps_loop_in_place(q, k, v, kv_state, k_state):
    outs = []
    for t in range(q.shape[2]):
        pq, pk = taylor(q[:, :, t:t + 1]), taylor(k[:, :, t:t + 1])
        kv_state.add_(pk.transpose(-2, -1) @ v[:, :, t:t + 1])
        k_state.add_(pk)
        outs.append((pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6))
    return torch.cat(outs, 2)


def steps_two_layers(q, k, v, kv_state, k_state):                  # layer 2 reads layer 1's output, own states
    o1, kv1, ks1 = step_matmul(q[:, :, :1], k[:, :, :1], v[:, :, :1], kv_state[0], k_state[0])
    x = o1[..., :D] * 0.5 + q[:, :, 1:2]
    o2, kv2, ks2 = step_matmul(x, k[:, :, 1:2], v[:, :, 1:2], kv_state[1], k_state[1])
    return o2, kv1, ks1, kv2, ks2


@pytest.mark.parametrize("fn,steps", [(steps_loop_functional, 3), (steps_loop_in_place, 3), (steps_two_layers, 2)],
                         ids=lambda x: getattr(x, "__name__", None))
def test_several_steps_in_one_graph(fn, steps):
    g = torch.Generator().manual_seed(7)
    f = 1 + D + D * D
    lead = (2,) if fn is steps_two_layers else ()
    q, k = (torch.randn(B, H, 3, D, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(B, H, 3, DV, generator=g, dtype=torch.float64)
    kv = torch.randn(*lead, B, H, f, DV, generator=g, dtype=torch.float64) * 0.1
    ks = torch.rand(*lead, B, H, 1, f, generator=g, dtype=torch.float64) * 0.1 + 1.0
    args = (q, k, v, kv, ks)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    mine, theirs = [x.clone() for x in args], [x.clone() for x in args]
    with torch.no_grad(), PassReports() as reports:     # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, *mine)
    report = reports.merged()
    assert len(report.sites) == steps and not report.refusals, str(report)
    ref = fn(*theirs)
    assert calls >= steps
    out, ref = (x if isinstance(x, tuple) else (x,) for x in (out, ref))
    for got, want in zip(out, ref):
        assert_rel_close(got, want, 1e-13, "output / returned state")
    for got, want, name in zip(mine, theirs, ("q", "k", "v", "kv_state", "k_state")):
        assert_rel_close(got, want, 1e-13, f"caller's {name}")


def test_one_tensor_as_q_and_k():
    """step(x, x, v, ...): Dynamo passes one tensor for q and k; the probe gave them two random values
    and refused the step ('probe disagrees', relative error 1.0)."""
    q, _, v, kv, ks = _inputs(step_matmul)
    compiled = torch.compile(step_matmul, backend=based_compile.backend(inner="eager"))
    with torch.no_grad(), PassReports() as reports:     # explain()'s report, from the compile's own trace
        calls, out = step_calls(compiled, q, q, v, kv.clone(), ks.clone())
    report = reports.merged()
    assert len(report.sites) == 1 and not report.refusals, str(report)
    assert calls >= 1
    for got, want in zip(out, step_matmul(q, q, v, kv.clone(), ks.clone())):
        assert_rel_close(got, want, 1e-13, "output / returned state")
