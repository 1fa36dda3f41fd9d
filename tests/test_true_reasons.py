"""Refusals that named the wrong thing (red team), and the forms behind them read where they are exact.

- a cast of the weights keeps their zeros: a widening (``a.float()``, ``a.sum(-1, dtype=torch.float32)``) is
  read through (exact), the operator's precision chosen by ``autocast_scope.operator_precision`` (q, k, v cast to
  the widest for ``a.float() @ v.float()``), with or without the probe (which agrees to the cast's accuracy); a
  narrowing is refused for its rounding; all were 'masked entries become convert_element_type of 0' under 'mask';
- a constant factor of the scores that is the same along the query and key axes: one number when its
  elements are all one (read), a per-head scale otherwise (refused, saying so; it was 'not 0/1');
- a document mask (ids compared) is a table, not a 0/1 matrix; a 0/2 mask has the values 0 and 2;
- at T = 1 the weights' two size-1 axes are told apart through views (``canonicalize.track_axis``): the site is
  read (it was 'tril/triu over axes that are not the weights' [T, T] axes').

Values and gradients compiled vs eager in float64 on fresh random inputs, the numerical probe off.
"""
from __future__ import annotations

import pytest
import torch

import based_compile
from based_compile.graph import verify
from compiled_compare import compile_and_compare

QKV = ((2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5))
pytestmark = pytest.mark.usefixtures("probe_off")


def weights(s):
    return 1 + s + 0.5 * s * s


def normalised(a, v):
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def explain(fn, dtype=torch.float64, t=11):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, t, d, generator=g).to(dtype) for d in (4, 4, 5))
    torch._dynamo.reset()
    return based_compile.explain(fn, q, k, v)


def _causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def normaliser_widened(q, k, v):
    a = weights(q @ k.mT * 0.35).tril()
    return (a @ v) / (a.float().sum(-1, keepdim=True) + 1e-6)


def normaliser_summed_wider(q, k, v):
    a = weights(q @ k.mT * 0.35).tril()
    return (a @ v) / (a.sum(-1, keepdim=True, dtype=torch.float64) + 1e-6)


def normaliser_summed_narrower(q, k, v):
    a = weights(q @ k.mT * 0.35).tril()
    return (a @ v) / (a.sum(-1, keepdim=True, dtype=torch.float32) + 1e-6)


def _no_worse_than_eager(fn, dtype, seed=0, t=9):
    """Compiled (probe off) and eager on ``dtype`` inputs, each against a float64 run of the same inputs: the
    output and the gradients of q, k, v no further from it than eager (twice eager's error, plus float64 noise).
    Returns the operator calls of the compiled run."""
    from based_calls import BasedOpCounter
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(2, 3, t, d, generator=g).to(dtype) for d in (4, 4, 5)]
    cot = torch.randn(2, 3, t, 5, generator=g, dtype=torch.float64)

    def run(f, xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        out = f(*xs)
        return [out.detach(), *torch.autograd.grad((out.double() * cot).sum(), xs)]

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"))
    with BasedOpCounter() as counter:
        got = run(compiled, inputs)
    want, reference = run(fn, inputs), run(fn, [x.double() for x in inputs])
    assert got[0].dtype == want[0].dtype
    for g_, w, r in zip(got, want, reference):
        assert (g_.double() - r).norm() <= 2 * (w.double() - r).norm() + 1e-12 * r.norm()
    return counter.calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_masked_weights_widened_with_the_values_are_read(dtype):
    """``a.float() @ v.float()`` (``.double()`` in a float32 model) on masked weights: a widening keeps every value,
    zeros included; q, k of the model's dtype and v widened are cast to the widest (``operator_precision``), the
    operator computing the whole site there, no less precisely than eager. It was refused with 'masked entries
    become convert_element_type of 0'."""
    wide = torch.float32 if dtype == torch.bfloat16 else torch.float64

    def fn(q, k, v):
        a = weights(q @ k.mT * 0.35).masked_fill(~_causal(q.shape[-2]), 0)
        return ((a.to(wide) @ v.to(wide)) / (a.to(wide).sum(-1, keepdim=True) + 1e-6)).to(q.dtype)

    assert _no_worse_than_eager(fn, dtype)
    ex = explain(fn, dtype)
    assert len(ex.sites) == 1 and not ex.refusals, ex


@pytest.mark.parametrize("probe", [False, True])
@pytest.mark.parametrize("fn,dtype", [(normaliser_widened, torch.bfloat16), (normaliser_summed_wider, torch.float32)])
def test_normaliser_widened_is_read_with_and_without_the_probe(fn, dtype, probe, monkeypatch):
    """q, k, v of one dtype and the normaliser widened (eager returns the wider dtype): the widening is read (it was
    'masked entries become convert_element_type of 0' under 'mask'), the operator's precision is
    operator_precision's; the probe, where it runs, agrees to the cast's dtype's accuracy (it refused at small
    sizes what it accepts at large ones), no worse than eager against float64."""
    if probe:
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 4_000_000)
    assert _no_worse_than_eager(fn, dtype)
    ex = explain(fn, dtype)
    assert len(ex.sites) == 1 and not ex.refusals, ex


def test_weights_summed_narrower_are_refused_for_the_rounding():
    ex = explain(normaliser_summed_narrower, torch.float64)
    assert not ex.sites and len(ex.refusals) == 1, ex
    r = ex.refusals[0]
    assert r.category == "unsupported" and "rounds" in r.reason and "masked entries" not in r.reason, r


class ConstantFactor(torch.nn.Module):
    """The scores times a constant [H, 1, 1] tensor: all elements one number (read) or one per head."""

    def __init__(self, per_head):
        super().__init__()
        self.per_head = per_head

    def forward(self, q, k, v):
        c = torch.tensor([0.3, 0.4, 0.5], dtype=q.dtype) if self.per_head else torch.full((3,), 0.4, dtype=q.dtype)
        a = weights((q @ k.mT) * c[:, None, None]).tril()
        return normalised(a, v)


def test_constant_factor_of_one_number_is_read():
    recorder = compile_and_compare(ConstantFactor(False), QKV, (5, 9, 13), count=True)
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals and ex.sites[0].spec.scale == pytest.approx(0.4), ex


def test_per_head_constant_scale_is_refused_as_such():
    recorder = compile_and_compare(ConstantFactor(True), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    refusals = [r for ex in recorder.reports.graphs for r in ex.refusals]
    assert refusals and all(r.category == "unsupported" and "per-head scale" in r.reason for r in refusals), refusals


def test_document_mask_is_refused_as_a_table():
    def fn(q, k, v):
        t = q.shape[-2]
        doc = torch.arange(t) // 4
        keep = (doc[:, None] == doc[None]) & _causal(t)
        return normalised(weights(q @ k.mT * 0.3).masked_fill(~keep, 0), v)
    ex = explain(fn)
    assert not ex.sites and len(ex.refusals) == 1, ex
    r = ex.refusals[0]
    assert r.category == "mask" and "eq" in r.reason and "not 0/1" not in r.reason, r


def test_mask_of_zeros_and_twos_says_so():
    def fn(q, k, v):
        t = q.shape[-2]
        return normalised(weights(q @ k.mT * 0.3) * (2 * torch.ones(t, t, dtype=q.dtype).tril()), v)
    ex = explain(fn)
    assert not ex.sites and len(ex.refusals) == 1, ex
    r = ex.refusals[0]
    assert r.category == "mask" and "other than 0 and 1 (2)" in r.reason, r


class Causal(torch.nn.Module):
    """Unnormalised: at T = 1 a normalised output is v * P / (P + eps), whose gradients in q and k are of the order
    of eps (cancellation), not a test of anything."""

    def forward(self, q, k, v):
        return weights(q @ k.mT * 0.3).tril() @ v


class Anticausal(torch.nn.Module):
    def forward(self, q, k, v):
        return normalised(weights(q @ k.mT * 0.3).triu(1), v)


def test_one_token_is_read():
    recorder = compile_and_compare(Causal(), QKV, (1, 5, 9), count=True)
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals and ex.sites[0].spec.causal, ex


def test_one_token_strictly_above_the_diagonal_is_refused():
    """triu(1) at T = 1 masks the only entry: the normaliser divides 0 by eps; not a Based mask at any T."""
    recorder = compile_and_compare(Anticausal(), QKV, (1, 5), count=True)
    assert recorder.calls == [0, 0]
    refusals = [r for ex in recorder.reports.graphs for r in ex.refusals]
    assert refusals and all(r.category == "mask" for r in refusals), refusals
