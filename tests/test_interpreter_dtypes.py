"""bfloat16 under Triton's interpreter: its tl.dot on bfloat16 operands returns wrong values, so the
kernels with tl.dot refuse bfloat16 CPU tensors there (a TypeError naming the dtype and why) instead
of returning garbage; the recurrent step (no tl.dot) and the operator's PyTorch CPU forms keep
running bfloat16."""
from __future__ import annotations

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile import BasedSpec, based_attention, config
from based_compile.kernels import (chunked_based, check_arguments, decode, fused_chunk, fused_chunk_based,
                                   naive_parallel_based, parallel_based, prefix_backward, prefix_chunked)
from based_compile.kernels import recurrent_step as step_kernel
from based_compile.kernels.arguments import triton_interpreting

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="the interpreter's bfloat16 refusal")

REFUSAL = r"bfloat16 CPU tensors under TRITON_INTERPRET=1: Triton's interpreter computes tl.dot on bfloat16"


def _bf16(*shape_args, **kw):
    return make_inputs(*shape_args, dtype=torch.bfloat16, **kw)


@pytest.mark.parametrize("fn", [parallel_based, fused_chunk_based, chunked_based], ids=lambda f: f.__name__)
@pytest.mark.parametrize("layout", ["BHTD", "BTHD"])
def test_public_kernels_refuse_bfloat16(fn, layout):
    q, k, v = _bf16(1, 2, 19, 6, 6)
    if layout == "BTHD":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    with pytest.raises(TypeError, match=REFUSAL):
        fn(q, k, v, layout=layout)


def test_internal_kernels_refuse_bfloat16():
    q, k, v = _bf16(1, 2, 19, 6, 6)
    args = check_arguments(q, k, v)
    for forward in (fused_chunk.fused_chunk_forward, prefix_chunked.prefix_forward):
        with pytest.raises(TypeError, match=REFUSAL):
            forward(q, k, v, args)
    o, z = torch.zeros_like(q), torch.ones(1, 2, 19)
    with pytest.raises(TypeError, match=REFUSAL):
        prefix_backward.prefix_backward(q, k, v, o, z, o, args)
    qd, kd, vd = _bf16(1, 2, 2, 8, 8)[0], *_bf16(1, 2, 40, 8, 8)[1:]
    with pytest.raises(TypeError, match=REFUSAL):
        decode.decode_forward(qd, kd, vd, check_arguments(qd, kd, vd, shorter_queries=True))


def test_other_dtypes_still_run():
    q, k, v = make_inputs(1, 2, 19, 6, 6, dtype=torch.float32)
    assert_rel_close(parallel_based(q.half(), k.half(), v.half()), naive_parallel_based(q.double(), k.double(),
                                                                                     v.double()), 1e-2)


def test_recurrent_step_kernel_keeps_bfloat16():
    """The step kernel has no tl.dot: bfloat16 runs, within bfloat16's rounding of float32."""
    pieces, qf, kf = ["const:1", "linear", "outer"], [1.0, 0.5, 0.125], [1.0, 1.0, 1.0]
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 5)
    kv, ks = torch.randn(1, 2, 21, 5) * 0.1, torch.rand(1, 2, 1, 21) + 1
    o32 = step_kernel.recurrent_step(q, k, v, kv, ks, pieces, qf, kf)[0]
    o16 = step_kernel.recurrent_step(*(x.bfloat16() for x in (q, k, v, kv, ks)), pieces, qf, kf)[0]
    assert o16.dtype == torch.bfloat16
    assert_rel_close(o16, o32, 2e-2)


def test_operator_runs_bfloat16_on_its_cpu_forms(monkeypatch):
    """'auto' never picks a Triton kernel for CPU tensors (the PyTorch forms run bfloat16 exactly enough,
    short and long T); a forced Triton kernel raises the refusal instead of returning garbage."""
    monkeypatch.delenv(config.KERNEL_ENV_VAR, raising=False)
    monkeypatch.setattr(config, "kernel", "auto")
    spec = BasedSpec(scale=0.4)
    for t in (19, 600):
        q, k, v = make_inputs(1, 2, t, 6, 6, dtype=torch.float32)
        ref = naive_parallel_based(q.double(), k.double(), v.double(), scale=0.4)
        assert_rel_close(based_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), spec), ref, 3e-2)
    q, k, v = _bf16(1, 2, 19, 6, 6)
    for forced in ("parallel", "fused_chunk", "chunked"):
        monkeypatch.setattr(config, "kernel", forced)
        with pytest.raises(TypeError, match=REFUSAL):
            based_attention(q, k, v, spec)
