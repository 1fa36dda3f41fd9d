"""Grad mode switched inside the compiled code (``with torch.no_grad()``, ``torch.inference_mode()``).

Dynamo records ``torch._C._set_grad_enabled`` nodes around such blocks; the pass matches a copy
of the attention region lowered to ATen, which has no grad mode. A value computed with gradients
off must be read as detached where gradients are on again (it was read as differentiable: the
normaliser under no_grad, fused into a normalised call, gave gradients of q and k off by 0.3-0.7,
and weights or feature maps under no_grad gave q and k gradients eager does not have), with the
probe and without it. Compared with eager in float64 (output and every gradient) at two lengths.
"""
from __future__ import annotations

import pytest
import torch

from based_calls import BasedOpCounter
from compare import assert_rel_close

import based_compile
from based_compile.graph import feature_normaliser, verify

B, H, DK, DV = 2, 3, 4, 5


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def _taylor(x):
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (2 ** 0.5 * d ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], -1)


def _weights(q, k):
    s = q @ k.transpose(-2, -1) * DK ** -0.5
    return torch.tril(1 + s + 0.5 * s * s)


def normaliser_under_no_grad(q, k, v):
    a = _weights(q, k)
    with torch.no_grad():
        z = a.sum(-1, keepdim=True) + 1e-6
    return (a @ v) / z


def normaliser_under_inference_mode(q, k, v):
    a = _weights(q, k)
    with torch.inference_mode():
        z = a.sum(-1, keepdim=True) + 1e-6
    return (a @ v) / z.clone()


def weights_under_no_grad(q, k, v):
    with torch.no_grad():
        a = _weights(q, k)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def key_map_under_no_grad(q, k, v):
    with torch.no_grad():
        kf = _taylor(k)
    a = torch.tril(_taylor(q) @ kf.transpose(-2, -1))
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def feature_normaliser_under_no_grad(q, k, v):
    qf, kf = _taylor(q), _taylor(k)
    with torch.no_grad():
        z = kf.cumsum(2)
    kv = torch.einsum("bhtf,bhtd->bhtfd", kf, v).cumsum(2)
    return torch.einsum("bhtf,bhtfd->bhtd", qf, kv) / (torch.einsum("bhtf,bhtf->bht", qf, z)[..., None] + 1e-6)


def normaliser_with_grad_back_on(q, k, v):
    """Accepted twin: gradients off and on again around nothing the attention reads."""
    with torch.no_grad():
        unused = q.sum()
    a = _weights(q, k)
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6) + 0 * unused


CASES = [
    # (function, based::attention runs)
    (normaliser_under_no_grad, True),            # the numerator alone is rewritten (detached normaliser)
    (normaliser_under_inference_mode, None),     # None: either, as long as it is exact
    (weights_under_no_grad, False),
    (key_map_under_no_grad, False),
    (feature_normaliser_under_no_grad, None),
    (normaliser_with_grad_back_on, True),
]


def _run(fn, q, k, v):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = fn(q, k, v)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), cot, allow_unused=True)
    return out.detach(), grads


@pytest.mark.parametrize("probe", [True, False], ids=["probe", "structure_only"])
@pytest.mark.parametrize("fn,rewritten", CASES, ids=[c[0].__name__ for c in CASES])
def test_values_computed_without_grad_are_detached(fn, rewritten, probe, monkeypatch):
    if not probe:
        monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
        monkeypatch.setattr(feature_normaliser, "INDEX_MAX_ELEMENTS", 0)
    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"))
    for t in (6, 9):
        gen = torch.Generator().manual_seed(t)
        q, k, v = (torch.randn(B, H, t, d, generator=gen, dtype=torch.float64) for d in (DK, DK, DV))
        out_e, grads_e = _run(fn, q, k, v)
        out_c, grads_c = _run(compiled, q, k, v)
        assert_rel_close(out_c, out_e, 1e-10, f"T={t}: output")
        for name, gc, ge in zip("qkv", grads_c, grads_e):
            assert (gc is None) == (ge is None), f"T={t}: gradient of {name}: compiled {gc is not None}, eager {ge is not None}"
            if ge is not None:
                assert_rel_close(gc, ge, 1e-10, f"T={t}: gradient of {name}")
        if rewritten is not None:
            with BasedOpCounter() as counter:     # called as compared: inputs requiring grad (else: another graph)
                compiled(*(x.detach().requires_grad_(True) for x in (q, k, v)))
            assert (counter.total > 0) == rewritten, f"T={t}: based calls {dict(counter.calls)}"


def test_graph_compiled_without_grad_is_rewritten():
    """Decoding under torch.no_grad() around the call: every node runs with gradients off, nothing
    is detached and the site is rewritten as before."""
    def fn(q, k, v):
        a = _weights(q, k)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    compiled = torch.compile(fn, backend=based_compile.backend(inner="aot_eager"))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, 7, d, generator=gen, dtype=torch.float64) for d in (DK, DK, DV))
    with torch.no_grad():
        assert_rel_close(compiled(q, k, v), fn(q, k, v), 1e-10)
        with BasedOpCounter() as counter:
            compiled(q, k, v)
    assert counter.total > 0


# ----------------------------------------------------------------------------- the kernel line's mode
# explain()'s kernel line (and the log's) says what the operator will decide at run time: training when
# grad mode is on and any of q, k, v requires grad. q, k, v computed from parameters inside the graph
# require grad although the lowered region's copies of them do not (it said "inference" for a training
# call). Near miss: the same model with its parameters frozen, called with grad mode on: inference.


class Projected(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, H * (2 * DK + DV), dtype=torch.float64)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, H, 2 * DK + DV).transpose(1, 2).split([DK, DK, DV], -1)
        a = _weights(q, k)
        return ((a @ v) / (a.sum(-1, keepdim=True) + 1e-6)).sum()


@pytest.mark.parametrize("frozen,grad,mode", [(False, True, "training"), (False, False, "inference"),
                                              (True, True, "inference")])
def test_kernel_line_names_the_mode_the_operator_runs_in(frozen, grad, mode):
    from pass_reports import PassReports
    model = Projected().requires_grad_(not frozen)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    with PassReports() as reports, torch.set_grad_enabled(grad):
        torch.compile(model, backend=based_compile.backend(inner="eager"))(x)
    assert reports.graphs and all(len(r.sites) == 1 for r in reports.graphs), str(reports.merged())
    kernel = reports.graphs[0].sites[0].kernel
    assert f": {mode}," in kernel and ("inference" if mode == "training" else "training") not in kernel, kernel
