"""Constants are values, not spellings: tensors filled with one number (``full_like``, ``new_full``,
``ones_like``) read as that number.

- eps written as a fill beside the normaliser (``z + torch.full_like(z, eps)``, ``z + z.new_full((1,), eps)``,
  ``reciprocal(full_like(z, eps) + z)``) is the normalised site's eps: before ``constant_fills``, only the
  numerator was rewritten and the T x T weights were still built for the row sums;
- near-miss: a fill that is not one number once it reaches the normaliser (a running sum of it, eps growing
  with the row) is not an eps: the normaliser is left as written (values exact; the site, if any, is not
  normalised);
- row sums spelled as a product with a column of ones (``a @ torch.ones(T, 1)``, ``a @ ones_like(v[..., :1])``)
  or with ones in every column (``a @ torch.ones(T, Dv)``, ``a @ ones_like(v)``, einsum ``"bhij,j->bhi"``
  with ``torch.ones(T)``) are the row sums: before, the numerator alone was rewritten (or the product as a
  second attention with v = ones) and the T x T weights stayed; twice the row sums (a column or a matrix of
  twos) is refused as scaled, and row sums weighted per column are no normaliser.

Each form is compiled with backend="based" (inner="aot_eager") in float64 at two lengths (the second
under a symbolic length) and compared with eager, values and gradients; the graphs handed to the inner
compiler are read for what is left of the T x T weights.
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from compare import assert_rel_close
from pass_reports import PassReports

B, H, D, DV = 2, 2, 4, 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def phi(x):
    x = x * D ** -0.25
    x2 = torch.einsum("...i,...j->...ij", x, x).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x, x2], -1)


def quadratic_full_like(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a.sum(-1, keepdim=True) + torch.full_like(a[..., :1], 1e-4))


def quadratic_fill_first_reciprocal(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    z = a.sum(-1, keepdim=True)
    return (a @ v) * torch.reciprocal(torch.full_like(z, 1e-2) + z)


def linear_new_full(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2)
    z = (qf * kf.cumsum(2)).sum(-1, keepdim=True)
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv) / (z + z.new_full((1,), 1e-3))


def quadratic_running_fill(q, k, v):              # near-miss: eps_i = (i + 1) * 1e-2, not one number
    a = torch.tril(phi(q) @ phi(k).mT)
    z = a.sum(-1, keepdim=True)
    return (a @ v) / (z + torch.full_like(z, 1e-2).cumsum(-2))


def linear_running_fill(q, k, v):                 # near-miss, the linear form's twin
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2)
    z = (qf * kf.cumsum(2)).sum(-1, keepdim=True)
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv) / (z + torch.full_like(z, 1e-2).cumsum(-2))


# fills whose own dtype changes their number: read as the number the elements hold
def quadratic_int_fill(q, k, v):                  # holds 0 (0.5 truncated): z + 0
    a = torch.tril(phi(q) @ phi(k).mT)
    z = a.sum(-1, keepdim=True)
    return (a @ v) / (z + torch.full_like(z, 0.5, dtype=torch.int64))


def quadratic_bfloat16_fill(q, k, v):             # holds 0.30078125
    a = torch.tril(phi(q) @ phi(k).mT)
    z = a.sum(-1, keepdim=True)
    return (a @ v) / (z + torch.full_like(z, 0.3, dtype=torch.bfloat16))


def linear_long_fill(q, k, v):                    # holds 2 (2.5 truncated)
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2)
    z = (qf * kf.cumsum(2)).sum(-1, keepdim=True)
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv) / (z + z.new_full((1,), 2.5, dtype=torch.long))


def scale_int_fill(q, k, v):                      # s * 1 (1.5 truncated)
    s = q @ k.mT
    s = s * torch.full_like(s, 1.5, dtype=torch.int32)
    a = torch.tril(1 + s + 0.5 * s * s)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def scale_float32_fill(q, k, v):                  # float32 0.3 in a float64 model
    s = (q @ k.mT) * torch.full((), 0.3, dtype=torch.float32)
    a = torch.tril(1 + s + 0.5 * s * s)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def quadratic_ones_column(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.ones(a.shape[-1], 1, dtype=a.dtype) + 1e-6)


def quadratic_ones_like_column(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.ones_like(v[..., :1]) + 1e-6)


def quadratic_twos_column(q, k, v):               # near-miss: 2 * the row sums
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.full((a.shape[-1], 1), 2.0, dtype=a.dtype) + 1e-6)


# row sums in every column: a product with a [T, Dv] fill, or einsum's vector of ones
def quadratic_ones_matrix(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.ones(a.shape[-1], v.shape[-1], dtype=a.dtype) + 1e-6)


def quadratic_ones_like_v(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.ones_like(v) + 1e-6)


def quadratic_einsum_ones(q, k, v):
    a = torch.tril(torch.einsum("bhid,bhjd->bhij", phi(q), phi(k)))
    z = torch.einsum("bhij,j->bhi", a, torch.ones(a.shape[-1], dtype=a.dtype))
    return torch.einsum("bhij,bhjd->bhid", a, v) / (z[..., None] + 1e-6)


def quadratic_twos_matrix(q, k, v):               # near-miss: 2 * the row sums in every column
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a @ torch.full((a.shape[-1], v.shape[-1]), 2.0, dtype=a.dtype) + 1e-6)


def quadratic_ones_matrix_weighted(q, k, v):      # near-miss: each column of the row sums weighted differently
    a = torch.tril(phi(q) @ phi(k).mT)
    w = torch.arange(1, v.shape[-1] + 1, dtype=a.dtype)
    return (a @ v) / ((a @ torch.ones(a.shape[-1], v.shape[-1], dtype=a.dtype)) * w + 1e-6)


def _square(gm, t) -> list[str]:
    """Nodes of a graph with two axes of the length t (the T x T weights or anything like them)."""
    found = []
    for node in gm.graph.nodes:
        val = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(val, torch.Tensor):
            sizes = [d.node.hint if isinstance(d, torch.SymInt) else int(d) for d in val.shape]
            if sizes.count(t) >= 2:
                found.append(node.name)
    return found


def _compile_and_compare(fn):
    """(reports, [(length, graphs compiled at it)]) after comparing compiled and eager at T = 11, 13."""
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    per_length = []
    with PassReports() as reports:
        for t in (11, 13):
            g = torch.Generator().manual_seed(t)
            q, k = (torch.randn(B, H, t, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
            v = torch.randn(B, H, t, DV, generator=g, dtype=torch.float64, requires_grad=True)
            before = len(graphs)
            out_c, out_e = compiled(q, k, v), fn(q, k, v)
            assert_rel_close(out_c, out_e, 1e-10, f"T={t}: output")
            cot = torch.randn(out_e.shape, generator=g, dtype=out_e.dtype)
            for name, gc, ge in zip("qkv", torch.autograd.grad(out_c, (q, k, v), cot),
                                    torch.autograd.grad(out_e, (q, k, v), cot)):
                assert_rel_close(gc, ge, 1e-10, f"T={t}: d{name}")
            per_length.append((t, graphs[before:]))
    assert len(reports.graphs) == 2, str(reports)
    return reports, per_length


@pytest.mark.parametrize("fn, eps", [(quadratic_full_like, 1e-4), (quadratic_fill_first_reciprocal, 1e-2),
                                     (linear_new_full, 1e-3), (quadratic_ones_column, 1e-6),
                                     (quadratic_ones_like_column, 1e-6), (quadratic_ones_matrix, 1e-6),
                                     (quadratic_ones_like_v, 1e-6), (quadratic_einsum_ones, 1e-6)],
                         ids=["full_like", "fill_first_reciprocal", "new_full", "ones_column", "ones_like_column",
                              "ones_matrix", "ones_like_v", "einsum_ones"])
def test_eps_written_as_a_fill_is_the_normalised_sites_eps(fn, eps):
    reports, per_length = _compile_and_compare(fn)
    for explanation in reports.graphs:
        assert len(explanation.sites) == 1 and not explanation.refusals, str(explanation)
        spec = explanation.sites[0].spec
        assert spec.normalize and spec.eps == pytest.approx(eps, rel=1e-12), str(reports)
    for t, graphs in per_length:
        assert graphs and all(not _square(gm, t) for gm in graphs), \
            f"T={t}: T x T tensors left: {[_square(gm, t) for gm in graphs]}"


@pytest.mark.parametrize("fn", [quadratic_running_fill, linear_running_fill], ids=["quadratic", "linear"])
def test_a_fill_that_is_not_one_number_is_not_an_eps(fn):
    reports, _ = _compile_and_compare(fn)
    for explanation in reports.graphs:
        assert not any(site.spec.normalize for site in explanation.sites), str(explanation)


@pytest.mark.parametrize("fn, eps", [(quadratic_int_fill, 0.0), (quadratic_bfloat16_fill, 0.30078125),
                                     (linear_long_fill, 2.0), (scale_int_fill, 1e-6), (scale_float32_fill, 1e-6)],
                         ids=["int", "bfloat16", "long", "int_scale", "float32_scale"])
def test_a_fill_is_the_number_its_dtype_holds(fn, eps, monkeypatch):
    """A fill of c in a dtype that does not hold c is the number it holds (with the probe off, as at long
    sequences: read as written, an int64 fill of 0.5 became eps = 0.5, an int32 fill of 1.5 a scale 1.5,
    errors 0.13-0.52, and the probe, which ran on the graph after the fills were read, did not see it)."""
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    reports, _ = _compile_and_compare(fn)
    for explanation in reports.graphs:
        for site in explanation.sites:
            assert not site.spec.normalize or site.spec.eps == pytest.approx(eps, rel=1e-12, abs=1e-300), str(site)



@pytest.mark.parametrize("fn", [quadratic_twos_column, quadratic_twos_matrix], ids=["column", "matrix"])
def test_row_sums_of_twos_are_refused_as_scaled(fn):
    reports, _ = _compile_and_compare(fn)
    for explanation in reports.graphs:
        assert not any(site.spec.normalize for site in explanation.sites), str(explanation)
        assert any(r.category == "normaliser" and "scaled by 2" in r.reason for r in explanation.refusals), \
            str(explanation)


def test_row_sums_in_every_column_of_a_symbolic_width():
    """a @ ones_like(v) where Dv changes between calls (a symbolic width under dynamic shapes): the row sums are
    broadcast to the width the fill has (the pass failed on this graph before: an expand to a SymInt)."""
    compiled = torch.compile(quadratic_ones_like_v, backend=based_compile.backend(inner="eager"))
    for t, dv in ((7, 5), (9, 6), (11, 3)):
        g = torch.Generator().manual_seed(t)
        q, k = (torch.randn(B, H, t, D, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(B, H, t, dv, generator=g, dtype=torch.float64)
        with PassReports() as reports:
            out = compiled(q, k, v)
        assert_rel_close(out, quadratic_ones_like_v(q, k, v), 1e-10, f"T={t} Dv={dv}")
        for explanation in reports.graphs:
            assert len(explanation.sites) == 1 and explanation.sites[0].spec.normalize, str(explanation)


def test_row_sums_weighted_per_column_are_not_a_normaliser():
    """Row sums spelled a @ ones(T, Dv), then multiplied by a weight per column: each column divides by another
    number, so the site is not normalised (values exact)."""
    reports, _ = _compile_and_compare(quadratic_ones_matrix_weighted)
    for explanation in reports.graphs:
        assert not any(site.spec.normalize for site in explanation.sites), str(explanation)


def linear_from_a_zero_state(q, k, v, fill=0.0):
    """The running sums started from a state the code makes with torch.zeros (or a near-miss: ones)."""
    qf, kf = phi(q), phi(k)
    s0 = torch.full((q.shape[0], q.shape[1], qf.shape[-1], v.shape[-1]), fill, dtype=q.dtype)
    kv = s0[:, :, None] + torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2)
    z = (qf * kf.cumsum(2)).sum(-1, keepdim=True)
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv) / (z + 1e-6)


def linear_from_a_state_of_ones(q, k, v):           # near-miss: kv starts at 1, the normaliser at 0
    return linear_from_a_zero_state(q, k, v, fill=1.0)


def test_running_sums_from_a_zero_state_made_in_the_code():
    """zeros + x is x: the state made by torch.zeros (read before as a zero initial state, then, once fills were
    read as numbers, as 'cumsum + 0.0', which no reader read: refused)."""
    reports, per_length = _compile_and_compare(linear_from_a_zero_state)
    for explanation in reports.graphs:
        assert len(explanation.sites) == 1 and explanation.sites[0].spec.normalize, str(explanation)
    for t, graphs in per_length:
        assert all("cumsum" not in str(n.target) for gm in graphs for n in gm.graph.nodes), f"T={t}"


def test_running_sums_from_a_state_of_ones_stay_exact():
    reports, _ = _compile_and_compare(linear_from_a_state_of_ones)
    for explanation in reports.graphs:
        assert explanation.sites or explanation.refusals, str(explanation)
