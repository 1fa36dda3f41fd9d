"""Constants computed from a symbolic size (``Matcher.constant``): under ``torch.compile(dynamic=True)`` or
``mark_dynamic`` a one-element tensor built from a length, ``torch.tensor(float(tk)).sqrt()``, is evaluated at
the traced length when the pass folds it into the polynomial (a scale of the raw scores, of the weights after
the polynomial, a coefficient). The sizes it reads are specialised (guarded): a call at another length
recompiles. It was baked silently: every later length reused the first length's number (relative errors up
to 0.9 where the numerical probe does not run; the probe is off here, as at those sizes).

Compiled (inner "aot_eager") vs eager in float64 at several lengths, values and gradients of q, k and v; the
forms the pass already read exactly (Python numbers and tensors of a size, without the sqrt) are still
rewritten.
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from compare import assert_rel_close
from compiled_compare import Recorder, values_and_grads
from based_compile.graph import verify

B, H, D, DV = 2, 3, 4, 3
TOL = 1e-10

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


@pytest.fixture(autouse=True)
def _no_probe(monkeypatch):
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)     # the sizes where the numerical probe does not run


def P(s):
    return 1 + s + 0.5 * s * s


def _sqrt_len(s, tk):
    return torch.tensor(float(tk), dtype=s.dtype).sqrt()


FORMS = {
    # the red team's two forms: the scale on the raw scores, and after the polynomial
    "raw / tensor(tk).sqrt()": lambda s, tk: P(s / _sqrt_len(s, tk)),
    "P(s) / tensor(tk).sqrt()": lambda s, tk: P(s) / _sqrt_len(s, tk),
    "raw * tensor(tk).rsqrt()": lambda s, tk: P(s * torch.tensor(float(tk), dtype=s.dtype).rsqrt()),
    # a coefficient of the polynomial computed as a tensor from the length
    "coefficient tensor(tk).sqrt() / 8": lambda s, tk: 1 + s + (_sqrt_len(s, tk) / 8) * s * s,
    # the length read through a shape only (a fill of it, summed), not through a number
    "coefficient ones(tk).sum().sqrt() / 8": lambda s, tk: 1 + s + (torch.ones(tk, dtype=s.dtype).sum().sqrt() / 8) * s * s,
    "raw / s.new_ones(tk).sum().sqrt()": lambda s, tk: P(s / s.new_ones(tk).sum().sqrt()),
    "raw / ones_like(s[0, 0, 0]).sum().sqrt()": lambda s, tk: P(s / torch.ones_like(s[0, 0, 0]).sum().sqrt()),
    # read exactly before (scalar_value specialises sizes): still rewritten
    "raw / tensor(tk)": lambda s, tk: P(s / torch.tensor(float(tk), dtype=s.dtype)),
    "raw / math.sqrt(tk)": lambda s, tk: P(s / math.sqrt(tk)),
    "raw / full((), tk)": lambda s, tk: P(s / torch.full((), tk, dtype=s.dtype)),
}


class KV(torch.nn.Module):
    """Causal against a KV cache (Tq <= Tk), the scale a function of Tk."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        return self.f(q @ k.mT, tk).masked_fill(~keep, 0) @ v


def _inputs(tq, tk, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, t, d, generator=g, dtype=torch.float64) for t, d in ((tq, D), (tk, D), (tk, DV))]


LENGTHS = [(5, 9), (5, 13), (6, 11), (8, 8), (4, 30)]


def _compare(module, lengths, *, dynamic, mark=False) -> Recorder:
    recorder = Recorder("aot_eager")
    compiled = torch.compile(module, backend=based_compile.backend(inner=recorder), dynamic=dynamic)
    for i, (tq, tk) in enumerate(lengths):
        x = _inputs(tq, tk, i)
        if mark:
            for t in x:
                torch._dynamo.mark_dynamic(t, 2)
        out_c, grads_c = values_and_grads(compiled, x, i)
        out_e, grads_e = values_and_grads(module, x, i)
        assert_rel_close(out_c, out_e, TOL, f"Tq={tq} Tk={tk}: output, compiled vs eager")
        for j, (c, e) in enumerate(zip(grads_c, grads_e)):
            assert_rel_close(c, e, TOL, f"Tq={tq} Tk={tk}: gradient of input {j}, compiled vs eager")
    return recorder


@pytest.mark.parametrize("name", list(FORMS))
def test_constant_of_a_symbolic_length_is_exact_at_every_length(name):
    recorder = _compare(KV(FORMS[name]), LENGTHS, dynamic=True)
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


@pytest.mark.parametrize("name", ["raw / tensor(tk).sqrt()", "P(s) / tensor(tk).sqrt()"])
def test_constant_of_a_marked_dynamic_length_is_exact_at_every_length(name):
    recorder = _compare(KV(FORMS[name]), LENGTHS, dynamic=None, mark=True)
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_the_length_is_specialised_so_another_length_recompiles():
    """The sqrt form is evaluated at the traced length: the graph holds for that length only."""
    recorder = _compare(KV(FORMS["raw / tensor(tk).sqrt()"]), [(5, 9), (6, 9), (5, 13)], dynamic=True)
    assert len(recorder.graphs) == 2, f"one graph per key length, got {len(recorder.graphs)}"


class Square(torch.nn.Module):
    """Square causal, normalised, the scale of the raw scores a function of T."""

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = P((q @ k.mT) / torch.tensor(float(t), dtype=q.dtype).sqrt())
        a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_square_normalised_form_is_exact_at_every_length():
    recorder = _compare(Square(), [(t, t) for t in (5, 9, 16, 7)], dynamic=True)
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


class EpsOfLength(torch.nn.Module):
    """eps of the normaliser a tensor computed from T: exact, rewritten or left to the inner compiler."""

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = P(q @ k.mT).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
        return (a @ v) / (a.sum(-1, keepdim=True) + torch.tensor(float(t), dtype=q.dtype).sqrt())


def test_eps_computed_from_the_length_is_exact_at_every_length():
    _compare(EpsOfLength(), [(t, t) for t in (5, 9, 16, 7)], dynamic=True)
