"""End-to-end tests of `torch.compile(model, backend="based")` on a naive Based language model.

The model is the examples' ``BasedLM`` (examples/naive_based_lm.py), written without
based_compile. Each test checks that the rewrite really happened (torch.ops.based calls
counted at run time, one per layer) as well as agreement with eager:
- training over several optimizer steps (SGD and Adam) gives the same losses and weights;
- ``fullgraph=True`` compiles and agrees;
- ``dynamic=True`` serves three sequence lengths from one compiled graph;
- in a fresh interpreter, ``backend="based"`` works without importing based_compile
  (the ``torch_dynamo_backends`` entry point).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from based_calls import BasedOpCounter
from compare import assert_rel_close
from conftest import FAKE_TENSOR_CACHE_DEFAULT

ROOT = Path(__file__).resolve().parents[1]
VOCAB, D_MODEL, LAYERS, HEADS, FEATURE_DIM, BATCH = 32, 32, 2, 2, 4, 2


def load_examples_lm():
    """examples/naive_based_lm.py as a module (examples/ is not a package)."""
    path = ROOT / "examples" / "naive_based_lm.py"
    spec = importlib.util.spec_from_file_location("naive_based_lm", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("naive_based_lm", module)
    spec.loader.exec_module(module)
    return module


naive_based_lm = load_examples_lm()


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


@pytest.fixture(autouse=True)
def torch_defaults():
    """End to end as users run it: torch's own fake-tensor dispatch cache (tests/conftest.py turns it off)."""
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=FAKE_TENSOR_CACHE_DEFAULT):
        yield


def make_model(dtype=torch.float64, seed=0, **kwargs):
    torch.manual_seed(seed)
    # conv_size=0 by default: CPU depthwise convolution in float64 takes a slow path (~1 s a step)
    options = dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=LAYERS, n_heads=HEADS, feature_dim=FEATURE_DIM,
                   max_len=64, conv_size=0)
    options.update(kwargs)
    return naive_based_lm.BasedLM(**options).to(dtype)


def batches(steps, t, seed=0):
    """``steps`` random token batches [B, T + 1] (inputs and next-token targets)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (BATCH, t + 1), generator=g) for _ in range(steps)]


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])                                    # [B, T, V]
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def train(model, data, optimizer_name, count_from_step=None):
    """Losses per step, and torch.ops.based calls per forward from step ``count_from_step`` on."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.2) if optimizer_name == "sgd" else torch.optim.Adam(params, lr=3e-3)
    losses, calls = [], []
    for step, tokens in enumerate(data):
        counting = count_from_step is not None and step >= count_from_step
        counter = BasedOpCounter()
        if counting:
            with counter:
                loss = lm_loss(model, tokens)
            calls.append(counter.total)
        else:
            loss = lm_loss(model, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, calls


def based_backend(inner="aot_eager"):
    import based_compile

    return based_compile.backend(inner=inner)


def assert_same_training(eager_model, compiled_model, compiled_losses, eager_losses, tol):
    for step, (lc, le) in enumerate(zip(compiled_losses, eager_losses)):
        assert abs(lc - le) <= tol * abs(le), f"step {step}: loss {lc!r} (compiled) vs {le!r} (eager)"
    for (name, pc), (_, pe) in zip(compiled_model.named_parameters(), eager_model.named_parameters()):
        assert_rel_close(pc, pe, tol, f"parameter {name} after training")


@pytest.mark.parametrize("form,optimizer,n_kv_heads", [
    ("feature_map", "adam", None),
    ("polynomial", "sgd", None),
    ("linear_cumsum", "adam", 1),
])
def test_training_matches_eager(form, optimizer, n_kv_heads):
    model = make_model(attention_form=form, n_kv_heads=n_kv_heads)
    eager = copy.deepcopy(model)
    data = batches(1, t=12) * 4                                       # one batch, learnt over 4 steps
    compiled = torch.compile(model, backend=based_backend())
    losses_c, calls = train(compiled, data, optimizer, count_from_step=1)
    losses_e, _ = train(eager, data, optimizer)
    assert losses_c[-1] < losses_c[0], f"training did not reduce the loss: {losses_c}"
    assert_same_training(eager, model, losses_c, losses_e, 1e-9)
    assert calls == [LAYERS] * (len(data) - 1), f"torch.ops.based calls per forward: {calls}, expected {LAYERS}"


def test_training_float32_default_backend_by_name():
    """backend="based" with its default inner compiler (Inductor), float32. One layer: a cold
    Inductor compile of the forward and backward takes most of this file's time budget."""
    import based_compile  # noqa: F401  (registers "based")

    model = make_model(torch.float32, attention_form="linear_cumsum", n_layers=1, conv_size=4)
    eager = copy.deepcopy(model)
    data = batches(1, t=16, seed=1) * 3
    compiled = torch.compile(model, backend="based")
    losses_c, calls = train(compiled, data, "adam", count_from_step=1)
    losses_e, _ = train(eager, data, "adam")
    assert_same_training(eager, model, losses_c, losses_e, 1e-4)
    assert losses_c[-1] < losses_c[0], f"training did not reduce the loss: {losses_c}"
    assert calls == [1] * (len(data) - 1), f"torch.ops.based calls per forward: {calls}"


@pytest.mark.parametrize("kwargs,expected", [(dict(mode="reduce-overhead"), {"triton.cudagraphs": True}),
                                             (dict(options={"epilogue-fusion": False}), {"epilogue_fusion": False})])
def test_compile_mode_and_options_reach_inductor(kwargs, expected, monkeypatch):
    """torch.compile(..., mode=, options=) with backend="based": torch.compile hands them to the
    backend, which applies them to its Inductor (here checked on the config patches it passes)."""
    import torch._inductor.compile_fx as compile_fx_module

    import based_compile

    patches = []
    real = compile_fx_module.compile_fx

    def spy(gm, example_inputs, **kwargs):
        patches.append(kwargs.get("config_patches"))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    model = make_model(torch.float32, attention_form="polynomial", n_layers=1)
    tokens = batches(1, t=12, seed=4)[0][:, :-1]
    compiled = torch.compile(model, backend=based_compile.backend(), **kwargs)
    with torch.no_grad():
        out = compiled(tokens)
        with BasedOpCounter() as counter:
            out = compiled(tokens)
        assert_rel_close(out, model(tokens), 1e-4)
    assert counter.total == 1
    assert patches and patches[0] == expected, patches       # (compile_fx then calls itself without them)


@pytest.mark.parametrize("kwargs,error", [
    (dict(mode="reduce-overhead"), "mode and options configure Inductor; this based backend's inner compiler is 'eager'"),
    (dict(mode="fastest"), "mode must be one of"),
    (dict(options={"no_such_setting": 1}), "'no_such_setting' is not an Inductor setting"),
])
def test_compile_mode_and_options_errors(kwargs, error):
    import based_compile

    inner = "eager" if kwargs.get("mode") == "reduce-overhead" else "inductor"
    model = make_model(attention_form="polynomial", n_layers=1)
    compiled = torch.compile(model, backend=based_compile.backend(inner=inner), **kwargs)
    with pytest.raises(Exception, match=error):
        compiled(batches(1, t=12, seed=4)[0][:, :-1])


def test_fullgraph():
    model = make_model(attention_form="polynomial")
    tokens = batches(1, t=12, seed=2)[0]
    compiled = torch.compile(model, backend=based_backend(), fullgraph=True)
    loss_c = lm_loss(compiled, tokens)
    grads_c = torch.autograd.grad(loss_c, list(model.parameters()))
    loss_e = lm_loss(model, tokens)
    grads_e = torch.autograd.grad(loss_e, list(model.parameters()))
    assert_rel_close(loss_c, loss_e, 1e-10, "loss")
    for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e):
        assert_rel_close(gc, ge, 1e-9, f"gradient of {name}")
    with BasedOpCounter() as counter:
        compiled(tokens[:, :-1])
    assert counter.total == LAYERS


def test_dynamic_three_lengths_one_graph():
    model = make_model(attention_form="feature_map", n_layers=1)
    graphs = []
    inner = based_backend()

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    compiled = torch.compile(model, backend=counting_backend, dynamic=True)
    first = None
    for t in (9, 14, 23):
        tokens = batches(1, t=t, seed=t)[0]
        loss_c = lm_loss(compiled, tokens)
        loss_c.backward()
        loss_e = lm_loss(model, tokens)
        assert_rel_close(loss_c, loss_e, 1e-10, f"loss at T={t}")
        first = len(graphs) if first is None else first
        assert len(graphs) == first, f"T={t}: recompiled ({len(graphs)} graphs, {first} at the first length)"
        with BasedOpCounter() as counter:
            lm_loss(compiled, tokens)
        assert counter.total == 1, f"T={t}: {counter.total} torch.ops.based calls, expected 1"



FRESH_INTERPRETER = textwrap.dedent("""
    import math, sys
    import torch

    def based_attention(q, k, v):                     # [B, H, T, D], written by hand
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        a = 1 + s + 0.5 * s ** 2
        a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)

    q, k, v = (torch.randn(2, 2, 16, d) for d in (4, 4, 8))
    assert "based_compile" not in sys.modules
    compiled = torch.compile(based_attention, backend="based")
    out = compiled(q, k, v)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        out = compiled(q, k, v)
    calls = sum(1 for e in profile.events() if e.name.startswith("based::"))
    ref = based_attention(q, k, v)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"based_compile imported: {'based_compile' in sys.modules}, based calls: {calls}, error: {err:.2e}")
    assert err < 1e-5 and calls == 1
""")


def test_backend_by_name_in_fresh_interpreter_without_import():
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    result = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER], capture_output=True, text=True, env=env,
                            cwd=str(ROOT / "tests"), timeout=300)
    assert result.returncode == 0, f"fresh interpreter failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert "based_compile imported: True, based calls: 1" in result.stdout, result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["feature_map", "polynomial", "linear_cumsum"])
def test_gpu_training_step_matches_float64(form, no_tf32):
    """On CUDA the rewritten model runs the Triton kernels (one based::attention call per layer, the
    masks built on the GPU): loss and every gradient of a float32 training step with Inductor as the
    inner compiler agree with the same model in float64 on the CPU."""
    import based_compile  # noqa: F401

    model = make_model(torch.float32, attention_form=form, conv_size=4, max_len=1024).cuda()
    reference = copy.deepcopy(model).double().cpu()
    tokens = batches(1, t=300, seed=3)[0]
    compiled = torch.compile(model, backend="based")
    loss = lm_loss(compiled, tokens.cuda())                           # compiles (inputs: a strided slice)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss = lm_loss(reference, tokens)
    ref_grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    assert_rel_close(loss.cpu().double(), ref_loss, 1e-4, "loss")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert_rel_close(g.cpu().double(), r, 2e-3, f"gradient of {name}")
    with BasedOpCounter() as counter:
        compiled(tokens.cuda()[:, :-1])                               # the same strides: no recompile
    assert counter.total == LAYERS, dict(counter.calls)


@pytest.mark.gpu
def test_gpu_training_with_cuda_graphs(no_tf32):
    """backend="based" with mode="reduce-overhead" (Inductor's CUDA graphs around the Triton kernels):
    four Adam steps on CUDA give the losses and weights of the same model trained in float64 on
    the CPU."""
    import based_compile  # noqa: F401

    model = make_model(torch.float32, attention_form="feature_map", conv_size=4, max_len=1024).cuda()
    reference = copy.deepcopy(model).double().cpu()
    data = batches(4, t=128, seed=5)
    compiled = torch.compile(model, backend="based", mode="reduce-overhead")
    losses_c, _ = train(compiled, [t.cuda() for t in data], "adam")
    losses_e, _ = train(reference, data, "adam")
    for step, (lc, le) in enumerate(zip(losses_c, losses_e)):
        assert abs(lc - le) <= 1e-4 * abs(le), f"step {step}: loss {lc!r} (compiled) vs {le!r} (float64)"
    for (name, pc), (_, pe) in zip(model.named_parameters(), reference.named_parameters()):
        assert_rel_close(pc.detach().cpu().double(), pe, 1e-2, f"parameter {name} after training")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,kernel", [(torch.bfloat16, "auto"), (torch.float32, "auto"),
                                          (torch.bfloat16, "fused_chunk"), (torch.bfloat16, "chunked")])
def test_gpu_training_step_makes_no_host_sync(dtype, kernel, monkeypatch):
    """A compiled training step on CUDA (forward, backward, optimizer step) waits for the GPU nowhere:
    no ``.item()``, host copy, ``nonzero`` or synchronize in the operator, the kernels' launch code or
    the graph around them (``torch.cuda.set_sync_debug_mode("error")`` raises on any). One such wait
    per layer would serialise host and GPU, and under DDP or FSDP2 stall the communication's overlap."""
    import based_compile
    from based_compile.op import config

    monkeypatch.setattr(config, "kernel", kernel)
    model = make_model(dtype, attention_form="feature_map", conv_size=4, max_len=1024).cuda()
    compiled = torch.compile(model, backend=based_compile.backend())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tokens = batches(1, t=256, seed=7)[0].cuda()

    def step(count=False):
        with BasedOpCounter() if count else contextlib.nullcontext() as counter:
            loss = lm_loss(compiled, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, counter.total if count else None

    step()                              # compiles (forward, then the backward at its first run)
    assert step(count=True)[1] == LAYERS            # (the profiler that counts stays out of the checked step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
