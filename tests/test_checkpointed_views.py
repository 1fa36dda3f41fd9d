"""A checkpointed function's argument that is a view of another tensor: ``k.mT`` read inside the function
(Dynamo evaluates the attribute outside the body and passes the view in) or ``checkpoint(f, q,
k.transpose(-2, -1), v)``. The pass reads the view in the body as the view it is
(``graph/checkpoint_operands.py``): the attention inside is rewritten as when the function takes the view
itself, the body stays checkpointed and is passed the tensor the view viewed. It was refused with an untrue
reason (k "not a [B, H, T, D] layout"). Near misses: a copy of the transpose (``.contiguous()``) keeps the
honest layout refusal, and an anti-causal mask behind ``k.mT`` is refused for its mask.

Values and gradients compiled vs eager in float64 on fresh random inputs at several lengths (dynamic from
the second), the numerical probe off.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from compiled_compare import compile_and_compare

HOP = torch.ops.higher_order.tag_activation_checkpoint
QKV = ((2, 3, "T", 4), (2, 3, "T", 4), (2, 3, "T", 5))
pytestmark = pytest.mark.usefixtures("probe_off")     # conftest: probes off, Dynamo reset


def weights(s):
    return 1 + s + 0.5 * s * s


def attend_mT(q, k, v):
    a = weights(q @ k.mT * 0.5).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def attend_kt(q, kt, v):                      # the function takes the keys transposed
    a = weights(q @ kt * 0.5).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def attend_swapped(q, k, v):                  # the scores of (k, q) transposed back: q.mT is an argument's view
    a = weights((k @ q.mT).mT * 0.5).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


class Checkpointed(torch.nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.proj = torch.nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, q, k, v):
        if self.how == "mT":
            return checkpoint(attend_mT, q, k, v, use_reentrant=False)
        if self.how == "passed_transposed":
            return checkpoint(attend_kt, q, k.transpose(-2, -1), v, use_reentrant=False)
        if self.how == "passed_mT_of_projection":     # the viewed tensor computed in the graph
            return checkpoint(attend_kt, q, self.proj(k).mT, v, use_reentrant=False)
        if self.how == "tied":                         # the view of an argument the function takes too
            x = q + k
            return checkpoint(attend_kt, x, x.mT, v, use_reentrant=False)
        if self.how == "view_with_sizes":              # a view that reads sizes
            b, h, t, d = k.shape
            return checkpoint(attend_kt, q, k.reshape(b, h, t, d).transpose(2, 3), v, use_reentrant=False)
        if self.how == "swapped":
            return checkpoint(attend_swapped, q, k, v, use_reentrant=False)
        # near misses
        if self.how == "copied":
            return checkpoint(attend_kt, q, k.mT.contiguous(), v, use_reentrant=False)
        if self.how == "anticausal":
            return checkpoint(_anticausal, q, k, v, use_reentrant=False)
        raise ValueError(self.how)


def _anticausal(q, k, v):
    a = weights(q @ k.mT * 0.5).triu()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _bodies(gm):
    return [getattr(gm, n.args[0].target) for n in gm.graph.nodes if n.target is HOP]


@pytest.mark.parametrize("how", ["mT", "passed_transposed", "passed_mT_of_projection", "tied", "view_with_sizes",
                                 "swapped"])
@pytest.mark.parametrize("dynamic", [None, False])
def test_view_operand_read_in_the_body(how, dynamic):
    recorder = compile_and_compare(Checkpointed(how), QKV, (5, 9, 13), dynamic=dynamic, count=True)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for gm in recorder.graphs:
        assert len(_bodies(gm)) == 1                     # still checkpointed
        call = next(n for n in gm.graph.nodes if n.target is HOP)
        body = _bodies(gm)[0]
        assert len(call.args) - 1 == sum(n.op == "placeholder" for n in body.graph.nodes)


def test_copied_transpose_is_refused_as_the_layout_it_has():
    recorder = compile_and_compare(Checkpointed("copied"), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    reasons = [r.reason for ex in recorder.reports.graphs for r in ex.refusals]
    assert any("layout" in r for r in reasons), reasons


def test_anticausal_behind_mT_is_refused_for_its_mask():
    recorder = compile_and_compare(Checkpointed("anticausal"), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    refusals = [r for ex in recorder.reports.graphs for r in ex.refusals]
    assert refusals and all(r.category == "mask" for r in refusals), refusals


# Chains of views (red team): the rewrite reads an inner view of the chain (``k.transpose(0, 1)`` of
# ``k.transpose(0, 1).mT``, ``k[:, :, :-1]``, ``k.detach()``), which stays in the body as the view of k it is.
# They were left as written by the backend while explain() reported a site.
def _chain(how):
    def fn(q, k, v):
        if how == "batch_head_swapped":                 # k given as [H, B, T, D]
            return checkpoint(attend_kt, q, k.transpose(0, 1).mT, v, use_reentrant=False)
        if how == "sliced":
            return checkpoint(attend_kt, q[:, :, 1:], k[:, :, :-1].mT, v[:, :, :-1], use_reentrant=False)
        if how == "detached":                           # k's gradient through the queries alone
            return checkpoint(attend_kt, q + k, k.detach().mT, v, use_reentrant=False)
        if how == "transposed_detached":                # near miss: detach above the view, not read
            return checkpoint(attend_kt, q + k, k.mT.detach(), v, use_reentrant=False)
        if how == "detached_copied":                    # near miss: a copy, read as the layout it has
            return checkpoint(attend_kt, q + k, k.detach().mT.contiguous(), v, use_reentrant=False)
        raise ValueError(how)
    return fn


CHAIN_QKV = {"batch_head_swapped": ((2, 3, "T", 4), (3, 2, "T", 4), (2, 3, "T", 5))}


@pytest.mark.parametrize("how", ["batch_head_swapped", "sliced", "detached"])
@pytest.mark.parametrize("dynamic", [None, False])
def test_a_chain_of_views_is_rewritten_and_explain_says_so(how, dynamic):
    shapes = CHAIN_QKV.get(how, QKV)
    recorder = compile_and_compare(_chain(how), shapes, (5, 9, 13), dynamic=dynamic, count=True)
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 1 and not ex.refusals, ex
    assert all(c >= 1 for c in recorder.calls), recorder.calls
    for gm in recorder.graphs:
        assert len(_bodies(gm)) == 1


def test_explain_agrees_with_what_runs_for_a_chain_of_views():
    from based_calls import BasedOpCounter
    from compiled_compare import shaped_inputs
    import based_compile
    fn = _chain("batch_head_swapped")
    inputs = shaped_inputs(3, 9, CHAIN_QKV["batch_head_swapped"])
    ex = based_compile.explain(fn, *inputs)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=based_compile.backend(inner="eager"))
    compiled(*inputs)
    with BasedOpCounter() as counter:
        compiled(*inputs)
    assert len(ex.sites) == 1 and not ex.refusals and counter.total >= 1, (ex, counter.calls)


def test_detached_copy_is_refused_as_the_layout_it_has():
    recorder = compile_and_compare(_chain("detached_copied"), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    reasons = [r.reason for ex in recorder.reports.graphs for r in ex.refusals]
    assert any("layout" in r for r in reasons), reasons


def test_a_body_left_as_written_after_the_rewrite_is_reported_as_refused(monkeypatch, caplog):
    """A planted failure settling the body after its rewrite: the body runs as written, and the report
    (explain()'s) says so instead of naming a site."""
    from based_compile.graph import checkpoint_operands

    def broken(self):
        raise RuntimeError("planted settle failure")

    monkeypatch.setattr(checkpoint_operands.Splice, "settle", broken)
    recorder = compile_and_compare(_chain("detached"), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    for ex in recorder.reports.graphs:
        assert not ex.sites and any("planted settle failure" in r.reason for r in ex.refusals), ex


def test_detach_of_a_transposed_view_is_refused_saying_so():
    """Was refused as 'not a [B, H, T, D] layout' alone (red team): the reason says k is a detach of a view."""
    recorder = compile_and_compare(_chain("transposed_detached"), QKV, (5, 9), count=True)
    assert recorder.calls == [0, 0]
    reasons = [r.reason for ex in recorder.reports.graphs for r in ex.refusals]
    assert reasons and all("is a detach of a view" in r and "k.detach().mT is read" in r for r in reasons), reasons
