"""Based attention of a query block against a KV cache (Tq <= Tk): the operator and the graph pass.

The operator's causal mask for Tq < Tk is aligned to the end (query i sees keys j <= i + Tk - Tq).
Its reference here is the square (Tq == Tk) float64 reference over all Tk positions, with random
queries in front of the block, sliced to the block: independent of the Tq < Tk code paths.
"""
from __future__ import annotations

import re

import pytest
import sympy
import torch
import torch.nn as nn

import based_compile
from based_compile import BasedSpec, based_attention, config
from based_compile.graph import kv_mask
from based_compile.graph.mask import Keep
from based_compile.kernels.naive import naive_parallel_based
from based_compile.op import policy
from compare import assert_rel_close
from pass_reports import PassReports

B, H, DK, DV = 2, 4, 4, 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    config.kernel = "auto"


def _block_reference(q, k, v, layout, **kw):
    """o of the last Tq queries, through the square reference: random earlier queries in front."""
    tdim = 2 if layout == "BHTD" else 1
    tq, tk = q.shape[tdim], k.shape[tdim]
    shape = list(q.shape)
    shape[tdim] = tk - tq
    q_full = torch.cat([torch.randn(shape, dtype=q.dtype), q], dim=tdim)
    return naive_parallel_based(q_full, k, v, layout=layout, **kw).narrow(tdim, tk - tq, tq)


def _tensor(b, h, t, d, layout, seed):
    x = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x if layout == "BHTD" else x.transpose(1, 2).contiguous()).requires_grad_()


@pytest.mark.parametrize("kernel", ["cpu_quadratic", "cpu_chunked"])
@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
@pytest.mark.parametrize("tq,tk,hk,causal", [(1, 9, 4, True), (3, 9, 2, True), (5, 70, 4, True), (3, 9, 2, False)])
def test_op_query_block_against_cache_float64(kernel, layout, tq, tk, hk, causal):
    config.kernel = kernel
    q, k, v = _tensor(B, H, tq, DK, layout, 1), _tensor(B, hk, tk, DK, layout, 2), _tensor(B, hk, tk, DV, layout, 3)
    spec = BasedSpec(layout=layout, scale=0.4, c0=0.7, c1=1.1, c2=0.3, causal=causal, eps=1e-3)
    o = based_attention(q, k, v, spec)
    kw = dict(scale=0.4, coeffs=(0.7, 1.1, 0.3), causal=causal, eps=1e-3)
    ref = _block_reference(q, k, v, layout, **kw)
    assert_rel_close(o, ref, 1e-12, "o")
    g = torch.randn_like(o)
    for got, want, name in zip(torch.autograd.grad((o * g).sum(), (q, k, v)),
                               torch.autograd.grad((ref * g).sum(), (q, k, v)), "qkv"):
        assert_rel_close(got, want, 1e-11, f"d{name}")


def test_op_refuses_more_queries_than_keys():
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 3)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        based_attention(q, k, v, BasedSpec())
    with pytest.raises(ValueError, match="k and v must share"):
        based_attention(q[:, :, :2], k, v[:, :, :3], BasedSpec())


def test_op_fake_and_compiled_shapes():
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 5)
    torch.library.opcheck(torch.ops.based.attention.default, (q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6))
    out = torch.ops.based.attention(q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6)
    assert out[0].shape == (1, 2, 3, 5) and out[1].shape == (1, 2, 3)


def test_policy_names_the_cuda_fallback():
    d = policy.decide_for("cuda", True, 1, 16, 64, 16, torch.bfloat16, tk=4096)      # training: no decode backward
    assert d.kernel == "pytorch_quadratic" and "Tq == Tk" in d.reason
    d = policy.decide_for("cuda", False, 1, 16, 64, 16, torch.bfloat16, tk=4096)
    assert d.kernel == "decode" and "decode kernel" in d.reason
    assert policy.decide_for("cuda", False, 16, 16, 64, 16, torch.bfloat16, tk=4096).kernel == "decode"
    assert policy.decide_for("cuda", False, 17, 16, 64, 16, torch.bfloat16, tk=4096).kernel == "pytorch_quadratic"
    config.kernel = "parallel"                 # a forced kernel is not overridden by the decode kernel
    assert policy.decide_for("cuda", False, 1, 16, 64, 16, torch.bfloat16, tk=4096).kernel == "pytorch_quadratic"
    config.kernel = "auto"
    d = policy.decide_for("cuda", False, 16384 - 16, 16, 64, 256, torch.bfloat16, tk=16384)
    assert d.kernel == "pytorch_chunked"
    assert policy.decide_for("cpu", False, 1, 16, 64, 16, torch.float32, tk=4096).kernel == "cpu_quadratic"
    assert policy.decide_for("cuda", False, 64, 16, 64, 16, torch.float32, tk=64).kernel == "parallel"


# ----------------------------------------------------------------------------- the graph pass


def _poly(s):
    return 1 + s + 0.5 * s ** 2


def _normalised(a, v):
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def decode_no_mask(q, k, v):                      # q [B, H, 1, D] against the whole cache
    return _normalised(_poly(q @ k.transpose(-2, -1) / 2.0), v)


def block_tril_offset(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0.0)
    return _normalised(a, v)


def block_triu_fill(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(torch.matmul(q, k.transpose(-2, -1)) * 0.5)
    a = a.masked_fill(torch.triu(torch.ones(tq, tk, dtype=torch.bool), diagonal=tk - tq + 1), 0.0)
    return _normalised(a, v)


def block_arange(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    i = torch.arange(tq)[:, None] + (tk - tq)
    j = torch.arange(tk)[None, :]
    a = _poly(torch.einsum("bhid,bhjd->bhij", q, k) / 2.0)
    return _normalised(a * (j <= i), v)


class SlicedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32))

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        a = _poly(q @ k.transpose(-2, -1) / 2.0)
        a = a.masked_fill(self.bias[:, :, tk - tq:tk, :tk] == 0, 0.0)
        return _normalised(a, v)


def block_bthd(q, k, v):                          # [B, T, H, D] in and out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return block_tril_offset(q, k, v).transpose(1, 2)


def block_gqa_repeat(q, k, v):
    return block_tril_offset(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))


def decode_gqa_expand(q, k, v):
    b, hk, t, d = k.shape
    k = k[:, :, None].expand(b, hk, 2, t, d).reshape(b, hk * 2, t, d)
    v = v[:, :, None].expand(b, hk, 2, t, v.shape[-1]).reshape(b, hk * 2, t, v.shape[-1])
    return decode_no_mask(q, k, v)


# near-misses
def block_top_left(q, k, v):                      # query i sees keys j <= i: a different function
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(), 0.0)
    return _normalised(a, v)


def block_offset_off_by_one(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq - 1), 0.0)
    return _normalised(a, v)


def decode_cubic(q, k, v):
    s = q @ k.transpose(-2, -1) / 2.0
    return _normalised(_poly(s) + s ** 3, v)


def decode_mask_before_poly(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0.0)
    return _normalised(_poly(s), v)


def _inputs(tq, tk, *, layout="BHTD", hk=H, seed=0):
    return (_tensor(B, H, tq, DK, layout, seed).detach(), _tensor(B, hk, tk, DK, layout, seed + 1).detach(),
            _tensor(B, hk, tk, DV, layout, seed + 2).detach())


def based_calls(fn, *args):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == "based::attention"), out


ACCEPTED = [
    (decode_no_mask, 1, "BHTD", H, False),
    (block_tril_offset, 3, "BHTD", H, True),
    (block_triu_fill, 3, "BHTD", H, True),
    (block_arange, 4, "BHTD", H, True),
    (SlicedBuffer(), 3, "BHTD", H, True),
    (block_bthd, 3, "BTHD", H, True),
    (block_gqa_repeat, 3, "BHTD", 2, True),
    (decode_gqa_expand, 1, "BHTD", 2, False),
]


@pytest.mark.parametrize("fn,tq,layout,hk,causal", ACCEPTED, ids=lambda x: getattr(x, "__name__", None))
def test_kv_cache_forms_are_rewritten(fn, tq, layout, hk, causal):
    q, k, v = _inputs(tq, 9, layout=layout, hk=hk)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with PassReports() as reports:                  # explain()'s report, from the compile's own trace
        calls, out = based_calls(compiled, q, k, v)
    assert calls >= 1
    assert_rel_close(out, fn(q, k, v), 1e-12, "compiled vs eager")
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert len(report.sites) == 1 and not report.refusals, str(report)
        spec = report.sites[0].spec
        assert (spec.layout, spec.causal, spec.group, spec.scale * spec.c1) == (layout, causal, H // hk, 0.5)
        assert "KV cache" in report.sites[0].form


@pytest.mark.parametrize("fn,category,words", [
    (block_top_left, "mask", "top left"),
    (block_offset_off_by_one, "mask", "offset 5"),
    (decode_cubic, "polynomial", "degree 3"),
    (decode_mask_before_poly, "mask", "before the polynomial"),
], ids=lambda x: getattr(x, "__name__", None))
def test_kv_cache_near_misses_are_refused(fn, category, words):
    q, k, v = _inputs(3, 9)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    with PassReports() as reports:                  # explain()'s report, from the compile's own trace
        calls, out = based_calls(compiled, q, k, v)
    assert calls == 0
    assert_rel_close(out, fn(q, k, v), 1e-12, "compiled vs eager")
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert not report.sites, str(report)
        assert any(r.category == category and words in r.reason for r in report.refusals), str(report)


def test_kv_mask_classification():
    """kv_mask decides on the mask's predicate (``mask.Keep``, j - i <= offset), at [3, 7] and at every size."""
    def tril(d):
        return Keep.diagonal("tril", d)
    assert kv_mask.classify(tril(4), 3, 7) == ("causal", "")
    assert kv_mask.classify(Keep.const(True), 3, 7) == ("none", "")
    assert kv_mask.classify(tril(0), 3, 7)[0] == "refuse" and "top left" in kv_mask.classify(tril(0), 3, 7)[1]
    assert kv_mask.classify(Keep.diagonal("triu", 5), 3, 7)[0] == "refuse"
    assert "offset 2" in kv_mask.classify(tril(2), 3, 7)[1]
    band = tril(4) & ~tril(1)
    assert kv_mask.classify(band, 3, 7)[0] == "refuse"
    tq, tk = sympy.Symbol("s0", positive=True, integer=True), sympy.Symbol("s1", positive=True, integer=True)
    assert kv_mask.classify(Keep.causal(tk - tq), tq, tk) == ("causal", "")
    assert kv_mask.classify(tril(4), tq, tk)[0] == "refuse"      # Tk - Tq = 4 at the traced sizes only


def test_growing_cache_compiles_at_most_twice():
    """Chunked prefill then one query per step against a cache that grows each step: Dynamo
    compiles the decode function for the first length and once more with a dynamic Tk, not per step."""
    frames = []
    inner = based_compile.backend(inner="eager")

    def counting(gm, example_inputs):
        frames.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(block_tril_offset, backend=counting)
    q, k, v = _inputs(1, 12, seed=5)
    for tk in range(4, 12):
        args = (q, k[:, :, :tk], v[:, :, :tk])
        calls, out = based_calls(compiled, *args)
        assert calls >= 1, f"Tk={tk}: not rewritten"
        assert_rel_close(out, block_tril_offset(*args), 1e-12, f"Tk={tk}")
    assert len(frames) <= 2, f"{len(frames)} compilations for 8 decode steps"


def block_constant_offset(q, k, v):               # tril(2): equals Tk - Tq only at some lengths
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(2), 0.0)
    return _normalised(a, v)


def test_constant_offset_is_not_taken_for_tk_minus_tq_under_dynamic_lengths():
    """Traced at lengths where the constant 2 equals Tk - Tq, then run where it does not: the
    dynamic graph must not carry an end-aligned rewrite (it computed with error 1.5 before)."""
    compiled = torch.compile(block_constant_offset, backend=based_compile.backend(inner="eager"))
    for tq, tk in [(3, 5), (4, 6), (3, 6), (2, 7)]:
        q, k, v = _inputs(tq, tk, seed=tq * tk)
        assert_rel_close(compiled(q, k, v), block_constant_offset(q, k, v), 1e-12, f"Tq={tq} Tk={tk}")



@pytest.mark.parametrize("fn", [decode_no_mask, block_tril_offset], ids=lambda f: f.__name__)
def test_more_queries_than_keys_is_guarded(fn):
    """Under dynamic shapes, a call with Tq > Tk (refused: the scores have more rows than columns) does
    not leave every later length unrewritten: its graph is guarded to Tq > Tk, and Tq <= Tk recompiles and is
    rewritten (it was not: after calls at (9, 5) and (10, 6), (3, 11) ran without the operator, values exact)."""
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), dynamic=True)
    calls = []
    for tq, tk in ((9, 5), (10, 6), (3, 11), (4, 12), (11, 7)):
        args = _inputs(tq, tk, seed=tq + tk)
        calls.append(based_calls(compiled, *args)[0])
        assert_rel_close(based_calls(compiled, *args)[1], fn(*args), 1e-12, f"Tq={tq} Tk={tk}")
    assert [c > 0 for c in calls] == [False, False, True, True, False], calls

def normalize_tril_offset(q, k, v):               # F.normalize(p=1) of the KV-cache weights
    tq, tk = q.shape[-2], k.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0.0)
    return torch.nn.functional.normalize(a, p=1, dim=-1) @ v


def rectangular_products(q, k, v):               # near miss: matmuls with more rows than columns, no polynomial
    return (q @ k.transpose(-2, -1) / 2.0) @ v


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("fn", [decode_no_mask, block_tril_offset, normalize_tril_offset], ids=lambda f: f.__name__)
def test_more_queries_than_keys_is_refused_with_its_reason(fn, dynamic):
    """Tq > Tk (a block of 10 queries against 7 keys; masked by tril(Tk - Tq), its first rows empty) was
    neither a site nor a refusal in explain() (red team): it is refused, saying so, and runs as written."""
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"), dynamic=dynamic)
    with PassReports() as reports:
        for tq, tk in ((10, 7), (12, 8)):
            q, k, v = _inputs(tq, tk, seed=tq * tk)
            calls, out = based_calls(compiled, q, k, v)
            assert calls == 0
            assert_rel_close(out, fn(q, k, v), 1e-12, f"Tq={tq} Tk={tk}")
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert not report.sites, str(report)
        assert any(r.category == "mask" and "more queries" in r.reason for r in report.refusals), str(report)


def test_rectangular_products_without_a_polynomial_are_not_refused():
    compiled = torch.compile(rectangular_products, backend=based_compile.backend(inner="eager"))
    with PassReports() as reports:
        q, k, v = _inputs(10, 7, seed=3)
        assert_rel_close(compiled(q, k, v), rectangular_products(q, k, v), 1e-12, "compiled vs eager")
    assert all(not r.sites and not r.refusals for r in reports.graphs), str(reports)


# ----------------------------------------------------------------------------- a sliced buffer, growing cache
# bias[..., Tk - Tq:Tk, :Tk] (GPT-2's spelling) was refused once Tk became dynamic ('the mask slices a
# buffer at a length-dependent offset'): every decode step after the first ran unrewritten. The whole
# buffer is now checked to be a function of j - i, and the offset read symbolically.


class ShiftedBuffer(nn.Module):
    def __init__(self, rows: int, cols: int, band: int | None = None):
        super().__init__()
        mask = torch.tril(torch.ones(32, 32))
        if band is not None:
            mask = mask * torch.triu(torch.ones(32, 32), -band)
        self.register_buffer("bias", mask.view(1, 1, 32, 32))
        self.rows, self.cols = rows, cols              # row offset: Tk - Tq + rows; key columns from cols

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        a = _poly(q @ k.transpose(-2, -1) / 2.0)
        start = tk - tq + self.rows
        a = a.masked_fill(self.bias[:, :, start:start + tq, self.cols:self.cols + tk] == 0, 0.0)
        return _normalised(a, v)


@pytest.mark.parametrize("tq,rows,band,rewritten", [
    (3, 0, None, True),            # bias[..., Tk-Tq:Tk, :Tk]
    (1, 0, None, True),            # one query: bias[..., Tk-1:Tk, :Tk]
    (3, -1, None, False),          # one row up: query i sees keys j <= i + Tk - Tq - 1
    (1, -1, None, False),
    (3, 0, 4, False),              # a band buffer: windowed
], ids=["end", "end_tq1", "offbyone", "offbyone_tq1", "band"])
def test_sliced_buffer_against_a_growing_cache(tq, rows, band, rewritten):
    fn = ShiftedBuffer(rows, 0, band)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    for tk in (9, 10, 11, 12):
        q, k, v = (x.requires_grad_() for x in _inputs(tq, tk, seed=tk))
        calls, out = based_calls(compiled, q, k, v)
        ref = fn(q, k, v)
        assert (calls >= 1) == rewritten, f"Tk={tk}: based::attention ran {calls}x"
        assert_rel_close(out, ref, 1e-12, f"Tk={tk}")
        g = torch.randn_like(ref)
        for got, want, name in zip(torch.autograd.grad((out * g).sum(), (q, k, v)),
                                   torch.autograd.grad((ref * g).sum(), (q, k, v)), "qkv"):
            assert_rel_close(got, want, 1e-11, f"Tk={tk}: d{name}")


class NegativeStarts(nn.Module):
    """bias[-Tq:, -Tk:] of a 32 x 64 buffer: rows 32 - Tq + i, columns 64 - Tk + j, so it keeps
    j - i <= Tk - Tq - 32 (diagonal 0). Read as if the starts were -Tq and -Tk from 0, it would look
    end-aligned: a slice start that is negative at the traced lengths is refused ('from the end')."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(32, 64)))

    def forward(self, q, k, v):
        tq, tk = q.shape[-2], k.shape[-2]
        a = _poly(q @ k.transpose(-2, -1) / 2.0)
        return _normalised(a.masked_fill(self.bias[-tq:, -tk:] == 0, 0.0), v)


def test_buffer_sliced_from_the_end_is_refused_at_every_length():
    fn = NegativeStarts()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    for tq, tk in [(3, 9), (4, 10), (5, 11), (2, 12)]:
        q, k, v = _inputs(tq, tk, seed=tk)
        calls, out = based_calls(compiled, q, k, v)
        assert calls == 0, f"Tq={tq} Tk={tk}: rewritten"
        assert_rel_close(out, fn(q, k, v), 1e-12, f"Tq={tq} Tk={tk}")


# ----------------------------------------------------------------------------- new tokens concatenated to a cache
# Prefill, then blocks of 2 tokens (speculative verification) against k = cat([cache, new]): the
# mask is tril(past), Tk - Tq is past + new - Tq, equal to past because new == Tq is one of the
# graph's guards (the mask broadcasts against the scores). The dynamic graph refused it ('offset s82,
# not Tk - Tq = -s0 + s61 + s82'): every block after the prefill ran unrewritten.


def cat_cache(q, k_cache, v_cache, k_new, v_new, shift=0):
    past = k_cache.shape[-2]
    k, v = torch.cat([k_cache, k_new], -2), torch.cat([v_cache, v_new], -2)
    tq = q.shape[-2]
    a = _poly(q @ k.transpose(-2, -1) / 2.0)
    a = a.masked_fill(~torch.ones(tq, past + tq, dtype=torch.bool).tril(past + shift), 0.0)
    return _normalised(a, v), k, v


def cat_cache_one_ahead(q, k_cache, v_cache, k_new, v_new):       # near-miss: sees one key too many
    return cat_cache(q, k_cache, v_cache, k_new, v_new, shift=1)


@pytest.mark.parametrize("fn,rewritten", [(cat_cache, True), (cat_cache_one_ahead, False)],
                         ids=lambda x: getattr(x, "__name__", None))
def test_blocks_against_a_concatenated_cache(fn, rewritten):
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    g = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    runs = [(5, 0)] + [(2, past) for past in (5, 7, 9, 11)]
    for i, (tq, past) in enumerate(runs):
        args = (t(B, H, tq, DK), t(B, H, past, DK), t(B, H, past, DV), t(B, H, tq, DK), t(B, H, tq, DV))
        calls, out = based_calls(compiled, *args)
        ref = fn(*args)
        if tq == 2:
            assert (calls >= 1) == rewritten, f"Tq={tq} past={past}: based::attention ran {calls}x"
        for got, want in zip(out, ref):
            assert_rel_close(got, want, 1e-12, f"Tq={tq} past={past}")


# ----------------------------------------------------------------------------- one mask, two caches
# HF's DynamicCache decoding: the mask is built once from the first layer's cache length and sliced to
# each layer's keys (attention_mask[:, :, :, :k.shape[-2]]). Under dynamic shapes each layer's cache
# length is its own symbol: the second layer's mask fits the operator only where the two are equal.
# They are equal where traced: the pass guards them equal (as Dynamo guards what it traced), and both
# layers are rewritten; a call with caches of other lengths recompiles, and that graph's second layer
# (its mask offset is the first cache's, not its own Tk - Tq) is refused, with sizes by their values.


def two_caches_one_mask(q, k0, v0, k1, v1):
    tq = q.shape[-2]
    past = k0.shape[-2] - tq
    position = torch.arange(past, past + tq)
    mask = (torch.arange(past + tq)[None, :] <= position[:, None])[None, None]
    out = []
    for k, v in ((k0, v0), (k1, v1)):
        a = _poly(q @ k.transpose(-2, -1) / 2.0)
        a = a.masked_fill(~mask[:, :, :, :k.shape[-2]], 0.0)
        out.append(_normalised(a, v))
    return out[0] + out[1]


def test_one_mask_sliced_to_two_caches_is_rewritten_in_both():
    compiled = torch.compile(two_caches_one_mask, backend=based_compile.backend(inner="eager"))
    g = torch.Generator().manual_seed(4)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    with PassReports() as reports:
        for tk in (6, 7, 8, 9):                              # the second call compiles the dynamic graph
            args = (t(B, H, 1, DK), t(B, H, tk, DK), t(B, H, tk, DV), t(B, H, tk, DK), t(B, H, tk, DV))
            compiled(*args)                                 # compiles (not counted: tracing runs the op too)
            calls, out = based_calls(compiled, *args)
            assert calls == 2, f"Tk={tk}: based::attention ran {calls}x"
            assert_rel_close(out, two_caches_one_mask(*args), 1e-12, f"Tk={tk}")
    assert len(reports.graphs) == 2, str(reports)
    for report in reports.graphs:
        assert len(report.sites) == 2 and not report.refusals, str(report)
    with PassReports() as reports:                          # the second cache shorter: the guard fails
        for tk0, tk1 in ((9, 7), (10, 8)):
            args = (t(B, H, 1, DK), t(B, H, tk0, DK), t(B, H, tk0, DV), t(B, H, tk1, DK), t(B, H, tk1, DV))
            compiled(*args)
            calls, out = based_calls(compiled, *args)
            assert calls == 1, f"Tk={tk0}, {tk1}: based::attention ran {calls}x"
            assert_rel_close(out, two_caches_one_mask(*args), 1e-12, f"Tk={tk0}, {tk1}")
    assert reports.graphs, str(reports)
    for report in reports.graphs:
        assert len(report.sites) == 1 and len(report.refusals) == 1, str(report)
        reason = report.refusals[0].reason
        assert "not aligned to the end of the keys" in reason, reason
        assert re.search(r"\bs\d+\b", reason) is None, reason          # no symbol names: sizes by value
