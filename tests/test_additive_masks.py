"""A 0/1 mask read off an additive one (HF's ``full((T, T), finfo.min).triu(1)``) is proven like any other.

A constant-built tensor is one value everywhere; ``triu`` makes it two-valued (finfo.min above the
diagonal, 0 on and below it) and a comparison with a number makes that a bool mask, a function of
j - i at every length. Each accepted spelling is rewritten (the ``based`` operator runs) and exact
against eager float64, values and gradients, at a static length and then under automatic dynamic
shapes; each near-miss (the diagonal masked too, a threshold that flips the pattern) is refused with
the pattern it keeps. Positions compared with a clamped index are not a function of j - i: refused
with that reason, not as "values other than 0 and 1".
"""
from __future__ import annotations

import pytest
import torch

from compiled_compare import compile_and_compare


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _attend(q, k, v, keep_or_drop):
    s = (q @ k.mT) * 0.5
    a = keep_or_drop(1 + s + 0.5 * s * s, q)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _additive(q, diagonal=1):
    t = q.shape[-2]
    return torch.full((t, t), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(diagonal)


FORMS = {   # name: (weights, q) -> masked weights
    "lt_zero": lambda a, q: a.masked_fill(_additive(q) < 0, 0.0),
    "eq_finfo_min": lambda a, q: a.masked_fill(_additive(q) == torch.finfo(q.dtype).min, 0.0),
    "where_eq_zero": lambda a, q: torch.where(_additive(q) == 0, a, 0.0),
    "float32_mask": lambda a, q: a.masked_fill(_additive(q.float()) < 0, 0.0),
}
NEAR_MISSES = {   # name: (form, what the refusal says it keeps)
    "triu_0_masks_the_diagonal": (lambda a, q: a.masked_fill(_additive(q, 0) < 0, 0.0),
                                  "shifted causal mask (keeps j - i <= -1)"),
    "threshold_flips_the_pattern": (lambda a, q: a.masked_fill(_additive(q) > -1, 0.0),
                                    "anti-causal mask (keeps j - i >= 1)"),
}


QKV = [(2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 3)]


def _run(form, lengths):
    recorder = compile_and_compare(lambda q, k, v: _attend(q, k, v, form), QKV, lengths, inner="aot_eager",
                                   tol=1e-9, count=True)
    return recorder.calls, recorder.reports


@pytest.mark.parametrize("name", FORMS)
def test_a_causal_mask_read_off_an_additive_mask_is_rewritten_and_exact(name):
    calls, reports = _run(FORMS[name], (5, 11, 17))       # static at 5, then a symbolic length
    assert all(calls), (name, calls, str(reports))
    assert all(site.spec.causal for site in reports.merged().sites), str(reports)


@pytest.mark.parametrize("name", NEAR_MISSES)
def test_an_additive_mask_of_another_pattern_is_refused_with_what_it_keeps(name):
    form, keeps = NEAR_MISSES[name]
    calls, reports = _run(form, (5, 11))
    assert not any(calls), (name, calls)
    assert reports.graphs and not any(reports.sites()), str(reports)
    for ex in reports.graphs:
        assert [r.category for r in ex.refusals] == ["mask"], ex
        assert keeps in ex.refusals[0].reason, ex.refusals[0].reason


def _capped(a, q):
    i = torch.arange(q.shape[-2], device=q.device)
    return a * (i[None] <= torch.clamp(i[:, None], max=15))     # j <= min(i, 15): causal only up to T = 16


def test_positions_compared_with_a_clamped_index_are_refused_as_not_a_function_of_j_minus_i():
    """At T = 30 the mask is not causal (rows past 15 stop at key 15): refused at a static length because the
    evaluated comparison is not a function of j - i, under a symbolic one because clamp is not read as one."""
    calls, reports = _run(_capped, (30, 31))
    assert not any(calls), calls
    reasons = [ex.refusals[0].reason for ex in reports.graphs]
    assert len(reasons) == 2, str(reports)
    assert "is not a function of j - i" in reasons[0] and "0 and 1" not in reasons[0], reasons[0]
    assert "built with clamp" in reasons[1], reasons[1]
