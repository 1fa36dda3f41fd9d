"""The memory-saving Taylor feature map (HazyResearch zoology / based ``TaylorExp.forward_mem_save``):

    x2 = einsum('...m,...n->...mn', x, x) / sqrt(d)                 # x (x) x, [.., D, D]
    cat([1, x / d**0.25, diagonal(x2) / sqrt(2), x2[..., tril[0], tril[1]]], -1)

with ``tril = tril_indices(D, D, -1)`` in a registered buffer (or inline): the diagonal holds the squares
x_a^2 / sqrt(2d), the gather the products x_a x_b (a > b) / sqrt(d), so phi(q).phi(k) = 1 + s + s^2 / 2,
s = q.k / sqrt(d): Based, read as the products each feature holds (``feature_map._block_piece``).
Near misses refused, with their reasons: index pairs that list a product twice and miss another, a diagonal
with the wrong weight, the diagonal counted twice (``tril_indices(D, D, 0)`` beside it), indices in a buffer
the model writes (not a compile-time constant). Indices in a plain integer tensor attribute (zoology's own
code) are read like a buffer, and guarded.

Accepted programs are compiled (inner ``aot_eager``; one test ``inductor``) at several lengths (a symbolic
length from the second), compared with eager in float64 (values and gradients of q, k, v, fresh random
inputs), and the operator's calls are counted.
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from compare import assert_rel_close
from compiled_compare import Recorder, shaped_inputs
from compiled_compare import compile_and_compare as compare_compiled

TOL = 1e-10
D = 4
QKV = ((1, 2, "T", D), (1, 2, "T", D), (1, 2, "T", 3))
pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


class MemSaveMap(torch.nn.Module):
    """``forward_mem_save`` with ``indices``: "buffer" (tril_indices(D, D, -1) registered), "inline",
    "triu" (triu_indices(D, D, 1) registered: the products above the diagonal), "twice" (the buffer with
    its last pair replaced by its first: x_0 x_1 listed twice, another product missed), "tril0"
    (tril_indices(D, D, 0): the diagonal again, beside torch.diagonal), "attribute" (a plain tensor
    attribute), "written" (the buffer, written by the model before it is read); ``diag_weight``: the
    diagonal's divisor (sqrt(2) is Based); ``rolled``: the outer product of x with x rolled along its
    features (x_a x_{a-1} at [a, a]: not x (x) x)."""

    def __init__(self, indices="buffer", diag_weight=math.sqrt(2), rolled=False):
        super().__init__()
        self.indices, self.r2, self.rolled = indices, diag_weight, rolled
        self.rd, self.rrd = math.sqrt(D), D ** 0.25
        pairs = {"triu": torch.triu_indices(D, D, 1), "tril0": torch.tril_indices(D, D, 0)}.get(
            indices, torch.tril_indices(D, D, -1)).clone()
        if indices == "twice":
            pairs[:, -1] = pairs[:, 0]
        if indices == "attribute":
            self.tril_indices = pairs
        else:
            self.register_buffer("tril_indices", pairs, persistent=False)

    def forward(self, x):
        x2 = torch.einsum("...m,...n->...mn", x, x.roll(1, -1) if self.rolled else x) / self.rd
        x2d = torch.diagonal(x2, dim1=-2, dim2=-1) / self.r2
        if self.indices == "inline":
            ti = torch.tril_indices(D, D, -1)
        else:
            if self.indices == "written":
                self.tril_indices.copy_(torch.tril_indices(D, D, -1))
            ti = self.tril_indices
        x2 = x2[..., ti[0], ti[1]]
        return torch.cat([torch.ones(x[..., :1].shape, dtype=x.dtype).to(x.device), x / self.rrd, x2d, x2], dim=-1)


class Attention(torch.nn.Module):
    """zoology's Based core, in the linear (cumsum) form or the quadratic one, on the map above."""

    def __init__(self, form="linear", **map_kwargs):
        super().__init__()
        self.form = form
        self.feature_map = MemSaveMap(**map_kwargs)

    def forward(self, q, k, v):
        q, k = self.feature_map(q), self.feature_map(k)
        if self.form == "quadratic":
            a = (q @ k.mT).tril()
            return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
        q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)
        return (q * (k * v).cumsum(dim=2)).sum(dim=-1) / ((q * k.cumsum(dim=2)).sum(dim=-1) + 1e-12)


def _inputs(seed, t, shapes=QKV):
    return shaped_inputs(seed, t, shapes)


def compile_and_compare(module, lengths=(5, 9, 13), inner="aot_eager") -> Recorder:
    """compiled_compare's at this file's shapes, counting the operator's calls (``.counter``)."""
    return compare_compiled(module, QKV, lengths, inner=inner, tol=TOL, count=True)


def _float64_reference(q, k, v):
    """Based itself, f(s) = 1 + s + s^2 / 2 with s = q.k / sqrt(D), causal and normalised."""
    s = q @ k.mT / math.sqrt(D)
    a = (1 + s + s * s / 2).tril()
    return a @ v / a.sum(-1, keepdim=True)


def _sites_are_based(recorder):
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        spec = ex.sites[0].spec
        assert spec.causal and spec.normalize, ex
    assert recorder.counter.total >= 1, recorder.counter.calls


@pytest.mark.parametrize("form", ["linear", "quadratic"])
@pytest.mark.parametrize("indices", ["buffer", "inline", "triu"])
def test_memory_saving_map_is_read_as_based(form, indices):
    recorder = compile_and_compare(Attention(form, indices=indices))
    _sites_are_based(recorder)


def test_memory_saving_map_computes_based():
    q, k, v = _inputs(7, 9)
    assert_rel_close(Attention()(q, k, v), _float64_reference(q, k, v), 1e-9, "the map in eager vs Based")


def test_memory_saving_map_under_inductor():
    recorder = compile_and_compare(Attention("linear"), lengths=(6, 11), inner="inductor")
    _sites_are_based(recorder)


def test_memory_saving_map_read_without_the_probe(monkeypatch):
    """The structural reading (real sizes, above the probe's limit): the diagonal's and the gather's
    features are followed from q's and k's feature axes."""
    monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
    recorder = compile_and_compare(Attention("quadratic"), lengths=(5, 9))
    _sites_are_based(recorder)


def _refusal(module) -> str:
    ex = based_compile.explain(module, *_inputs(0, 6))
    assert not ex.sites and [r.category for r in ex.refusals] == ["feature_map"], ex
    reason = ex.refusals[0].reason
    assert "different tensors" not in reason, reason
    return reason


@pytest.mark.parametrize("form", ["linear", "quadratic"])
def test_index_pairs_listing_a_product_twice_are_refused(form):
    reason = _refusal(Attention(form, indices="twice"))
    assert "not (x.y)^2 times one constant" in reason, reason


def test_diagonal_with_the_wrong_weight_is_refused():
    reason = _refusal(Attention(diag_weight=1.4142))           # sqrt(2) to 5 digits
    assert "not (x.y)^2 times one constant" in reason and "x_0 x_1 has the weight" in reason, reason


def test_products_without_the_squares_are_refused_with_what_they_lack(monkeypatch):
    """Only the products above the diagonal (x_a x_b, a < b; fla's map with its pairs shifted reads so): the
    reason names the missing squares (it said "x_0^2 has the weight 0 ..., 0 wanted")."""
    from types import SimpleNamespace

    from based_compile.graph import feature_map
    from based_compile.graph.refusal import Refused

    monkeypatch.setattr(feature_map, "hint_shape", lambda source: (2, D))
    upper = [(a, b) for a in range(D) for b in range(a + 1, D)]
    piece = SimpleNamespace(kind="pairs", factor=1.0, pairs=upper)
    with pytest.raises(Refused) as err:
        feature_map._pairs_coefficient([(piece, piece)], None)
    reason = str(err.value)
    assert "not (x.y)^2 times one constant" in reason and "x_0^2 has no weight" in reason, reason
    assert "0 wanted" not in reason, reason


def test_diagonal_counted_twice_is_refused():
    reason = _refusal(Attention(indices="tril0"))            # tril_indices(D, D, 0) lists x_a^2 too
    assert "not (x.y)^2 times one constant" in reason, reason


def test_diagonal_of_another_product_is_refused():
    reason = _refusal(Attention(rolled=True))
    assert "torch.diagonal" in reason and "does not prove is the outer product" in reason, reason


def test_indices_the_model_writes_are_refused():
    reason = _refusal(Attention(indices="written"))
    assert "not a compile-time constant" in reason, reason


def test_indices_in_a_plain_attribute_are_read_and_guarded():
    """zoology's own TaylorExp keeps ``self.tril_indices = torch.tril_indices(...)`` as a plain attribute: an
    integer module attribute is a compile-time constant like a buffer, and guarded the same way."""
    module = Attention(indices="attribute")
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    for t in (5, 9):
        inputs = _inputs(t, t)
        with torch.no_grad():
            compiled(*inputs)
            with BasedOpCounter() as counter:
                got = compiled(*inputs)
        assert counter.total >= 1, counter.calls
        assert_rel_close(got, module(*inputs), TOL, f"T={t}")
    module.feature_map.tril_indices = module.feature_map.tril_indices.clone()     # the same values: runs
    with torch.no_grad():
        assert_rel_close(compiled(*inputs), module(*inputs), TOL, "reassigned")
    module.feature_map.tril_indices = torch.triu_indices(D, D, 1)        # other values: guarded
    with torch.no_grad(), pytest.raises(based_compile.StaleBufferError,
                                        match="integer tensor attribute.*tril_indices"):
        compiled(*inputs)


def test_index_buffer_is_guarded():
    module = Attention()
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(0, 6)
    assert_rel_close(compiled(*inputs), module(*inputs), TOL, "before the write")
    module.feature_map.tril_indices.copy_(torch.triu_indices(D, D, 1))     # other values (still Based)
    with pytest.raises(based_compile.StaleBufferError, match="tril_indices"):
        compiled(*inputs)


class RowsTransposed(torch.nn.Module):
    """Near miss: the squares and products taken of x.transpose(1, 2) ([B, T, H, ..]) beside pieces of x
    ([B, H, T, ..]): at T == H the cat joins rows of other tokens and heads."""

    def phi(self, x):
        xt = x.transpose(1, 2)
        x2 = torch.einsum("...m,...n->...mn", xt, xt) / math.sqrt(D)
        ti = torch.tril_indices(D, D, -1)
        x2d, x2o = torch.diagonal(x2, dim1=-2, dim2=-1) / math.sqrt(2), x2[..., ti[0], ti[1]]
        return torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25, x2d, x2o], -1)

    def forward(self, q, k, v):
        a = (self.phi(q) @ self.phi(k).mT).tril()
        return a @ v / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("probe", [True, False])
def test_squares_of_other_rows_are_refused(probe, monkeypatch):
    if not probe:
        monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
    ex = based_compile.explain(RowsTransposed(), *_inputs(0, 2))             # T == H == 2
    assert not ex.sites and [r.category for r in ex.refusals] == ["verify"], ex
    assert ("numerical probe disagrees" if probe else "heads meets query time") in ex.refusals[0].reason, ex
