"""Exact forms the pass refused (issue 13, "Exact forms refused"), found by the fuzzer's refusal
attribution (``python -m fuzz --attribute``): each is now accepted, with a near-miss that stays
refused for a true reason.

Every accepted program is compiled with the based backend at several lengths (Dynamo recompiles
with a symbolic length after the first) and compared with eager in float64, values and
gradients of every input, on fresh random inputs; the test also counts the rewritten sites, so
that a refusal cannot pass for a correct rewrite. What explain() would say (sites, specs, refusals)
is read from the pass's report of each compiled graph (``PassReports``), not from another trace.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx

import based_compile
from based_compile.graph.rewrite import based_attention_call
from compare import assert_rel_close
from compiled_compare import Recorder, shaped_inputs, values_and_grads as _run
from compiled_compare import compile_and_compare as compare_compiled
from pass_reports import PassReports

TOL = 1e-10


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


QKV = ((1, 2, "T", 4), (1, 2, "T", 4), (1, 2, "T", 3))


def compile_and_compare(module, shapes=QKV, lengths=(4, 9, 13), dynamic=None) -> Recorder:
    """compiled_compare's, eagerly compiled (one graph traced at the first length, one with a symbolic length
    at the second unless ``dynamic``)."""
    return compare_compiled(module, shapes, lengths, dynamic=dynamic, tol=TOL)


def _inputs(seed, t, shapes):
    return shaped_inputs(seed, t, shapes)


def explain(module, shapes=QKV, t=6):
    return based_compile.explain(module, *_inputs(0, t, shapes))


# --------------------------------------------------------------------------- the output of an einsum
# written in place (o.div_(den)): functionalisation leaves an unused regenerated view of the matmul's
# output and, under dynamic shapes, size queries of its views; neither is a reader of the value.


class EinsumInPlace(torch.nn.Module):
    """o = einsum(a, v); o.div_(den), [B, T, H, D] inputs, GQA repeat_interleave (``grouped``)."""

    def __init__(self, grouped=False, defect=None):
        super().__init__()
        self.grouped, self.defect = grouped, defect

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if self.grouped:
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        t = q.shape[-2]
        s = (q @ k.mT) / math.sqrt(q.shape[-1])
        a = 1.0 + s + 0.5 * s * s
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=-1 if self.defect == "strict" else 0)
        a = a.masked_fill(~keep, 0.0)
        o = torch.einsum("bhij,bhjd->bhid", a, v)
        o.div_(a.sum(-1).unsqueeze(-1) + 1e-6)
        return o.transpose(1, 2)


BTHD = ((1, "T", 2, 4), (1, "T", 2, 4), (1, "T", 2, 3))
BTHD_GQA = ((1, "T", 4, 4), (1, "T", 2, 4), (1, "T", 2, 3))


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("grouped", [False, True])
def test_einsum_output_divided_in_place_is_rewritten(dynamic, grouped):
    shapes = BTHD_GQA if grouped else BTHD
    recorder = compile_and_compare(EinsumInPlace(grouped), shapes, dynamic=dynamic)
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_einsum_output_divided_in_place_near_miss_is_refused():
    recorder = compile_and_compare(EinsumInPlace(defect="strict"), BTHD)
    for ex in recorder.reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["mask"], ex
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- torch.utils.checkpoint
# Dynamo records a checkpointed function as the tag_activation_checkpoint higher-order op with the
# function's graph as a body: the pass runs on the body, the site is rewritten inside it, and the
# body stays checkpointed (recomputed in the backward).


def _attend(q, k, v, shift=0):
    t = q.shape[-2]
    s = q @ k.transpose(-2, -1) / 2
    a = (1 + s + 0.5 * s * s).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=shift), 0.0)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Checkpointed(torch.nn.Module):
    def __init__(self, shift=0, buffer=False):
        super().__init__()
        self.shift, self.buffer = shift, buffer
        if buffer:
            self.register_buffer("mask", torch.tril(torch.ones(32, 32, dtype=torch.bool), diagonal=shift))

    def attend(self, q, k, v, mask=None):
        if mask is None:
            return _attend(q, k, v, self.shift)
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) / 2
        a = (1 + s + 0.5 * s * s).masked_fill(~mask[:t, :t], 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    def forward(self, q, k, v):
        q = q * 1.5                       # computed outside the body: an activation argument
        args = (q, k, v, self.mask) if self.buffer else (q, k, v)
        return torch.utils.checkpoint.checkpoint(self.attend, *args, use_reentrant=False)


@pytest.mark.parametrize("buffer", [False, True])
def test_attention_inside_checkpoint_is_rewritten_inside(buffer):
    recorder = compile_and_compare(Checkpointed(buffer=buffer))
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and ex.sites[0].spec.causal, ex
    bodies = [m for g in recorder.graphs for m in g.modules() if m is not g and isinstance(m, fx.GraphModule)]
    assert bodies and all(sum(n.target is based_attention_call for n in b.graph.nodes) == 1 for b in bodies)
    assert any(n.target is torch.ops.higher_order.tag_activation_checkpoint
               for g in recorder.graphs for n in g.graph.nodes)      # still checkpointed


def test_buffer_baked_inside_checkpoint_is_guarded():
    module = Checkpointed(buffer=True)
    compiled = torch.compile(module, backend=based_compile.backend(inner="eager"))
    inputs = _inputs(0, 6, QKV)
    compiled(*inputs)
    module.mask.fill_(True)          # no longer causal: the rewrite read the old values
    with pytest.raises(based_compile.StaleBufferError, match="mask"):
        compiled(*inputs)


@pytest.mark.parametrize("buffer", [False, True])
def test_attention_inside_checkpoint_near_miss_is_refused(buffer):
    recorder = compile_and_compare(Checkpointed(shift=-1, buffer=buffer))
    for ex in recorder.reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["mask"], ex
    bodies = [m for g in recorder.graphs for m in g.modules() if m is not g and isinstance(m, fx.GraphModule)]
    assert not any(n.target is based_attention_call for b in bodies for n in b.graph.nodes)


# A mask built outside the checkpointed function and passed in: tests/test_checkpointed_mask.py.


# --------------------------------------------------------------------------- a checkpointed feature map
# checkpoint(phi, q): the body has no contraction, so it joins the attention's region and lowering
# inlines it (its ones column comes out detached); the features are read through it. Here q is also
# scaled by a buffer after its own transpose while k is transposed only: q and k are read on
# different sides of their transposes (the probe picks the reading whose layout agrees).


def _phi(x, defect=None):
    d = x.shape[-1]
    x2 = x * x if defect == "square" else (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
    return torch.cat([x[..., :1] ** 0, x / d ** 0.25, x2 / math.sqrt(2 * d)], dim=-1)


class CheckpointedMap(torch.nn.Module):
    def __init__(self, form="quadratic", defect=None):
        super().__init__()
        self.form, self.defect = form, defect
        self.register_buffer("scale", torch.tensor(0.8))

    def forward(self, q, k, v):
        q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))
        q = q * self.scale
        qf = torch.utils.checkpoint.checkpoint(_phi, q, self.defect, use_reentrant=False)
        kf = torch.utils.checkpoint.checkpoint(_phi, k, self.defect, use_reentrant=False)
        if self.form == "quadratic":
            t = q.shape[-2]
            a = (qf @ kf.mT).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
            o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
        else:
            kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)
            o = (qf.unsqueeze(-1) * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)
        return o.permute(0, 2, 1, 3)


@pytest.mark.parametrize("form", ["quadratic", "linear"])
def test_checkpointed_feature_map_is_read_through(form):
    recorder = compile_and_compare(CheckpointedMap(form), BTHD)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


@pytest.mark.parametrize("form", ["quadratic", "linear"])
def test_checkpointed_elementwise_square_map_is_refused(form):
    recorder = compile_and_compare(CheckpointedMap(form, "square"), BTHD)
    for ex in recorder.reports.graphs:
        assert not ex.sites and "feature_map" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- a learnable scale
# s = (q @ k.mT) * self.scale with an nn.Parameter: sigma c (q.k) = sigma ((c q) . k), so the op reads
# q * self.scale (inserted in the graph: the scale's gradient flows through it). Near miss: the
# parameter scales the weights after the polynomial (c P(s) is not P(c s)): refused with that reason.


class LearnableScale(torch.nn.Module):
    def __init__(self, where="scores"):
        super().__init__()
        self.where = where
        self.scale = torch.nn.Parameter(torch.tensor(0.45, dtype=torch.float64))

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = q @ k.mT
        if self.where == "scores":
            s = s * self.scale
        a = 1 + s + 0.5 * s * s
        if self.where == "weights":
            a = self.scale * a
        a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("dynamic", [None, True])
def test_learnable_scale_on_the_scores_is_rewritten(dynamic):
    module = LearnableScale()
    recorder = compile_and_compare(module, dynamic=dynamic)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()
    # the scale's own gradient
    compiled = torch.compile(module, backend=based_compile.backend(inner="eager"), dynamic=dynamic)
    inputs = _inputs(5, 7, QKV)
    (g_c,) = torch.autograd.grad(compiled(*inputs).square().sum(), [module.scale])
    (g_e,) = torch.autograd.grad(module(*inputs).square().sum(), [module.scale])
    assert_rel_close(g_c, g_e, TOL, "gradient of the learnable scale")
    with torch.no_grad():
        module.scale.mul_(1.7)                     # training changes it: the op reads the new value
    assert_rel_close(compiled(*inputs), module(*inputs), TOL, "output after the scale changed")


def test_learnable_scale_on_the_weights_is_refused():
    recorder = compile_and_compare(LearnableScale("weights"))
    for ex in recorder.reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["unsupported"], ex
        assert "learnable scale" in ex.refusals[0].reason
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- the compressed Taylor map
# cat([x * x, sqrt(2) x[..., iu] x[..., ju]]) through triu_indices (the zoo's featmap_quadratic_triu),
# here on q, k transposed from [B, T, H, D] and k scaled first: every piece reads the same x.


def _phi_triu(x, root2=math.sqrt(2)):
    d = x.shape[-1]
    iu, ju = torch.triu_indices(d, d, offset=1)
    x2 = torch.cat([x * x, root2 * x[..., iu] * x[..., ju]], dim=-1)
    return torch.cat([torch.ones(*x.shape[:-1], 1, dtype=x.dtype), x / d ** 0.25, x2 / math.sqrt(2 * d)], dim=-1)


class TriuTransposed(torch.nn.Module):
    def __init__(self, root2=math.sqrt(2)):
        super().__init__()
        self.root2 = root2

    def forward(self, q, k, v):
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = 0.5 * k
        qf, kf = _phi_triu(q, self.root2), _phi_triu(k, self.root2)
        t = q.shape[-2]
        a = (qf @ kf.mT).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
        return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).transpose(1, 2)


def test_compressed_map_on_transposed_scaled_inputs_is_rewritten():
    recorder = compile_and_compare(TriuTransposed(), BTHD)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_compressed_map_with_a_wrong_off_diagonal_weight_is_refused():
    ex = explain(TriuTransposed(root2=1.4142), BTHD)        # sqrt(2) to 5 digits: not (q.k)^2
    assert not ex.sites and [r.category for r in ex.refusals] == ["feature_map"], ex
    assert "x_0 x_1" in ex.refusals[0].reason


# The compressed map with its index pairs kept in registered buffers (fla's TaylorFeatureMap): a
# buffer is a compile-time constant, read by value like an inline triu_indices, and guarded (a write
# to it after compiling raises). Near misses: buffers that do not list the upper triangle (the
# diagonal pairs twice), and index tensors passed as arguments (not constants).


class TriuBuffers(torch.nn.Module):
    def __init__(self, d=4, pairs="triu"):
        super().__init__()
        iu = torch.triu_indices(d, d, 1) if pairs == "triu" else torch.triu_indices(d, d, 0)[:, :d * (d - 1) // 2]
        self.register_buffer("iu0", iu[0], persistent=False)
        self.register_buffer("iu1", iu[1], persistent=False)

    def phi(self, x, iu0, iu1):
        d = x.shape[-1]
        diag = x * x / math.sqrt(2 * d)
        off = x[..., iu0] * x[..., iu1] / math.sqrt(d)
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, diag, off], -1)

    def forward(self, q, k, v, iu0=None, iu1=None):
        iu0 = self.iu0 if iu0 is None else iu0
        iu1 = self.iu1 if iu1 is None else iu1
        qf, kf = self.phi(q, iu0, iu1), self.phi(k, iu0, iu1)
        kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2)
        z = torch.einsum("bhtf,bhtf->bht", qf, kf.cumsum(2))[..., None]
        return torch.einsum("bhtf,bhtfd->bhtd", qf, kv) / (z + 1e-6)


def test_compressed_map_with_indices_in_buffers_is_rewritten():
    recorder = compile_and_compare(TriuBuffers())
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_compressed_map_index_buffers_are_guarded():
    module = TriuBuffers()
    compiled = torch.compile(module, backend=based_compile.backend(inner=Recorder()))
    q, k, v = _inputs(0, 6, QKV)
    assert_rel_close(compiled(q, k, v), module(q, k, v), TOL, "before the write")
    with torch.no_grad():
        module.iu1.copy_(module.iu0)                       # the pairs (a, a): another function
    with pytest.raises(based_compile.StaleBufferError, match=r"_buffers\['iu1'\]"):
        compiled(q, k, v)


def test_compressed_map_with_buffers_that_are_not_the_upper_triangle_is_refused():
    ex = explain(TriuBuffers(pairs="with diagonal"))
    assert not ex.sites and [r.category for r in ex.refusals] == ["feature_map"], ex
    assert "not (x.y)^2 times one constant" in ex.refusals[0].reason, ex


def test_compressed_map_with_index_arguments_is_refused_and_says_so():
    iu = torch.triu_indices(4, 4, 1)
    ex = based_compile.explain(TriuBuffers(), *_inputs(0, 6, QKV), iu[0], iu[1])
    assert not ex.sites and [r.category for r in ex.refusals] == ["feature_map"], ex
    assert "index" in ex.refusals[0].reason and "compile-time constant" in ex.refusals[0].reason, ex
    assert "different tensors" not in ex.refusals[0].reason, ex


# --------------------------------------------------------------------------- (v.mT @ a.mT).mT
# The weights as the right operand, transposed: (v^T a^T)^T = a v. Near miss: (v.mT @ a).mT sums
# over the query axis of the weights (a^T v): refused as an attention lookalike.


class ValuesFirst(torch.nn.Module):
    def __init__(self, transposed=True, normalise=True):
        super().__init__()
        self.transposed, self.normalise = transposed, normalise

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = (q @ k.mT) * 0.5
        a = (1 + s + 0.5 * s * s).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
        o = (v.mT @ (a.mT if self.transposed else a)).mT
        return o / (a.sum(-1, keepdim=True) + 1e-6) if self.normalise else o


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("dynamic", [None, True])
def test_values_first_transposed_product_is_rewritten(normalise, dynamic):
    recorder = compile_and_compare(ValuesFirst(normalise=normalise), dynamic=dynamic)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and ex.sites[0].spec.normalize == normalise, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_values_first_product_over_the_query_axis_is_refused():
    recorder = compile_and_compare(ValuesFirst(transposed=False, normalise=False))
    for ex in recorder.reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["unsupported"], ex
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- the non-causal state product
# o = phi(q) @ (phi(k)^T @ v) (or an einsum for the state), den = phi(q) @ phi(k).sum(t) or
# (phi(q) * phi(k).sum(t, keepdim=True)).sum(f): the quadratic form without a mask, read as one site.
# Near misses: a normaliser over running sums (causal) against a numerator over all keys; an
# elementwise-square feature map.


class StateProduct(torch.nn.Module):
    def __init__(self, num="matmul", den="matmul", defect=None):
        super().__init__()
        self.num, self.den, self.defect = num, den, defect

    def forward(self, q, k, v):
        qf, kf = _phi(q, "square" if self.defect == "square" else None), _phi(k, "square" if self.defect == "square" else None)
        if self.num == "matmul":
            o = qf @ (kf.transpose(-2, -1) @ v)
        else:
            o = qf @ torch.einsum("bhtf,bhtd->bhfd", kf, v)
        ksum = kf.cumsum(2) if self.defect == "running" else kf.sum(2, keepdim=True)
        if self.den == "none":
            return o
        if self.den == "matmul" and self.defect != "running":
            den = qf @ kf.sum(2).unsqueeze(-1)
        else:
            den = (qf * ksum).sum(-1, keepdim=True)
        return o / (den + 1e-6)


@pytest.mark.parametrize("num,den", [("matmul", "matmul"), ("einsum", "mul_sum"), ("einsum", "none")])
def test_noncausal_state_product_is_rewritten(num, den):
    recorder = compile_and_compare(StateProduct(num, den))
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.sites[0].spec.causal, ex
        assert ex.sites[0].spec.normalize == (den != "none"), ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


@pytest.mark.parametrize("defect,category", [("running", "normaliser"), ("square", "feature_map")])
def test_noncausal_state_product_near_misses_are_refused(defect, category):
    recorder = compile_and_compare(StateProduct("matmul", "mul_sum", defect))
    for ex in recorder.reports.graphs:
        assert not ex.sites and category in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


class CheckpointedThenWritten(torch.nn.Module):
    """o = checkpoint(attend, ...); o += x: the caller writes the body's output in place (the operator
    saves its output for the backward: the body returns a clone of it)."""

    def forward(self, q, k, v, x):
        o = torch.utils.checkpoint.checkpoint(_attend, q, k, v, use_reentrant=False)
        o += x
        return o


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_checkpoint_output_written_in_place_by_the_caller(inner):
    module = CheckpointedThenWritten()
    shapes = QKV + ((1, 2, "T", 3),)
    compiled = torch.compile(module, backend=based_compile.backend(inner=inner))
    with PassReports() as reports:
        for t in (4, 9):
            inputs = _inputs(t, t, shapes)
            out_c, grads_c = _run(compiled, inputs, t)
            out_e, grads_e = _run(module, inputs, t)
            assert_rel_close(out_c, out_e, TOL, f"T={t}: output")
            for j, (c, e) in enumerate(zip(grads_c, grads_e)):
                assert_rel_close(c, e, TOL, f"T={t}: gradient of input {j}")
    assert len(reports.graphs) >= 2 and all(len(ex.sites) == 1 and not ex.refusals for ex in reports.graphs), reports


# --------------------------------------------------------------------------- causal einsum states
# kv = einsum('bhtf,bhtd->bhtfd', phi(k), v).cumsum(2); o = einsum('bhtf,bhtfd->bhtd', phi(q), kv): the
# readout is a matmul over the features (not a product summed). Near miss: the readout sums over the
# values' axis instead of the features (einsum 'bhtf,bhtdf->bhtd' on a state laid out [.., d, f]
# read as [.., f, d]: another function): refused or left alone, never rewritten.


class EinsumStates(torch.nn.Module):
    def __init__(self, defect=None):
        super().__init__()
        self.defect = defect

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2)
        if self.defect == "exclusive":
            kv = kv - torch.einsum("bhtf,bhtd->bhtfd", kf, v)
        o = torch.einsum("bhtf,bhtfd->bhtd", qf, kv)
        return o / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("dynamic", [None, True])
def test_causal_einsum_states_are_rewritten(dynamic):
    recorder = compile_and_compare(EinsumStates(), dynamic=dynamic)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and ex.sites[0].spec.causal, ex
    if dynamic is None:       # the normaliser is fused at static shapes (a graph with a symbolic length
        ex = recorder.reports.graphs[0]         # rewrites the numerator alone and keeps its normaliser)
        assert ex.sites[0].spec.normalize, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_causal_einsum_states_exclusive_is_refused():
    recorder = compile_and_compare(EinsumStates("exclusive"))
    for ex in recorder.reports.graphs:
        assert not ex.sites and "mask" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- the normaliser written on
# the features (issue 13): a quadratic numerator (phi(q) phi(k)^T, masked, times v) over
# 1 / (einsum(phi(q), phi(k).cumsum(2)) + eps), (phi(q) * phi(k).cumsum(2)).sum(-1), or non-causal
# phi(q) @ phi(k).sum(2)[..., None] / einsum(phi(q), phi(k).sum(2)): the row sums of the numerator's
# weights, fused into one normalised call; nothing of the [B, H, T, F] normaliser stays in the graph.
# Near misses (each sums other weights than the numerator's, or pairs other rows): refused.


class FeatureNormalised(torch.nn.Module):
    def __init__(self, den="einsum", causal=True, defect=None):
        super().__init__()
        self.den, self.causal, self.defect = den, causal, defect

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        a = torch.einsum("bhnf,bhmf->bhnm", qf, kf)
        if self.causal:
            a = a.tril()
        o = a @ v
        d = self.defect
        qd = 2 * qf if d == "scaled" else qf
        kd = {"other_k": qf, "other_map": _phi_unscaled(k)}.get(d, kf)
        if d == "other_map":
            qd = _phi_unscaled(q)
        if self.causal != (d == "total_vs_running"):
            ks = kd.cumsum(1 if d == "heads_axis" else 2)
            if d == "shifted":
                ks = ks - kd
        else:
            ks = kd.sum(2)
        eps = 1e-6
        if self.den == "einsum":
            spec = "bhtf,bhtf->bht" if ks.dim() == 4 else "bhtf,bhf->bht"
            z = torch.einsum(spec, qd, ks)
            z = 1 / z + eps if d == "eps_after" else 1 / (z + eps)
            return o * z[..., None]
        if self.den == "matmul":
            return o / (qd @ ks.unsqueeze(-1) + eps)
        ks = ks if ks.dim() == 4 else ks.unsqueeze(2)
        return o / ((qd * ks).sum(-1, keepdim=True) + eps)


def _phi_unscaled(x):
    """[1, x, x (x) x]: f = 1 + s + s^2, another function than _phi's."""
    return torch.cat([x[..., :1] ** 0, x, (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)], dim=-1)


def _no_normaliser_left(recorder: Recorder):
    """Every compiled graph has its site and none of the normaliser's cumsum / sum / einsum."""
    for g in recorder.graphs:
        text = "\n".join(str(n.target) for n in g.graph.nodes if n.op in ("call_function", "call_method"))
        assert "cumsum" not in text and "einsum" not in text and "sum" not in text.replace("cumsum", ""), g.graph


FEATURE_FORMS = [("einsum", True), ("mul_sum", True), ("einsum", False), ("matmul", False), ("mul_sum", False)]


def _skip_checks(monkeypatch, probe):
    """probe "off": the structure alone (the numerical probe is skipped above its size limit); "none":
    also the index tensors (the pairing read from views tracked axis by axis, as at large shapes)."""
    if probe in ("off", "none"):
        monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
    if probe == "none":
        monkeypatch.setattr("based_compile.graph.feature_normaliser.INDEX_MAX_ELEMENTS", 0)


@pytest.mark.parametrize("den,causal", FEATURE_FORMS)
@pytest.mark.parametrize("probe", ["on", "off", "none"])
def test_feature_normaliser_of_the_quadratic_form_is_fused(den, causal, probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    recorder = compile_and_compare(FeatureNormalised(den, causal))
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
        spec = ex.sites[0].spec
        assert spec.normalize and spec.eps == 1e-6 and spec.causal == causal, ex
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()
    _no_normaliser_left(recorder)


@pytest.mark.parametrize("den,causal,defect", [
    ("einsum", True, "eps_after"),          # 1 / z + eps: eps after the reciprocal
    ("einsum", True, "other_map"),          # another feature map (f = 1 + s + s^2) for the normaliser
    ("mul_sum", True, "shifted"),           # cumsum(phi(k)) - phi(k): sums over j < i
    ("einsum", True, "other_k"),            # phi(q) . cumsum(phi(q)): another key
    ("mul_sum", True, "scaled"),            # (2 phi(q)) . cumsum(phi(k))
    ("mul_sum", True, "heads_axis"),        # the running sum over the heads, not over time
    ("einsum", True, "total_vs_running"),   # sum over all keys against a causal numerator
    ("mul_sum", False, "total_vs_running"), # running sums against a non-causal numerator
])
# Not "on": the normaliser is refused while matching, before the probe (verify.settle) would run, so
# with the probe "on" the pass takes the very path of "off" (both with the index tensors).
@pytest.mark.parametrize("probe", ["off", "none"])
def test_feature_normaliser_near_misses_are_refused(den, causal, defect, probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    recorder = compile_and_compare(FeatureNormalised(den, causal, defect), lengths=(4, 9))
    for ex in recorder.reports.graphs:
        assert not ex.sites and "normaliser" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


# Structural near-misses the numerical probe used to catch alone (silently wrong once the probe is
# skipped above its size limit): the linear form's normaliser over (2 phi(q)) while the numerator
# reads phi(q); row sums broadcast against the key axis (a / a.sum(-1)[..., None, :]).


class ScaledLinearNormaliser(torch.nn.Module):
    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        o = (qf.unsqueeze(-1) * (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)).sum(-2)
        return o / (((2 * qf) * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


class ColumnNormalised(torch.nn.Module):
    def forward(self, q, k, v):
        s = q @ k.mT * 0.5
        a = (1 + s + 0.5 * s * s).tril()
        return (a / (a.sum(-1)[..., None, :] + 1e-6)) @ v


@pytest.mark.parametrize("module", [ScaledLinearNormaliser, ColumnNormalised])
def test_normaliser_near_misses_refused_without_the_probe(module, monkeypatch):
    monkeypatch.setattr("based_compile.graph.verify.PROBE_MAX_ELEMENTS", 0)
    recorder = compile_and_compare(module(), lengths=(4, 9))
    for ex in recorder.reports.graphs:
        assert not ex.sites and "normaliser" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


# Feature normalisers that pair rows and features correctly but sum other keys, or lay the rows out
# in another order than the numerator's (silently wrong once the probe is skipped, found by a red
# team): the running sum over a strided time axis or restarting every T/2, the sums or phi(q)
# transposed between batch and heads (B == H), time blocks interleaved, phi of another view of k or q.


class NormaliserViews(torch.nn.Module):
    def __init__(self, defect, linear=False):
        super().__init__()
        self.defect, self.linear = defect, linear

    def forward(self, q, k, v):
        qf, kf = _phi(q), _phi(k)
        b, h, t, f = kf.shape
        d = self.defect
        causal = d != "total_batch_heads"
        if self.linear:
            o = (qf.unsqueeze(-1) * (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(2)).sum(-2)
        else:
            a = qf @ kf.mT
            o = (a.tril() if causal else a) @ v
        qd, s = qf, kf.cumsum(2) if causal else kf.sum(2, keepdim=True)
        if d == "strided":
            s = kf.reshape(b, h, t // 2, 2, f).cumsum(2).reshape(b, h, t, f)
        elif d == "restart":
            s = kf.reshape(b, h, 2, t // 2, f).cumsum(3).reshape(b, h, t, f)
        elif d in ("batch_heads", "total_batch_heads"):
            s = s.transpose(0, 1)
        elif d == "q_batch_heads":
            qd, s = qf.transpose(0, 1), s.transpose(0, 1)
        elif d == "time_blocks":
            qd, s = (x.reshape(b, h, 2, t // 2, f).transpose(2, 3).reshape(b, h, t, f) for x in (qf, s))
        elif d == "sum_time_blocks":
            s = s.reshape(b, h, 2, t // 2, f).transpose(2, 3).reshape(b, h, t, f)
        return o / ((qd * s).sum(-1, keepdim=True) + 1e-6)


NORMALISER_VIEW_DEFECTS = ["strided", "restart", "batch_heads", "total_batch_heads", "q_batch_heads", "time_blocks",
                           "sum_time_blocks"]
SQUARE = ((2, 2, "T", 2), (2, 2, "T", 2), (2, 2, "T", 3))


@pytest.mark.parametrize("defect", NORMALISER_VIEW_DEFECTS)
@pytest.mark.parametrize("probe", ["off", "none"])
def test_feature_normaliser_over_other_keys_or_rows_is_refused(defect, probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    recorder = compile_and_compare(NormaliserViews(defect), SQUARE, lengths=(4, 8))
    for ex in recorder.reports.graphs:
        assert not ex.sites and "normaliser" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


@pytest.mark.parametrize("defect", ["strided", "restart"])
@pytest.mark.parametrize("probe", ["off", "none"])
def test_linear_form_normaliser_over_other_keys_is_refused(defect, probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    recorder = compile_and_compare(NormaliserViews(defect, linear=True), SQUARE, lengths=(4, 8))
    for ex in recorder.reports.graphs:
        assert not ex.sites and "normaliser" in [r.category for r in ex.refusals], ex
    assert not any(recorder.sites())


@pytest.mark.parametrize("probe", ["off", "none"])
def test_feature_normaliser_controls_are_fused(probe, monkeypatch):
    """The near misses above without their defect: fused, equal to eager."""
    _skip_checks(monkeypatch, probe)
    for linear in (False, True):
        recorder = compile_and_compare(NormaliserViews(None, linear), SQUARE, lengths=(4, 8))
        for ex in recorder.reports.graphs:
            assert len(ex.sites) == 1 and ex.sites[0].spec.normalize, ex
        assert recorder.sites() and all(n == 1 for n in recorder.sites())


class NormaliserOtherView(torch.nn.Module):
    """[B, T, H, D] inputs: the numerator reads q, k.transpose(1, 2), the normaliser phi of
    x.reshape(B, H, T, D) (another element order) for ``which`` of q, k (None: the same views)."""

    def __init__(self, which):
        super().__init__()
        self.which = which

    def forward(self, q, k, v):
        b, t, h, d = k.shape
        qf, kf = _phi(q.transpose(1, 2)), _phi(k.transpose(1, 2))
        o = (qf @ kf.mT).tril() @ v.transpose(1, 2)
        qd = _phi(q.reshape(b, h, t, d)) if self.which == "q" else qf
        kd = _phi(k.reshape(b, h, t, d)) if self.which == "k" else kf
        return o / ((qd * kd.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


BTHD = ((1, "T", 2, 2), (1, "T", 2, 2), (1, "T", 2, 3))


@pytest.mark.parametrize("which", ["q", "k", None])
@pytest.mark.parametrize("probe", ["off", "none"])
def test_feature_normaliser_on_another_view_is_refused(which, probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    recorder = compile_and_compare(NormaliserOtherView(which), BTHD, lengths=(4, 8))
    for ex in recorder.reports.graphs:
        if which is None:
            assert len(ex.sites) == 1 and ex.sites[0].spec.normalize, ex
        else:
            assert not ex.sites and "normaliser" in [r.category for r in ex.refusals], ex
    assert all(n == (which is None) for n in recorder.sites()), recorder.sites()


# --------------------------------------------------------------------------- a chunked reference (issue 13):
# the intra-chunk quadratic plus the inter-chunk states, over q, k, v reshaped to [B, H, T / C, C, D].
# Not rewritten; the refusal says why (it said "not a [B, H, T, D] attention layout").


class Chunked(torch.nn.Module):
    def __init__(self, chunk=4):
        super().__init__()
        self.chunk = chunk

    def forward(self, q, k, v):
        b, h, t, _ = q.shape
        qf, kf = _phi(q), _phi(k)
        f, dv, c = qf.shape[-1], v.shape[-1], self.chunk
        qc, kc, vc = qf.view(b, h, t // c, c, f), kf.view(b, h, t // c, c, f), v.view(b, h, t // c, c, dv)
        kv = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)
        kv = kv.cumsum(2) - kv                                   # the states before each chunk
        a = torch.einsum("bhncf,bhnmf->bhncm", qc, kc).tril()
        o = torch.einsum("bhncf,bhnfd->bhncd", qc, kv) + a @ vc
        ks = kc.sum(3).cumsum(2) - kc.sum(3)
        z = torch.einsum("bhncf,bhnf->bhnc", qc, ks) + a.sum(-1)
        return (o / (z[..., None] + 1e-6)).reshape(b, h, t, dv)


def test_chunked_reference_is_refused_as_chunked():
    q, k, v = _inputs(0, 8, QKV)
    full = FeatureNormalised("mul_sum", True)(q, k, v)
    assert_rel_close(Chunked()(q, k, v), full, 1e-12, "the chunked reference is the Based function")
    recorder = compile_and_compare(Chunked(), lengths=(8, 12, 16))
    for ex in recorder.reports.graphs:
        assert not ex.sites and ex.refusals, ex
        assert all(r.category == "unsupported" and "chunked form" in r.reason and "layout" not in r.reason
                   for r in ex.refusals), ex
    assert not any(recorder.sites())


# --------------------------------------------------------------------------- queries and keys of one
# length that Dynamo gave two symbols (nothing in the graph ties them): a top-left causal mask
# (torch.tril on the scores) is the operator's causal mask only when Tq == Tk. The pass guards
# Tq == Tk (the rewritten graph runs at equal lengths only; other lengths recompile and are left
# unrewritten, guarded Tq != Tk). Near miss: a mask that is not causal at equal lengths either.


class TopLeft(torch.nn.Module):
    def __init__(self, diagonal=0):
        super().__init__()
        self.diagonal = diagonal

    def forward(self, q, k, v):
        s = q @ k.mT * 0.5
        a = torch.tril(1 + s + 0.5 * s * s, self.diagonal)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _lengths_run(module, lengths, recorder):
    compiled = torch.compile(module, backend=based_compile.backend(inner=recorder), dynamic=True)
    for tq, tk in lengths:
        inputs = _inputs(10 * tq + tk, 0, ((2, 2, tq, 2), (2, 2, tk, 2), (2, 2, tk, 3)))
        seen = len(recorder.graphs)
        out_c, grads_c = _run(compiled, inputs, tq)
        out_e, grads_e = _run(module, inputs, tq)
        assert_rel_close(out_c, out_e, TOL, f"Tq={tq}, Tk={tk}: output")
        for j, (c, e) in enumerate(zip(grads_c, grads_e)):
            assert_rel_close(c, e, TOL, f"Tq={tq}, Tk={tk}: gradient of input {j}")
        yield (tq, tk), recorder.sites()[seen:]


def test_top_left_causal_mask_with_two_length_symbols_is_rewritten_at_equal_lengths():
    recorder = Recorder()
    seen = dict(_lengths_run(TopLeft(), [(2, 2), (5, 5), (9, 9), (5, 7), (7, 5), (4, 6), (3, 3), (8, 8)], recorder))
    # (2, 2) compiles static, (5, 5) with two length symbols: rewritten, guarded Tq == Tk; (9, 9) reuses it
    assert seen[(5, 5)] == [1] and seen[(9, 9)] == [], seen
    # unequal lengths recompile once, unrewritten, guarded Tq != Tk; equal lengths go back to the rewrite
    assert seen[(5, 7)] == [0] and seen[(7, 5)] == [] and seen[(4, 6)] == [], seen
    assert seen[(3, 3)] == [] and seen[(8, 8)] == [], seen
    assert len(recorder.graphs) == 3, recorder.sites()


def test_top_left_causal_mask_traced_at_unequal_lengths_is_refused():
    recorder = Recorder()
    seen = dict(_lengths_run(TopLeft(), [(2, 3), (5, 7), (6, 6), (9, 9)], recorder))
    # refused where it was traced at Tq != Tk (guarded so: equal lengths then recompile and are rewritten)
    assert seen[(2, 3)] == [0] and seen[(5, 7)] == [0] and seen[(6, 6)] == [1] and seen[(9, 9)] == [], seen
    ex = based_compile.explain(TopLeft(), *_inputs(0, 0, ((2, 2, 5, 2), (2, 2, 7, 2), (2, 2, 7, 3))))
    assert not ex.sites and "mask" in [r.category for r in ex.refusals], ex


def test_top_left_shifted_mask_with_two_length_symbols_is_refused():
    recorder = Recorder()
    seen = dict(_lengths_run(TopLeft(diagonal=1), [(2, 2), (5, 5), (9, 9), (5, 7)], recorder))
    assert not any(recorder.sites()), seen


# --------------------------------------------------------------------------- one key/value head, linear form
# The running-sum form with k and v of one head broadcast to every query head (multi-query): the
# normaliser's pairing proof now lets phi(k)'s single head meet every query head (as the numerator
# does, whose reading proves that axis is the heads). Before: "the normaliser pairs a query row with
# another row of the sum over phi(k)". Near-miss: k and v shared over the batch instead.


def _lin_mqa(q, k, v):
    qf, kf = _phi(q), _phi(k)
    kv = (kf[..., :, None] * v[..., None, :]).cumsum(2)
    return (qf[..., None] * kv).sum(-2) / ((qf * kf.cumsum(2)).sum(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("probe", ["on", "off"])
def test_one_key_value_head_in_the_linear_form_is_rewritten(probe, monkeypatch):
    _skip_checks(monkeypatch, probe)
    shapes = ((1, 3, "T", 4), (1, 1, "T", 4), (1, 1, "T", 3))
    recorder = compile_and_compare(_lin_mqa, shapes=shapes)
    assert recorder.reports.sites() == [1, 1], recorder.reports
    assert recorder.sites() and all(n == 1 for n in recorder.sites()), recorder.sites()


def test_keys_shared_over_the_batch_in_the_linear_form_are_refused():
    shapes = ((2, 3, "T", 4), (1, 3, "T", 4), (1, 3, "T", 3))
    recorder = compile_and_compare(_lin_mqa, shapes=shapes)
    for ex in recorder.reports.graphs:
        assert not ex.sites and ex.refusals, str(ex)
    assert not any(recorder.sites()), recorder.sites()
