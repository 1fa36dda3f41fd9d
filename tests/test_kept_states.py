"""The chunked kernel's forward states kept for its backward (kernels/kept_states.py).

A training forward leaves its prefix states beside z; the backward takes them instead of running the state
kernel again, and recomputes them whenever z is not the forward's own (a copy). Under the interpreter with
state chunks of 32 tokens; every buffer starts as NaN, so states the backward took from the wrong place show.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile.kernels import chunked, kept_states, naive_parallel_based, prefix_backward, prefix_chunked
from based_compile.kernels.arguments import check_arguments

SMALL = prefix_chunked.PrefixConfig(c=32, bt=16, bs=16, bts=16, bv=64, target=1)


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(prefix_chunked, "POISON_OUTPUTS", True)
    monkeypatch.setattr(prefix_backward, "POISON_OUTPUTS", True)


@pytest.fixture
def state_runs(monkeypatch):
    """How many times the backward ran the state kernel."""
    runs = []
    real = prefix_backward.forward_states
    monkeypatch.setattr(prefix_backward, "forward_states", lambda *a, **kw: runs.append(1) or real(*a, **kw))
    return runs


def _gradients(q, k, v, do, args, cfg, keep, copy_z=False):
    o, z = prefix_chunked.prefix_forward(q, k, v, args, cfg, keep=keep)
    return o, prefix_backward.prefix_backward(q, k, v, o, z.clone() if copy_z else z, do, args, cfg)


@pytest.mark.parametrize("t,dv,kv_heads,causal,changes", [
    (77, 64, None, True, {}),
    (200, 96, None, True, dict(target=20)),     # two value blocks forward, one backward: 2 segments, then 4
    (50, 24, 2, True, dict(target=100)),        # GQA, segments
    (45, 40, None, False, {}),                  # non-causal: the total
])
def test_kept_states_give_exact_gradients_without_the_state_kernel(state_runs, t, dv, kv_heads, causal, changes):
    cfg = dataclasses.replace(SMALL, **changes)
    q, k, v = make_inputs(1, 4 if kv_heads else 2, t, 16, dv, kv_heads=kv_heads, dtype=torch.float32)
    args = check_arguments(q, k, v, causal=causal)
    do = torch.randn(*q.shape[:-1], dv)
    o, grads = _gradients(q, k, v, do, args, cfg, keep=True)
    assert state_runs == []
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*leaves, causal=causal)
    assert_rel_close(o, ref, 2e-5, "o")
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, leaves, do.double())):
        assert_rel_close(g, r, 2e-5, f"d{name}")


def test_a_copied_z_makes_the_backward_recompute_the_same_states(state_runs):
    q, k, v = make_inputs(1, 2, 77, 16, 64, dtype=torch.float32)
    args = check_arguments(q, k, v)
    do = torch.randn(1, 2, 77, 64)
    _, kept = _gradients(q, k, v, do, args, SMALL, keep=True)
    assert state_runs == []
    _, copied = _gradients(q, k, v, do, args, SMALL, keep=True, copy_z=True)
    assert state_runs == [1]
    for a, b in zip(kept, copied):
        assert torch.equal(a, b)


def test_only_a_normalised_training_forward_keeps_its_states():
    q, k, v = make_inputs(1, 2, 40, 8, 16, dtype=torch.float32)
    args = check_arguments(q, k, v)
    plain = prefix_chunked.prefix_forward(q, k, v, args, SMALL)[1]
    assert plain.untyped_storage().nbytes() == plain.numel() * 4
    kept = prefix_chunked.prefix_forward(q, k, v, args, SMALL, keep=True)[1]
    assert kept.untyped_storage().nbytes() > kept.numel() * 4
    unnormalised = check_arguments(q, k, v, normalize=False)
    assert prefix_chunked.prefix_forward(q, k, v, unnormalised, SMALL, keep=True)[1] is None
    assert prefix_chunked.recovered_states(kept, args, SMALL, q.dtype) is not None
    assert prefix_chunked.recovered_states(plain, args, SMALL, q.dtype) is None
    # another launch (another chunk) lays the states out differently: not recovered
    assert prefix_chunked.recovered_states(kept, args, dataclasses.replace(SMALL, c=64), q.dtype) is None


def test_recover_gives_back_what_allocate_laid_out_and_nothing_else():
    parts = [((2, 3, 5), torch.bfloat16), ((7,), torch.float32), ((1,), torch.float32)]
    z, views = kept_states.carrier((2, 3), parts, "cpu")
    z.copy_(torch.randn(2, 3))
    for x in views:
        x.copy_(torch.randn(x.shape))
    back = kept_states.carried(z, parts)
    assert [x.data_ptr() for x in back] == [x.data_ptr() for x in views]
    assert all(torch.equal(a, b) for a, b in zip(back, views))
    for other in (z.clone(), z[1:], z.view(3, 2).t(), z.double(), None):
        assert kept_states.carried(other, parts) is None
    assert kept_states.carried(z, parts[:2]) is None                   # another layout, another size


def test_chunked_based_keeps_states_only_when_gradients_are_wanted(state_runs, monkeypatch):
    monkeypatch.setattr(prefix_chunked, "prefix_config", lambda args, dtype=None: SMALL)
    q, k, v = make_inputs(1, 2, 70, 16, 32, dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = chunked.chunked_based(*leaves)
    grads = torch.autograd.grad(o, leaves, torch.ones_like(o))
    assert state_runs == []
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*ref_leaves)
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))):
        assert_rel_close(g, r, 2e-5, f"d{name}")
    seen = []
    real = prefix_chunked.prefix_forward
    monkeypatch.setattr(chunked, "prefix_forward", lambda *a, **kw: seen.append(kw.get("keep", False)) or real(*a, **kw))
    with torch.no_grad():
        chunked.chunked_based(*leaves)
    chunked.chunked_based(q, k, v)
    chunked.chunked_based(*leaves)
    assert seen == [False, False, True]


def _naive_based(q, k, v):                          # [B, H, T, D], as a user writes it
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    a = (1 + s + 0.5 * s ** 2).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device)), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _compiled_training_keeps_states(state_runs, inner, device, dtype, tol):
    import based_compile
    torch._dynamo.reset()
    q, k, v = (x.to(dtype) for x in make_inputs(1, 2, 70, 16, 32, device=device))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    compiled = torch.compile(_naive_based, backend=based_compile.backend(inner=inner))
    o = compiled(*leaves)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    assert state_runs == [], "the compiled backward ran the state kernel again"
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _naive_based(*ref_leaves)
    assert_rel_close(o, ref, tol, "o")
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, ref_leaves, do.double())):
        assert_rel_close(g, r, tol, f"d{name}")


def test_a_compiled_training_step_keeps_its_states(state_runs, monkeypatch):
    """Through the pass, based::attention and AOT autograd: the z the backward operator gets is the forward's."""
    if torch.cuda.is_available():
        pytest.skip("the GPU test below covers it")
    from based_compile.op import config
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(config, "kernel", "chunked")
    monkeypatch.setattr(prefix_chunked, "prefix_config", lambda args, dtype=None: SMALL)
    _compiled_training_keeps_states(state_runs, "aot_eager", "cpu", torch.float32, 2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_gpu_compiled_training_step_keeps_its_states(state_runs, monkeypatch, dtype, tol, no_tf32):
    from based_compile.op import config
    monkeypatch.setattr(config, "kernel", "chunked")
    _compiled_training_keeps_states(state_runs, "inductor", "cuda", dtype, tol)


def test_the_gpu_default_launch_under_the_interpreter(state_runs):
    """The launch the H200 runs (256-token chunks, 128-key state steps, one-hot pair factors, 64-row tiles),
    forward and kept-state backward, at a T that ends inside a chunk."""
    cfg = prefix_chunked.PrefixConfig()
    q, k, v = make_inputs(1, 2, 300, 16, 64, dtype=torch.float32)
    args = check_arguments(q, k, v)
    do = torch.randn(1, 2, 300, 64)
    o, grads = _gradients(q, k, v, do, args, cfg, keep=True)
    assert state_runs == []
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*leaves)
    assert_rel_close(o, ref, 2e-5, "o")
    for name, g, r in zip("qkv", grads, torch.autograd.grad(ref, leaves, do.double())):
        assert_rel_close(g, r, 2e-5, f"d{name}")
