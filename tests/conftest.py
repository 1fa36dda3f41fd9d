"""Shared pytest configuration: the gpu/slow markers and random Based inputs."""
from __future__ import annotations

import logging
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

# Inductor compiles in this process rather than in a pool of compile workers: with 2 cores (CI)
# the pool's workers, which each import torch in every process that compiles with Inductor (this
# one, examples run as subprocesses, gloo ranks), cost more CPU than they save. Set before
# torch._inductor.config is first imported; subprocesses inherit it.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

# One intra-op thread (torch's OpenMP/MKL pool), here and in subprocesses (OMP_NUM_THREADS, read when
# a process starts): the suite's tensors are tiny, so a second thread buys nothing, and its OpenMP
# workers spin-wait between parallel regions, burning a core: alone, the same tests took up to twice
# the CPU time (test_op.py 28 CPU-s -> 13); in CI, where two pytest processes share two cores, those
# spinning threads take the other process's core. Set OMP_NUM_THREADS yourself to override both.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The fake-tensor dispatch cache off in this process (set TORCH_FAKE_TENSOR_DISPATCH_CACHE to choose):
# a memo of fake tensors' metadata, semantically invisible by design (torch can cross-check it), which
# pays off when a trace repeats ops on tensors of one shape (a model's layers). Each test here traces a
# small model once or twice, so nearly every op misses, and making the entry costs more than the op,
# most under symbolic sizes: the compile-heavy files took 17% less CPU without it. torch's default is
# still what runs in every subprocess (the examples, fresh interpreters, the distributed ranks) and in
# tests/test_e2e.py (``FAKE_TENSOR_CACHE_DEFAULT``).
FAKE_TENSOR_CACHE_DEFAULT = torch._dynamo.config.fake_tensor_cache_enabled
if "TORCH_FAKE_TENSOR_DISPATCH_CACHE" not in os.environ:
    torch._dynamo.config.fake_tensor_cache_enabled = False

# The multi-process tests (gloo: context parallel, DDP, FSDP2) start their ranks through
# torch.multiprocessing with the "spawn" method, the tests' own and the examples' and benchmarks'
# (mp.spawn, mp.start_processes(start_method="spawn")). Each spawned rank is a fresh interpreter
# that imports torch, Dynamo, Inductor and based_compile again: 3-5 s of CPU, about 14 ranks in a
# run of the suite. Under pytest those ranks start from a fork server that imported them once (the
# server does nothing else, so forking it is safe); what a rank receives is pickled exactly as with
# "spawn", so the examples' arguments are checked as strictly. The first use starts the server.
_FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "torch._inductor.compile_fx", "based_compile"]
_mp_spawn = sys.modules["torch.multiprocessing.spawn"]
_start_processes = _mp_spawn.start_processes


def _start_processes_from_the_fork_server(fn, args=(), nprocs=1, join=True, daemon=False, start_method="spawn"):
    return _start_processes(fn, args, nprocs, join, daemon, "forkserver" if start_method == "spawn" else start_method)


if torch.multiprocessing.get_all_start_methods().count("forkserver"):
    import multiprocessing

    multiprocessing.set_forkserver_preload(_FORK_SERVER_PRELOAD)
    _mp_spawn.start_processes = torch.multiprocessing.start_processes = _start_processes_from_the_fork_server


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches reset before and after a test: each test compiles afresh (``pytestmark =
    pytest.mark.usefixtures("fresh_dynamo")`` in the files that compile)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def probe_off(monkeypatch):
    """The pass without its numerical probe and its index probe, as at real sizes (where neither runs), and
    Dynamo reset around the test (``pytestmark = pytest.mark.usefixtures("probe_off")``)."""
    from based_compile.graph import feature_normaliser, verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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



@pytest.fixture(autouse=True)
def _no_structured_trace_payloads():
    """torch's structured trace (``TORCH_TRACE``) logs through "torch.__trace", which never propagates
    and is always at DEBUG; torch computes each payload (graph dumps at every compile stage) whenever
    that logger has a handler. pytest (>= 8) attaches its log-capture handlers to every
    non-propagating logger, so without TORCH_TRACE every compile in the suite paid for payloads nobody
    reads (about 8% of a compile-heavy file's time). A propagating logger gets no handler of pytest's;
    torch's own lazy handler (TORCH_TRACE unset: it removes itself on first use) stays."""
    trace = logging.getLogger("torch.__trace")
    if not os.environ.get("TORCH_TRACE"):
        trace.propagate = True
        for handler in list(trace.handlers):
            if type(handler).__name__ != "LazyTraceHandler":
                trace.removeHandler(handler)
    yield
