"""The ``based::attention`` operator: registration (opcheck), values and gradients vs float64,
compiled use (fullgraph, dynamic shapes, autocast), O(T) memory on the CPU, GPU variants."""
from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from based_compile.op import config, cpu_path, policy
from based_compile.kernels import naive_chunk_based, naive_parallel_based
from based_calls import BasedOpCounter
from based_compile.op.custom_op import based_attention
from based_compile.op.spec import BasedSpec
from compare import assert_rel_close
from conftest import make_inputs

COEFFS = [(1.0, 1.0, 0.5), (0.3, -0.7, 0.25)]
# f(s) = 1 + s + s^2 > 0 everywhere: the normaliser z stays away from 0, so normalised outputs are
# well conditioned in float32/bfloat16 (with COEFFS[1], f changes sign and z can come close to 0).
POSITIVE_COEFFS = (1.0, 1.0, 1.0)
ATTENTION = torch.ops.based.attention.default
ATTENTION_BACKWARD = torch.ops.based.attention_backward.default


@pytest.fixture
def kernel_setting(monkeypatch):
    """Set based_compile.config.kernel for one test (restored afterwards); the env var cleared."""
    monkeypatch.delenv(config.KERNEL_ENV_VAR, raising=False)

    def set_kernel(name: str) -> None:
        monkeypatch.setattr(config, "kernel", name)

    set_kernel("auto")
    return set_kernel


def reference(q, k, v, spec: BasedSpec):
    """The reference output (naive_parallel_based) in the dtype of q, k, v: float64 in the tests."""
    return naive_parallel_based(q, k, v, spec.scale, spec.coeffs, spec.causal, spec.normalize, spec.eps, spec.layout)


def op_args(q, k, v, spec: BasedSpec, training: bool):
    return (q, k, v, spec.layout, spec.scale, spec.c0, spec.c1, spec.c2, spec.causal, spec.normalize, spec.eps,
            training)


def check_against_float64(q, k, v, spec: BasedSpec, tol: float):
    """Output and gradients of based_attention (inputs of any dtype) vs the float64 reference."""
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o = based_attention(q, k, v, spec)
    assert o.dtype == q.dtype and o.is_contiguous()
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    ref = reference(q64, k64, v64, spec)
    # A non-contiguous output gradient, as a transpose or reshape after the attention produces it.
    do = torch.randn(*ref.shape[:-3], ref.shape[-2], ref.shape[-3], ref.shape[-1], dtype=ref.dtype,
                     device=ref.device).transpose(-3, -2)
    grads = torch.autograd.grad(o, (q, k, v), do.to(o.dtype))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do)
    assert_rel_close(o, ref, tol, "o")
    for name, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_rel_close(g, r, tol, name)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
OPCHECK_CASES = [
    # (b, h, kv_heads, t, dk, dv, layout, causal, normalize, dtype)
    (1, 2, 2, 9, 4, 3, "BHTD", True, True, torch.float32),
    (2, 4, 2, 17, 8, 5, "BTHD", True, False, torch.float64),
    (1, 2, 1, 12, 4, 6, "BHTD", False, True, torch.float64),
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_cpu(case, kernel_setting):
    b, h, hk, t, dk, dv, layout, causal, normalize, dtype = case
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=hk, layout=layout, dtype=dtype, requires_grad=True)
    spec = BasedSpec(layout=layout, scale=dk ** -0.5, causal=causal, normalize=normalize)
    args = op_args(q, k, v, spec, True)
    torch.library.opcheck(ATTENTION, args)
    o, z = ATTENTION(*args)
    assert z.dtype == (cpu_path.compute_dtype(dtype) if normalize else torch.float32)
    assert z.shape == ((b, h, t) if normalize else (0,))
    do = torch.randn_like(o)
    bwd_args = (do, q.detach(), k.detach(), v.detach(), o.detach(), z) + args[3:]
    torch.library.opcheck(ATTENTION_BACKWARD, bwd_args)


def test_schema_names_the_spec_arguments():
    schema = str(ATTENTION._schema)
    assert schema.startswith("based::attention(Tensor q, Tensor k, Tensor v, str layout, float scale, float c0, "
                             "float c1, float c2, bool causal, bool normalize, float eps, bool training=False)")
    assert str(ATTENTION_BACKWARD._schema).startswith("based::attention_backward(Tensor do, Tensor q")


def test_normaliser_is_not_differentiable(kernel_setting):
    q, k, v = make_inputs(1, 2, 8, 4, 4, requires_grad=True)
    o, z = torch.ops.based.attention(q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6, True)
    assert o.requires_grad and not z.requires_grad


def test_training_argument_left_at_its_default(kernel_setting):
    """The dispatcher drops an argument equal to its default before the autograd kernel sees it:
    the gradients must still be those of the float64 reference."""
    q, k, v = make_inputs(1, 2, 10, 4, 3, dtype=torch.float64, requires_grad=True)
    spec = BasedSpec(scale=0.5)
    o, _ = torch.ops.based.attention(q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6)
    q64, k64, v64 = (x.detach().requires_grad_(True) for x in (q, k, v))
    ref = reference(q64, k64, v64, spec)
    assert_rel_close(o, ref, 1e-10)
    do = torch.randn_like(o)
    for g, r in zip(torch.autograd.grad(o, (q, k, v), do), torch.autograd.grad(ref, (q64, k64, v64), do)):
        assert_rel_close(g, r, 1e-10)


def test_create_graph_gives_first_order_grads_and_refuses_the_second(kernel_setting):
    q, k, v = make_inputs(1, 2, 10, 4, 3, dtype=torch.float64, requires_grad=True)
    spec = BasedSpec(scale=0.5)
    o = based_attention(q, k, v, spec)
    q64, k64, v64 = (x.detach().requires_grad_(True) for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference(q64, k64, v64, spec).square().sum(), (q64, k64, v64))
    grads = torch.autograd.grad(o.square().sum(), (q, k, v), create_graph=True)
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g, r, 1e-10)
    assert grads[0].requires_grad
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(grads[0].sum(), q)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_shortcut_still_shows_both_operators(kernel_setting):
    """Eager calls on plain tensors skip the second trip through the dispatcher; a dispatch mode
    (the Python key) or the profiler must still see based::attention and its backward."""
    q, k, v = make_inputs(1, 2, 12, 4, 3, dtype=torch.float64, requires_grad=True)
    spec = BasedSpec(scale=0.5)
    with _OpLog() as log:
        o = based_attention(q, k, v, spec)
        torch.autograd.grad(o.sum(), (q, k, v))
    assert "based.attention.default" in log.ops and "based.attention_backward.default" in log.ops, log.ops
    with BasedOpCounter() as counter:
        o = based_attention(q, k, v, spec)
        torch.autograd.grad(o.sum(), (q, k, v))
    assert counter.calls == {"based::attention": 1, "based::attention_backward": 1}, counter.calls


class _Subclass(torch.Tensor):
    """A tensor subclass that sees every operator (the Python dispatch key)."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda x: x.as_subclass(torch.Tensor) if isinstance(x, _Subclass) else x  # noqa: E731
        return func(*(unwrap(a) for a in args), **(kwargs or {}))


def _plain_in(context: str) -> bool:
    """ops._plain for three CPU tensors made and checked inside ``context``."""
    from contextlib import nullcontext

    from torch._subclasses.fake_tensor import FakeTensorMode

    from based_compile.op import custom_op as ops

    make = lambda **kw: torch.randn(2, 3, **kw)  # noqa: E731
    if context == "vmap":
        return torch.vmap(lambda x: torch.tensor(ops._plain(x, x, x)))(make()).all().item()
    if context == "functionalize":
        out = []
        torch.func.functionalize(lambda x: out.append(ops._plain(x, x, x)) or x)(make())
        return out[0]
    if context == "subclass":
        return ops._plain(make(), make(), make().as_subclass(_Subclass))
    if context == "meta":
        return ops._plain(make(), make(device="meta"), make())
    if context == "sparse":
        return ops._plain(make(), make(), make().to_sparse())
    ctx = {"plain": nullcontext(), "autocast": torch.autocast("cpu", torch.bfloat16), "fake": FakeTensorMode(),
           "dispatch_mode": _OpLog(), "below_autograd": torch._C._AutoDispatchBelowAutograd()}[context]
    with ctx:
        tensors = (make(), make(requires_grad=context != "fake"), make())
        return ops._plain(*tensors)


@pytest.mark.parametrize("context,plain", [
    ("plain", True), ("below_autograd", True), ("autocast", False), ("fake", False), ("dispatch_mode", False),
    ("vmap", False), ("functionalize", False), ("subclass", False), ("meta", False), ("sparse", False)])
def test_eager_shortcut_only_for_plain_tensors(context, plain):
    """The eager shortcut (no trip through the dispatcher) is taken for plain CPU/CUDA tensors only:
    anything else that would see the operator in the dispatcher still does."""
    assert _plain_in(context) is plain


def test_invalid_kernel_setting_raises_on_every_call(kernel_setting, monkeypatch):
    """Settings are part of the remembered plan's key as written and validated when a plan is made:
    an invalid value is never remembered, and a valid one set between calls takes effect."""
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    spec = BasedSpec(scale=0.5)
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "no_such_kernel")
    for _ in range(2):
        with pytest.raises(ValueError, match=config.KERNEL_ENV_VAR):
            based_attention(q, k, v, spec)
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "cpu_chunked")
    with mock.patch.object(cpu_path, "chunked_forward", wraps=cpu_path.chunked_forward) as spy:
        based_attention(q, k, v, spec)
    assert spy.call_count == 1


def test_meta_tensors_take_the_fake_implementation():
    q, k, v = (torch.empty(2, 3, 40, d, device="meta") for d in (4, 4, 5))
    o = based_attention(q, k, v, BasedSpec(scale=0.5))
    assert o.device.type == "meta" and o.shape == (2, 3, 40, 5)


def test_compiled_autograd_traces_the_backward_operator(kernel_setting):
    q, k, v = make_inputs(1, 2, 12, 4, 3, dtype=torch.float64, requires_grad=True)
    spec = BasedSpec(scale=0.5)
    q64, k64, v64 = (x.detach().requires_grad_(True) for x in (q, k, v))
    ref_grads = torch.autograd.grad(reference(q64, k64, v64, spec).square().sum(), (q64, k64, v64))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: based_attention(q, k, v, spec).square().sum(), backend="aot_eager")
    loss = fn(q, k, v)
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        loss.backward()
    for x, r in zip((q, k, v), ref_grads):
        assert_rel_close(x.grad, r, 1e-10)


# ---------------------------------------------------------------------------------------------
# Values and gradients vs float64 on the CPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["cpu_quadratic", "cpu_chunked"])
@pytest.mark.parametrize("layout,causal,normalize", list(itertools.product(["BHTD", "BTHD"], [True, False],
                                                                            [True, False])))
def test_cpu_paths_match_float64(kernel, layout, causal, normalize, kernel_setting):
    kernel_setting(kernel)
    for coeffs, kv_heads, t in ((COEFFS[0], 4, 150), (COEFFS[1], 2, 67)):   # T: several chunks, a short last one
        if normalize and coeffs == COEFFS[1]:
            coeffs = POSITIVE_COEFFS         # a sign-changing f makes the normalised output ill-conditioned
        spec = BasedSpec(layout=layout, scale=0.3, c0=coeffs[0], c1=coeffs[1], c2=coeffs[2], causal=causal,
                         normalize=normalize, eps=1e-6, group=4 // kv_heads)
        q, k, v = make_inputs(2, 4, t, 8, 5, kv_heads=kv_heads, layout=layout)
        check_against_float64(q, k, v, spec, 1e-10)


@pytest.mark.parametrize("kernel", ["cpu_quadratic", "cpu_chunked"])
def test_cpu_paths_edge_shapes(kernel, kernel_setting):
    """T = 1, one chunk exactly, one token more; Dk = Dv = 1; a strided (non-contiguous) q.

    T = 1 runs unnormalised: there o = f v / (f + eps), whose q and k gradients are of the order
    of eps and come out of a cancellation, so they carry ~1e-9 relative rounding in float64."""
    kernel_setting(kernel)
    for t, (dk, dv), causal, normalize in ((1, (3, 2), True, False), (cpu_path.CHUNK_SIZE, (1, 1), True, True),
                                           (cpu_path.CHUNK_SIZE + 1, (5, 3), True, True),
                                           (cpu_path.CHUNK_SIZE + 1, (5, 3), False, True)):
        q, k, v = make_inputs(2, 3, t, dk, dv, kv_heads=1)
        q = torch.cat([q, q], dim=-1)[..., :dk]                  # strided view
        c0, c1, c2 = POSITIVE_COEFFS                   # normalised: keep the normaliser away from 0
        spec = BasedSpec(scale=0.7, c0=c0, c1=c1, c2=c2, causal=causal, normalize=normalize, group=3)
        check_against_float64(q, k, v, spec, 1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("kernel", ["cpu_quadratic", "cpu_chunked"])
def test_cpu_paths_low_precision(dtype, tol, kernel, kernel_setting):
    kernel_setting(kernel)
    q, k, v = make_inputs(1, 2, 100, 16, 8, dtype=dtype)
    check_against_float64(q, k, v, BasedSpec(scale=0.25), tol)


def test_auto_policy_runs_both_cpu_forms(kernel_setting, monkeypatch):
    calls = []
    for name in ("quadratic_forward", "chunked_forward", "quadratic_backward", "chunked_backward"):
        fn = getattr(cpu_path, name)
        monkeypatch.setattr(cpu_path, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    cross = next(row.t for row in policy.CPU_CROSSOVERS if row.training)       # the inputs require grad
    for t, form in ((cross - 1, "quadratic"), (cross + 3, "chunked")):
        calls.clear()
        q, k, v = make_inputs(1, 1, t, 4, 4)
        check_against_float64(q, k, v, BasedSpec(scale=0.5), 1e-10)
        assert calls == [f"{form}_forward", f"{form}_backward"]


def test_arguments_are_checked(kernel_setting):
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    with pytest.raises(TypeError, match="spec"):
        based_attention(q, k, v, {"scale": 0.5})
    with pytest.raises(ValueError, match="layout"):
        based_attention(q, k, v, BasedSpec(layout="BHDT"))
    with pytest.raises(ValueError, match="eps"):
        based_attention(q, k, v, BasedSpec(eps=-1.0))
    with pytest.raises(ValueError, match="multiple"):
        based_attention(q, k[:, :1].expand(1, 3, 8, 4), v[:, :1].expand(1, 3, 8, 4), BasedSpec())
    with pytest.raises(TypeError, match="dtype"):
        based_attention(q, k.float(), v, BasedSpec())
    with pytest.raises(TypeError, match="^k must be a torch.Tensor"):
        based_attention(q, k.tolist(), v, BasedSpec())
    with pytest.raises(ValueError, match="sequence length"):   # after a call of the same spec: checked again
        based_attention(q, k[:, :, :5], v, BasedSpec())


@pytest.mark.parametrize("field,value", [("scale", None), ("c2", "0.5"), ("eps", True), ("c0", torch.tensor(1.0))])
def test_spec_fields_must_be_numbers(field, value):
    with pytest.raises(TypeError, match=f"BasedSpec.{field} must be a number"):
        BasedSpec(**{field: value})


@pytest.mark.parametrize("field,value,error", [
    ("causal", "no", TypeError), ("normalize", None, TypeError), ("causal", 1, TypeError),
    ("layout", "BSHD", ValueError), ("eps", -1.0, ValueError), ("eps", float("nan"), ValueError),
    ("group", 0, ValueError), ("group", 1.5, ValueError)])
def test_spec_fields_are_checked(field, value, error):
    """No coercion: bool("no") is True, so a string would silently mean causal."""
    with pytest.raises(error, match=f"BasedSpec.{field} must be"):
        BasedSpec(**{field: value})


def test_operators_refuse_non_tensors(kernel_setting):
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    spec = BasedSpec(scale=0.5)
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="q must be a torch.Tensor"):
            torch.ops.based.attention(None, k, v, *spec.op_arguments)
    o, z = torch.ops.based.attention(q, k, v, *spec.op_arguments)
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        ATTENTION_BACKWARD(torch.randn_like(o), q, k, v, o, None, *spec.op_arguments, False)


def test_backward_operator_checks_do_o_and_z(kernel_setting):
    """The kernels index do, o and z by q's sizes: other shapes or dtypes are refused, on real and
    on fake tensors, instead of reading out of bounds."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    spec = BasedSpec(scale=0.5)
    o, z = torch.ops.based.attention(q, k, v, *spec.op_arguments)
    do = torch.randn_like(o)
    good = dict(do=do, q=q, k=k, v=v, o=o, z=z)
    bad = [("do", do[:, :, :5]), ("do", do.float()), ("o", o[..., :3]), ("z", z[:, :, :5]), ("z", z.float())]
    for name, wrong in bad:
        with pytest.raises(ValueError, match=f"attention_backward: {name} must be"):
            ATTENTION_BACKWARD(*{**good, name: wrong}.values(), *spec.op_arguments, False)
        with FakeTensorMode() as mode:
            fake = {n: mode.from_tensor(t) for n, t in {**good, name: wrong}.items()}
            with pytest.raises(ValueError, match=f"attention_backward: {name} must be"):
                ATTENTION_BACKWARD(*fake.values(), *spec.op_arguments, False)
    dq, dk, dv = ATTENTION_BACKWARD(do, q, k, v, o, z, *spec.op_arguments, False)     # the right ones pass
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    based_attention(q2, k2, v2, spec).backward(do)
    for got, want in ((dq, q2.grad), (dk, k2.grad), (dv, v2.grad)):
        assert_rel_close(got, want, 1e-12)


def test_unhashable_kernel_setting_raises_value_error(kernel_setting):
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    kernel_setting(["cpu_chunked"])
    with pytest.raises(ValueError, match=r"based_compile\.config\.kernel"):
        based_attention(q, k, v, BasedSpec())


def test_spec_operator_arguments():
    import numpy as np
    spec = BasedSpec(scale=np.float32(0.5), c0=1, causal=False)
    assert spec.op_arguments == ("BHTD", 0.5, 1.0, 1.0, 0.5, False, True, 1e-6)
    assert all(type(a) in (str, float, bool) for a in spec.op_arguments)


def test_plan_follows_the_kernel_setting_between_calls(kernel_setting):
    """The checked arguments and kernel choice are remembered per shapes and spec; the kernel setting
    is part of what they are remembered by."""
    q, k, v = make_inputs(1, 2, 8, 4, 4)
    spec = BasedSpec(scale=0.5)
    ran = []
    with torch.no_grad():
        for kernel in ("cpu_quadratic", "cpu_chunked", "cpu_quadratic"):
            kernel_setting(kernel)
            with mock.patch.object(cpu_path, f"{kernel.removeprefix('cpu_')}_forward",
                                   wraps=getattr(cpu_path, f"{kernel.removeprefix('cpu_')}_forward")) as spy:
                based_attention(q, k, v, spec)
            ran.append(spy.call_count)
    assert ran == [1, 1, 1]


# ---------------------------------------------------------------------------------------------
# Compiled code
# ---------------------------------------------------------------------------------------------
def test_compile_dynamic_no_recompile(kernel_setting):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    spec = BasedSpec(layout="BTHD", scale=0.35, c0=POSITIVE_COEFFS[0], c1=POSITIVE_COEFFS[1], c2=POSITIVE_COEFFS[2])

    def fn(q, k, v):
        return based_attention(q, k, v, spec) * 2.0

    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    cross = next(row.t for row in policy.CPU_CROSSOVERS if row.training)
    for t in (24, 61, cross + 5):           # both CPU forms behind one graph: the choice is made at run time
        q, k, v = make_inputs(1, 2, t, 4, 6, kv_heads=1, layout="BTHD", dtype=torch.float32, requires_grad=True)
        o = compiled(q, k, v)
        o.backward(torch.ones_like(o))
        q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
        ref = reference(q64, k64, v64, spec) * 2.0
        ref.backward(torch.ones_like(ref))
        assert_rel_close(o, ref, 1e-5, f"o at T={t}")
        for x, x64, name in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
            assert_rel_close(x.grad, x64.grad, 1e-5, f"{name} at T={t}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])


def test_compile_inference_graph_contains_the_op(kernel_setting):
    spec = BasedSpec(scale=0.5)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    q, k, v = make_inputs(1, 2, 20, 4, 4, dtype=torch.float32)
    with torch.no_grad():
        o = torch.compile(lambda q, k, v: based_attention(q, k, v, spec), backend=backend, fullgraph=True)(q, k, v)
    assert_rel_close(o, reference(q.double(), k.double(), v.double(), spec), 1e-5)
    (gm,) = graphs
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.based.attention.default in targets or torch.ops.based.attention in targets


def test_export_with_dynamic_length(kernel_setting):
    spec = BasedSpec(scale=0.5, causal=False)

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return based_attention(q, k, v, spec)

    q, k, v = make_inputs(1, 2, 40, 4, 3, dtype=torch.float32)
    length = torch.export.Dim("T", min=2, max=1 << 20)
    ep = torch.export.export(Attention(), (q, k, v), dynamic_shapes=({2: length},) * 3)
    assert "torch.ops.based.attention.default" in ep.graph_module.code
    q, k, v = make_inputs(1, 2, 77, 4, 3, dtype=torch.float32)
    assert_rel_close(ep.module()(q, k, v), reference(q.double(), k.double(), v.double(), spec), 1e-5)


def check_autocast_gradients(o, q, k, v, spec: BasedSpec):
    """float32 q, k, v's gradients through a low-precision autocast output, against float64."""
    do = torch.randn_like(o, dtype=torch.float32)
    (o.float() * do).sum().backward()
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    (reference(q64, k64, v64, spec) * do.double()).sum().backward()
    for x, x64, name in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
        assert x.grad.dtype == torch.float32
        assert_rel_close(x.grad, x64.grad, 5e-2, name)


def test_autocast_cpu_casts_to_the_autocast_dtype(kernel_setting):
    spec = BasedSpec(scale=0.25)
    q, k, v = make_inputs(1, 2, 40, 16, 8, dtype=torch.float32, requires_grad=True)
    ref = reference(q.detach().double(), k.detach().double(), v.detach().double(), spec)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o = based_attention(q, k, v, spec)
        oc = torch.compile(lambda q, k, v: based_attention(q, k, v, spec), fullgraph=True)(q, k, v)
    for out in (o, oc):
        assert out.dtype == torch.bfloat16
        assert_rel_close(out, ref, 3e-2)
    check_autocast_gradients(o, q, k, v, spec)
    with torch.autocast("cpu", dtype=torch.float16):
        assert based_attention(q, k.half(), v, spec).dtype == torch.float16    # mixed inputs: all cast


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_leaves_float64_alone(kernel_setting, autocast_dtype):
    """Autocast never casts float64 (a float64 matmul under autocast stays float64): neither does the
    operator, eagerly, through the dispatcher or compiled."""
    spec = BasedSpec(scale=0.5)
    q, k, v = make_inputs(1, 2, 12, 4, 3, dtype=torch.float64, requires_grad=True)
    ref = reference(q.detach(), k.detach(), v.detach(), spec)
    with torch.autocast("cpu", dtype=autocast_dtype):
        assert (q @ k.transpose(-2, -1)).dtype == torch.float64          # what autocast itself does
        outs = (based_attention(q, k, v, spec),
                torch.ops.based.attention(q, k, v, "BHTD", 0.5, 1.0, 1.0, 0.5, True, True, 1e-6)[0],
                torch.compile(lambda q, k, v: based_attention(q, k, v, spec), fullgraph=True)(q, k, v))
    for o in outs:
        assert o.dtype == torch.float64
        assert_rel_close(o, ref, 1e-10)
    o = outs[0]
    q64, k64, v64 = (x.detach().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(o)
    for g, r in zip(torch.autograd.grad(o, (q, k, v), do),
                    torch.autograd.grad(reference(q64, k64, v64, spec), (q64, k64, v64), do)):
        assert g.dtype == torch.float64
        assert_rel_close(g, r, 1e-10)


# ---------------------------------------------------------------------------------------------
# Memory: long-context inference on the CPU never builds T x T
# ---------------------------------------------------------------------------------------------
class LargestTensor(TorchDispatchMode):
    """Records the largest numel of any tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def watch_largest_tensor(monkeypatch, names):
    """Run the named cpu_path functions under LargestTensor (inside the operator, so that the aten
    ops of the implementation are seen, not just the operator's outputs); {name: largest numel}."""
    seen = {}
    for name in names:
        fn = getattr(cpu_path, name)

        def watched(*args, _fn=fn, _name=name, **kwargs):
            with LargestTensor() as mode:
                out = _fn(*args, **kwargs)
            seen[_name] = mode.largest
            return out

        monkeypatch.setattr(cpu_path, name, watched)
    return seen


def test_long_context_cpu_inference_is_linear_in_memory(kernel_setting, monkeypatch):
    t = 32768
    spec = BasedSpec(scale=0.25)
    q, k, v = make_inputs(1, 1, t, 16, 16, dtype=torch.float32, seed=0)
    assert policy.choose_kernel(spec, q, k, v, training=False) == "cpu_chunked"
    seen = watch_largest_tensor(monkeypatch, ["quadratic_forward", "chunked_forward"])
    with torch.no_grad():
        o = based_attention(q, k, v, spec)
    assert list(seen) == ["chunked_forward"]
    # The largest tensors are the query features [T, Dk(Dk+1)/2]: 136 T here, against T x T = 32768 T.
    assert seen["chunked_forward"] <= 256 * t, f"a tensor of {seen['chunked_forward']} elements"
    # Causal attention on the first 1024 tokens is the same computation: check it against float64.
    ref = reference(q[:, :, :1024].double(), k[:, :, :1024].double(), v[:, :, :1024].double(), spec)
    assert_rel_close(o[:, :, :1024], ref, 1e-5)
    assert torch.isfinite(o).all()
    # The watcher does see a T x T matrix when there is one.
    kernel_setting("cpu_quadratic")
    with torch.no_grad():
        based_attention(q[:, :, :1024], k[:, :, :1024], v[:, :, :1024], spec)
    assert seen["quadratic_forward"] >= 1024 * 1024


def test_long_context_cpu_training_is_linear_in_memory(kernel_setting, monkeypatch):
    t = 16384
    spec = BasedSpec(scale=0.25)
    q, k, v = make_inputs(1, 1, t, 16, 16, dtype=torch.float32, seed=1, requires_grad=True)
    seen = watch_largest_tensor(monkeypatch, ["quadratic_backward", "chunked_forward", "chunked_backward"])
    based_attention(q, k, v, spec).sum().backward()
    assert sorted(seen) == ["chunked_backward", "chunked_forward"], seen
    # The backward's largest: q (x) dn' [T, Dk * (Dv + 1)] = 272 T here, against T x T = 16384 T.
    assert seen["chunked_backward"] <= 512 * t, f"a tensor of {seen['chunked_backward']} elements"
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    naive_chunk_based(q64, k64, v64, scale=spec.scale, eps=spec.eps).sum().backward()     # O(T) float64
    for x, x64, name in ((q, q64, "dq"), (k, k64, "dk"), (v, v64, "dv")):
        assert_rel_close(x.grad, x64.grad, 1e-4, name)


# ---------------------------------------------------------------------------------------------
# The Triton kernels behind the operator, on the CPU under TRITON_INTERPRET=1 (forced)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["parallel", "fused_chunk", "chunked"])
def test_forced_triton_kernel_through_the_op(kernel, kernel_setting, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU tests")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernel_setting(kernel)
    q, k, v = make_inputs(1, 4, 40, 8, 20, kv_heads=2, layout="BTHD", dtype=torch.float32)
    assert policy.choose_kernel(BasedSpec(layout="BTHD"), q, k, v, True) == kernel
    for coeffs, normalize in ((POSITIVE_COEFFS, True), (COEFFS[1], False)):
        spec = BasedSpec(layout="BTHD", scale=0.3, c0=coeffs[0], c1=coeffs[1], c2=coeffs[2], normalize=normalize,
                         group=2)
        check_against_float64(q, k, v, spec, 1e-4)


# ---------------------------------------------------------------------------------------------
# GPU (run by the lead with -m gpu)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
def test_opcheck_cuda(normalize, kernel_setting):
    for kernel in ("parallel", "fused_chunk", "chunked"):
        kernel_setting(kernel)
        q, k, v = make_inputs(1, 4, 80, 16, 32, kv_heads=2, dtype=torch.float32, device="cuda", requires_grad=True)
        spec = BasedSpec(scale=0.25, normalize=normalize)
        args = op_args(q, k, v, spec, True)
        torch.library.opcheck(ATTENTION, args)
        o, z = ATTENTION(*args)
        do = torch.randn_like(o)
        torch.library.opcheck(ATTENTION_BACKWARD, (do, q.detach(), k.detach(), v.detach(), o.detach(), z) + args[3:])


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["auto", "parallel", "fused_chunk", "chunked"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_cuda_matches_float64(kernel, dtype, tol, kernel_setting):
    kernel_setting(kernel)
    for layout, kv_heads, coeffs, normalize in (("BHTD", 4, COEFFS[0], True), ("BTHD", 2, COEFFS[1], False)):
        q, k, v = make_inputs(2, 4, 300, 16, 64, kv_heads=kv_heads, layout=layout, dtype=dtype, device="cuda")
        spec = BasedSpec(layout=layout, scale=0.25, c0=coeffs[0], c1=coeffs[1], c2=coeffs[2], normalize=normalize)
        check_against_float64(q, k, v, spec, tol)


@pytest.mark.gpu
def test_cuda_refuses_float64(kernel_setting):
    q, k, v = make_inputs(1, 2, 16, 16, 16, device="cuda")
    with pytest.raises(TypeError, match="float16, bfloat16, float32"):
        based_attention(q, k, v, BasedSpec())


@pytest.mark.gpu
def test_cuda_autocast_bf16(kernel_setting):
    spec = BasedSpec(scale=0.25)
    q, k, v = make_inputs(2, 4, 256, 16, 64, dtype=torch.float32, device="cuda", requires_grad=True)
    ref = reference(q.detach().double(), k.detach().double(), v.detach().double(), spec)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o = torch.compile(lambda q, k, v: based_attention(q, k, v, spec), fullgraph=True)(q, k, v)
    assert o.dtype == torch.bfloat16
    assert_rel_close(o, ref, 2e-2)
    check_autocast_gradients(o, q, k, v, spec)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
@pytest.mark.parametrize("training", [False, True])
def test_cuda_compile_modes(mode, training, kernel_setting):
    torch._dynamo.reset()
    spec = BasedSpec(scale=0.25)
    # A pointwise weight around the op (a Linear here made max-autotune benchmark matmul configs for
    # minutes per shape); it has a gradient, so training replays write parameter grads too.
    weight = torch.randn(64, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(q, k, v):
        return based_attention(q, k, v, spec) * weight

    compiled = torch.compile(step, mode=mode, fullgraph=True)
    for t in (1024, 8192):                  # both sides of the inference crossover at B*H = 256
        q, k, v = make_inputs(4, 64, t, 16, 64, dtype=torch.bfloat16, device="cuda", requires_grad=training)
        with torch.set_grad_enabled(training):
            for _ in range(3):              # CUDA graphs: warm-up, record, replay
                torch.compiler.cudagraph_mark_step_begin()   # a new iteration (training loops need it)
                for x in (q, k, v, weight):                  # as optimizer.zero_grad(set_to_none=True):
                    x.grad = None                           # accumulating into last replay's grads is an error
                out = compiled(q, k, v)
                if training:
                    out.float().sum().backward()
        # The chunked reference: no [T, T] float64 matrix at T = 8192.
        qd, kd, vd = (x.detach().double().requires_grad_(training) for x in (q, k, v))
        ref = naive_chunk_based(qd, kd, vd, spec.scale, spec.coeffs, spec.causal, spec.normalize, spec.eps)
        ref = ref * weight.detach().double()
        assert_rel_close(out, ref, 3e-2, f"{mode} T={t}")
        if training:                        # the last replay's gradients
            ref.sum().backward()
            for name, x, xd in zip("qkv", (q, k, v), (qd, kd, vd)):
                assert_rel_close(x.grad, xd.grad, 3e-2, f"{mode} T={t} d{name}")


def test_compiled_backward_call_runs_the_implementation_directly(monkeypatch):
    """A compiled backward calls ``based::attention_backward`` with grad mode off on plain tensors: the
    Autograd kernel runs the implementation itself instead of a second trip through the dispatcher
    (``redispatch``, ~15 us of host time per call and layer), and computes the reference gradients."""
    from based_compile.op import custom_op

    q, k, v = make_inputs(1, 2, 12, 4, 3, dtype=torch.float64)
    spec = BasedSpec(scale=0.5)
    params = (*spec.op_arguments, True)
    o, z = torch.ops.based.attention(q, k, v, *params)
    do = torch.randn_like(o)
    q64, k64, v64 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = torch.autograd.grad(reference(q64, k64, v64, spec), (q64, k64, v64), do)

    class NoRedispatch:
        def redispatch(self, *args):
            raise AssertionError("based::attention_backward went through the dispatcher a second time")

    monkeypatch.setattr(custom_op, "_ATTENTION_BACKWARD", NoRedispatch())
    with torch.no_grad():
        grads = torch.ops.based.attention_backward(do, q, k, v, o, z, *params)
    for g, r in zip(grads, ref):
        assert_rel_close(g, r, 1e-10)
    # Under a dispatch mode (not plain), the call still reaches the operator's other kernels.
    with torch.no_grad(), pytest.raises(AssertionError, match="second time"):
        with _Recording():
            torch.ops.based.attention_backward(do, q, k, v, o, z, *params)


class _Recording(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
