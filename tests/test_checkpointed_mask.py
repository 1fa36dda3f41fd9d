"""A causal mask built outside a checkpointed function and passed in (HF-style gradient checkpointing:
``checkpoint(layer, hidden, mask, use_reentrant=False)``): the pass reads the mask where the outer graph
builds it (``graph/checkpoint_operands.py``), with the proofs any mask gets, rewrites the attention inside
the body, which stays checkpointed, and drops the mask from the call (and from the outer graph where
nothing else reads it). Near misses (a mask that is not causal, one built at another length and sliced,
a weighting, a mask that depends on inputs' values) are refused with their reasons and run as written.

Every program is compiled (inner ``aot_eager``; one test ``inductor``) at several lengths (a symbolic
length from the second) and compared with eager in float64, values and gradients of every input, on
fresh random inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

import based_compile
from based_calls import BasedOpCounter
from based_compile.graph.rewrite import based_attention_call
from compare import assert_rel_close
from compiled_compare import Recorder, shaped_inputs, values_and_grads as _run
from compiled_compare import compile_and_compare as compare_compiled
from pass_reports import PassReports

TOL = 1e-10
HOP = torch.ops.higher_order.tag_activation_checkpoint
pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def build_mask(kind: str, t: int, dtype, buffer=None, batch=1):
    """The mask, built outside the checkpointed function as the model's forward builds it."""
    if kind == "tril":
        return torch.tril(torch.ones(t, t, dtype=dtype))
    if kind == "arange":
        return (torch.arange(t)[None, :] <= torch.arange(t)[:, None]).to(dtype)
    if kind == "hf":              # transformers' _prepare_4d_causal_attention_mask: 0 kept, finfo.min masked
        mask = torch.full((t, t), torch.finfo(dtype).min, dtype=dtype)
        cond = torch.arange(mask.size(-1))
        mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
        return mask[None, None, :, :].expand(batch, 1, t, t)
    if kind == "buffer":
        return buffer[:t, :t].to(dtype)
    if kind in ("written", "written_above"):    # in place: the writes before the call are its value
        mask = torch.ones(t, t, dtype=dtype)
        mask.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(1), 0)
        if kind == "written_above":             # keys two and more after the query kept again
            mask.masked_fill_(torch.ones(t, t, dtype=torch.bool).triu(2), 1)
        return mask
    # near misses
    if kind == "triu":
        return torch.triu(torch.ones(t, t, dtype=dtype))
    if kind == "longer":          # built for t + 2 positions and sliced: query i sees keys j <= i + 2
        return torch.ones(t + 2, t + 2, dtype=dtype).tril()[2:, :t]
    if kind == "weighting":       # 2 below the diagonal, 1 on it: not 0/1
        return torch.ones(t, t, dtype=dtype).tril() + torch.ones(t, t, dtype=dtype).tril(-1)
    raise ValueError(kind)


class Layers(torch.nn.Module):
    """``layers`` attention layers, each called through torch.utils.checkpoint with the one mask the
    forward builds. ``use``: how a layer applies it: multiplied (``mul``), ``masked_fill(~mask, 0)``
    (``fill``), or an HF additive mask zeroing where it is not 0 (``additive``), multiplied by its
    ``exp`` (``exp``), or added to the weights (``add``, a near miss)."""

    def __init__(self, kind="tril", use="mul", layers=1, read_again=False):
        super().__init__()
        self.kind, self.use, self.layers, self.read_again = kind, use, layers, read_again
        self.register_buffer("causal", torch.ones(32, 32, dtype=torch.bool).tril())

    def attend(self, q, k, v, mask):
        s = q @ k.transpose(-2, -1) / 2
        a = 1 + s + s * s / 2
        if self.use == "mul":
            a = a * mask
        elif self.use == "fill":
            a = a.masked_fill(~mask, 0.0)
        elif self.use == "exp":                   # exp of the additive mask: 1 kept, 0 masked
            a = a * torch.exp(mask)
        elif self.use == "add":                   # added to the weights: not a Based mask
            a = a + mask
        else:
            a = a.masked_fill(mask != 0, 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    def forward(self, q, k, v):
        t = q.shape[-2]
        dtype = torch.bool if self.use == "fill" else q.dtype
        mask = build_mask(self.kind, t, dtype, self.causal, q.shape[0])
        o = q
        for i in range(self.layers):
            o = checkpoint(self.attend, o * (1.5 + i), k, v, mask, use_reentrant=False)
        if self.read_again:                   # the mask is read outside the call too
            o = o + mask.sum() / 100
        return o


QKV = ((1, 2, "T", 4), (1, 2, "T", 4), (1, 2, "T", 4))


def _inputs(seed, t, shapes=QKV):
    return shaped_inputs(seed, t, shapes)


def compile_and_compare(module, lengths=(5, 9, 13), inner="aot_eager") -> Recorder:
    """compiled_compare's at this file's shapes, counting the operator's calls (``.counter``)."""
    return compare_compiled(module, QKV, lengths, inner=inner, tol=TOL, count=True)


def _square(node: fx.Node) -> bool:
    """A node computing a value whose two last axes have one length that is not a head dim: a T x T
    tensor (a graph input, the registered buffer, is not computed)."""
    if node.op == "placeholder":
        return False
    value = node.meta.get("example_value")
    if not isinstance(value, torch.Tensor) or value.dim() < 2:
        return False
    a, b = (s.node.hint if isinstance(s, torch.SymInt) else s for s in value.shape[-2:])
    return a == b and a not in (1, 4)


def _bodies(gm):
    return [getattr(gm, n.args[0].target) for n in gm.graph.nodes if n.target is HOP]


CASES = [("tril", "mul"), ("arange", "mul"), ("hf", "additive"), ("hf", "exp"), ("buffer", "fill"), ("tril", "fill"),
         ("written", "mul")]


@pytest.mark.parametrize("kind,use", CASES, ids=[f"{k}-{u}" for k, u in CASES])
def test_mask_built_outside_the_checkpoint_is_read_and_dropped(kind, use):
    recorder = compile_and_compare(Layers(kind, use, layers=2))
    for ex in recorder.reports.graphs:
        assert len(ex.sites) == 2 and all(s.spec.causal for s in ex.sites) and not ex.refusals, ex
    assert recorder.counter.total >= 2, recorder.counter.calls
    for gm in recorder.graphs:
        bodies = _bodies(gm)
        assert len(bodies) == 2                                   # still checkpointed
        for body in bodies:
            assert sum(n.target is based_attention_call for n in body.graph.nodes) == 1
            assert not any(_square(n) for n in body.graph.nodes), body.code
        assert not any(_square(n) for n in gm.graph.nodes), gm.code  # the mask fed the sites only


def test_mask_read_again_outside_stays_there_not_in_the_body():
    recorder = compile_and_compare(Layers("tril", "mul", read_again=True))
    assert all(len(ex.sites) == 1 for ex in recorder.reports.graphs), recorder.reports
    for gm in recorder.graphs:
        assert any(_square(n) for n in gm.graph.nodes)            # mask.sum() still reads it
        body, = _bodies(gm)
        assert not any(_square(n) for n in body.graph.nodes), body.code


def test_buffer_sliced_outside_is_guarded():
    module = Layers("buffer", "fill")
    compiled = torch.compile(module, backend=based_compile.backend(inner="aot_eager"))
    inputs = _inputs(0, 6)
    compiled(*inputs)
    module.causal.fill_(True)                 # no longer causal: the rewrite read the old values
    with pytest.raises(based_compile.StaleBufferError, match="causal"):
        compiled(*inputs)


def test_mask_built_outside_under_inductor():
    recorder = compile_and_compare(Layers("arange", "mul"), lengths=(6, 11), inner="inductor")
    assert all(len(ex.sites) == 1 for ex in recorder.reports.graphs), recorder.reports
    assert recorder.counter.total >= 1, recorder.counter.calls


NEAR = [("triu", "mul", "j - i"), ("longer", "mul", "j - i"), ("weighting", "mul", "arithmetic on a 0/1 tensor"),
        ("written_above", "mul", "j - i >= 2")]


@pytest.mark.parametrize("kind,use,why", NEAR, ids=[k for k, _, _ in NEAR])
def test_near_miss_mask_built_outside_is_refused_and_left(kind, use, why):
    recorder = compile_and_compare(Layers(kind, use))
    for ex in recorder.reports.graphs:
        assert not ex.sites and [r.category for r in ex.refusals] == ["mask"], ex
        assert why in ex.refusals[0].reason and "checkpointed region" not in ex.refusals[0].reason, ex
    assert recorder.counter.total == 0
    for gm in recorder.graphs:                # body and call as written: the mask passed in and read
        body, = _bodies(gm)
        assert any(_square(n) for n in body.graph.nodes) and any(_square(n) for n in gm.graph.nodes)


class FromInputs(Layers):
    """The mask from the values of inputs: a padding mask combined with the causal one (HF with an
    attention_mask), a random mask built outside, or a mask passed to forward."""

    def __init__(self, how, use="fill"):
        super().__init__(use=use)
        self.how = how

    def forward(self, q, k, v, mask=None):
        t = q.shape[-2]
        if self.how == "padding":
            mask = torch.ones(t, t, dtype=torch.bool).tril() & (v[0, 0, :, 0] > -10)[None, :]
        elif self.how == "random":
            mask = torch.rand(t, t, dtype=q.dtype) < 2.0      # all True, but random: not a constant
        return checkpoint(self.attend, q * 1.5, k, v, mask, use_reentrant=False)


@pytest.mark.parametrize("use", ["fill", "mul"])
@pytest.mark.parametrize("how,why", [("padding", "from values of inputs"), ("random", "rand, which is random"),
                                     ("argument", "not a compile-time constant")])
def test_mask_from_inputs_is_refused_saying_why(how, why, use):
    module = FromInputs(how, use)
    q, k, v = _inputs(0, 6)
    args = (q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()) if how == "argument" else (q, k, v)
    ex = based_compile.explain(module, *args)
    assert not ex.sites and [r.category for r in ex.refusals] == ["mask"], ex
    assert why in ex.refusals[0].reason, ex


def test_inner_compiler_rejecting_the_rewrite_gets_the_call_and_body_as_written(monkeypatch):
    """A planted failure: the inner compiler raises on a graph whose body holds the rewritten site; the
    graph it then compiles is Dynamo's as traced (the mask passed in, the body reading it), and runs exactly."""
    from based_compile.graph import driver
    monkeypatch.setattr(driver, "REJECTED_BY_INNER", {})
    seen = []

    def picky_inner(gm, example_inputs):
        rewritten = any(n.target is based_attention_call for b in _bodies(gm) for n in b.graph.nodes)
        seen.append((rewritten, [len(n.args) for n in gm.graph.nodes if n.target is HOP],
                     [any(_square(n) for n in b.graph.nodes) for b in _bodies(gm)]))
        if rewritten:
            raise RuntimeError("planted: the inner compiler cannot compile this graph")
        return gm.forward

    module = Layers("tril", "mul")
    compiled = torch.compile(module, backend=based_compile.backend(inner=picky_inner))
    inputs = _inputs(0, 7)
    out_c, grads_c = _run(compiled, inputs, 1)
    assert [s[0] for s in seen] == [True, False], seen
    assert seen[1][1] == [seen[0][1][0] + 1] and seen[1][2] == [True], seen      # the mask is back
    out_e, grads_e = _run(module, inputs, 1)
    for c, e in zip((out_c, *grads_c), (out_e, *grads_e)):
        assert_rel_close(c, e, TOL, "compiled unrewritten vs eager")


def test_additive_mask_added_to_the_weights_is_refused():
    """HF's additive mask added to the polynomial weights (not read through an ``exp``): read where it is
    built, it is still not a Based mask but a term added to the scores."""
    ex = based_compile.explain(Layers("hf", "add"), *_inputs(0, 6))
    assert not ex.sites and [r.category for r in ex.refusals] == ["unsupported"], ex
    assert "added to the scores" in ex.refusals[0].reason, ex


class _Block(torch.nn.Module):
    """A pre-norm block: fused q/k/v projection, Based attention masked by HF's additive mask, MLP."""

    def __init__(self, d=16, h=2):
        super().__init__()
        self.h = h
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.o = torch.nn.Linear(d, d, bias=False)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))

    def forward(self, x, attention_mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / (d // self.h) ** 0.5
        a = (1 + s + 0.5 * s * s).masked_fill(attention_mask < 0, 0.0)
        o = (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
        x = x + self.o(o.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(x)


class _LM(torch.nn.Module):
    """Embedding, the 4-d causal mask built once, each block called through torch.utils.checkpoint."""

    def __init__(self, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        mask = build_mask("hf", ids.shape[1], x.dtype, batch=ids.shape[0])
        for block in self.blocks:
            x = checkpoint(block.__call__, x, mask, use_reentrant=False)
        return x


def test_hf_style_gradient_checkpointing_lm():
    torch.manual_seed(0)
    model = _LM().double()
    recorder = Recorder()
    compiled = torch.compile(model, backend=based_compile.backend(inner=recorder))
    params = list(model.parameters())
    with PassReports() as reports:
        for t in (7, 12, 17):
            ids = torch.randint(0, 50, (2, t), generator=torch.Generator().manual_seed(t))
            cot = torch.randn(2, t, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
            got, want = compiled(ids), model(ids)
            assert_rel_close(got, want, TOL, f"T={t}: output")
            for gc, ge in zip(torch.autograd.grad(got, params, cot), torch.autograd.grad(want, params, cot)):
                assert_rel_close(gc, ge, TOL, f"T={t}: gradient of a parameter")
    assert all(len(ex.sites) == 2 and not ex.refusals for ex in reports.graphs), reports
    with torch.no_grad(), BasedOpCounter() as counter:
        compiled(ids)
    assert counter.total >= 2, counter.calls
    for gm in recorder.graphs:
        assert len(_bodies(gm)) == 2 and not any(_square(n) for n in gm.graph.nodes), gm.code


def test_a_failure_copying_the_mask_in_leaves_the_body_read_on_its_own(monkeypatch, caplog):
    """A planted defect of the copy: the model still compiles, the body as written (the mask refused as
    passed in), exactly."""
    from based_compile.graph import checkpoint_operands

    def broken(*args):
        raise RuntimeError("planted")

    monkeypatch.setattr(checkpoint_operands, "_copy_in", broken)
    recorder = compile_and_compare(Layers("tril", "mul"), lengths=(6,))
    ex, = recorder.reports.graphs
    assert not ex.sites and "input of a checkpointed region" in ex.refusals[0].reason, ex
    assert any("planted" in r.getMessage() for r in caplog.records)
    body, = _bodies(recorder.graphs[0])
    assert any(_square(n) for n in recorder.graphs[0].graph.nodes) and not any(
        n.name.startswith("outer_") for n in body.graph.nodes)


def test_a_failure_dropping_the_mask_from_the_call_leaves_both_graphs_as_written(monkeypatch, caplog):
    """A planted defect after the outer graph was changed (the mask's operand dropped from the first call,
    then a failure): the outer graph is put back, every body as written, the model exact."""
    from based_compile.graph import checkpoint_operands
    real = checkpoint_operands.Splice._drop_operands

    def broken(self, *args):
        real(self, *args)
        raise ValueError("planted after the drop")

    monkeypatch.setattr(checkpoint_operands.Splice, "_drop_operands", broken)
    recorder = compile_and_compare(Layers("tril", "mul", layers=2), lengths=(6,))
    assert any("planted after the drop" in r.getMessage() for r in caplog.records)
    for gm in recorder.graphs:
        assert len(_bodies(gm)) == 2
        calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is HOP]
        assert len(calls) == 2 and all(len(n.args) == 5 for n in calls), gm.code   # body, q, k, v, mask
        assert all(any(_square(n) for n in body.graph.nodes) for body in _bodies(gm))
