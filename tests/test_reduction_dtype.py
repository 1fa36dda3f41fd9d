"""Sums and running sums written with ``dtype=``: ``x.sum(d, dtype=t)`` is ``x.to(t).sum(d)`` (PyTorch casts the
input first), so a ``dtype=`` other than the input's is a cast the readers must see.

They read such a reduction as a plain sum and dropped its rounding (red team, S1): a float32 model's normaliser
``a.sum(-1, keepdim=True, dtype=torch.float16)`` or running sum ``kf.cumsum(2, dtype=torch.bfloat16)`` was
rewritten 1e-4 to 2e-3 off eager where the probe does not run. The lowering now spells the cast out
(``canonicalize.split_reduction_dtypes``): a narrowing is refused with the reason, a widening is read as an
explicit ``.to()`` there is (of the quadratic form's weights: read, exact, the operator's precision chosen by
operator_precision; elsewhere refused), and a ``dtype=`` equal to the input's is dropped (the site is rewritten as
before). Every test runs with the probe off (as at real sizes)
and compares values and gradients with eager.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

import based_compile
from based_compile.graph.canonicalize import REDUCTION_DTYPE, split_reduction_dtypes
from compare import assert_rel_close
from compiled_compare import Recorder, values_and_grads
from pass_reports import PassReports

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# float32 sites differ from eager by their summation order (2e-7 at these sizes); the dropped rounding of a
# float16 or bfloat16 reduction is 7e-5 .. 7e-3, of a float32 one in a float64 model 2e-8 .. 9e-8
TOL = {F32: 1e-5, F64: 1e-12}


pytestmark = pytest.mark.usefixtures("probe_off")     # conftest.py: as at real sizes, Dynamo reset


def _phi(x):
    d = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25,
                      (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)], -1)


def _causal(t):
    return torch.tril(torch.ones(t, t, dtype=torch.bool))


class QuadraticNormaliser(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, q, k, v):
        s = q @ k.mT * 0.5
        a = (1 + s + 0.5 * s * s).masked_fill(~_causal(q.shape[-2]), 0)
        return (a @ v) / (a.sum(-1, keepdim=True, dtype=self.dtype) + 1e-6)


class LinearRunningSums(torch.nn.Module):
    """``where``: "den" sums the keys' features with ``dtype=``, "num" the state product."""

    def __init__(self, dtype, where):
        super().__init__()
        self.dtype, self.where = dtype, where

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        kv = kf[..., :, None] * v[..., None, :]
        kv = kv.cumsum(2, dtype=self.dtype) if self.where == "num" else kv.cumsum(2)
        ks = kf.cumsum(2, dtype=self.dtype) if self.where == "den" else kf.cumsum(2)
        return (qf[..., :, None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)


class NonCausal(torch.nn.Module):
    """``where``: "state" sums the state product with ``dtype=``, "ksum" the keys' features."""

    def __init__(self, dtype, where):
        super().__init__()
        self.dtype, self.where = dtype, where

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        state = (kf[..., :, None] * v[..., None, :]).sum(2, dtype=self.dtype if self.where == "state" else None)
        n = (qf[..., :, None] * state[:, :, None]).sum(-2)
        z = (qf * kf.sum(2, keepdim=True, dtype=self.dtype if self.where == "ksum" else None)).sum(-1, keepdim=True)
        return n / (z + 1e-6)


class FeatureNormaliser(torch.nn.Module):
    """The quadratic form's normaliser on the features, summed with ``dtype=``."""

    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        a = (qf @ kf.mT).masked_fill(~_causal(q.shape[-2]), 0)
        z = (qf * kf.cumsum(2)).sum(-1, keepdim=True, dtype=self.dtype)
        return (a @ v) / (z + 1e-6)


def _compare(module, dtype, lengths=(5, 11)):
    """Values and gradients of the compiled module against eager (inputs of ``dtype``); the reports."""
    recorder = Recorder()
    compiled = torch.compile(module, backend=based_compile.backend(inner=recorder))
    with PassReports() as reports:
        for t in lengths:
            g = torch.Generator().manual_seed(t)
            inputs = [torch.randn(2, 3, t, d, generator=g, dtype=dtype) for d in (4, 4, 5)]
            out_c, grads_c = values_and_grads(compiled, inputs, t)
            out_e, grads_e = values_and_grads(module, inputs, t)
            assert out_c.dtype == out_e.dtype
            assert_rel_close(out_c, out_e, TOL[dtype], f"T={t}: output, compiled vs eager")
            for j, (c, e) in enumerate(zip(grads_c, grads_e)):
                assert_rel_close(c, e, TOL[dtype], f"T={t}: gradient of input {j}, compiled vs eager")
    return recorder, reports


def _refusals(reports) -> list[str]:
    return [r.reason for graph in reports.graphs for r in graph.refusals]


NARROWING = [(F32, F16), (F32, BF16), (F64, F32)]
CASES = {
    "quadratic normaliser": lambda dt: QuadraticNormaliser(dt),
    "running sum of the keys": lambda dt: LinearRunningSums(dt, "den"),
    "running sum of the state": lambda dt: LinearRunningSums(dt, "num"),
    "non-causal state": lambda dt: NonCausal(dt, "state"),
    "non-causal key sum": lambda dt: NonCausal(dt, "ksum"),
}
NAMES = {"quadratic normaliser": "the sum", "running sum of the keys": "the running sum",
         "running sum of the state": "the running sum", "non-causal state": "the sum",
         "non-causal key sum": "the sum"}


@pytest.mark.parametrize("model,reduced", NARROWING, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_narrowing_reduction_is_refused_with_its_reason(case, model, reduced):
    recorder, reports = _compare(CASES[case](reduced), model)
    assert sum(recorder.sites()) == 0
    reasons = _refusals(reports)
    assert reasons, reports.graphs
    assert all(f"{NAMES[case]} with dtype={reduced} of a {model} tensor" in r for r in reasons), reasons
    assert all(f"rounds every element to {reduced} before summing" in r for r in reasons), reasons


@pytest.mark.parametrize("model,reduced", NARROWING, ids=lambda d: str(d).split(".")[-1])
def test_narrowing_feature_normaliser_is_not_read(model, reduced):
    """Its normaliser is left to eager: the site is the unnormalised product, or nothing."""
    recorder, reports = _compare(FeatureNormaliser(reduced), model)
    for graph in reports.graphs:
        for site in graph.sites:
            assert "normalised" not in site.spec_text or "unnormalised" in site.spec_text, site


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("model", [F32, F64], ids=lambda d: str(d).split(".")[-1])
def test_same_dtype_is_a_no_op_and_read(case, model):
    """Near miss of the refusals: ``dtype=`` the input's own dtype changes nothing; the site is rewritten."""
    recorder, reports = _compare(CASES[case](model), model)
    assert sum(recorder.sites()) >= 1, reports.graphs
    assert not _refusals(reports), reports.graphs


@pytest.mark.parametrize("case", sorted(set(CASES) - {"quadratic normaliser"}))
def test_widening_reduction_is_read_as_an_explicit_cast(case):
    """float64 sums of a float32 model's tensors: the output is float64, the operator would compute the whole
    site in float64 where eager computes the rest in float32; refused like ``.to(torch.float64)`` there."""
    recorder, reports = _compare(CASES[case](F64), F32)
    assert sum(recorder.sites()) == 0
    reasons = _refusals(reports)
    assert reasons and all(f"with dtype={F64} of a {F32} tensor" in r and "a widening cast" in r
                           for r in reasons), reasons


def test_widening_sum_of_the_weights_is_read():
    """The quadratic form's row sums with ``dtype=torch.float64`` in a float32 model: the weights' reader reads a
    widening cast through (exact; a cast keeps the weights' zeros), the operator's precision is operator_precision's
    (its float32 result cast to float64, as rounded as eager's float32 numerator); values and gradients as eager's."""
    recorder, reports = _compare(QuadraticNormaliser(F64), F32)
    assert sum(recorder.sites()) >= 1 and not _refusals(reports), reports.graphs


def test_widening_from_bfloat16_matches_an_explicit_cast():
    """``a.sum(-1, dtype=torch.float32)`` of bfloat16 weights reads exactly as ``a.float().sum(-1)``: same sites,
    same output bits of the compiled programs, no further from float64 than eager."""
    class Explicit(torch.nn.Module):
        def forward(self, q, k, v):
            s = q @ k.mT * 0.5
            a = (1 + s + 0.5 * s * s).masked_fill(~_causal(q.shape[-2]), 0)
            return (a @ v) / (a.float().sum(-1, keepdim=True) + 1e-6)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, d, generator=g).bfloat16() for d in (4, 4, 3))
    implicit, explicit = QuadraticNormaliser(F32), Explicit()
    ex_i, ex_e = based_compile.explain(implicit, q, k, v), based_compile.explain(explicit, q, k, v)
    assert len(ex_i.sites) == len(ex_e.sites) == 1 and not ex_i.refusals and not ex_e.refusals
    assert ex_i.sites[0].spec == ex_e.sites[0].spec
    torch._dynamo.reset()
    out_i = torch.compile(implicit, backend=based_compile.backend(inner="eager"))(q, k, v)
    torch._dynamo.reset()
    out_e = torch.compile(explicit, backend=based_compile.backend(inner="eager"))(q, k, v)
    assert torch.equal(out_i, out_e)
    reference = implicit(q.double(), k.double(), v.double())
    eager = implicit(q, k, v)
    assert out_i.dtype == eager.dtype
    assert (out_i.double() - reference).norm() <= 2 * (eager.double() - reference).norm()


def _lowered(fn, *shapes_dtypes):
    gm = fx.symbolic_trace(fn)
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(gm, decomposition_table={})(*[torch.zeros(s, dtype=d) for s, d in shapes_dtypes])


def test_split_reduction_dtypes_spells_out_the_cast():
    gm = _lowered(lambda x, i: (x.sum(-1, dtype=torch.float16), x.cumsum(0, dtype=torch.float32),
                                x.sum(dtype=torch.float64), i.sum(0, dtype=torch.int32)),
                  ((3, 4), F32), ((3,), torch.int32))
    for node in gm.graph.nodes:        # make_fx's values: fake ones as Dynamo's graphs have
        if "val" in node.meta and isinstance(node.meta["val"], torch.Tensor):
            node.meta["val"] = torch._subclasses.FakeTensorMode().from_tensor(node.meta["val"])
    x = torch.randn(3, 4)
    i = torch.arange(3, dtype=torch.int32)
    expected = gm(x, i)
    split_reduction_dtypes(gm)
    reductions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in
                  (torch.ops.aten.sum.dim_IntList, torch.ops.aten.sum.default, torch.ops.aten.cumsum.default)]
    kept = [n for n in reductions if "dtype" in n.kwargs]
    assert [n.kwargs["dtype"] for n in kept] == [torch.int32]          # an integer sum keeps its dtype=
    casts = [n for n in gm.graph.nodes if REDUCTION_DTYPE in n.meta]
    assert [(c.args[1], c.meta[REDUCTION_DTYPE].args[0] is c) for c in casts] == [(F16, True), (F64, True)]
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(gm(x, i), expected))
