"""A scale of the raw scores read at run time (``graph/score_scale.py``): the scores multiplied or divided
by a one-element tensor that is not a compile-time constant, a learnable temperature or a scale computed
from the inputs. Division by a one-element tensor is multiplication by its reciprocal, whatever it is
computed from, so ``(q @ k.mT) / self.temperature`` is read as ``(q / self.temperature) @ k.mT``.

Accepted programs are compiled (inner "aot_eager", the probe on at these small sizes) at several lengths,
compared with eager in float64, values and the gradients of q, k, v and of every parameter, on fresh
random inputs; the ``based`` operator is counted on a call that does not compile. Near misses (a
per-head or per-query temperature, a scale computed from the scores, a temperature applied after the
polynomial of normalised attention, a write into the scale before the output) are refused with their
reasons; after the polynomial of an unnormalised output, the scale is the output's. explain() names
the scale the operator reads at run time.
"""
from __future__ import annotations

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from based_compile.graph import score_scale
from compare import assert_rel_close
from pass_reports import PassReports

TOL = 1e-10
B, H, D, DV = 2, 3, 4, 3

pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def _weights(s):
    t = s.shape[-1]
    a = 1 + s + 0.5 * s * s
    return a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)


def _out(a, v):
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Scaled(torch.nn.Module):
    """Based attention whose raw scores go through ``scale(self, s, q, k, v)``."""

    def __init__(self, scale, temperature_shape=()):
        super().__init__()
        self.scale = scale
        self.temperature = torch.nn.Parameter(torch.full(temperature_shape, 2.5, dtype=torch.float64))
        self.other = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, q, k, v):
        return _out(_weights(self.scale(self, q @ k.mT, q, k, v)), v)


ACCEPTED = {
    "divided by a parameter": lambda m, s, q, k, v: s / m.temperature,
    "times its reciprocal": lambda m, s, q, k, v: s * (1 / m.temperature),
    "divided by a function of a parameter": lambda m, s, q, k, v: s / (m.temperature.abs().sqrt() * 3),
    "times then divided by two parameters": lambda m, s, q, k, v: (s * m.other) / m.temperature,
    "divided by a constant then a parameter": lambda m, s, q, k, v: (s / 4 ** 0.5) / m.temperature,
    "times a scale computed from q": lambda m, s, q, k, v: s * (0.1 + q.abs().mean()),
    "divided by a scale computed from k and v": lambda m, s, q, k, v: s / (1 + k.square().mean() + v.abs().amax()),
}


def _inputs(t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, d, generator=g, dtype=torch.float64) for d in (D, D, DV)]


def _grads(module, fn, inputs, seed):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = list(module.parameters())
    grads = torch.autograd.grad(out, inputs + params, cot, allow_unused=True)
    return out.detach(), grads


def compile_and_compare(module, lengths=(5, 9, 12), dynamic=None):
    """Compile, call at each length, compare values and gradients (inputs and parameters) with eager; the
    pass's reports and the operator calls counted on a second call at the last length."""
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"), dynamic=dynamic)
    names = ["q", "k", "v"] + [n for n, _ in module.named_parameters()]
    with PassReports() as reports:
        for t in lengths:
            inputs = _inputs(t, 100 + t)
            out_c, grads_c = _grads(module, compiled, inputs, t)
            out_e, grads_e = _grads(module, module, inputs, t)
            assert_rel_close(out_c, out_e, TOL, f"T={t}: output, compiled vs eager")
            for name, c, e in zip(names, grads_c, grads_e):
                if e is None:
                    assert c is None, f"T={t}: gradient of {name}: compiled has one, eager none"
                    continue
                assert_rel_close(c, e, TOL, f"T={t}: gradient of {name}, compiled vs eager")
    inputs = [x.requires_grad_(True) for x in _inputs(lengths[-1], 7)]    # as compiled: no recompile
    with BasedOpCounter() as counter:
        compiled(*inputs)
    return reports, counter.calls["based::attention"]


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_run_time_scale_of_the_raw_scores_is_rewritten_exactly(name):
    reports, calls = compile_and_compare(Scaled(ACCEPTED[name]))
    assert reports.graphs, reports
    for ex in reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
    assert calls == 1, f"based::attention called {calls} times"


@pytest.mark.parametrize("name", ["divided by a parameter", "times a scale computed from q"])
def test_run_time_scale_under_dynamic_shapes(name):
    reports, calls = compile_and_compare(Scaled(ACCEPTED[name]), dynamic=True)
    assert all(len(ex.sites) == 1 for ex in reports.graphs), reports
    assert calls == 1


def test_temperature_of_one_element_of_any_rank_is_read():
    reports, calls = compile_and_compare(Scaled(ACCEPTED["divided by a parameter"], (1, 1, 1, 1)))
    assert all(len(ex.sites) == 1 for ex in reports.graphs), reports
    assert calls == 1


def test_a_changed_temperature_is_read_at_run_time():
    module = Scaled(ACCEPTED["divided by a parameter"])
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(8, 3)
    with torch.no_grad():
        assert_rel_close(compiled(*inputs), module(*inputs), TOL, "before the change")
        module.temperature.mul_(0.3)
        with BasedOpCounter() as counter:
            out = compiled(*inputs)
        assert_rel_close(out, module(*inputs), TOL, "after the temperature changed")
    assert counter.total == 1


# --------------------------------------------------------------------------- explain()

def _site_spec(module, t=6):
    ex = based_compile.explain(module, *_inputs(t, 0))
    assert len(ex.sites) == 1, ex
    return str(ex.sites[0])


def test_explain_names_the_temperature_the_operator_reads():
    text = _site_spec(Scaled(ACCEPTED["divided by a parameter"]))
    assert "s = 1 * (1 / self.temperature) * q.k" in text, text
    text = _site_spec(Scaled(ACCEPTED["times its reciprocal"]))
    assert "s = 1 * (1 / self.temperature) * q.k" in text, text
    text = _site_spec(Scaled(ACCEPTED["times then divided by two parameters"]))
    assert "s = 1 * (self.other * (1 / self.temperature)) * q.k" in text, text


def test_explain_says_a_scale_is_computed_at_run_time():
    text = _site_spec(Scaled(ACCEPTED["times a scale computed from q"]))
    assert "s = 1 * (a one-element tensor computed at run time) * q.k" in text, text


def test_describe_writes_out_a_few_ops():
    # the lowered graph of s / (t.abs().sqrt() * 3): the scale's ops are written out
    text = _site_spec(Scaled(ACCEPTED["divided by a function of a parameter"]))
    assert "(1 / (sqrt(abs(self.temperature)) * 3))" in text, text


def test_readable_source():
    assert score_scale.readable_source("L['self']._parameters['temperature']") == "self.temperature"
    assert score_scale.readable_source("L['self']._modules['attn']._parameters['t']") == "self.attn.t"


# --------------------------------------------------------------------------- near misses

class PerQuery(torch.nn.Module):
    def forward(self, q, k, v):
        return _out(_weights((q @ k.mT) / (1 + q.norm(dim=-1, keepdim=True))), v)


class FromScores(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        s = q @ k.mT
        s = s / s.detach().abs().amax() if self.how == "amax" else s * s.mean()
        return _out(_weights(s), v)


class AfterPolynomial(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, q, k, v):
        return _out(_weights(q @ k.mT) / self.temperature, v)


class NormaliserUnscaled(torch.nn.Module):
    """The numerator's scores divided by the temperature, the normaliser's not: other weights (the reason
    was an internal error of the pass, an attribute left from a rename)."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(1.9, dtype=torch.float64))

    def forward(self, q, k, v):
        s = q @ k.mT
        return (_weights(s / self.temperature) @ v) / (_weights(s).sum(-1, keepdim=True) + 1e-6)


REFUSED = {
    "normaliser without the temperature": (NormaliserUnscaled, "another one-element scale on q.k"),
    "per-head temperature": (lambda: Scaled(ACCEPTED["divided by a parameter"], (1, H, 1, 1)), "per-head"),
    "per-query temperature": (PerQuery, "per-query"),
    "scale from the scores (amax)": (lambda: FromScores("amax"), "computed from the scores themselves"),
    "scale from the scores (mean)": (lambda: FromScores("mean"), "computed from the scores themselves"),
    "temperature after the polynomial": (AfterPolynomial, "after the polynomial"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_near_miss_is_refused_with_the_reason(name):
    make, why = REFUSED[name]
    module = make()
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(7, 1)
    with PassReports() as reports:
        out_c, grads_c = _grads(module, compiled, inputs, 1)
    out_e, grads_e = _grads(module, module, inputs, 1)
    assert_rel_close(out_c, out_e, TOL, "output")
    for c, e in zip(grads_c, grads_e):
        if e is not None:
            assert_rel_close(c, e, TOL, "gradient")
    for ex in reports.graphs:
        assert not ex.sites, ex
        assert any(why in r.reason for r in ex.refusals), ex
    inputs = [x.requires_grad_(True) for x in inputs]
    with BasedOpCounter() as counter:
        compiled(*inputs)
    assert counter.total == 0


class WrittenScale(torch.nn.Module):
    """The scale written in place after the scores read it and before the output: the operator, at the
    output, would read the written value."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, q, k, v):
        c = self.temperature * 1.0
        s = (q @ k.mT) * c
        c.mul_(3.0)
        return _out(_weights(s), v)


def test_scale_written_before_the_output_is_refused():
    module = WrittenScale()
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(7, 2)
    with torch.no_grad(), PassReports() as reports:
        out = compiled(*inputs)
    assert_rel_close(out, module(*inputs), TOL, "output")
    for ex in reports.graphs:
        assert not ex.sites and any("writes in place" in r.reason for r in ex.refusals), ex


def test_probe_checks_the_scale_on_its_own_inputs(monkeypatch):
    """A planted misreading (the power of a factor flipped: q * c read for s / c) of a scale computed from
    q, at run time: the numerical probe, evaluating the scale on its own q as the rewrite would, refuses it."""
    real_times = score_scale.ScoreScale.times
    monkeypatch.setattr(score_scale.ScoreScale, "times", lambda self, node, power: real_times(self, node, -power))
    module = Scaled(lambda m, s, q, k, v: s / (1 + q.abs().mean()))
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(7, 4)
    with PassReports() as reports:
        out = compiled(*inputs)
    assert_rel_close(out, module(*inputs), TOL, "output")
    for ex in reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["verify"], ex


# --------------------------------------------------------------------------- against a KV cache (Tq < Tk)
# A block of Tq queries against Tk >= Tq cached keys, causal aligned to the end (query i sees keys
# j <= i + Tk - Tq), or one decoded query against the whole cache: the scale is read on q as for Tq == Tk.
# It was refused ('after the polynomial or the mask', a wrong reason) for every Tq < Tk call.

def _cache_inputs(tq, tk, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, d, generator=g, dtype=torch.float64) for t, d in ((tq, D), (tk, D), (tk, DV))]


class CacheScaled(torch.nn.Module):
    """``scale(self, s, q, k, v)`` of the raw [Tq, Tk] scores; ``where``: "scores" (the raw scores),
    "masked scores" (the raw scores masked, then scaled, then the polynomial and the mask again),
    "masked scores only" (the same without the mask after the polynomial), "polynomial" (the weights,
    after the polynomial), "mask" (the masked weights)."""

    def __init__(self, scale, where="scores", causal=True):
        super().__init__()
        self.scale, self.where, self.causal = scale, where, causal
        self.temperature = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))
        self.other = torch.nn.Parameter(torch.tensor(0.7, dtype=torch.float64))

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        s = q @ k.mT
        if self.where == "scores":
            s = self.scale(self, s, q, k, v)
        if self.where.startswith("masked scores"):
            s = self.scale(self, s.masked_fill(~keep, 0.0) if self.causal else torch.where(keep, s, 0), q, k, v)
        a = 1 + s + 0.5 * s * s
        if self.where == "polynomial":
            a = self.scale(self, a, q, k, v)
        if self.where == "masked scores only":
            pass
        elif self.causal:
            a = a.masked_fill(~keep, 0.0)
        elif self.where == "masked scores":
            a = torch.where(keep, a, 0)
        if self.where == "mask":
            a = self.scale(self, a, q, k, v)
        return _out(a, v)


def _compare_cache(module, sizes, dynamic=None):
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"), dynamic=dynamic)
    names = ["q", "k", "v"] + [n for n, _ in module.named_parameters()]
    calls = []
    with PassReports() as reports:
        for tq, tk in sizes:
            inputs = _cache_inputs(tq, tk, 10 * tq + tk)
            out_c, grads_c = _grads(module, compiled, inputs, tk)
            out_e, grads_e = _grads(module, module, inputs, tk)
            assert_rel_close(out_c, out_e, TOL, f"Tq={tq} Tk={tk}: output, compiled vs eager")
            for name, c, e in zip(names, grads_c, grads_e):
                if e is not None:
                    assert_rel_close(c, e, TOL, f"Tq={tq} Tk={tk}: gradient of {name}, compiled vs eager")
            with BasedOpCounter() as counter:
                compiled(*[x.requires_grad_(True) for x in inputs])
            calls.append(counter.calls["based::attention"])
    return reports, calls


CACHE_SIZES = [(3, 9), (3, 10), (2, 11), (1, 12)]


@pytest.mark.parametrize("name", ["divided by a parameter", "times a scale computed from q",
                                  "divided by a scale computed from k and v"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "whole_cache"])
def test_run_time_scale_against_a_kv_cache_is_rewritten_exactly(name, causal):
    reports, calls = _compare_cache(CacheScaled(ACCEPTED[name], causal=causal), CACHE_SIZES)
    assert calls == [1] * len(CACHE_SIZES), calls
    assert reports.graphs, reports
    for ex in reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        assert "KV cache" in ex.sites[0].form, ex


def test_run_time_scale_against_a_kv_cache_under_dynamic_shapes():
    reports, calls = _compare_cache(CacheScaled(ACCEPTED["divided by a parameter"]), CACHE_SIZES, dynamic=True)
    assert calls == [1] * len(CACHE_SIZES), calls
    assert all(len(ex.sites) == 1 for ex in reports.graphs), reports


def test_explain_names_the_temperature_against_a_kv_cache():
    ex = based_compile.explain(CacheScaled(ACCEPTED["divided by a parameter"]), *_cache_inputs(3, 9, 0))
    assert len(ex.sites) == 1 and not ex.refusals, ex
    text = str(ex.sites[0])
    assert "s = 1 * (1 / self.temperature) * q.k" in text, text
    assert "KV cache (Tq=3 <= Tk=9, causal aligned to the end)" in text, text


@pytest.mark.parametrize("where,why", [
    ("polynomial", "after the polynomial"),
    ("mask", "after the polynomial"),
])
def test_temperature_after_the_weights_against_a_kv_cache_is_refused(where, why):
    module = CacheScaled(ACCEPTED["divided by a parameter"], where=where)
    reports, calls = _compare_cache(module, CACHE_SIZES[:2])
    assert calls == [0, 0], calls
    for ex in reports.graphs:
        assert not ex.sites and any(why in r.reason for r in ex.refusals), ex
    ex = based_compile.explain(module, *_cache_inputs(3, 9, 0))
    assert not ex.sites and any(why in r.reason for r in ex.refusals), ex


def test_per_query_temperature_against_a_kv_cache_is_refused():
    module = CacheScaled(lambda m, s, q, k, v: s / (1 + q.norm(dim=-1, keepdim=True)))
    reports, calls = _compare_cache(module, CACHE_SIZES[:2])
    assert calls == [0, 0], calls
    for ex in reports.graphs:
        assert not ex.sites and any("per-query" in r.reason for r in ex.refusals), ex


# --------------------------------------------------------------------------- after a mask of the raw scores
# s = (q @ k.mT).masked_fill(~causal, 0) / self.temperature (or torch.where(causal, s, 0) * c), then the
# polynomial and the mask: c (keep s) = keep (c s), so the scale is read on q as for unmasked scores (it
# was refused as 'after the polynomial or the mask'). The polynomial of the masked scores is f(0) = c0 at
# the masked entries: exact only where a mask after the polynomial hides them (without it, refused).


MASKED_SIZES = [(6, 6), (9, 9), (3, 9), (1, 10)]


@pytest.mark.parametrize("name", ["divided by a parameter", "times a scale computed from q",
                                  "times then divided by two parameters"])
@pytest.mark.parametrize("spelling", [True, False], ids=["masked_fill", "where"])
def test_run_time_scale_of_masked_raw_scores_is_rewritten_exactly(name, spelling):
    reports, calls = _compare_cache(CacheScaled(ACCEPTED[name], where="masked scores", causal=spelling),
                                    MASKED_SIZES)
    assert calls == [1] * len(MASKED_SIZES), calls
    for ex in reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        assert ex.sites[0].spec.causal, ex


def test_run_time_scale_of_masked_raw_scores_under_dynamic_shapes():
    reports, calls = _compare_cache(CacheScaled(ACCEPTED["divided by a parameter"], where="masked scores"),
                                    MASKED_SIZES, dynamic=True)
    assert calls == [1] * len(MASKED_SIZES), calls


def test_explain_names_the_temperature_of_masked_raw_scores():
    module = CacheScaled(ACCEPTED["divided by a parameter"], where="masked scores")
    ex = based_compile.explain(module, *_cache_inputs(6, 6, 0))
    assert len(ex.sites) == 1 and not ex.refusals, ex
    assert "s = 1 * (1 / self.temperature) * q.k" in str(ex.sites[0]) and "causal" in str(ex.sites[0]), ex


def test_run_time_scale_of_masked_raw_scores_without_a_later_mask_is_refused():
    module = CacheScaled(ACCEPTED["divided by a parameter"], where="masked scores only")
    reports, calls = _compare_cache(module, [(6, 6), (3, 9)])
    assert calls == [0, 0], calls
    for ex in reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["mask"], ex
        assert "the mask is applied before the polynomial" in ex.refusals[0].reason, ex


# --------------------------------------------------------------------------- after the polynomial, unnormalised
# (c P(s)) @ v = c (P(s) @ v): a one-element scale read at run time applied to the weights after the
# polynomial (c * s**2 / self.temperature, (1 + s + s**2 / 2) / t) is exact as the operator's output times
# it, for an unnormalised output, whatever the sign of the scale (it was refused: c P(s) is not P(c s), and
# c s**2 = (sqrt(c) s)**2 only for c > 0). Normalised, it is not the operator's function (eps is not scaled:
# c P / (sum c P + eps) = P / (sum P + eps / c)) and stays refused, with that reason (AfterPolynomial above);
# so is a sum or a power of the scaled weights (c P(s) + 1 is no c P'(s)).


class WeightsScaled(torch.nn.Module):
    """Unnormalised Based-like attention whose weights ``poly(s)`` go through ``then(self, a, q)`` after the
    polynomial, before (``mask_first`` False) or after the causal mask; ``temperature`` may be negative."""

    def __init__(self, poly, then, mask_first=False, temperature=-1.7):
        super().__init__()
        self.poly, self.then, self.mask_first = poly, then, mask_first
        self.temperature = torch.nn.Parameter(torch.tensor(temperature, dtype=torch.float64))

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        a = self.poly((q @ k.mT) * 0.5)
        if self.mask_first:
            a = a.masked_fill(~keep, 0.0)
        a = self.then(self, a, q)
        if not self.mask_first:
            a = a.masked_fill(~keep, 0.0)
        return a @ v


POLYNOMIALS = {"homogeneous": lambda s: 0.5 * s ** 2, "taylor": lambda s: 1 + s + 0.5 * s * s}
WEIGHT_SCALES = {
    "divided by a parameter": lambda m, a, q: a / m.temperature,
    "times a scale computed from q, then by a constant": lambda m, a, q: (a * (0.1 + q.abs().mean())) * 3.0,
}


@pytest.mark.parametrize("mask_first", [False, True], ids=["then_masked", "masked_first"])
@pytest.mark.parametrize("scale", list(WEIGHT_SCALES))
@pytest.mark.parametrize("poly", list(POLYNOMIALS))
def test_run_time_scale_after_the_polynomial_scales_the_unnormalised_output(poly, scale, mask_first):
    module = WeightsScaled(POLYNOMIALS[poly], WEIGHT_SCALES[scale], mask_first)
    reports, calls = _compare_cache(module, [(6, 6), (3, 9)])
    assert calls == [1, 1], calls
    for ex in reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        assert "unnormalised, output times" in ex.sites[0].spec_text, ex


def test_run_time_scale_after_the_polynomial_under_dynamic_shapes_and_a_changed_value():
    module = WeightsScaled(POLYNOMIALS["homogeneous"], WEIGHT_SCALES["divided by a parameter"])
    reports, calls = _compare_cache(module, MASKED_SIZES, dynamic=True)
    assert calls == [1] * len(MASKED_SIZES), calls
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _cache_inputs(3, 9, 5)
    with torch.no_grad():
        assert_rel_close(compiled(*inputs), module(*inputs), TOL, "before the change")
        module.temperature.mul_(-4.0)              # another sign: read at run time
        assert_rel_close(compiled(*inputs), module(*inputs), TOL, "after the temperature changed")


def test_explain_names_the_scale_of_the_output():
    module = WeightsScaled(POLYNOMIALS["homogeneous"], WEIGHT_SCALES["divided by a parameter"])
    ex = based_compile.explain(module, *_cache_inputs(6, 6, 0))
    assert len(ex.sites) == 1 and not ex.refusals, ex
    text = str(ex.sites[0])
    assert "f(s) = 0 + 0*s + 0.5*s^2" in text and "unnormalised, output times (1 / self.temperature)" in text, text


@pytest.mark.parametrize("then,why", [
    (lambda m, a, q: a / m.temperature + 1.0, "then go through aten.add"),
    (lambda m, a, q: (a / m.temperature) ** 2, "then go through aten.pow"),
    (lambda m, a, q: a / m.temperature + a, "then go through aten.add"),
], ids=["plus_one", "squared", "plus_the_weights"])
def test_scaled_weights_changed_after_the_scale_are_refused(then, why):
    module = WeightsScaled(POLYNOMIALS["taylor"], then)
    reports, calls = _compare_cache(module, [(6, 6), (3, 9)])
    assert calls == [0, 0], calls
    for ex in reports.graphs:
        assert not ex.sites and any(why in r.reason for r in ex.refusals), ex


class NormalisedAfterScale(torch.nn.Module):
    """c * s**2 / t, normalised with eps: P / (sum P + eps t / c), not the operator's function."""

    def __init__(self):
        super().__init__()
        self.temperature = torch.nn.Parameter(torch.tensor(2.5, dtype=torch.float64))

    def forward(self, q, k, v):
        s = (q @ k.mT) * 0.5
        causal = torch.tril(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool))
        return _out((0.5 * s ** 2 / self.temperature).masked_fill(~causal, 0.0), v)


def test_homogeneous_polynomial_scaled_then_normalised_is_refused_with_the_eps_reason():
    reports, calls = _compare_cache(NormalisedAfterScale(), [(6, 6)])
    assert calls == [0], calls
    for ex in reports.graphs:
        assert not ex.sites and any("eps / c" in r.reason and "after the polynomial" in r.reason
                                    for r in ex.refusals), ex


def test_probe_checks_the_scale_of_the_output(monkeypatch):
    """A planted misreading (the power of a factor flipped: t read for 1 / t) of a scale of the weights: the
    numerical probe, multiplying the operator's output as the rewrite would, refuses it."""
    real_times = score_scale.ScoreScale.times
    monkeypatch.setattr(score_scale.ScoreScale, "times", lambda self, node, power: real_times(self, node, -power))
    module = WeightsScaled(POLYNOMIALS["taylor"], WEIGHT_SCALES["divided by a parameter"])
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _cache_inputs(7, 7, 4)
    with PassReports() as reports:
        out = compiled(*inputs)
    assert_rel_close(out, module(*inputs), TOL, "output")
    for ex in reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["verify"], ex
