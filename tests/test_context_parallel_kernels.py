"""Context parallelism through the Triton kernels (Triton's interpreter on the CPU): 2 gloo processes.

A shard whose kernel is the fused chunk (or the chunked kernel, which takes no states) runs the fused
chunk from the other ranks' states, at the real Dv and normalised: the spies see every local kernel
call with Dv value columns (before, the shard ran unnormalised over [V, 1], Dv + 1 columns, and
added the prefix in PyTorch). Each rank's output and the gradients of its q, k, v (float32) are
compared with the float64 autograd reference over the whole sequence. Ranks that chose different
kernels (the fused chunk on one, the parallel kernel's unnormalised path on the other) still agree
on the states they exchange.
"""
from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TOL = 3e-5
CONFIGS = [  # (kernel of rank 0, kernel of rank 1, layout, causal, heads, kv_heads, T, Dv, normalize)
    ("fused_chunk", "fused_chunk", "BHTD", True, 2, 2, 37, 24, True),
    ("fused_chunk", "fused_chunk", "BTHD", True, 4, 2, 21, 80, True),       # GQA, two value blocks
    ("fused_chunk", "fused_chunk", "BHTD", False, 2, 1, 19, 16, True),
    ("fused_chunk", "fused_chunk", "BTHD", False, 2, 2, 23, 16, False),
    ("fused_chunk", "fused_chunk", "BHTD", True, 2, 2, 25, 8, False),
    ("chunked", "chunked", "BHTD", True, 2, 2, 33, 24, True),               # the chunked kernel's shards
    ("fused_chunk", "parallel", "BTHD", True, 4, 2, 29, 24, True),          # ranks on different paths
    ("parallel", "fused_chunk", "BHTD", False, 2, 1, 17, 16, True),
    ("parallel", "fused_chunk", "BHTD", True, 2, 2, 15, 8, False),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


class _Spy:
    """Records the value columns and normalisation of every call of the fused chunk's functions."""

    def __init__(self, module, names):
        self.calls = []
        self.module = module
        for name in names:
            setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, fn):
        def spy(*args, **kwargs):
            a = next(x for x in args if type(x).__name__ == "BasedArguments")
            self.calls.append((name, a.dv, a.normalize))
            return fn(*args, **kwargs)
        return spy


def _case(rank, spy, kernels, layout, causal, h, hk, t, dv, normalize):
    import based_compile
    from based_compile.kernels import naive_parallel_based
    from based_compile.op.context_parallel import shard_bounds

    based_compile.config.kernel = kernels[rank]
    g = torch.Generator().manual_seed(4321 + t)

    def rnd(heads, d):
        x = torch.randn(1, heads, t, d, generator=g, dtype=torch.float64)
        return x.transpose(1, 2).contiguous() if layout == "BTHD" else x

    q, k, v, do = rnd(h, 8), rnd(hk, 8), rnd(hk, dv), rnd(h, dv)
    kw = dict(scale=0.4, coeffs=(0.7, 1.2, 0.4), causal=causal, normalize=normalize, eps=1e-3, layout=layout)
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    naive_parallel_based(*full, **kw).backward(do)
    o_full = naive_parallel_based(q, k, v, **kw)
    spec = based_compile.BasedSpec(layout=layout, scale=0.4, c0=0.7, c1=1.2, c2=0.4, causal=causal,
                                   normalize=normalize, eps=1e-3, group=h // hk)
    dim = 1 if layout == "BTHD" else 2
    start, end = shard_bounds(t, rank, WORLD)
    spy.calls.clear()
    with based_compile.context_parallel(dist.group.WORLD):
        shards = [x.narrow(dim, start, end - start).float().requires_grad_() for x in (q, k, v)]
        o = based_compile.based_attention(*shards, spec)
        o.backward(do.narrow(dim, start, end - start).float())
    errors = {"o": _rel(o, o_full.narrow(dim, start, end - start))}
    for name, shard, whole in zip("qkv", shards, full):
        errors["d" + name] = _rel(shard.grad, whole.grad.narrow(dim, start, end - start))
    return errors, list(spy.calls)


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from based_compile.kernels import fused_chunk

        spy = _Spy(fused_chunk, ["fused_chunk_forward", "fused_chunk_backward", "fused_chunk_forward_with_state",
                                 "fused_chunk_backward_with_state"])
        results[rank] = {config: _case(rank, spy, config[:2], *config[2:]) for config in CONFIGS}
    except Exception:  # noqa: BLE001 - reported to the test
        results[rank] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernels through the interpreter (CPU)")
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(_free_port(), shared), nprocs=WORLD, join=True)
        return dict(shared)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_sharded_kernels_equal_the_whole_sequence(results, config):
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
        errors, _ = results[rank][config]
        assert max(errors.values()) < TOL, (rank, errors)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_fused_chunk_shards_run_at_dv_normalised(results, config):
    """The fused chunk's shards: one forward and one backward from the prefix states, with Dv value
    columns and the call's own normalisation; never the plain kernel over [V, 1]."""
    dv, normalize = config[7], config[8]
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
        _, calls = results[rank][config]
        if config[rank] == "parallel":
            assert calls == [], calls
            continue
        assert calls == [("fused_chunk_forward_with_state", dv, normalize),
                         ("fused_chunk_backward_with_state", dv, normalize)], calls
