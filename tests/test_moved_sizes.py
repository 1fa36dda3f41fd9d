"""The numerical probe of a site in a graph with symbolic sizes (``verify._probe_other_lengths``).

The probe reads a site at the traced sizes; a graph with symbolic sizes runs at others too. After
the probe agrees, the matched subgraph is evaluated again at other sizes that satisfy the graph's
guards (``verify._moved_sizes``) and the site is refused unless it still agrees. This is a second
line behind the symbolic mask proof (issue 13, class 3): the tests weaken that proof on purpose
(judged at the traced sizes only, as the bug did) and check that the second line alone keeps the
compiled model exact, for a square site and for a KV cache grown by ``torch.cat`` (k and v computed
in the graph, which the probe at other lengths used to skip).
"""
from __future__ import annotations

import os
import sys

import pytest
import sympy
import torch

import based_compile
from based_compile.graph import kv_mask, verify
from based_calls import BasedOpCounter
from compare import assert_rel_close


def _poly(s):
    return 1 + s + 0.5 * s * s


def window(q, k, v):
    """A sliding window of 3 keys: causal at T <= 3 only."""
    t = q.shape[-2]
    a = _poly((q @ k.mT) * 0.5)
    ones = torch.ones(t, t, dtype=torch.bool)
    a = a.masked_fill(~(torch.tril(ones) & ~torch.tril(ones, diagonal=-3)), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def cat_constant_offset(q, k_cache, v_cache, k_new, v_new):
    """A KV cache grown by cat, masked with a constant offset 5: Tk - Tq only while the cache holds 5."""
    k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
    a = _poly((q @ k.mT) * 0.5)
    a = a.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(5), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def cat_aligned(q, k_cache, v_cache, k_new, v_new):
    """The exact twin: the mask offset follows the cache (Tk - Tq)."""
    k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
    a = _poly((q @ k.mT) * 0.5)
    a = a.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2]), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.fixture
def mask_proof_at_traced_sizes(monkeypatch):
    """kv_mask.classify judging at the traced sizes only (every size symbol at ``hint[0]``)."""
    hint = [None]
    judge = kv_mask.classify

    def at_traced_sizes(keep, tq, tk):
        def fix(x):
            return x.xreplace({s: hint[0] for s in x.free_symbols}) if isinstance(x, sympy.Expr) else x
        return judge(keep, int(fix(tq)) if isinstance(tq, sympy.Expr) else tq,
                     int(fix(tk)) if isinstance(tk, sympy.Expr) else tk)

    monkeypatch.setattr(kv_mask, "classify", at_traced_sizes)
    return hint


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _calls_and_output(compiled, args):
    compiled(*args)                                   # compiles (a profiler must not see Dynamo trace)
    with BasedOpCounter() as counter:
        out = compiled(*args)
    return counter.total, out


def test_square_site_that_agrees_only_at_the_traced_length_is_refused(mask_proof_at_traced_sizes):
    mask_proof_at_traced_sizes[0] = 3
    compiled = torch.compile(window, backend=based_compile.backend(inner="eager"), dynamic=True)
    g = torch.Generator().manual_seed(0)
    for t in (3, 8, 12):
        args = [_randn(g, 1, 2, t, 4) for _ in range(3)]
        calls, out = _calls_and_output(compiled, args)
        assert calls == 0, f"T={t}: the window was rewritten as causal"
        assert_rel_close(out, window(*args), 1e-12, f"T={t}")


def test_without_the_second_line_the_weakened_proof_is_silently_wrong(mask_proof_at_traced_sizes, monkeypatch):
    """The scenario above is a real hazard: without the probe at other sizes, the window is rewritten
    as causal and the compiled model is wrong at T = 8."""
    mask_proof_at_traced_sizes[0] = 3
    monkeypatch.setattr(verify, "_probe_other_lengths", lambda *args: None)
    compiled = torch.compile(window, backend=based_compile.backend(inner="eager"), dynamic=True)
    g = torch.Generator().manual_seed(0)
    compiled(*[_randn(g, 1, 2, 3, 4) for _ in range(3)])        # traced at T = 3, where the window is causal
    args = [_randn(g, 1, 2, 8, 4) for _ in range(3)]
    calls, out = _calls_and_output(compiled, args)
    want = window(*args)
    assert calls >= 1 and ((out - want).norm() / want.norm()).item() > 0.1


def _grow_cache(fn, rewritten):
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), dynamic=True)
    g = torch.Generator().manual_seed(1)
    for past in (5, 7, 11):
        args = [_randn(g, 1, 2, 2, 4), _randn(g, 1, 2, past, 4), _randn(g, 1, 2, past, 3),
                _randn(g, 1, 2, 2, 4), _randn(g, 1, 2, 2, 3)]
        calls, out = _calls_and_output(compiled, args)
        assert (calls >= 1) == rewritten, f"past={past}: based ran {calls}x"
        assert_rel_close(out, fn(*args), 1e-12, f"past={past}")


def test_cache_grown_by_cat_with_a_constant_offset_is_refused_at_other_lengths(mask_proof_at_traced_sizes):
    mask_proof_at_traced_sizes[0] = 5
    _grow_cache(cat_constant_offset, rewritten=False)


def test_cache_grown_by_cat_aligned_to_its_end_stays_rewritten():
    """The exact twin (the real mask proof): checked at other lengths, it agrees there."""
    _grow_cache(cat_aligned, rewritten=True)


# ------------------------------------------------------------------------------ the sizes it moves to
class _Guard:
    def __init__(self, expr):
        self.expr = expr


class _Env:
    """What _moved_sizes reads of a ShapeEnv: the traced values and the guards."""

    def __init__(self, values, guards):
        self.backed_var_to_val = values
        self.guards = [_Guard(g) for g in guards]


S0, S1, S2, S3 = sympy.symbols("s0 s1 s2 s3", positive=True, integer=True)


def _holds(env, moved):
    at = {**env.backed_var_to_val, **moved}
    return all(bool(g.expr.xreplace(at)) for g in env.guards)


def test_moved_sizes_keep_a_sum_relation_and_move_every_symbol():
    env = _Env({S0: 2, S1: 5, S2: 2, S3: 5}, [sympy.Eq(S2 + S1, S0 + S3)])
    moved = verify._moved_sizes(env, {S0: 2, S1: 5, S2: 2, S3: 5})
    assert moved is not None and _holds(env, moved)
    assert all(moved[s] != v for s, v in env.backed_var_to_val.items())
    assert moved[S1] - moved[S0] != 3                    # Tk - Tq moves: a constant offset shows


def test_moved_sizes_follow_an_equality_to_a_symbol_not_asked_for():
    env = _Env({S0: 4, S1: 4}, [sympy.Eq(S0, S1)])
    moved = verify._moved_sizes(env, {S0: 4})
    assert moved is not None and moved[S0] == moved[S1] != 4


def test_moved_sizes_step_past_an_upper_bound_guard():
    env = _Env({S0: 2}, [sympy.Lt(S0, 4)])               # doubling breaks it; moving by one does not
    assert verify._moved_sizes(env, {S0: 2}) == {S0: 3}


def test_no_moved_sizes_for_a_graph_specialised_to_its_length():
    env = _Env({S0: 2}, [sympy.Eq(S0 // 2, 1), sympy.Eq(sympy.Mod(S0, 2), 0)])
    assert verify._moved_sizes(env, {S0: 2}) is None


def test_float_symbols_in_the_guards_keep_their_values():
    """Dynamo makes some Python floats symbolic (a scale): their guards hold at their own values."""
    zf = sympy.Symbol("zf0", real=True)
    env = _Env({S0: 8, zf: 0.5}, [sympy.Eq(zf * 2, 1.0), sympy.Eq(sympy.Mod(S0, 4), 0)])
    moved = verify._moved_sizes(env, {S0: 8})
    assert moved == {S0: 16}


@pytest.fixture
def moved_probe_results(monkeypatch):
    """What each site's probe at other sizes returned (None: it ran and agreed)."""
    seen = []
    probe = verify._probe_other_lengths

    def spy(*args, **kwargs):
        seen.append(probe(*args, **kwargs))
        return seen[-1]
    monkeypatch.setattr(verify, "_probe_other_lengths", spy)
    return seen


def test_a_dynamic_language_model_is_checked_at_other_sizes(moved_probe_results):
    """The naive LM under dynamic=True: each site agrees at the moved sizes (no fallback)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from naive_based_lm import BasedLM

    torch.manual_seed(0)
    model = BasedLM(vocab_size=64, d_model=32, n_layers=2, n_heads=2).double().eval()
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"), dynamic=True)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert_rel_close(compiled(ids), model(ids), 1e-10, "logits")
    assert moved_probe_results == [None, None], moved_probe_results


# ------------------------------------------------------------------ found by the red team (2026-11-30)
CACHE_MAX = 16


def capped_cache(q, k, v):
    """A KV cache the code caps: the guard Tk <= 16 with Tk traced at 16 leaves only smaller sizes."""
    tq, tk = q.shape[-2], k.shape[-2]
    if tk > CACHE_MAX:
        raise ValueError("cache overflow")
    a = _poly((q @ k.mT) * 0.5)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_a_capped_cache_is_checked_at_smaller_sizes(moved_probe_results):
    """Before: every move went up, past the cap; the exact KV-cache site was refused."""
    g = torch.Generator().manual_seed(0)
    args = [_randn(g, 2, 3, 5, 4), _randn(g, 2, 3, CACHE_MAX, 4), _randn(g, 2, 3, CACHE_MAX, 5)]
    compiled = torch.compile(capped_cache, backend=based_compile.backend(inner="eager"), dynamic=True)
    calls, out = _calls_and_output(compiled, args)
    assert calls == 1 and moved_probe_results == [None], moved_probe_results
    assert_rel_close(out, capped_cache(*args), 1e-12, "capped cache")


def test_a_data_dependent_length_does_not_cost_the_graph_its_other_sites():
    """q, k, v sliced to n = n_t.item(): its size has no value to move. Before, the pass raised on it
    and the whole graph ran unrewritten, the ordinary site beside it included."""
    def one(q, k, v):
        a = torch.tril(_poly((q @ k.mT) * 0.5))
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    def two(q, k, v, n_t):
        n = n_t.item()
        torch._check(n >= 2)
        torch._check(n <= q.shape[-2])
        return one(q, k, v), one(q[:, :, :n], k[:, :, :n], v[:, :, :n])

    g = torch.Generator().manual_seed(0)
    args = [_randn(g, 2, 3, 12, 4), _randn(g, 2, 3, 12, 4), _randn(g, 2, 3, 12, 5), torch.tensor(9)]
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        compiled = torch.compile(two, backend=based_compile.backend(inner="eager"), dynamic=True)
        calls, out = _calls_and_output(compiled, args)
    assert calls == 2, calls
    for o, w in zip(out, two(*args)):
        assert_rel_close(o, w, 1e-12, "data-dependent length")


def _phi(x):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x / 2 ** 0.5, x2 / (2 * 2 ** 0.5)], -1)


def prefill_from_states(q, k, v, kv_state, k_state):
    kv = kv_state[:, :, None] + (_phi(k)[..., :, None] * v[..., None, :]).cumsum(2)
    ks = k_state[:, :, None] + _phi(k).cumsum(2)
    o = (_phi(q)[..., None] * kv).sum(-2) / ((_phi(q) * ks).sum(-1, keepdim=True) + 1e-6)
    return o, kv[:, :, -1], ks[:, :, -1]


def test_a_continued_prefill_is_checked_at_other_sizes(moved_probe_results):
    """The states' feature count 1 + D + D^2 is tied to the head dim by a guard: moved with it, and
    the states drawn afresh at the moved sizes (before: evaluated with the traced states, it failed
    and every such site fell back to the structural proof)."""
    g = torch.Generator().manual_seed(2)
    d, dv, f = 4, 5, 1 + 4 + 16
    args = [_randn(g, 2, 3, 7, d), _randn(g, 2, 3, 7, d), _randn(g, 2, 3, 7, dv), _randn(g, 2, 3, f, dv),
            _randn(g, 2, 3, f).abs() + 1.0]
    compiled = torch.compile(prefill_from_states, backend=based_compile.backend(inner="eager"), dynamic=True)
    calls, out = _calls_and_output(compiled, args)
    assert calls >= 1 and moved_probe_results and all(r is None for r in moved_probe_results), moved_probe_results
    for o, w in zip(out, prefill_from_states(*args)):
        assert_rel_close(o, w, 1e-12, "continued prefill")
