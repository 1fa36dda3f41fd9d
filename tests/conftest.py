"""Shared pytest configuration: the gpu/slow markers and random Based inputs."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # for `from compare import ...`

# Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The
# variable must be set before triton is first imported (it is read when kernels are
# decorated), so it is set here, before any test module imports based_compile.
if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_tf32():
    """float32 matmuls in full precision (no TF32) for one test: GPU references are compared at 1e-4."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_inputs(b, h, t, dk, dv, *, kv_heads=None, dtype=torch.float64, device="cpu", layout="BHTD",
                requires_grad=False, seed=None):
    """Fresh random q, k, v (never zeros). q: H heads, k/v: kv_heads heads (GQA when fewer)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(torch.seed() if seed is None else seed)
    hk = h if kv_heads is None else kv_heads

    def one(heads, d):
        x = torch.randn(b, heads, t, d, generator=g, dtype=torch.float64)
        if layout == "BTHD":
            x = x.transpose(1, 2).contiguous()
        x = x.to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    return one(h, dk), one(hk, dk), one(hk, dv)


@pytest.fixture
def based_inputs():
    """Factory fixture: ``based_inputs(b, h, t, dk, dv, **kw)`` -> (q, k, v)."""
    return make_inputs
