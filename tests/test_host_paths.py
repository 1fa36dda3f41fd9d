"""The host-side shortcuts of the operators' per-call paths (benchmarks/host_overhead.py measures
them): each must give what the long way gives, and a remembered result must never stand in for a
check of arguments it was not computed for."""
from __future__ import annotations

import math
import os
import re

import pytest
import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode

from based_compile.kernels import launch
from based_compile.kernels import recurrent_step as step_kernel
from based_compile.kernels.arguments import environ_get, triton_interpreting
from based_compile.op import recurrent_step as step_op
from based_compile.op.recurrent_step import check_step_arguments, recurrent_step_reference
from compare import assert_rel_close

TAYLOR = ["const:1", "linear", "outer"]


def test_environ_get_reads_what_os_environ_holds(monkeypatch):
    name = "BASED_COMPILE_TEST_VARIABLE"
    monkeypatch.delenv(name, raising=False)
    assert environ_get(name) is None and environ_get(name, "d") == "d"
    for value in ("1", "0", "", "  spaced ", "caf\u00e9", "1"):       # each change read at once, "1" twice
        monkeypatch.setenv(name, value)
        assert environ_get(name) == value == os.environ.get(name)
    monkeypatch.delenv(name)
    assert environ_get(name, "gone") == "gone"
    for value, interpreting in (("1", True), ("0", False), ("", False), ("yes", True)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert triton_interpreting() is interpreting


def test_host_integer_helpers_match_triton():
    for n in range(0, 2100):
        assert launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 127):
            assert launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)


def _step_inputs(dtype=torch.float32, rows=3, group=2, dk=4, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = 1 + dk + dk * dk
    q = torch.randn(1, rows * group, 1, dk, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(1, rows, 1, dk, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(1, rows, 1, dv, generator=g, dtype=torch.float64).to(dtype)
    kv = torch.randn(1, rows, f, dv, generator=g, dtype=torch.float64).to(dtype)
    ks = (torch.rand(1, rows, 1, f, generator=g, dtype=torch.float64) * 4 + 1).to(dtype)
    factors = [1.0, dk ** -0.25, 1 / math.sqrt(2 * dk)]
    return [q, k, v, kv, ks, TAYLOR, factors, [x * 1.25 for x in factors], True, 1e-6]


def test_step_operator_runs_its_implementation_without_a_second_dispatch(monkeypatch):
    """Plain CPU tensors: the Autograd kernel calls the implementation itself (no ``redispatch``) and
    returns the reference's values; under a fake-tensor mode the call still goes through the dispatcher."""
    args = _step_inputs(torch.float64)
    ref = recurrent_step_reference(*args)

    def no_redispatch(self, *a, **kw):
        raise AssertionError(f"{self} went through the dispatcher a second time")

    monkeypatch.setattr(torch._ops.OpOverload, "redispatch", no_redispatch)
    with torch.no_grad():
        out = torch.ops.based.recurrent_step.default(*args)
    for got, want in zip(out, ref):
        assert got.shape == want.shape
        assert_rel_close(got, want, 1e-12)
    with FakeTensorMode() as mode, pytest.raises(AssertionError, match="second time"):
        torch.ops.based.recurrent_step.default(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                 for a in args])
    with pytest.raises(RuntimeError, match="not differentiable"):            # the refusal comes first
        torch.ops.based.recurrent_step.default(args[0].clone().requires_grad_(), *args[1:])


def _bad_variants(args):
    """(what differs, arguments, the error check_step_arguments raises) for calls like ``args``."""
    q, k, v, kv, ks, pieces, qf, kf, normalize, eps = args
    return [
        ("kv_state size", [q, k, v, kv[..., :-1], ks, pieces, qf, kf, normalize, eps], ValueError),
        ("k_state size", [q, k, v, kv, ks[..., :-1], pieces, qf, kf, normalize, eps], ValueError),
        ("no k_state, normalised", [q, k, v, kv, None, pieces, qf, kf, True, eps], ValueError),
        ("a piece", [q, k, v, kv, ks, ["const:1", "linear", "quad"], qf, kf, normalize, eps], ValueError),
        ("a factor missing", [q, k, v, kv, ks, pieces, qf[:2], kf, normalize, eps], ValueError),
        ("eps", [q, k, v, kv, ks, pieces, qf, kf, normalize, -1.0], ValueError),
        ("normalize", [q, k, v, kv, ks, pieces, qf, kf, 1, eps], TypeError),
        ("an integer state", [q, k, v, kv.to(torch.int32), ks, pieces, qf, kf, normalize, eps], TypeError),
        ("a state on another device", [q, k, v, kv.to("meta"), ks, pieces, qf, kf, normalize, eps], ValueError),
        ("v's rows", [q, k, v[:, :2], kv, ks, pieces, qf, kf, normalize, eps], ValueError),
        ("not a tensor", [q, k, None, kv, ks, pieces, qf, kf, normalize, eps], TypeError),
    ]


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()),
                    reason="the CUDA implementation runs on CPU tensors only under TRITON_INTERPRET=1")
def test_cuda_step_checks_every_new_key(monkeypatch):
    """The CUDA implementation remembers its checks per key: a call differing from a checked one in
    any checked property raises as check_step_arguments does, after the good call and again, and
    the good call still gives the reference's values."""
    monkeypatch.setattr(step_kernel, "POISON_OUTPUTS", True)
    step_op._CHECKED.clear()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in _step_inputs(torch.float32)]
    ref = recurrent_step_reference(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    for _ in range(2):                                        # the second call is a remembered one
        out = step_op._step_cuda(*args)
        for got, want in zip(out, ref):
            assert_rel_close(got.double(), want, 1e-5)
    assert len(step_op._CHECKED) == 1
    for what, bad, error in _bad_variants(args):
        with pytest.raises(error) as expected:
            check_step_arguments(*bad)
        for _ in range(2):
            with pytest.raises(error, match=re.escape(str(expected.value))):
                step_op._step_cuda(*bad)
    out = step_op._step_cuda(*args)
    assert_rel_close(out[0].double(), ref[0], 1e-5)


def _cache_reference(q, k, v, spec, layout="BHTD"):
    """float64 Based attention of Tq queries at the end of Tk keys (causal mask aligned to the end)."""
    if layout == "BTHD":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    q, k, v = (x.double() for x in (q, k, v))
    s = spec.scale * q @ k.transpose(-2, -1)
    a = (spec.c0 + spec.c1 * s + spec.c2 * s * s).tril(k.shape[2] - q.shape[2])
    o = (a @ v) / (a.sum(-1, keepdim=True) + spec.eps)
    return o if layout == "BHTD" else o.transpose(1, 2)


@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_growing_kv_cache_makes_one_plan_and_every_length_is_right(monkeypatch, layout):
    """Queries against a cache that grows by a token per call: one plan (checks and kernel choice)
    for all lengths, each call with its own Tk (values against float64); a call that breaks what
    the shared plan assumes (k and v of different lengths, more queries than keys) still raises."""
    from based_compile import BasedSpec, based_attention
    from based_compile.op import custom_op

    custom_op._PLANS.clear()
    made = []
    make = custom_op._make_plan
    monkeypatch.setattr(custom_op, "_make_plan", lambda *a: made.append(a[1].shape) or make(*a))
    spec = BasedSpec(scale=0.5, layout=layout)
    g = torch.Generator().manual_seed(1)
    time = 2 if layout == "BHTD" else 1

    def rand(t, d):
        shape = [1, 2, t, d] if layout == "BHTD" else [1, t, 2, d]
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    keys, values = rand(40, 4), rand(40, 3)
    with torch.no_grad():
        for tq in (1, 3):
            q = rand(tq, 4)
            for tk in range(tq + 1, 40, 3):
                k, v = keys.narrow(time, 0, tk), values.narrow(time, 0, tk)
                o = based_attention(q, k, v, spec)
                assert_rel_close(o, _cache_reference(q, k, v, spec, layout), 1e-12, f"Tq={tq} Tk={tk}")
        assert len(made) == 2, made                             # one plan per query length
        q = rand(1, 4)
        with pytest.raises(ValueError, match="k and v must share the sequence length"):
            based_attention(q, keys.narrow(time, 0, 9), values.narrow(time, 0, 8), spec)
        with pytest.raises(ValueError, match="Tq <= Tk"):
            based_attention(rand(12, 4), keys.narrow(time, 0, 9), values.narrow(time, 0, 9), spec)
        o = based_attention(q, keys.narrow(time, 0, 1), values.narrow(time, 0, 1), spec)    # Tq == Tk: its own plan
        assert_rel_close(o, _cache_reference(q, keys.narrow(time, 0, 1), values.narrow(time, 0, 1), spec, layout),
                         1e-12)
    assert len(made) == 5, made


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("tq", [1, 4, 16, 17, 300, 700])
def test_kernel_choice_for_a_kv_cache_does_not_depend_on_its_length(device, training, tq):
    """custom_op._plan shares one plan across every Tk > Tq: the policy's choice must not depend on Tk."""
    from based_compile.op import policy

    for dk, dv, bh in ((16, 64, 32), (64, 128, 4)):
        for dtype in (torch.float32, torch.bfloat16):
            kernels = {policy.decide_for(device, training, tq, dk, dv, bh, dtype, tk).kernel
                       for tk in (tq + 1, tq + 7, 2 * tq + 5, 4096, 70000)}
            assert len(kernels) == 1, (device, training, tq, dk, dv, bh, dtype, kernels)
