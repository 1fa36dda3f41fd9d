"""Compile one program with the based backend and compare it with eager in float64.

This module is copied verbatim into every reproducer the fuzzer prints, so it imports only
torch and based_compile (the public API) and nothing from the rest of ``fuzz``.

``check(Model, make_inputs, lengths, inner, dynamic, grad, tol)`` builds ``Model()`` in float64,
calls it eagerly and compiled (``torch.compile(model, backend=...)``) at each length in turn
(so that Dynamo's automatic dynamic shapes recompile with a symbolic length after the first),
and compares outputs and, with ``grad``, the gradients of every input and parameter, as
relative Frobenius errors. It then calls the compiled model once more at each length under
the profiler to count the ``based::`` operators it ran (after the compiled calls, so that
no compilation is traced). It returns a dict:

- ``crash``: the compiled call's exception (type: message) or None;
- ``errors``: per length, {what: relative error} for the output and each gradient;
- ``worst``: the largest error and where it was;
- ``based_calls``: per length, how many ``based::attention`` calls the compiled model ran.

``plain=True`` compiles with the inner compiler alone (no based pass): a failure that remains
is torch's, not based_compile's.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

import torch

import based_compile


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf on a shape mismatch, NaN or inf in out."""
    if out is None or ref is None:
        return 0.0 if out is None and ref is None else float("inf")
    if out.shape != ref.shape:
        return float("inf")
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf") if torch.isfinite(ref).all() else 0.0
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


def make_backend(inner: str, plain: bool = False):
    """'inductor' is ``backend="based"`` itself; any other inner compiler goes through
    based_compile.backend. ``plain``: the inner compiler alone, without the pass (to tell a bug
    of the pass from one of torch)."""
    if plain:
        return inner
    return "based" if inner == "inductor" else based_compile.backend(inner=inner)


def _run(model, params, inputs, cotangent_seed: int, grad: bool):
    """(output, {name: gradient}) of one call of ``model`` (eager or compiled) with the named
    parameters ``params``; fresh leaf copies of the inputs each time."""
    leaves = [x.detach().clone().requires_grad_(grad and x.is_floating_point()) for x in inputs]
    if not grad:
        with torch.no_grad():
            return model(*leaves), {}
    out = model(*leaves)
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangent = torch.randn(out.shape, generator=g, dtype=out.dtype)
    wrt = [x for x in leaves if x.requires_grad] + [p for _, p in params]
    names = [f"d_input{i}" for i, x in enumerate(leaves) if x.requires_grad] + [f"d_{n}" for n, _ in params]
    grads = torch.autograd.grad(out, wrt, cotangent, allow_unused=True)
    return out, dict(zip(names, grads))


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler writes start/stop lines to file descriptor 2: silence them."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def count_based_calls(fn) -> int:
    """How many based::attention calls ``fn()`` runs (the profiler sees the compiled code's ops)."""
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "based::attention")


def check(Model, make_inputs, lengths, inner="inductor", dynamic=None, grad=True, tol=1e-9, seed=0, plain=False):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = Model().double().eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    compiled = torch.compile(model, backend=make_backend(inner, plain), dynamic=dynamic)
    result = {"crash": None, "errors": {}, "based_calls": {}, "worst": (0.0, None)}
    all_inputs = {t: make_inputs(t, seed + t) for t in lengths}
    for t in lengths:
        inputs = all_inputs[t]
        ref, ref_grads = _run(model, params, inputs, seed + 7 * t, grad)
        try:
            out, grads = _run(compiled, params, inputs, seed + 7 * t, grad)
        except Exception as err:  # noqa: BLE001 - a compile or run failure is the finding
            tb = traceback.format_exc()
            result["crash"] = f"T={t}: {type(err).__name__}: {str(err).strip()[:2000]}"
            result["traceback"] = tb[-4000:]
            return result
        errors = {"output": rel_error(out, ref)}
        for name, r in ref_grads.items():
            errors[name] = rel_error(grads.get(name), r)
        result["errors"][t] = errors
        for what, e in errors.items():
            if e > result["worst"][0] or e != e:
                result["worst"] = (e, f"T={t} {what}")
    for t in lengths:
        inputs = all_inputs[t]
        result["based_calls"][t] = count_based_calls(lambda: _run(compiled, params, inputs, 0, grad))
    result["wrong"] = not result["worst"][0] <= tol
    return result
