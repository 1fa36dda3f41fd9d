"""Registered buffers read by value at compile time (a tril mask, a scale): changing them after
compiling must not leave a rewrite running that no longer computes what the model does
(based_compile/buffer_guard.py)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import based_compile
import zoo
from based_calls import BasedOpCounter
from compare import assert_rel_close
from based_compile import StaleBufferError


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def compiled_masked_layer(inner="eager"):
    model, (x,) = zoo.projected()()
    compiled = torch.compile(model, backend=based_compile.backend(inner=inner))
    compiled(x)                                     # compiles (outside any BasedOpCounter)
    return model, compiled, x


def check_rewritten_and_equal(model, compiled, x):
    with BasedOpCounter() as counter:
        out = compiled(x)
    assert counter.calls.get("based::attention") == 1, counter.calls
    assert_rel_close(out, model(x), 1e-10)


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_mask_buffer_changed_in_place_raises(inner):
    model, compiled, x = compiled_masked_layer(inner)
    check_rewritten_and_equal(model, compiled, x)
    with torch.no_grad():
        model.bias.fill_(1.0)                       # not causal any more
    with pytest.raises(StaleBufferError, match=r"_buffers\['bias'\].*changed since torch.compile"):
        compiled(x)


def test_mask_buffer_rewritten_with_the_same_values_keeps_running():
    model, compiled, x = compiled_masked_layer()
    check_rewritten_and_equal(model, compiled, x)
    with torch.no_grad():
        model.bias.mul_(1.0)                        # version bumped, values unchanged
    for _ in range(2):
        check_rewritten_and_equal(model, compiled, x)


def test_mask_buffer_reassigned():
    model, compiled, x = compiled_masked_layer()
    check_rewritten_and_equal(model, compiled, x)
    model.bias = model.bias.clone()                 # another tensor, the same values
    check_rewritten_and_equal(model, compiled, x)
    model.bias = torch.tril(torch.ones_like(model.bias), diagonal=-1)     # shifted: a different function
    with pytest.raises(StaleBufferError):
        compiled(x)


class UpstreamBuffer(nn.Module):
    """Based attention whose q is shifted by a buffer (used at run time, not read by the pass) and
    whose scores are scaled by another buffer (a compile-time constant of the site)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("q_offset", torch.full((zoo.DK,), 0.25, dtype=torch.float64))
        self.register_buffer("scale", torch.tensor(1 / math.sqrt(zoo.DK), dtype=torch.float64))

    def forward(self, q, k, v):
        q = q + self.q_offset
        s = (q @ k.transpose(-2, -1)) * self.scale
        a = (1 + s + 0.5 * s * s).tril()
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_only_buffers_the_rewrite_read_are_guarded():
    model = UpstreamBuffer()
    q, k, v = zoo.random_qkv(torch.float64, seed=3, kv_heads=zoo.H)
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    compiled(q, k, v)
    with BasedOpCounter() as counter:
        assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)
    assert counter.calls.get("based::attention") == 1, counter.calls
    with torch.no_grad():
        model.q_offset.fill_(-0.5)                  # upstream of q: the compiled graph computes it
    assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)
    with torch.no_grad():
        model.scale.fill_(0.1)                      # baked into the spec
    with pytest.raises(StaleBufferError, match=r"_buffers\['scale'\]"):
        compiled(q, k, v)


def test_no_wrapper_without_buffers():
    """A site with its mask built in forward reads no buffer: the inner compiler's callable is
    returned as it is."""
    model, (q, k, v) = zoo.Handwritten(zoo.Recipe()), zoo.random_qkv(torch.float64, seed=0, kv_heads=zoo.H)
    seen = []

    def inner(gm, example_inputs):
        def run(*args):
            return gm(*args)
        seen.append(run)
        return run

    backend = based_compile.backend(inner=inner)
    compiled_fn = None

    def capture(gm, example_inputs):
        nonlocal compiled_fn
        compiled_fn = backend(gm, example_inputs)
        return compiled_fn

    torch.compile(model, backend=capture)(q, k, v)
    assert compiled_fn is seen[0]


def _masked_by_an_argument(q, k, v, buffers):      # a list the caller passes, named like a module's buffers
    s = q @ k.mT / 2
    a = (1 + s + 0.5 * s * s) * buffers[0]
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_an_argument_named_buffers_is_not_a_registered_buffer():
    """Only a module's registered buffers (``._buffers[...]`` in Dynamo's source name) are read by value: an
    argument called ``buffers`` is an input like any other (it was baked in, and a call with another mask
    raised StaleBufferError)."""
    compiled = torch.compile(_masked_by_an_argument, backend=based_compile.backend(inner="eager"))
    t = 6
    for mask in (torch.ones(t, t, dtype=torch.float64).tril(), torch.ones(t, t, dtype=torch.float64)):
        q, k, v = (torch.randn(1, 2, t, 4, dtype=torch.float64) for _ in range(3))
        assert_rel_close(compiled(q, k, v, [mask]), _masked_by_an_argument(q, k, v, [mask]), 1e-10)


class _PrefillWithStateBuffers(nn.Module):
    """A continued prefill whose states live in registered buffers, written back after each chunk."""

    def __init__(self, b, h, f, dv, write="always"):
        super().__init__()
        self.write = write
        self.register_buffer("kv", torch.zeros(b, h, f, dv, dtype=torch.float64))
        self.register_buffer("ks", torch.zeros(b, h, f, dtype=torch.float64))

    def forward(self, q, k, v):
        d = q.shape[-1]
        x2 = (q.unsqueeze(-1) * q.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
        qf = torch.cat([torch.ones_like(q[..., :1]), q / d ** 0.25, x2], -1)
        y2 = (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
        kf = torch.cat([torch.ones_like(k[..., :1]), k / d ** 0.25, y2], -1)
        kv0 = self.kv[:q.shape[0]] if self.write.startswith("sliced") else self.kv   # a cache for the largest batch
        kv = kv0[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
        ks = self.ks[:, :, None] + kf.cumsum(2)
        o = (qf[..., None] * kv).sum(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)
        if self.write == "view":                # the same write, through a view of the buffer
            self.kv.view(-1).copy_(kv[:, :, -1].reshape(-1))
        elif self.write == "always":
            self.kv.copy_(kv[:, :, -1])
        elif self.write == "sliced":
            self.kv[:q.shape[0]].copy_(kv[:, :, -1])
        self.ks.copy_(ks[:, :, -1])
        return o


@pytest.mark.parametrize("writes", [["always"] * 3, ["view"] * 3, ["never", "always", "never"],
                                    ["sliced_read_only", "sliced", "sliced_read_only"]],
                         ids=["written", "written_through_a_view", "written_in_some_calls", "read_through_a_slice"])
def test_state_buffers_the_model_writes_are_not_baked(writes):
    """Buffers the graph writes in place (a stateful prefill's states), directly or through a view, are the
    model's state, read as tensors at run time; and a state the operator reads is never baked, even by a graph
    that does not write it (the second call raised StaleBufferError)."""
    b, h, d, dv = 2, 2, 3, 4
    f = 1 + d + d * d
    eager, compiled_model = _PrefillWithStateBuffers(b, h, f, dv), _PrefillWithStateBuffers(b, h, f, dv)
    compiled = torch.compile(compiled_model, backend=based_compile.backend(inner="eager"))
    g = torch.Generator().manual_seed(0)
    for write in writes:
        eager.write = compiled_model.write = write
        q, k, v = (torch.randn(b, h, 5, x, generator=g, dtype=torch.float64) for x in (d, d, dv))
        with BasedOpCounter() as counter:
            got = compiled(q, k, v)
        assert_rel_close(got, eager(q, k, v), 1e-10)
        assert_rel_close(compiled_model.kv, eager.kv, 1e-10)
    assert counter.calls, counter.calls


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_gpu_mask_buffer_guard(mode, no_tf32):
    """On CUDA through Inductor (and CUDA graphs): the rewrite runs and matches a float64 reference,
    a same-values rewrite of the buffer keeps it running, a changed mask raises (which also shows
    that the rewrite happened under CUDA graphs, where the operator's calls are not seen)."""
    model, (x,) = zoo.projected()(dtype=torch.float32)
    model, x = model.cuda(), x.cuda()
    reference = zoo.ProjectedAttention().double().cuda()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="based", mode=mode)
    for _ in range(3):                              # CUDA graphs record on a later call
        compiled(x)
    with BasedOpCounter() as counter:
        out = compiled(x)
    if mode is None:        # a CUDA graph replay runs the kernels without calling the operator
        assert counter.calls.get("based::attention") == 1, counter.calls
    assert_rel_close(out.double(), reference(x.double()), 1e-4)
    with torch.no_grad():
        model.bias.mul_(1.0)
    assert_rel_close(compiled(x).double(), reference(x.double()), 1e-4)
    with torch.no_grad():
        model.bias.fill_(1.0)
    with pytest.raises(StaleBufferError):
        compiled(x)


def test_blocks_compiled_one_by_one_compare_each_buffer_once(monkeypatch):
    """Blocks compiled one by one (the README's advice for DDP and FSDP2) share one compiled graph, each
    calling it with its own mask buffer of equal values: each buffer is compared once, not on every call
    (the guard remembered only the last tensor: every call copied the buffer to the CPU, a sync on CUDA)."""
    blocks = [zoo.projected()()[0] for _ in range(3)]
    for b in blocks[1:]:
        b.load_state_dict(blocks[0].state_dict())
    backend = based_compile.backend(inner="eager")
    compiled = [torch.compile(b, backend=backend) for b in blocks]
    x = zoo.projected()()[1][0]
    compiled[0](x)                                               # compiles (outside any BasedOpCounter)
    compared = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real_equal(a, b))
    for _ in range(4):
        for b, c in zip(blocks, compiled):
            with BasedOpCounter() as counter:
                out = c(x)
            assert counter.calls.get("based::attention") == 1, counter.calls
            assert_rel_close(out, b(x), 1e-10)
    assert len(compared) <= len(blocks) - 1, len(compared)      # the compiling block's buffer is known
    with torch.no_grad():
        blocks[2].bias.fill_(1.0)                                # one block's buffer changed: still caught
    with pytest.raises(StaleBufferError):
        compiled[2](x)


class ScaledByAnAttribute(nn.Module):
    """A float scale kept as a plain tensor attribute (a schedule may replace it): a variable, read at run
    time, never baked; an integer one (an index table) is a constant, like a buffer."""

    def __init__(self):
        super().__init__()
        self.scale = torch.tensor(0.5, dtype=torch.float64)

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = (q @ k.mT) * self.scale
        a = (1 + s + 0.5 * s * s).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_a_float_tensor_attribute_is_read_at_run_time():
    model = ScaledByAnAttribute()
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)
    model.scale = torch.tensor(0.25, dtype=torch.float64)                # replaced: no error, followed
    assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)


class StepScaled(nn.Module):
    """A one-element integer attribute a schedule replaces every call (a step counter): read at run time, not
    baked (an integer attribute of more elements, an index table, is a constant)."""

    def __init__(self):
        super().__init__()
        self.step = torch.tensor(3)

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = (q @ k.mT) / self.step
        a = (1 + s + 0.5 * s * s).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def test_a_one_element_integer_attribute_replaced_every_call_keeps_running():
    model = StepScaled()
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64) for _ in range(3))
    for step in (3, 4, 5):
        model.step = torch.tensor(step)
        assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10, f"step {step}")


# ----------------------------------------------------------------------------- feature-map constants in buffers
# zoology's TaylorExp with its constants (d^1/4, sqrt(d), sqrt(2)) kept as 0-d registered buffers: refused as "a
# learnable temperature" (red team M5), though a buffer is no parameter and a buffer scale of the scores was read.
# A 0-d buffer is now a number where any reader takes one (canonicalize.scalar_value), and a rewritten site or
# recurrent step that read it guards it: a changed value raises instead of running the old one.


class TaylorWithBufferConstants(nn.Module):
    def __init__(self, d=4, persistent=True):
        super().__init__()
        for name, value in (("rrd", d ** 0.25), ("rd", math.sqrt(d)), ("r2", math.sqrt(2))):
            self.register_buffer(name, torch.tensor(value, dtype=torch.float64), persistent=persistent)

    def phi(self, x):
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / self.r2
        return torch.cat([torch.ones_like(x[..., :1]), x / self.rrd, x2 / self.rd], -1)

    def forward(self, q, k, v):
        t = q.shape[-2]
        a = (self.phi(q) @ self.phi(k).mT).masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), 0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("persistent", [True, False])
def test_feature_map_constants_in_buffers_are_read_and_guarded(persistent, monkeypatch):
    from based_compile.graph import verify
    from compiled_compare import compile_and_compare
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    model = TaylorWithBufferConstants(persistent=persistent)
    rec = compile_and_compare(model, [(2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5)], (5, 9))
    assert sum(rec.sites()) >= 1 and not any(r.refusals for r in rec.reports.graphs), rec.reports
    spec = rec.reports.graphs[0].sites[0].spec
    assert all(math.isclose(a, b) for a, b in zip((spec.scale, spec.c0, spec.c1, spec.c2), (0.5, 1, 1, 0.5))), spec
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    q, k, v = (torch.randn(2, 3, 7, d, dtype=torch.float64) for d in (4, 4, 5))
    check = lambda: assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)      # noqa: E731
    check()
    with torch.no_grad():
        model.rd.mul_(1.0)                          # version bumped, values unchanged
    check()
    with torch.no_grad():
        model.rd.mul_(2.0)                          # another map: refused to run, not silently the old one
    with pytest.raises(StaleBufferError, match=r"_buffers\['rd'\].*changed since torch.compile"):
        compiled(q, k, v)
    model.rd = torch.tensor(math.sqrt(4), dtype=torch.float64)      # back, as another tensor: equal, runs
    check()


@pytest.mark.parametrize("write", ["data", "numpy", "storage", "inference_mode"])
def test_small_cpu_buffers_are_compared_by_value_every_call(write, monkeypatch):
    """Writes the version counter does not count (``.data``, ``.numpy()``, the storage, a buffer made under
    inference_mode) kept the old constant running with no error (relative error 0.23, red team): a small CPU
    buffer is now compared by value on every call."""
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    if write == "inference_mode":
        with torch.inference_mode():
            model = TaylorWithBufferConstants()
    else:
        model = TaylorWithBufferConstants()
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    q, k, v = (torch.randn(2, 3, 7, d, dtype=torch.float64) for d in (4, 4, 5))
    with BasedOpCounter() as counter:
        assert_rel_close(compiled(q, k, v), model(q, k, v), 1e-10)
    assert counter.total >= 1, counter.calls
    new = 2 * math.sqrt(4)
    if write == "data":
        model.rd.data.fill_(new)
    elif write == "numpy":
        model.rd.numpy().fill(new)
    elif write == "storage":
        model.rd.untyped_storage().copy_(torch.tensor(new, dtype=torch.float64).untyped_storage())
    else:
        with torch.inference_mode():
            model.rd.fill_(new)
    assert model.rd.item() == new
    with pytest.raises(StaleBufferError, match=r"_buffers\['rd'\]"):
        compiled(q, k, v)


class StepWithBufferConstant(nn.Module):
    def __init__(self, d=4):
        super().__init__()
        self.register_buffer("rrd", torch.tensor(d ** 0.25, dtype=torch.float64))

    def forward(self, q, k, v, kv_state, k_state):
        def phi(x):
            x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(x.shape[-1]))
            return torch.cat([torch.ones_like(x[..., :1]), x / self.rrd, x2], -1)
        pq, pk = phi(q), phi(k)
        kv_state = kv_state + pk.transpose(-2, -1) @ v
        k_state = k_state + pk
        return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


def test_recurrent_step_reading_a_buffer_constant_is_guarded():
    model = StepWithBufferConstant()
    f = 1 + 4 + 16
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, dtype=torch.float64) for s in
            ((2, 3, 1, 4), (2, 3, 1, 4), (2, 3, 1, 5), (2, 3, f, 5), (2, 3, 1, f))]
    compiled = torch.compile(model, backend=based_compile.backend(inner="eager"))
    with torch.no_grad():
        compiled(*args)                             # compiles (outside any BasedOpCounter: the probe calls the op)
        with BasedOpCounter() as counter:
            out = compiled(*args)
        assert counter.calls.get("based::recurrent_step") == 1, counter.calls
        for got, want in zip(out, model(*args)):
            assert_rel_close(got, want, 1e-10)
        model.rrd.mul_(2.0)
        with pytest.raises(StaleBufferError, match=r"_buffers\['rrd'\]"):
            compiled(*args)
        ex = based_compile.explain(model, *args)
    assert len(ex.sites) == 1 and "recurrent step" in str(ex), ex     # the report of a step prints


def test_feature_map_constant_in_a_parameter_is_still_refused():
    class ParameterConstant(TaylorWithBufferConstants):
        def __init__(self):
            super().__init__()
            del self.rd
            self.rd = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    q, k, v = (torch.randn(2, 3, 7, d, dtype=torch.float64) for d in (4, 4, 5))
    ex = based_compile.explain(ParameterConstant(), q, k, v)
    assert not ex.sites and [r.category for r in ex.refusals] == ["feature_map"], ex
    assert "nn.Parameter" in ex.refusals[0].reason and "registered buffer" in ex.refusals[0].reason, ex


class TaylorWithShapedBuffer(TaylorWithBufferConstants):
    """rrd kept as a registered buffer of shape (1,): not read as a constant (only 0-d buffers are)."""

    def __init__(self):
        super().__init__()
        self.rrd = torch.full((1,), 4 ** 0.25, dtype=torch.float64)


def test_a_one_element_buffer_that_is_not_0d_is_refused_as_what_it_is(monkeypatch):
    """Was refused as 'a learnable temperature, an nn.Parameter, a plain tensor attribute...' (red team): the
    reason names its shape and that only a 0-d registered buffer is read as a constant."""
    from based_compile.graph import verify
    from compiled_compare import compile_and_compare
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    rec = compile_and_compare(TaylorWithShapedBuffer(), [(2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5)], (5, 9))
    assert sum(rec.sites()) == 0, rec.reports
    reasons = " | ".join(r.reason for ex in rec.reports.graphs for r in ex.refusals)
    assert "shape (1,)" in reasons and "a registered buffer that is not 0-d" in reasons, rec.reports
