"""Under torch.autocast, q, k and v of different dtypes (graph/autocast_scope.py: lower_region,
operator_precision).

The common layout: q and k come from ``nn.Linear`` (bfloat16/float16 under autocast) while v is float32 (the raw
input, or an op run with autocast off), or the other way round. Such a graph is valid only under autocast (a
bfloat16 @ float32 matmul exists only there), and the pass, which reads a graph with autocast off, could not
lower it: it fell back to a reading with autocast's casts in it, which no reader reads through, and refused the
site with a misleading reason ("v is an intermediate value of an operation ... a custom op that writes it in
place", "the chain goes through convert_element_type"), or recorded an internal error (a float32 q and k against
a float16 v; a feature map cast by ``.float()`` inside it). Now the graph is lowered as traced with autocast's
casts taken out and its dtypes read as written, and one rule decides the operator's precision for every mix:
cast as a matmul (all to autocast's dtype, as eager's matmuls cast them) or, for a site autocast leaves alone,
all in the widest dtype. Every mix below is rewritten, with eager's output dtype and values and gradients no
further from float64 than eager's own; near misses are refused with the reason, the probe off as at real sizes.
"""
from __future__ import annotations

import logging
import math
import zlib

import pytest
import torch
import torch.nn as nn

import based_compile
from based_calls import BasedOpCounter
from pass_reports import PassReports

B, H, T, D, DV = 2, 2, 11, 4, 5
LOW = {"bf16": torch.bfloat16, "f16": torch.float16}

pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def phi(x):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25, x2], -1)


def phi_float(x):                          # the features computed in float32 whatever x is (a .float() in the map)
    return phi(x.float())


def phi_pairs(x):                          # the compressed map: x_a^2 and sqrt(2) x_a x_b over triu_indices
    iu, ju = torch.triu_indices(D, D, 1, device=x.device)
    pairs = torch.cat([x * x, x[..., iu] * x[..., ju] * math.sqrt(2)], -1) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([x[..., :1] ** 0, x / D ** 0.25, pairs], -1)


def polynomial(q, k, v):
    s = q @ k.mT / 2
    a = torch.tril(1 + s + 0.5 * s * s)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def feature_map(q, k, v, map_=phi):
    a = torch.tril(map_(q) @ map_(k).mT)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def feature_map_float(q, k, v):
    return feature_map(q, k, v, phi_float)


def feature_map_pairs(q, k, v):
    return feature_map(q, k, v, phi_pairs)


def linear_einsum(q, k, v):               # outer product in the operands' promoted dtype, readout by bmm (cast)
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhnf,bhnd->bhnfd", kf, v).cumsum(2)
    den = torch.einsum("bhnf,bhnf->bhn", qf, kf.cumsum(2))[..., None]
    return torch.einsum("bhnf,bhnfd->bhnd", qf, kv) / (den + 1e-6)


def linear_broadcast(q, k, v):            # products and sums only: autocast leaves it alone (type promotion)
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    return (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


def non_causal(q, k, v):
    qf, kf = phi(q), phi(k)
    return (qf @ (kf.mT @ v)) / (qf @ kf.sum(2)[..., None] + 1e-6)


FORMS = [polynomial, feature_map, feature_map_float, feature_map_pairs, linear_einsum, linear_broadcast, non_causal]
MIXES = ["low,low,f32", "f32,f32,low", "low,f32,f32", "f32,low,f32"]


def _dtypes(mix: str, low: torch.dtype) -> list:
    return [low if d == "low" else torch.float32 for d in mix.split(",")]


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _no_worse_than_eager(got, want, reference, what):
    """eager's dtype, and no further from the float64 reference than eager's own autocast result (2x: eager rounds
    intermediates the operator keeps in float32, and the other way round, differently on every seed)."""
    assert got.dtype == want.dtype, f"{what}: {got.dtype} where eager gives {want.dtype}"
    err, eager_err = (got.double() - reference).norm(), (want.double() - reference).norm()
    assert err <= 2 * eager_err + 1e-6 * reference.norm(), f"{what}: {err:.3e} against eager's {eager_err:.3e}"


def check_mixed(fn, dtypes, low, seed, *, reference_fn=None, extra=(), grad=True, inner="aot_eager"):
    """Compile ``fn`` under autocast at ``low`` on q, k, v of ``dtypes`` (then ``extra`` float32 tensors): the
    operator runs, each result has eager's dtype and values, and q, k, v's gradients (float64 reference) are no
    further off than eager's; the report has the site and no refusal. Returns the report."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T, D), (B, H, T, D), (B, H, T, DV)]
    base = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    qkv = [x.to(d).requires_grad_(grad) for x, d in zip(base, dtypes)]
    rest = [x.float() for x in extra]
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    with PassReports() as reports, torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=low):
        want = _tuple(fn(*qkv, *[x.clone() for x in rest]))
        compiled(*qkv, *[x.clone() for x in rest])
        with BasedOpCounter() as counter:
            got = _tuple(compiled(*qkv, *[x.clone() for x in rest]))
    report = reports.merged()
    assert counter.total >= 1 and report.sites and not report.refusals, report
    base64 = [x.clone().requires_grad_(grad) for x in base]
    reference = _tuple((reference_fn or fn)(*base64, *[x.double() for x in extra]))
    for i, (a, b, r) in enumerate(zip(got, want, reference)):
        _no_worse_than_eager(a, b, r, f"result {i}")
    if grad:
        cot = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in reference]
        grads = [torch.autograd.grad(out, qkv, [c.to(o.dtype) for c, o in zip(cot, out)]) for out in (got, want)]
        grads_ref = torch.autograd.grad(reference, base64, cot)
        for name, a, b, r in zip("qkv", *grads, grads_ref):
            _no_worse_than_eager(a, b, r, f"d{name}")
    return report


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("fn", FORMS, ids=lambda f: f.__name__)
def test_every_mix_of_operand_dtypes_is_rewritten_as_eager_computes_it(fn, mix, low):
    """q and k low with v float32, v low with q and k float32, one of q or k float32, features cast by
    ``.float()`` inside the map: rewritten, in eager's output dtype, values and gradients within eager's error."""
    check_mixed(fn, _dtypes(mix, LOW[low]), LOW[low], seed=zlib.crc32(f"{fn.__name__} {mix} {low}".encode()) % 1000,
                reference_fn=feature_map if fn is feature_map_float else None)


@pytest.mark.parametrize("mix", ["low,low,f32", "f32,f32,low"])
@pytest.mark.parametrize("fn", FORMS, ids=lambda f: f.__name__)
def test_autocast_entered_inside_the_compiled_code(fn, mix):
    """``with torch.autocast(...)`` inside the compiled function around mixed operand dtypes: the graph is valid
    only inside that block, which the caller's settings do not show (the pass failed on it: "internal error of
    the pass: RuntimeError: expected scalar type ..." in explain()); each node is lowered under the block it
    runs in. Rewritten, and explain() names the dtype q, k, v are cast to."""
    def inside(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(q, k, v)

    g = torch.Generator().manual_seed(zlib.crc32(f"inside {fn.__name__} {mix}".encode()))
    base = [torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (D, D, DV)]
    qkv = [x.to(dt).requires_grad_() for x, dt in zip(base, _dtypes(mix, torch.bfloat16))]
    compiled = torch.compile(inside, backend=based_compile.backend(inner="aot_eager"))
    with PassReports() as reports:
        want = inside(*qkv)
        compiled(*qkv)
        with BasedOpCounter() as counter:
            got = compiled(*qkv)
    report = reports.merged()
    assert counter.total == 1 and len(report.sites) == 1 and not report.refusals, report
    if fn is polynomial:
        dtypes = mix.replace("low", "bfloat16").replace("f32", "float32").replace(",", ", ")
        assert report.sites[0].form.endswith(f"(q, k, v of {dtypes} cast to bfloat16)"), report
    reference = (feature_map if fn is feature_map_float else fn)(*(x.clone().requires_grad_() for x in base))
    _no_worse_than_eager(got, want, reference, "output")


@pytest.mark.parametrize("mix", ["low,low,f32", "f32,f32,low"])
@pytest.mark.parametrize("fn", [polynomial, feature_map_pairs, linear_einsum, linear_broadcast, non_causal],
                         ids=lambda f: f.__name__)
def test_mixed_operand_dtypes_without_the_probe(fn, mix, monkeypatch):
    """The same without the numerical probe (as at real sizes), under dynamic shapes: the structural reading of
    the graph lowered as traced, autocast's casts taken out, stands alone."""
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    g = torch.Generator().manual_seed(5)
    dtypes = _dtypes(mix, torch.bfloat16)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"), dynamic=True)
    for t in (7, 13):
        q, k, v = (torch.randn(B, H, t, d, generator=g).to(dt) for d, dt in zip((D, D, DV), dtypes))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = fn(q, k, v)
            compiled(q, k, v)
            with BasedOpCounter() as counter:
                got = compiled(q, k, v)
        assert counter.total == 1, counter.calls
        reference = fn(*(x.double() for x in (q, k, v)))
        _no_worse_than_eager(got, want, reference, f"T={t}")


# ------------------------------------------------------------------ the model layout: q, k from nn.Linear
class Mixer(nn.Module):
    """q and k projected by nn.Linear (autocast's dtype), v the block's input itself ("x") or projected with
    autocast off ("float32_projection"): float32; heads split by views, BTHD -> BHTD."""

    def __init__(self, form: str, v_from: str, d_model: int = 2 * DV):
        super().__init__()
        self.form, self.v_from = form, v_from
        self.wide = torch.float32               # the float64 reference model: float64
        self.q_proj, self.k_proj = nn.Linear(d_model, 2 * D, bias=False), nn.Linear(d_model, 2 * D, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, 2, D).transpose(1, 2)
        k = self.k_proj(x).view(b, t, 2, D).transpose(1, 2)
        if self.v_from == "x":
            v = x
        else:
            with torch.autocast("cpu", enabled=False):
                v = self.v_proj(x.to(self.wide))
        v = v.view(b, t, 2, DV).transpose(1, 2)
        y = {"polynomial": polynomial, "feature_map": feature_map, "linear_cumsum": linear_broadcast}[self.form](q, k, v)
        return y.transpose(1, 2).reshape(b, t, 2 * DV)


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("v_from", ["x", "float32_projection"])
@pytest.mark.parametrize("form", ["polynomial", "feature_map", "linear_cumsum"])
def test_q_k_from_linear_v_float32(form, v_from, low):
    """The brief's layout: bfloat16/float16 q, k from nn.Linear, float32 v (the raw input, or an op autocast is
    off for: a switch around v's projection is not a switch inside the attention). Rewritten; output dtype,
    values and gradients (input and weights) as eager's, within its error against float64."""
    torch.manual_seed(3)
    model = Mixer(form, v_from)
    model64 = Mixer(form, v_from).double()
    model64.wide = torch.float64
    model64.load_state_dict(model.state_dict())
    x = torch.randn(2, T, 2 * DV, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    compiled = torch.compile(model, backend=based_compile.backend(inner="aot_eager"))
    with PassReports() as reports, torch.autocast("cpu", dtype=LOW[low]):
        want = model(x)
        compiled(x)
        with BasedOpCounter() as counter:
            got = compiled(x)
    assert counter.total == 1 and reports.merged().sites and not reports.merged().refusals, reports
    reference = model64(x64)
    _no_worse_than_eager(got, want, reference, "output")
    cot = torch.randn(reference.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [model.q_proj.weight, model.k_proj.weight]
    grads = [torch.autograd.grad(out, [x] + params, cot.to(out.dtype)) for out in (got, want)]
    grads_ref = torch.autograd.grad(reference, [x64, model64.q_proj.weight, model64.k_proj.weight], cot)
    for name, a, b, r in zip(["x", "q_proj", "k_proj"], *grads, grads_ref):
        _no_worse_than_eager(a, b, r, f"gradient of {name}")


# ------------------------------------------------------------------ states, steps, a KV cache
def prefill_with_states(q, k, v):
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    y = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    return y, torch.einsum("bhtf,bhtd->bhfd", kf, v), kf.sum(2)


def continued_prefill(q, k, v, kv0, ks0):
    qf, kf = phi(q), phi(k)
    kv = kv0[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = ks0[:, :, None] + kf.cumsum(2)
    num = (qf.unsqueeze(-2) @ kv).squeeze(-2)
    return num / ((qf.unsqueeze(-2) @ ks.unsqueeze(-1)).squeeze(-1) + 1e-6), kv[:, :, -1], ks[:, :, -1]


def kv_cache(q, k, v):
    tq, tk = q.shape[-2], k.shape[-2]
    s = q @ k.mT / 2
    a = (1 + s + 0.5 * s * s).masked_fill(~torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq), 0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def decode_step(q, k, v, kv, ks):
    pq, pk = phi(q), phi(k)
    kv = kv + pk.transpose(-2, -1) @ v
    ks = ks + pk
    return (pq @ kv) / (pq @ ks.transpose(-2, -1) + 1e-6), kv, ks


@pytest.mark.parametrize("mix", ["low,low,f32", "f32,f32,low"])
def test_mixed_dtypes_with_states(mix):
    """A prefill that returns its states (the operator keeps float32 there: the key sum is elementwise), and one
    continued from float32 states: q, k, v cast to one dtype, results in eager's dtypes."""
    low = torch.bfloat16
    check_mixed(prefill_with_states, _dtypes(mix, low), low, seed=21)
    g = torch.Generator().manual_seed(22)
    f = 1 + D + D * D
    check_mixed(continued_prefill, _dtypes(mix, low), low, seed=23,
                extra=(torch.randn(B, H, f, DV, generator=g, dtype=torch.float64),
                       torch.rand(B, H, f, generator=g, dtype=torch.float64) + 1))


@pytest.mark.parametrize("mix", ["low,low,f32", "f32,f32,low"])
def test_mixed_dtypes_against_a_kv_cache_and_in_a_decode_step(mix):
    low = torch.float16
    g = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(B, H, t, d, generator=g).to(dt) for t, d, dt in zip((3, T, T), (D, D, DV),
                                                                                 _dtypes(mix, low)))
    compiled = torch.compile(kv_cache, backend=based_compile.backend(inner="aot_eager"))
    with torch.autocast("cpu", dtype=low):
        want = kv_cache(q, k, v)
        compiled(q, k, v)
        with BasedOpCounter() as counter:
            got = compiled(q, k, v)
    assert counter.total == 1, counter.calls
    _no_worse_than_eager(got, want, kv_cache(*(x.double() for x in (q, k, v))), "KV cache")
    f = 1 + D + D * D
    kv, ks = torch.randn(B, H, f, DV, generator=g), torch.rand(B, H, 1, f, generator=g) + 1
    check_mixed(lambda *a: decode_step(*(x[:, :, :1] for x in a[:3]), *a[3:]), _dtypes(mix, low), low, seed=32,
                extra=(kv.double(), ks.double()), grad=False)


# ------------------------------------------------------------------ near misses and the reading itself
def _causal_weights(q, k):
    s = q @ k.mT * 0.5
    return torch.tril(1 + s + 0.5 * s * s)


def sum_in_float32(q, k, v):
    a = _causal_weights(q, k)
    return (a @ v) / (a.sum(-1, keepdim=True, dtype=torch.float32) + 1e-6)


def weights_widened(q, k, v):
    a = _causal_weights(q, k).float()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("low", sorted(LOW))
@pytest.mark.parametrize("fn, mix", [
    (sum_in_float32, "f32,f32,low"),          # weights in autocast's dtype, normaliser widened: float32
    (sum_in_float32, "low,f32,f32"),
    (weights_widened, "f32,low,f32"),
    (sum_in_float32, "low,low,f32"),          # q.k of two low tensors widened by the user's code: the widening is
    (weights_widened, "low,low,f32"),         # read (exact), a cast keeps the weights' values (it was refused)
], ids=lambda x: getattr(x, "__name__", x))
def test_a_normaliser_widened_after_the_matmuls_is_rewritten_with_mixed_dtypes(fn, mix, low, monkeypatch):
    """The normaliser (or the weights) widened to float32 after autocast's matmuls: eager returns float32 computed
    from its matmuls' rounded results; the operator runs cast as a matmul and its output is cast to float32
    (autocast_scope.operator_precision; it was refused), values and gradients no further from float64 than
    eager's."""
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    check_mixed(fn, _dtypes(mix, LOW[low]), LOW[low], 41, reference_fn=_reference_of(fn))


def _reference_of(fn):
    def reference(q, k, v):                    # the same in float64 (no float32 cast)
        a = _causal_weights(q, k)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    return reference


def test_a_mixed_graph_is_read_as_written(caplog):
    """The lowering of a region only autocast makes valid: autocast's casts are taken out (the matmul reads the
    float32 v), the user's own cast stays, and each node's dtype is the one it has as written (the bmm of a
    bfloat16 and a float32 tensor: float32); no error is logged on the way (FakeTensor logged one when the
    pass tried the lowering with autocast off)."""
    from based_compile.graph.autocast_lowering import lower_region
    from based_compile.graph.autocast_scope import analysis_without_autocast, settings_by_node, traced_settings
    from based_compile.graph.canonicalize import attention_region, example_value, extract_region
    seen = {}

    def fn(q, k, v):
        a = _causal_weights(q, k)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6) + v.bfloat16().sum()

    def backend(gm, example_inputs):
        sub, _, _ = extract_region(gm, attention_region(gm))
        settings = settings_by_node(gm, traced_settings())
        with analysis_without_autocast():
            seen["lowered"] = lower_region(sub, settings)
        return gm.forward

    q, k, v = torch.randn(1, 2, 6, D).bfloat16(), torch.randn(1, 2, 6, D).bfloat16(), torch.randn(1, 2, 6, DV)
    with caplog.at_level(logging.DEBUG), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(fn, backend=backend)(q, k, v)
    lowered = seen["lowered"]
    casts = [n for n in lowered.graph.nodes if n.op == "call_function" and "convert_element_type" in str(n.target)]
    assert len(casts) == 1 and "bfloat16" in (casts[0].meta.get("stack_trace") or ""), lowered.graph
    bmms = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.bmm.default]
    assert [example_value(n).dtype for n in bmms] == [torch.bfloat16, torch.float32], lowered.graph
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_switch_inside_the_attention_is_still_refused_with_mixed_dtypes():
    """The accepted twin of v computed with autocast off is a site whose own matmuls run under two settings: its
    numerator with autocast off (float32 v, float32 weights), its scores under the caller's: refused."""
    def split(q, k, v):
        a = _causal_weights(q, k)
        with torch.autocast("cpu", enabled=False):
            num = a.float() @ v
        return num / (a.sum(-1, keepdim=True) + 1e-6)

    g = torch.Generator().manual_seed(51)
    q, k, v = (torch.randn(B, H, T, d, generator=g).to(dt) for d, dt in zip((D, D, DV),
                                                                            _dtypes("low,low,f32", torch.bfloat16)))
    with PassReports() as reports, torch.autocast("cpu", dtype=torch.bfloat16):
        want = split(q, k, v)
        got = torch.compile(split, backend=based_compile.backend(inner="aot_eager"))(q, k, v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    report = reports.merged()
    assert not report.sites and report.refusals, report
    assert not [r for r in report.refusals if "internal error" in r.reason], report


def _checkpointed(q, k, v):
    s = q @ k.transpose(-2, -1) / 2
    a = torch.tril(1 + s + 0.5 * s * s)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_a_checkpointed_site_with_mixed_dtypes(where):
    """The attention in a ``torch.utils.checkpoint`` body, bfloat16 q, k and float32 v, autocast entered by the
    caller or around the checkpoint call inside the compiled code (the body runs under its call's settings: the
    pass failed on the body, an internal error in explain(), when they were not passed in): rewritten inside the
    body, values and gradients within eager's error."""
    from torch.utils.checkpoint import checkpoint

    def call(q, k, v):
        if where == "inside":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return checkpoint(_checkpointed, q, k, v, use_reentrant=False)
        return checkpoint(_checkpointed, q, k, v, use_reentrant=False)

    g = torch.Generator().manual_seed(61)
    base = [torch.randn(B, H, T, d, generator=g, dtype=torch.float64) for d in (D, D, DV)]
    qkv = [x.to(dt).requires_grad_() for x, dt in zip(base, _dtypes("low,low,f32", torch.bfloat16))]
    compiled = torch.compile(call, backend=based_compile.backend(inner="aot_eager"))
    with PassReports() as reports, torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "outside"):
        want = call(*qkv)
        compiled(*qkv)
        with BasedOpCounter() as counter:
            got = compiled(*qkv)
    report = reports.merged()
    assert counter.total == 1 and len(report.sites) == 1, report
    assert not [r for r in report.refusals if "internal error" in r.reason], report
    base64 = [x.clone().requires_grad_() for x in base]
    reference = _checkpointed(*base64)
    _no_worse_than_eager(got, want, reference, "output")
    cot = torch.randn(reference.shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad(out, qkv, cot.to(out.dtype)) for out in (got, want)]
    for name, a, b, r in zip("qkv", *grads, torch.autograd.grad(reference, base64, cot)):
        _no_worse_than_eager(a, b, r, f"d{name}")
