"""``torch.compile(..., dynamic=True)`` makes the head dim Dk symbolic: a scale written from it
(``q.shape[-1] ** 0.5``, ``d ** -0.25`` in a feature map) is a symbolic float. The pass specialises
Dk (an integer guard) and bakes in the example's value: every site is rewritten, a call at another
Dk recompiles (never reuses the other Dk's scale), and a growing cache (Tk) stays symbolic.

Before: the KV-cache site was refused under dynamic=True (the probe at other lengths moved Dk too,
where the baked scale is wrong) and the decode ran Inductor's code.
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from compare import assert_rel_close

B, H, DV = 2, 3, 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def taylor(x):                       # scales from the symbolic size: d ** 0.25, sqrt(d) as tensor ops
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / (2 ** 0.5 * d ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x * d ** -0.25, x2], dim=-1)


def kv_cache_step(q, k, v):          # q [B, H, 1, Dk] against the cache [B, H, Tk, Dk]
    tq, tk = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    a = 1 + s + 0.5 * s ** 2
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    a = a.masked_fill(~causal, 0.0)
    return (a @ v) / (a.sum(dim=-1, keepdim=True) + 1e-6)


def recurrent_step(q, k, v, kv_state, k_state):
    pq, pk = taylor(q), taylor(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def training_polynomial(q, k, v):    # a training-time site: causal, T x T, scale from Dk
    t = q.shape[2]
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    a = (1 + s + 0.5 * s ** 2).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def training_feature_map(q, k, v):
    pq, pk = taylor(q), taylor(k)
    a = torch.tril(pq @ pk.transpose(-2, -1))
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Counting:
    """The based backend, counting the graphs it compiles."""

    def __init__(self):
        self.graphs = 0
        self.inner = based_compile.backend(inner="eager")

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.inner(gm, example_inputs)


def op_calls(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("based::")}, out


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_kv_cache_decode_dynamic_two_head_dims():
    backend = Counting()
    compiled = torch.compile(kv_cache_step, backend=backend, dynamic=True)
    graphs = {}
    for i, (dk, tk) in enumerate([(4, 9), (4, 10), (4, 11), (8, 9), (8, 12), (4, 13)]):
        q, k, v = _randn(B, H, 1, dk, seed=i), _randn(B, H, tk, dk, seed=10 + i), _randn(B, H, tk, DV, seed=20 + i)
        with torch.no_grad():
            calls, out = op_calls(compiled, q, k, v)
        assert calls.get("based::attention", 0) >= 1, f"Dk={dk}, Tk={tk}: not rewritten ({calls})"
        assert_rel_close(out, kv_cache_step(q, k, v), 1e-10, f"Dk={dk}, Tk={tk}")
        graphs.setdefault(dk, backend.graphs)
    # a growing cache does not recompile; another Dk does (once), and Dk=4 again reuses its graph
    assert backend.graphs == 2, backend.graphs
    assert graphs == {4: 1, 8: 2}


def test_recurrent_step_dynamic_two_head_dims():
    backend = Counting()
    compiled = torch.compile(recurrent_step, backend=backend, dynamic=True)
    for i, (b, dk) in enumerate([(2, 4), (3, 4), (2, 6), (2, 4)]):
        f = 1 + dk + dk * dk
        q, k, v = _randn(b, H, 1, dk, seed=i), _randn(b, H, 1, dk, seed=10 + i), _randn(b, H, 1, DV, seed=20 + i)
        kv = _randn(b, H, f, DV, seed=30 + i) * 0.1
        ks = _randn(b, H, 1, f, seed=40 + i).abs() * 0.1 + 1.0
        with torch.no_grad():
            calls, out = op_calls(compiled, q, k, v, kv, ks)
        assert calls.get("based::recurrent_step", 0) >= 1, f"B={b}, Dk={dk}: not rewritten ({calls})"
        for got, want, what in zip(out, recurrent_step(q, k, v, kv, ks), ("output", "kv state", "k state")):
            assert_rel_close(got, want, 1e-10, f"B={b}, Dk={dk}: {what}")
    assert backend.graphs == 2, backend.graphs


@pytest.mark.parametrize("fn", [training_polynomial, training_feature_map], ids=lambda f: f.__name__)
def test_training_site_dynamic_two_head_dims(fn):
    backend = Counting()
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    for i, (t, dk) in enumerate([(7, 4), (9, 4), (7, 6), (8, 4)]):
        q, k, v = (_randn(B, H, t, d, seed=3 * i + j).requires_grad_() for j, d in enumerate((dk, dk, DV)))
        calls, out = op_calls(compiled, q, k, v)
        assert calls.get("based::attention", 0) >= 1, f"T={t}, Dk={dk}: not rewritten ({calls})"
        ref = fn(*(x.detach().requires_grad_() for x in (q, k, v)))
        assert_rel_close(out, ref, 1e-10, f"T={t}, Dk={dk}: output")
        grad = _randn(*out.shape, seed=99)
        got = torch.autograd.grad(out, (q, k, v), grad)
        want_in = [x.detach().requires_grad_() for x in (q, k, v)]
        want = torch.autograd.grad(fn(*want_in), want_in, grad)
        for g, w, name in zip(got, want, "qkv"):
            assert_rel_close(g, w, 1e-10, f"T={t}, Dk={dk}: d{name}")
    assert backend.graphs == 2, backend.graphs
