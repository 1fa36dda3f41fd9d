"""Multi-query attention whose matmuls fold heads with time into their rows (issue 15, item 4).

``einsum("bthd,bsd->bhts", q, k[:, :, 0])`` lowers to ``bmm([B, H*T, D], [B, D, S])``: the scores
are [.., T, T] only after a view splits the rows, and the weights times v fold (time, heads). The
old code saw no square matmul: "0 sites, 0 refusals". Now such a matmul is rewritten, in the
lowered graph, as the batched matmul it is (``graph/folded_rows.py``, an identity), k and v of one
head without a heads axis ([B, T, D]) are read as one key/value head, and every folded region no
reader explains gets a refusal that says what is folded (``graph/lookalike.py``).

Each accepted program is compiled at two lengths (the second recompiles with a symbolic length) and
compared with eager in float64, values and gradients of every input, with the numerical probe on
and off; the sites are counted, so a refusal cannot pass for a rewrite. Each near-miss is refused
and computes what eager does.
"""
from __future__ import annotations

import pytest
import torch

import based_compile
from compare import assert_rel_close
from test_coverage import Recorder

B, H, D, DV = 2, 3, 4, 5
TOL = 1e-10


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


@pytest.fixture(params=["probe", "structure"])
def probe(request, monkeypatch):
    """The numerical probe on, or off (as above its size limit: every real model)."""
    if request.param == "structure":
        monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr("based_compile.graph.feature_normaliser.INDEX_MAX_ELEMENTS", 0)
    return request.param


def _poly(s):
    return 1 + s + 0.5 * s * s


def _causal(a, tq, tk=None):
    tk = tq if tk is None else tk
    return a.masked_fill(~torch.ones(tq, tk, dtype=torch.bool, device=a.device).tril(tk - tq), 0)


def _z_bthd(a):
    return a.sum(-1).transpose(1, 2)[..., None] + 1e-6


# ----------------------------------------------------------------------------- exact forms


def issue_reproducer(q, k, v):
    """The issue's program: one key head selected, BTHD, causal, normalised."""
    kk, vv = k[:, :, 0], v[:, :, 0]
    s = torch.einsum("bthd,bsd->bhts", q, kk) * 0.25
    a = _causal(_poly(s), q.shape[1])
    return torch.einsum("bhts,bsd->bthd", a, vv) / _z_bthd(a)


def bthd_noncausal_unnormalised(q, k, v):
    kk, vv = k[:, :, 0], v[:, :, 0]
    return torch.einsum("bhts,bsd->bthd", _poly(torch.einsum("bthd,bsd->bhts", q, kk) * 0.25), vv)


def bhtd_causal_unnormalised(q, k, v):
    kk, vv = k[:, 0], v[:, 0]
    s = torch.einsum("bhtd,bsd->bhts", q, kk) * 0.5
    return torch.einsum("bhts,bsd->bhtd", _causal(_poly(s), q.shape[2]), vv)


def bhtd_noncausal_normalised(q, k, v):
    kk, vv = k[:, 0], v[:, 0]
    a = _poly(torch.einsum("bhtd,bsd->bhts", q / 2, kk))
    return torch.einsum("bhts,bsd->bhtd", a, vv) / (a.sum(-1, keepdim=True) + 1e-6)


def bhtd_reshape_bmm(q, k, v):
    """Heads folded by hand: q.reshape(B, H*T, D) @ k^T, viewed back."""
    b, h, t, d = q.shape
    kk, vv = k[:, 0], v[:, 0]
    s = torch.bmm(q.reshape(b, h * t, d), kk.transpose(1, 2)).view(b, h, t, t) * 0.25
    a = _causal(_poly(s), t)
    return torch.bmm(a.reshape(b, h * t, t), vv).view(b, h, t, -1) / (a.sum(-1, keepdim=True) + 1e-6)


def bthd_index_select_and_other_head_for_v(q, k, v):
    """k's head chosen by index_select, v from another head: Based attention of those tensors."""
    kk = k.index_select(2, torch.tensor([0])).squeeze(2)
    vv = v[:, :, 1]
    s = torch.einsum("bthd,bsd->bhts", q, kk) * 0.25
    a = _causal(_poly(s), q.shape[1])
    return torch.einsum("bhts,bsd->bthd", a, vv) / _z_bthd(a)


def bthd_kv_cache_aligned_to_the_end(q, k, v):
    """Two queries against the whole cache, the causal mask aligned to the end."""
    qq, kk, vv = q[:, -2:], k[:, :, 0], v[:, :, 0]
    s = torch.einsum("bthd,bsd->bhts", qq, kk) * 0.25
    a = _causal(_poly(s), 2, kk.shape[1])
    return torch.einsum("bhts,bsd->bthd", a, vv) / _z_bthd(a)


def bthd_grouped_einsum(q, k, v):
    """Grouped query heads written as a 5-d einsum over (groups, heads per group), one group."""
    b, t, h, d = q.shape
    s = torch.einsum("btgrd,bsgd->bgrts", q.view(b, t, 1, h, d), k[:, :, :1]) * 0.25
    a = _causal(_poly(s), t)
    o = torch.einsum("bgrts,bsgd->btgrd", a, v[:, :, :1]) / (a.sum(-1).permute(0, 3, 1, 2)[..., None] + 1e-6)
    return o.reshape(b, t, h, -1)


def _phi(x):
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([torch.ones_like(x[..., :1]), x * d ** -0.25, x2 / (2 * d) ** 0.5], -1)


def bhtd_feature_map_quadratic(q, k, v):
    """The Taylor feature maps' quadratic form, one key/value head without its axis."""
    a = _causal(torch.einsum("bhtf,bsf->bhts", _phi(q), _phi(k[:, 0])), q.shape[2])
    return torch.einsum("bhts,bsd->bhtd", a, v[:, 0]) / (a.sum(-1, keepdim=True) + 1e-6)


EXACT = {
    "issue_reproducer": (issue_reproducer, "BTHD"),
    "bthd_noncausal_unnormalised": (bthd_noncausal_unnormalised, "BTHD"),
    "bhtd_causal_unnormalised": (bhtd_causal_unnormalised, "BHTD"),
    "bhtd_noncausal_normalised": (bhtd_noncausal_normalised, "BHTD"),
    "bhtd_reshape_bmm": (bhtd_reshape_bmm, "BHTD"),
    "bthd_index_select_and_other_head_for_v": (bthd_index_select_and_other_head_for_v, "BTHD"),
    "bthd_kv_cache_aligned_to_the_end": (bthd_kv_cache_aligned_to_the_end, "BTHD"),
    "bthd_grouped_einsum": (bthd_grouped_einsum, "BTHD"),
    "bhtd_feature_map_quadratic": (bhtd_feature_map_quadratic, "BHTD"),
}


def _qkv(t, layout, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = ([(B, t, H, D), (B, t, H, D), (B, t, H, DV)] if layout == "BTHD" else
              [(B, H, t, D), (B, H, t, D), (B, H, t, DV)])
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def _compare(fn, layout, lengths=(6, 9)) -> Recorder:
    """Compile with the based backend, call at each length, compare values and gradients with eager."""
    recorder = Recorder()
    compiled = torch.compile(fn, backend=based_compile.backend(inner=recorder))
    for t in lengths:
        inputs = _qkv(t, layout, 100 + t)
        got, want = ([x.clone().requires_grad_(True) for x in inputs] for _ in range(2))
        out_c, out_e = compiled(*got), fn(*want)
        cot = torch.randn(out_e.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        assert_rel_close(out_c, out_e, TOL, f"T={t}: output")
        for i, (c, e) in enumerate(zip(torch.autograd.grad(out_c, got, cot, allow_unused=True),
                                       torch.autograd.grad(out_e, want, cot, allow_unused=True))):
            assert (c is None) == (e is None), f"T={t}: input {i} has a gradient in one of compiled, eager"
            if e is not None:
                assert_rel_close(c, e, TOL, f"T={t}: gradient of input {i}")
    return recorder


@pytest.mark.parametrize("name", list(EXACT))
def test_folded_multi_query_attention_is_rewritten_exactly(name, probe):
    fn, layout = EXACT[name]
    recorder = _compare(fn, layout)
    assert recorder.sites() == [1, 1], recorder.sites()


def test_the_issue_reproducer_is_explained_as_one_site():
    ex = based_compile.explain(issue_reproducer, *_qkv(9, "BTHD", 0))
    assert len(ex.sites) == 1 and not ex.refusals, ex
    site = ex.sites[0]
    assert site.spec.layout == "BTHD" and site.spec.group == H and site.spec.causal and site.spec.normalize, ex
    assert "test_folded_rows.py" in site.source, site.source      # the user's line, not a graph node


# ----------------------------------------------------------------------------- near-misses


def output_folded_in_the_other_order(q, k, v):
    """The product's rows are (heads, time); the output reads them back as (time, heads)."""
    b, t, h, d = q.shape
    kk, vv = k[:, :, 0], v[:, :, 0]
    s = (q.transpose(1, 2).reshape(b, h * t, d) @ kk.mT).view(b, h, t, t) * 0.25
    a = _causal(_poly(s), t)
    return (a.reshape(b, h * t, t) @ vv).view(b, t, h, -1)


def scores_split_in_the_other_order(q, k, v):
    """q's rows folded as (time, heads), the scores split as (heads, time)."""
    b, t, h, d = q.shape
    kk, vv = k[:, :, 0], v[:, :, 0]
    s = (q.reshape(b, t * h, d) @ kk.mT).view(b, h, t, t) * 0.25
    a = _causal(_poly(s), t)
    return torch.einsum("bhts,bsd->bthd", a, vv) / _z_bthd(a)


def mask_over_the_folded_rows(q, k, v):
    """tril over the [H*T, T] rows: every head after the first sees every key."""
    b, t, h, d = q.shape
    kk, vv = k[:, :, 0], v[:, :, 0]
    a = _poly((q.transpose(1, 2).reshape(b, h * t, d) @ kk.mT) * 0.25)
    a = a.masked_fill(~torch.ones(h * t, t, dtype=torch.bool, device=a.device).tril(), 0)
    return (a @ vv).view(b, h, t, -1).transpose(1, 2)


def normaliser_over_the_queries(q, k, v):
    kk, vv = k[:, :, 0], v[:, :, 0]
    a = _causal(_poly(torch.einsum("bthd,bsd->bhts", q, kk) * 0.25), q.shape[1])
    return torch.einsum("bhts,bsd->bthd", a, vv) / (a.sum(-2).transpose(1, 2)[..., None] + 1e-6)


def one_query_head_against_every_key_head(q, k, v):
    """Heads folded into the columns: q of one head scored against the keys of every head."""
    qq = q[:, 0]
    a = _causal(_poly(torch.einsum("btd,bhsd->bhts", qq, k) * 0.25), q.shape[2])
    return torch.einsum("bhts,bhsd->bhtd", a, v)


def keys_shared_over_the_batch(q, k, v):
    """Rows fold batch, heads and time against the keys of the first batch entry."""
    b, h, t, d = q.shape
    s = (q.reshape(b * h * t, d) @ k[0, 0].T).view(b, h, t, t) * 0.25
    a = _causal(_poly(s), t)
    return (a.reshape(-1, t) @ v[0, 0]).view(b, h, t, -1)


def rows_folded_by_cat(q, k, v):
    """Exact, but the rows are a cat of the heads: no view folds them, so nothing unfolds them."""
    b, h, t, d = q.shape
    rows = torch.cat([q[:, i] for i in range(h)], 1)
    a = _causal(_poly((rows @ k[:, 0].mT).view(b, h, t, t) * 0.25), t)
    return torch.einsum("bhts,bsd->bhtd", a, v[:, 0])


def running_sums_without_a_heads_axis(q, k, v):
    """The running-sum form with k[:, 0]: read only with the heads axis kept (k[:, :1]); the reason
    names the select as a head picked, not as a token left out."""
    qf, kf = _phi(q), _phi(k[:, 0])
    kv = torch.einsum("btf,btd->btfd", kf, v[:, 0]).cumsum(1)
    den = torch.einsum("bhtf,btf->bht", qf, kf.cumsum(1))[..., None] + 1e-6
    return torch.einsum("bhtf,btfd->bhtd", qf, kv) / den


# (program, layout, category or None, words the reasons must hold)
NEAR_MISSES = {
    "output_folded_in_the_other_order": (output_folded_in_the_other_order, "BTHD", "verify", []),
    "scores_split_in_the_other_order": (scores_split_in_the_other_order, "BTHD", "unsupported",
                                        ["regroups", "[2, 7, 3, 7] -> [2, 3, 7, 7]"]),
    "mask_over_the_folded_rows": (mask_over_the_folded_rows, "BTHD", "unsupported",
                                  ["regroups", "masked_fill", "[2, 3, 7, 7] -> [2, 21, 7]"]),
    "normaliser_over_the_queries": (normaliser_over_the_queries, "BTHD", "normaliser", ["over the queries"]),
    "one_query_head_against_every_key_head": (one_query_head_against_every_key_head, "BHTD", "unsupported",
                                              ["columns", "several key heads", "[2, 7, 21]"]),
    "keys_shared_over_the_batch": (keys_shared_over_the_batch, "BHTD", "unsupported", ["(7, 4)"]),
    "rows_folded_by_cat": (rows_folded_by_cat, "BHTD", "unsupported", ["into its rows", "[2, 21, 7]"]),
    "running_sums_without_a_heads_axis": (running_sums_without_a_heads_axis, "BHTD", "unsupported",
                                          ["select", "heads axis is kept"]),
}


@pytest.mark.parametrize("name", list(NEAR_MISSES))
def test_folded_near_miss_is_refused_with_its_reason(name, probe):
    fn, layout, category, words = NEAR_MISSES[name]
    ex = based_compile.explain(fn, *_qkv(7, layout, 0))
    assert not ex.sites and ex.refusals, ex
    reasons = " | ".join(r.reason for r in ex.refusals)
    for word in words:
        assert word in reasons, ex
    assert "a token left out" not in reasons, ex
    if category is not None and not (category == "verify" and probe == "structure"):
        assert category in [r.category for r in ex.refusals], ex


@pytest.mark.parametrize("name", ["output_folded_in_the_other_order", "mask_over_the_folded_rows"])
def test_folded_near_miss_computes_what_eager_does(name, probe):
    fn, layout, _, _ = NEAR_MISSES[name]
    assert _compare(fn, layout).sites() == [0, 0]


@pytest.mark.parametrize("name", ["issue_reproducer", "scores_split_in_the_other_order", "output_folded_in_the_other_order"])
def test_heads_equal_to_the_length_is_rewritten_only_where_exact(name, probe):
    """At H == T (the traced length) a fold in one order and a split in the other are the same
    reshape; what is rewritten there must still be what the code computes, and at another length
    (a symbolic one) the near-misses are refused."""
    fn, layout = EXACT[name] if name in EXACT else NEAR_MISSES[name][:2]
    recorder = _compare(fn, layout, lengths=(H, 5))
    assert recorder.sites()[1] == (1 if name in EXACT else 0), recorder.sites()


# ----------------------------------------------------------------------------- the kernel


def test_triton_kernel_reads_the_selected_head_under_the_interpreter(monkeypatch):
    """The operator gets k[:, :, 0] unsqueezed (a strided view of k): the parallel Triton kernel, forced
    under the interpreter, computes the issue's program (float32; values and gradients against float64
    eager)."""
    from based_compile.op import config

    monkeypatch.setattr(config, "kernel", "parallel")
    base = _qkv(9, "BTHD", 3)
    args = [x.float().requires_grad_() for x in base]
    ref = [x.detach().double().requires_grad_() for x in args]
    recorder = Recorder()
    got = torch.compile(issue_reproducer, backend=based_compile.backend(inner=recorder))(*args)
    want = issue_reproducer(*ref)
    assert recorder.sites() == [1], recorder.sites()
    cot = torch.randn(want.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_rel_close(got, want, 1e-5, "values")
    for name, x, w in zip("qkv", torch.autograd.grad(got, args, cot.float()), torch.autograd.grad(want, ref, cot)):
        assert_rel_close(x, w, 1e-5, f"d{name}")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["BTHD", "BHTD"])
def test_gpu_folded_multi_query_attention(dtype, layout, no_tf32):
    """On CUDA (Inductor inner): the issue's spelling (BTHD) and its BHTD twin at Dk = 16, Dv = 64,
    H = 8, T = 700, one key/value head selected from k and v; the kernels read k and v unsqueezed.
    Output and gradients of q, k, v against float64 eager; based::attention runs."""
    from based_calls import BasedOpCounter

    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    b, h, t, dk, dv = 2, 8, 700, 16, 64

    def code(q, k, v):
        if layout == "BTHD":
            return issue_reproducer(q, k, v)
        s = torch.einsum("bhtd,bsd->bhts", q, k[:, 0]) * 0.25
        a = _causal(_poly(s), q.shape[2])
        return torch.einsum("bhts,bsd->bhtd", a, v[:, 0]) / (a.sum(-1, keepdim=True) + 1e-6)

    shape = (lambda d: (b, t, h, d)) if layout == "BTHD" else (lambda d: (b, h, t, d))
    base = [torch.randn(*shape(d), generator=g, dtype=torch.float64) * s for d, s in ((dk, 0.5), (dk, 0.5), (dv, 1))]
    args = [x.to("cuda", dtype).requires_grad_() for x in base]
    ref_args = [x.detach().double().requires_grad_() for x in args]
    want = code(*ref_args)
    torch._dynamo.reset()
    compiled = torch.compile(code, backend="based")
    got = compiled(*args)
    cot = torch.randn_like(want)
    grads = torch.autograd.grad(got, args, cot.to(dtype))
    wants = torch.autograd.grad(want, ref_args, cot)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert_rel_close(got, want, tol, "values")
    for name, x, w in zip("qkv", grads, wants):
        assert_rel_close(x, w, 2 * tol, f"d{name}")
    with BasedOpCounter() as counter:        # the compiled graph again: nothing compiles here
        compiled(*args)
    assert counter.total >= 1, counter.calls
