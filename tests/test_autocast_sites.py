"""Under torch.autocast, a rewritten site computes in the precision the user's code computes in
(graph/autocast_scope.py, op/custom_op.register_autocast).

Eager autocast runs matmuls, bmm and einsum in its lower dtype and leaves elementwise products, sums and
cumsums in float32. The operators cast their inputs as a matmul's (a site written with matmuls or einsums),
and a site written with elementwise products and sums alone runs with autocast off. Before, such a site
(the broadcast running-sum form) ran in bfloat16 after the rewrite while eager kept float32 (error ~1e-2),
and based::attention_with_state had no autocast rule at all (its CPU form ran under autocast op by op).
"""
from __future__ import annotations

import math

import pytest
import torch

import based_compile
from based_calls import BasedOpCounter
from compare import assert_rel_close

B, H, T, D, DV = 2, 2, 11, 4, 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def phi(x):
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(D))
    return torch.cat([torch.ones_like(x[..., :1]), x / D ** 0.25, x2], -1)


def broadcast_running_sums(q, k, v):             # no matmul: float32 under autocast in eager
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    y = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)
    return y


def broadcast_running_sums_with_states(q, k, v):
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -1], kc[:, :, -1]


def matmuls(q, k, v):                              # matmuls: bfloat16 under autocast in eager
    s = q @ k.mT / 2
    a = torch.tril(1 + s + 0.5 * s * s)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def feature_map_matmuls(q, k, v):
    a = torch.tril(phi(q) @ phi(k).mT)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, T, d, generator=g) for d in (D, D, DV))


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("fn", [broadcast_running_sums, broadcast_running_sums_with_states],
                         ids=lambda f: f.__name__)
def test_a_site_autocast_leaves_in_float32_stays_float32(fn, inner):
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    q, k, v = _inputs(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _tuple(fn(q, k, v))
        compiled(q, k, v)                                  # compiles
        with BasedOpCounter() as counter:
            got = _tuple(compiled(q, k, v))
    assert sum(counter.calls.values()) >= 1, counter.calls
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        assert_rel_close(g, w, 1e-5, "compiled vs eager under autocast")


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
@pytest.mark.parametrize("fn", [matmuls, feature_map_matmuls], ids=lambda f: f.__name__)
def test_a_matmul_site_is_rewritten_and_cast_as_autocast_casts_it(fn, inner):
    """A site written with matmuls, compiled inside autocast, is read as written (it was refused: the pass
    read autocast's casts before the matmuls as the user's) and runs the operator in autocast's dtype: values
    and gradients as close to float64 as eager's own."""
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    q, k, v = (x.requires_grad_() for x in _inputs(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fn(q, k, v)
        compiled(q, k, v)
        with BasedOpCounter() as counter:
            got = compiled(q, k, v)
    assert sum(counter.calls.values()) >= 1, counter.calls
    assert got.dtype == want.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference = fn(q64, k64, v64)
    cot = torch.randn(reference.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    pairs = [(got, want, reference)]
    grads_got = torch.autograd.grad(got, (q, k, v), cot.to(got.dtype))
    grads_want = torch.autograd.grad(want, (q, k, v), cot.to(want.dtype))
    grads_ref = torch.autograd.grad(reference, (q64, k64, v64), cot)
    pairs += list(zip(grads_got, grads_want, grads_ref))
    for g, w, r in pairs:       # both in bfloat16's precision: the operator no worse than eager's autocast
        assert (g.double() - r).norm() <= 2 * (w.double() - r).norm() + 1e-3 * r.norm()


def test_attention_with_state_casts_like_attention():
    """based::attention_with_state under autocast casts q, k, v as based::attention does; its fake agrees
    with what it returns (compiled with aot_eager, fullgraph)."""
    from based_compile import BasedSpec
    from based_compile.op.attention_with_state import based_attention_with_state
    pieces = ["const:1", "linear", "outer"]

    def f(q, k, v):
        return based_attention_with_state(q, k, v, BasedSpec(scale=0.5), pieces, [1.0, 1.0, 1.0])

    q, k, v = _inputs(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(q, k, v)
        plain = based_compile.based_attention(q, k, v, BasedSpec(scale=0.5))
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    assert eager[0].dtype == plain.dtype == torch.bfloat16
    assert [x.dtype for x in compiled] == [x.dtype for x in eager]
    for c, e in zip(compiled, eager):
        assert_rel_close(c.float(), e.float(), 1e-6, "compiled vs eager")


# ------------------------------------------------------------------ mixed precisions (a reviewer's cases)
def matmuls_without_autocast_divided_outside(q, k, v):
    with torch.autocast("cpu", enabled=False):            # the matmuls in float32 ...
        s = q @ k.mT / 2
        a = torch.tril(1 + s + 0.5 * s * s)
        num, den = a @ v, a.sum(-1, keepdim=True)
    return num / (den + 1e-6)                              # ... the output under the caller's autocast


def states_elementwise_readout_matmul(q, k, v):         # states float32 in eager, the readout bfloat16
    qf, kf = phi(q), phi(k)
    kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
    kc = kf.cumsum(2)
    y = (qf.unsqueeze(-2) @ kv).squeeze(-2) / ((qf * kc).sum(-1, keepdim=True) + 1e-6)
    return y, kv[:, :, -1], kc[:, :, -1]


def step_elementwise(q, k, v, kv, ks):                   # a decode step of products and sums: float32
    pq, pk = phi(q), phi(k)
    kv = kv + pk.transpose(-2, -1) * v
    ks = ks + pk
    num = (pq.transpose(-2, -1) * kv).sum(-2, keepdim=True)
    return num / ((pq * ks).sum(-1, keepdim=True) + 1e-6), kv, ks


def _no_worse_than_eager(compiled_fn, fn, args):
    """Each returned tensor: eager's dtype, and no further from float64 than eager's own autocast error."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _tuple(fn(*args))
        compiled_fn(*args)
        with BasedOpCounter() as counter:
            got = _tuple(compiled_fn(*args))
    reference = _tuple(fn(*(a.double() for a in args)))
    for g, w, r in zip(got, want, reference):
        assert g.dtype == w.dtype
        assert (g.double() - r).norm() <= 2 * (w.double() - r).norm() + 1e-6 * r.norm()
    return counter.calls


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_a_site_split_by_an_autocast_switch_is_refused(inner):
    """torch.autocast switched inside the attention (its matmuls off, its output under the caller's
    autocast): the operator, inserted at the output, would run under the output's setting (bfloat16 where
    eager's matmuls ran in float32: error 2.6e-3 against 7.8e-8); the site is refused."""
    fn = matmuls_without_autocast_divided_outside
    calls = _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner=inner)), fn, _inputs(6))
    assert not calls, calls


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_returned_states_keep_eagers_precision(inner):
    """States eager computes in float32 (products and cumsums) are not computed in bfloat16 because the
    output is read through a matmul (error 2.5e-3 against 5e-8 before)."""
    fn = states_elementwise_readout_matmul
    calls = _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner=inner)), fn, _inputs(7))
    assert calls, calls


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_a_recurrent_step_autocast_leaves_in_float32_stays_float32(inner):
    q, k, v = (x[:, :, :1] for x in _inputs(8))
    f = 1 + D + D * D
    g = torch.Generator().manual_seed(9)
    kv, ks = torch.randn(B, H, f, DV, generator=g), torch.rand(B, H, 1, f, generator=g) + 1
    calls = _no_worse_than_eager(torch.compile(step_elementwise, backend=based_compile.backend(inner=inner)),
                                 step_elementwise, (q, k, v, kv, ks))
    assert calls, calls


def einsum_outer_running_sums(q, k, v):               # einsum outer products: no contraction, float32
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2)
    y = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)
    return y


def states_after_the_output_without_autocast(q, k, v):
    qf, kf = phi(q), phi(k)
    a = torch.tril(qf @ kf.mT)
    y = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
    with torch.autocast("cpu", enabled=False):             # the states in float32, after the output
        kv = torch.einsum("bhtf,bhtd->bhfd", kf, v)
    return y, kv


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_an_einsum_without_a_contraction_is_not_cast(inner):
    """torch.einsum runs as a bmm (cast by autocast) only when it sums over an index of two operands: an
    outer product stays float32 in eager, and so does the site (2.6e-3 against 1.2e-7 when every einsum was
    taken for a matmul)."""
    fn = einsum_outer_running_sums
    assert _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner=inner)), fn, _inputs(10))


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_states_split_from_the_output_by_an_autocast_switch_are_not_returned_by_the_operator(inner):
    """The states computed under another autocast setting than the output: the operator is not asked for
    them (they were computed in bfloat16 with it: 3.0e-3 against 7.9e-8)."""
    fn = states_after_the_output_without_autocast
    _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner=inner)), fn, _inputs(11))


def step_updated_in_place_then_read_without_autocast(q, k, v, kv):
    kv.add_(phi(k).transpose(-2, -1) @ v)                   # under the caller's autocast
    with torch.autocast("cpu", enabled=False):
        return phi(q) @ kv                                  # read in float32


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_a_step_split_by_an_autocast_switch_is_refused(inner):
    """A decode step whose in-place state update and readout run under different autocast settings (the
    readout reads the updated input: the walk back from the output alone missed the update) is refused."""
    q, k, v = (x[:, :, :1] for x in _inputs(12))
    kv = torch.randn(B, H, 1 + D + D * D, DV, generator=torch.Generator().manual_seed(13))
    fn = step_updated_in_place_then_read_without_autocast
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_state, got_state = kv.clone(), kv.clone()
        want = fn(q, k, v, want_state)
        compiled(q, k, v, got_state.clone())
        with BasedOpCounter() as counter:
            got = compiled(q, k, v, got_state)
    assert not counter.calls, counter.calls
    assert_rel_close(got, want, 1e-6, "output")
    assert_rel_close(got_state, want_state, 1e-6, "state")


def implicit_einsum_outer_running_sums(q, k, v):      # "...f,...d" (no '->'): an outer product, float32
    qf, kf = phi(q), phi(k)
    kv = torch.einsum("...f,...d", kf, v).cumsum(2)             # [.., Dv, F]: implicit output, sorted
    y = (qf.unsqueeze(-2) * kv).sum(-1) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)
    return y


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_what_autocast_casts_is_read_off_the_traced_dtypes(inner):
    """Whether a site's code computes in the lower precision is read off the dtypes Dynamo traced, not off op
    names: an einsum outer product without '->' stays float32 (it was taken for a matmul: 2.6e-3 against
    1.2e-7)."""
    fn = implicit_einsum_outer_running_sums
    assert _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner=inner)), fn, _inputs(14))


def continued_prefill_bf16_inputs_float32_states(q, k, v, kv0, ks0):
    qf, kf = phi(q), phi(k)
    kv = kv0[:, :, None] + (kf[..., :, None] * v[..., None, :]).cumsum(2)
    ks = ks0[:, :, None] + kf.cumsum(2)
    return (qf.unsqueeze(-2) @ kv).squeeze(-2) / ((qf * ks).sum(-1, keepdim=True) + 1e-6)


def test_a_graph_only_autocast_makes_valid_is_read_as_traced(caplog):
    """bfloat16 q, k, v against float32 states in a matmul (valid only under autocast): read with autocast
    off, the pass failed on the graph and compiled it unchanged with a warning; it lowers it as traced, autocast's
    casts taken out (graph/autocast_lowering.py, tests/test_autocast_mixed_dtypes.py)."""
    q, k, v = (x.bfloat16() for x in _inputs(15))
    g = torch.Generator().manual_seed(16)
    kv0, ks0 = torch.randn(B, H, 1 + D + D * D, DV, generator=g), torch.rand(B, H, 1 + D + D * D, generator=g) + 1
    fn = continued_prefill_bf16_inputs_float32_states
    with caplog.at_level("WARNING", logger="based_compile"):
        _no_worse_than_eager(torch.compile(fn, backend=based_compile.backend(inner="eager")), fn,
                             (q, k, v, kv0, ks0))
    assert not [r for r in caplog.records if "the pass failed" in r.getMessage()], caplog.text


# ------------------------------------------------------------------ CUDA autocast (the kernels' path)
@pytest.mark.gpu
@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
@pytest.mark.parametrize("fn", [matmuls, broadcast_running_sums], ids=lambda f: f.__name__)
def test_cuda_autocast_runs_the_kernels_in_eagers_precision(fn, inner):
    """On CUDA under bfloat16 autocast: the matmul site runs the Triton kernels in bfloat16, the broadcast
    running-sum site in float32 (autocast off), each with values and gradients no further from float64
    than eager's own autocast result (T = 300: past the kernels' tile and chunk edges)."""
    g = torch.Generator(device="cuda").manual_seed(14)
    q, k, v = (torch.randn(2, 4, 300, d, device="cuda", generator=g).requires_grad_() for d in (D, D, 32))
    compiled = torch.compile(fn, backend=based_compile.backend(inner=inner))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = fn(q, k, v)
        compiled(q, k, v)
        with BasedOpCounter() as counter:
            got = compiled(q, k, v)
    assert counter.total >= 1, counter.calls
    assert got.dtype == want.dtype
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    reference = fn(q64, k64, v64)
    cot = torch.randn(reference.shape, dtype=torch.float64, device="cuda", generator=g)
    pairs = [(got, want, reference)]
    pairs += list(zip(torch.autograd.grad(got, (q, k, v), cot.to(got.dtype)),
                      torch.autograd.grad(want, (q, k, v), cot.to(want.dtype)),
                      torch.autograd.grad(reference, (q64, k64, v64), cot)))
    for got_x, want_x, ref in pairs:
        assert (got_x.double() - ref).norm() <= 2 * (want_x.double() - ref).norm() + 1e-5 * ref.norm()


# An output widened after autocast's matmuls (a.sum(-1, dtype=torch.float32), what CUDA's autocast does to a.sum)
# is rewritten, cast as a matmul and cast to eager's dtype: tests/test_autocast_widened.py.
