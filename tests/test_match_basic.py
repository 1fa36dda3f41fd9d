"""The backend's own quick tests: options, registration, explain(), the probe, and pass details
the zoo (tests/zoo.py, tests/test_patterns.py) does not single out.

Sizes are tiny and the inner compiler is "eager"; every test checks that the rewrite did (or
did not) happen, not only that outputs match.
"""
from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import based_compile
from based_compile import config
from based_compile.graph.refusal import Refused
from compare import assert_rel_close

B, H, T, DK, DV = 2, 2, 8, 4, 3


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def qkv(t=T, seed=0, h=H, hkv=H):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, h, t, DK, generator=g, dtype=torch.float64),
            torch.randn(B, hkv, t, DK, generator=g, dtype=torch.float64),
            torch.randn(B, hkv, t, DV, generator=g, dtype=torch.float64))


def based(q, k, v, eps=1e-6):
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    a = 1 + s + 0.5 * s ** 2
    t = q.shape[-2]
    a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


class Based(nn.Module):
    def forward(self, q, k, v):
        return based(q, k, v)


class InputMasked(nn.Module):
    """The mask comes from an input: not a compile-time constant, so not rewritten."""

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-2, -1) / 2.0
        a = (1 + s + 0.5 * s ** 2) * keep
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class WithNoGrad(nn.Module):
    """Grad-mode changes elsewhere in the graph stay where they are."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DK, DK).double()

    def forward(self, q, k, v):
        with torch.no_grad():
            frozen = self.proj(q)
        return based(q + 0 * frozen, k, v) + frozen.sum()


def based_calls(fn, *args):
    """Number of torch.ops.based.attention calls in the profiler trace of one call."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == "based::attention")


# --------------------------------------------------------------------------- options and registration


def test_bad_options_raise():
    with pytest.raises(ValueError, match="kernel"):
        based_compile.backend(kernel="fastest")
    with pytest.raises(ValueError, match="inner"):
        based_compile.backend(inner="no-such-backend")
    with pytest.raises(TypeError, match="rewrite"):
        based_compile.backend(rewrite="yes")
    with pytest.raises(TypeError, match="verify"):
        based_compile.backend(verify=1)
    with pytest.raises(TypeError, match="model must be a callable"):
        based_compile.explain(None, torch.randn(2))


def test_based_is_registered_on_import():
    assert torch._dynamo.lookup_backend("based") is based_compile.based_backend


def code_recorder():
    """An inner compiler that records the code of each graph it gets and runs it as it is."""
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm.code)
        return gm.forward
    return inner, seen


def test_inner_callable_receives_rewritten_graph():
    inner, seen = code_recorder()
    q, k, v = qkv()
    out = torch.compile(Based(), backend=based_compile.backend(inner=inner))(q, k, v)
    assert_rel_close(out, based(q, k, v), 1e-12)
    assert len(seen) == 1 and "based_attention_call" in seen[0]


def test_rewrite_false_leaves_graph_alone():
    inner, seen = code_recorder()
    q, k, v = qkv()
    torch.compile(Based(), backend=based_compile.backend(inner=inner, rewrite=False))(q, k, v)
    assert "based_attention_call" not in seen[0] and "matmul" in seen[0]


def test_kernel_option_is_forwarded_to_config():
    q, k, v = qkv()
    try:
        compiled = torch.compile(Based(), backend=based_compile.backend(inner="eager", kernel="cpu_chunked"))
        assert config.kernel == "cpu_chunked"
        assert_rel_close(compiled(q, k, v), based(q, k, v), 1e-10)
        assert based_calls(compiled, q, k, v) == 1
    finally:
        config.kernel = "auto"


# --------------------------------------------------------------------------- explain()


def test_explain_reports_site_and_leaves_no_compiled_state():
    model = Based()
    ex = based_compile.explain(model, *qkv())
    assert len(ex.sites) == 1 and not ex.refusals
    site = ex.sites[0]
    assert "test_match_basic.py" in site.source and site.form == "quadratic"
    assert site.spec.causal and site.spec.normalize and math.isclose(site.spec.scale, 0.5)
    assert (site.spec.c0, site.spec.c1, site.spec.c2) == (1.0, 1.0, 0.5)
    assert "cpu_" in site.kernel
    text = str(ex)
    assert "1 Based attention site" in text and "causal" in text and site.kernel in text
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(Based.forward.__code__)
    assert entries == [], "explain() left compiled code behind"


def test_explain_refuses_mask_from_input():
    q, k, v = qkv()
    keep = torch.tril(torch.ones(T, T, dtype=torch.float64))
    model = InputMasked()
    ex = based_compile.explain(model, q, k, v, keep)
    assert not ex.sites
    assert [r.category for r in ex.refusals] == ["mask"]
    assert "compile-time constant" in ex.refusals[0].reason
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    assert_rel_close(compiled(q, k, v, keep), model(q, k, v, keep), 1e-12)
    assert based_calls(compiled, q, k, v, keep) == 0


def test_pass_logs_rewrite_at_info(caplog):
    with caplog.at_level(logging.INFO, logger="based_compile"):
        torch.compile(Based(), backend=based_compile.backend(inner="eager"))(*qkv())
    assert any("Based attention at" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


# --------------------------------------------------------------------------- the probe


def _matched_site(model, *inputs):
    """The Match and evaluator the pass builds for a one-site model (captured, not rewritten)."""
    from based_compile import backend as _  # noqa: F401
    import importlib

    backend_module = importlib.import_module("based_compile.graph.driver")
    captured = {}
    original = backend_module.settle

    def spy(match, evaluator, **kwargs):
        captured["match"], captured["evaluator"] = match, evaluator
        return original(match, evaluator, **kwargs)

    backend_module.settle = spy
    try:
        based_compile.explain(model, *inputs)
    finally:
        backend_module.settle = original
    return captured["match"], captured["evaluator"]


def test_probe_refuses_a_wrong_spec():
    """The probe can fail: the same subgraph with a wrong causal flag or coefficient is refused."""
    from based_compile.graph.verify import settle

    match, evaluator = _matched_site(Based(), *qkv())
    assert settle(match, evaluator).spec.causal
    close = (replace(match, eps=1e-3), replace(match, coeffs=(1.0, 1.0, 0.5 + 1e-4)))   # errors ~1e-4..1e-3
    for wrong in (replace(match, causal=False), replace(match, coeffs=(1.0, 1.0, 0.25)),
                  replace(match, normalize=False), *close):
        with pytest.raises(Refused) as info:
            settle(wrong, evaluator)
        assert info.value.category == "verify"


# --------------------------------------------------------------------------- graphs around the site


def test_grad_mode_region_elsewhere_in_graph():
    model = WithNoGrad()
    q, k, v = (x.requires_grad_() for x in qkv())
    compiled = torch.compile(model, backend=based_compile.backend(inner="aot_eager"))
    out_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(out_c.sum(), (q, k, v) + tuple(model.parameters()), allow_unused=True)
    out_e = model(q, k, v)
    grads_e = torch.autograd.grad(out_e.sum(), (q, k, v) + tuple(model.parameters()), allow_unused=True)
    assert_rel_close(out_c, out_e, 1e-10)
    for gc, ge in zip(grads_c, grads_e):
        assert (gc is None) == (ge is None)
        if gc is not None:
            assert_rel_close(gc, ge, 1e-10, "gradient")
    assert based_calls(compiled, q, k, v) == 1


def test_dynamic_lengths_one_graph_and_grads():
    graphs = []
    inner = based_compile.backend(inner="eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(Based(), backend=counting, dynamic=True)
    for t in (5, 8, 13):
        q, k, v = (x.requires_grad_() for x in qkv(t=t, seed=t))
        out = compiled(q, k, v)
        ref = based(q, k, v)
        assert_rel_close(out, ref, 1e-10, f"T={t}")
        for gc, ge in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
            assert_rel_close(gc, ge, 1e-9, f"gradient at T={t}")
        assert based_calls(compiled, q, k, v) == 1
    assert len(graphs) == 1, f"{len(graphs)} graphs for three lengths"


def test_gqa_group_is_derived():
    class GQA(nn.Module):
        def forward(self, q, k, v):
            k = k.repeat_interleave(2, dim=1)
            v = v.repeat_interleave(2, dim=1)
            return based(q, k, v)

    q, k, v = qkv(h=4, hkv=2)
    ex = based_compile.explain(GQA(), q, k, v)
    assert [s.spec.group for s in ex.sites] == [2]
    compiled = torch.compile(GQA(), backend=based_compile.backend(inner="eager"))
    assert_rel_close(compiled(q, k, v), GQA()(q, k, v), 1e-12)


def test_mutations_outside_the_site_survive_the_rewrite():
    """Only the site's own nodes are erased: a buffer updated in place stays updated; the
    in-place mask on the weights (a temporary of the site) goes away with the site."""

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, q, k, v):
            self.calls.add_(1)
            a = q @ k.transpose(-2, -1) / 2.0
            a = 1 + a + 0.5 * a * a
            t = q.shape[-2]
            a.masked_fill_(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0)
            return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    codes = []

    def inner(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    model = Counting()
    q, k, v = qkv()
    out = torch.compile(model, backend=based_compile.backend(inner=inner))(q, k, v)
    assert_rel_close(out, based(q, k, v), 1e-12)
    assert model.calls.item() == 1.0
    assert "add_" in codes[0] and "masked_fill_" not in codes[0] and "based_attention_call" in codes[0]


def test_a_failing_pass_leaves_the_graph_to_the_inner_compiler(monkeypatch, caplog):
    """A bug in detection is logged and reported; the model still compiles and computes the same."""
    import importlib

    backend_module = importlib.import_module("based_compile.graph.driver")

    def broken(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(backend_module, "attention_region", broken)

    def attn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        a = (1 + s + 0.5 * s * s).tril()
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="based_compile"):
        out = torch.compile(attn, backend=based_compile.backend(inner="eager"))(q, k, v)
    torch.testing.assert_close(out, attn(q, k, v), rtol=0, atol=0)
    assert "planted failure" in caplog.text
    report = based_compile.explain(attn, q, k, v)
    assert not report.sites and any("planted failure" in r.reason for r in report.refusals)


@pytest.mark.parametrize("step", ["rewrite_dynamo_sites", "rewrite_recurrent_steps"])
def test_a_failing_rewrite_puts_the_graph_back(monkeypatch, caplog, step):
    """A bug in the rewrite itself (after the sites were found, the graph half changed) is logged and
    reported; the graph goes back to Dynamo's, so the model compiles and computes the same, and explain()
    lists the site as refused with the error, not as rewritten."""
    from based_compile.graph import driver

    real = getattr(driver, step)

    def broken(gm, *args, **kwargs):
        real(gm, *args, **kwargs)               # the graph changed ...
        raise RuntimeError("planted rewrite failure")   # ... then the rewrite fails

    monkeypatch.setattr(driver, step, broken)

    def attn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        a = (1 + s + 0.5 * s * s).tril()
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    codes = []

    def inner(gm, example_inputs):
        codes.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="based_compile"):
        out = torch.compile(attn, backend=based_compile.backend(inner=inner))(q, k, v)
    torch.testing.assert_close(out, attn(q, k, v), rtol=0, atol=0)
    assert "planted rewrite failure" in caplog.text
    assert codes and all("based_attention" not in code for code in codes)
    report = based_compile.explain(attn, q, k, v)
    assert not report.sites, report
    assert any("planted rewrite failure" in r.reason for r in report.refusals), report


def test_sites_the_operator_cannot_run_are_left_to_the_inner_compiler(monkeypatch):
    """A site on tensors the operator would refuse (here: a planted reason) is refused at compile time."""
    from based_compile.graph import driver

    monkeypatch.setattr(driver, "unsupported_reason", lambda q, k, v: "planted limit")

    def attn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        a = (1 + s + 0.5 * s * s).tril()
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    q, k, v = (torch.randn(1, 2, 8, 4, dtype=torch.float64) for _ in range(3))
    report = based_compile.explain(attn, q, k, v)
    assert not report.sites
    assert [r.category for r in report.refusals] == ["unsupported"] and "planted limit" in report.refusals[0].reason


def test_operator_limits_are_known_at_compile_time():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from based_compile.op.custom_op import unsupported_reason

    with FakeTensorMode():
        def qkv(device, dtype, dk=16, dv=64):
            return (torch.empty(1, 2, 8, dk, device=device, dtype=dtype),
                    torch.empty(1, 2, 8, dk, device=device, dtype=dtype),
                    torch.empty(1, 2, 8, dv, device=device, dtype=dtype))

        assert unsupported_reason(*qkv("cpu", torch.float64)) is None
        assert unsupported_reason(*qkv("cuda", torch.bfloat16)) is None
        assert "float64" in unsupported_reason(*qkv("cuda", torch.float64))
        assert "Dk=256" in unsupported_reason(*qkv("cuda", torch.float32, dk=256))
        assert "Dv=512" in unsupported_reason(*qkv("cuda", torch.float32, dv=512))
        q, k, v = qkv("cpu", torch.float32)
        assert "different dtypes" in unsupported_reason(q, k, v.double())


class BufferMasked(nn.Module):
    """Based attention masked by a registered [32, 32] buffer, sliced to the length."""

    def __init__(self, buffer: torch.Tensor):
        super().__init__()
        self.register_buffer("bias", buffer)

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) / 2.0
        a = (1 + s + 0.5 * s * s).masked_fill(self.bias[:t, :t] == 0, 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_buffer_not_triangular_beyond_the_traced_length_is_refused():
    """A buffer whose [:12, :12] slice is causal but whose rows from 20 are not: compiled for dynamic
    lengths, a rewrite read at T=12 would be wrong at T=24, so the site is refused. (A graph traced
    for T=12 only, with a static length, reads the [:12, :12] slice: causal, rewritten.)"""
    buffer = torch.tril(torch.ones(32, 32))
    buffer[20:, 0] = 0
    model = BufferMasked(buffer).double()
    inputs = qkv(t=12)
    for x in inputs:
        torch._dynamo.mark_dynamic(x, 2)
    explanation = based_compile.explain(model, *inputs)
    assert not explanation.sites
    assert [r.category for r in explanation.refusals] == ["mask"]
    assert "not a function of j - i" in explanation.refusals[0].reason
    assert len(based_compile.explain(model, *qkv(t=12)).sites) == 1           # static T=12: causal there
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"), dynamic=True)
    for t in (12, 24):
        inputs = qkv(t=t, seed=t)
        assert_rel_close(compiled(*inputs), model(*inputs), 1e-12, f"T={t}")
    plain = BufferMasked(torch.tril(torch.ones(32, 32))).double()          # the twin: rewritten
    assert len(based_compile.explain(plain, *qkv(t=12)).sites) == 1


class WritesInPlace(nn.Module):
    """Based attention with an in-place write into something it reads, named by ``where``:
    "v_after_use" (``v.mul_(2)`` after ``a @ v``, before the output), "k_after_scores" (``k.zero_()``
    after ``q @ k.T``), "mask_buffer" (the tril buffer filled with ones before it is used),
    "v_after_output" (``v.mul_(2)`` once the output is computed: harmless, still rewritten)."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where
        self.register_buffer("bias", torch.tril(torch.ones(32, 32)))

    def forward(self, q, k, v):
        t = q.shape[-2]
        if self.where == "mask_buffer":
            self.bias.fill_(1.0)
        s = q @ k.transpose(-2, -1) / 2.0
        if self.where == "k_after_scores":
            k.zero_()
        a = (1 + s + 0.5 * s * s) * self.bias[:t, :t]
        n = a @ v
        if self.where == "v_after_use":
            v.mul_(2)
        o = n / (a.sum(-1, keepdim=True) + 1e-6)
        if self.where == "v_after_output":
            v.mul_(2)
        return o


@pytest.mark.parametrize("where,rewritten", [("v_after_use", False), ("k_after_scores", False),
                                             ("mask_buffer", False), ("v_after_output", True)])
def test_in_place_writes_into_what_the_site_reads(where, rewritten):
    """The operator runs where the site's output was: a write before that into q, k, v or a buffer
    the site reads would change its inputs (errors 0.4 to 2.5 before this was refused)."""
    inputs = qkv()
    explanation = based_compile.explain(WritesInPlace(where).double(), *(x.clone() for x in inputs))
    assert len(explanation.sites) == int(rewritten)
    if where == "mask_buffer":      # a buffer the graph writes is the model's state, not a constant mask
        assert [r.category for r in explanation.refusals] == ["mask"]
        assert "not a compile-time constant" in explanation.refusals[0].reason
    elif not rewritten:
        assert [r.category for r in explanation.refusals] == ["unsupported"]
        assert "writes in place" in explanation.refusals[0].reason
    compiled = torch.compile(WritesInPlace(where).double(), backend=based_compile.backend(inner="eager"))
    eager_inputs, compiled_inputs = [x.clone() for x in inputs], [x.clone() for x in inputs]
    assert_rel_close(compiled(*compiled_inputs), WritesInPlace(where).double()(*eager_inputs), 1e-12, where)
    for got, want in zip(compiled_inputs, eager_inputs):                # the writes themselves still happen
        assert torch.equal(got, want)


def _piecewise(kind):
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        if kind == "clamp_scores":
            s = s.clamp(-3.5, 3.5)
        elif kind == "hardtanh_scores":
            s = torch.nn.functional.hardtanh(s, -3.5, 3.5)
        elif kind == "fmod_scores":
            s = torch.fmod(s, 4.0)
        a = 1 + s + 0.5 * s * s
        if kind == "clamp_weights":
            a = a.clamp(max=20.0)
        elif kind == "addcmul":                          # the accepted twin: a sum of products
            a = torch.addcmul(1 + s, s, s, value=0.5)
        a = torch.tril(a)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    return fn


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "structure_only"])
@pytest.mark.parametrize("kind", ["clamp_scores", "hardtanh_scores", "fmod_scores", "clamp_weights", "addcmul"])
def test_piecewise_functions_of_the_scores_are_refused(kind, probe, monkeypatch):
    """A clamp, hardtanh or fmod of the scores or weights agrees with 1 + s + s^2/2 at every point the
    polynomial reader evaluates (|s| <= 3): it was read as that polynomial, and where the scores pass
    the breakpoint the rewrite computed another function (errors 0.8-1.1; clamp_weights also with the
    probe, whose random scores stay below it). Only sums and products are read by evaluation."""
    from based_compile.graph import feature_normaliser, verify
    if not probe:
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    fn = _piecewise(kind)
    q, k, v = (x * 3 for x in qkv(t=9))                   # scores well past the breakpoints
    explanation = based_compile.explain(fn, q, k, v)
    if kind == "addcmul":
        assert len(explanation.sites) == 1, str(explanation)
    else:
        assert not explanation.sites and [r.category for r in explanation.refusals] == ["polynomial"], str(explanation)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    assert_rel_close(compiled(q, k, v), fn(q, k, v), 1e-10, kind)
    assert based_calls(compiled, q, k, v) == (kind == "addcmul")


@pytest.mark.parametrize("spelling", ["ge_tensor", "ge_scalar", "lt_modulo"])
def test_weights_times_a_comparison_mask_are_read_as_masked(spelling):
    """A causal mask multiplied in as a bool comparison of indices is a mask, not an elementwise
    function of the weights: POLYNOMIAL_OPS is checked only on ops whose operands are weights (the
    first version refused these as 'aten.ge.Tensor of the scores is not a polynomial operation')."""
    def fn(q, k, v):
        s = q @ k.transpose(-2, -1) * 0.5
        i = torch.arange(s.shape[-1])
        if spelling == "ge_tensor":
            keep = i[:, None] >= i[None, :]
        elif spelling == "ge_scalar":
            keep = (i[:, None] - i[None, :]) >= 0
        else:
            keep = (i[:, None] - i[None, :]) % 64 < 32          # causal up to 32 (static length 7)
        a = (1 + s + 0.5 * s * s) * keep
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    q, k, v = qkv(t=7)
    explanation = based_compile.explain(fn, q, k, v)
    assert len(explanation.sites) == 1 and not explanation.refusals, str(explanation)
