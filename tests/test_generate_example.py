"""examples/generate.py, tiny, on the CPU: the three modes compiled with the based backend produce eager's
greedy tokens, agree with each other, and run the rewritten operators (KV-cache attention with
Tq < Tk; the recurrent step, functional or on a static cache written in place)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import based_compile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from generate import GenerativeBasedLM, StaticCache, run  # noqa: E402


def _op_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return out, counts.get("based::attention", 0), counts.get("based::recurrent_step", 0), \
        counts.get("based::attention_with_state", 0)


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_generate_modes_match_eager_and_each_other(n_kv_heads):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GenerativeBasedLM(64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=n_kv_heads, feature_dim=4,
                              max_len=32).double().eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    backend = based_compile.backend(inner="eager")
    tokens = {}
    for mode in ("kv_cache", "recurrent", "static"):
        tokens[mode, "eager"], _ = run(model, prompt, 6, mode, compiled=False)
        (tokens[mode, "based"], _), attention, steps, prefills = _op_calls(
            lambda: run(model, prompt, 6, mode, compiled=True, backend=backend))
        if mode == "kv_cache":
            assert attention >= 8, "prefill and decode steps must run based::attention"
        elif mode == "static":
            assert steps >= 8, "decode steps on the static cache must run based::recurrent_step"
            assert prefills >= 2, "the prefill must return its states through based::attention_with_state"
        else:
            assert steps >= 8, "decode steps must run based::recurrent_step"
            assert prefills >= 2, "the prefill must return its states through based::attention_with_state"
        torch._dynamo.reset()
    first = tokens["kv_cache", "eager"]
    assert len(set(first[0].tolist())) > 1, "degenerate decode: the test would not see a difference"
    for key, t in tokens.items():
        assert torch.equal(t, first), f"{key} differs from kv_cache eager: {t.tolist()} vs {first.tolist()}"


def test_generate_arguments():
    model = GenerativeBasedLM(64, d_model=16, n_layers=1, n_heads=2, feature_dim=4, max_len=8)
    with pytest.raises(ValueError, match="mode"):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 1, mode="beam")
    with pytest.raises(ValueError, match="max_len"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), 5)


def _model(n_kv_heads=None, layers=2):
    torch.manual_seed(0)
    return GenerativeBasedLM(64, d_model=16, n_layers=layers, n_heads=2, n_kv_heads=n_kv_heads, feature_dim=4,
                             max_len=64).double().eval()


def _functional_states(model, prompt, n):
    """Eager recurrent mode: the caches after the prompt and ``n`` greedy tokens, and the tokens."""
    logits, caches = model.forward_with_cache(prompt, None, "recurrent")
    tokens = []
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        logits, caches = model.forward_with_cache(token, caches, "recurrent")
    return caches, torch.cat(tokens, 1), logits


@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_static_cache_states_after_n_steps_equal_eager(n_kv_heads):
    """float64: the static cache after the prompt and N greedy steps, eager and compiled with the based
    backend (every layer's step on based::recurrent_step, the states written in place: the same
    tensors, not replaced), equals the functional recurrent mode's caches; the logits agree too."""
    torch._dynamo.reset()
    model = _model(n_kv_heads)
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    n = 5
    with torch.no_grad():
        want, want_tokens, want_logits = _functional_states(model, prompt, n)
        runs = {}
        for name, step in (("eager", model.forward_static),
                           ("based", torch.compile(model.forward_static, backend=based_compile.backend(inner="eager")))):
            cache = StaticCache(model, 2)
            for t in cache.tensors():
                t.fill_(float("nan"))                        # poisoned: load_ must write every entry
            addresses = [t.data_ptr() for t in cache.tensors()]
            logits, _ = model.forward_with_cache(prompt, None, "recurrent")
            cache.load_(_)
            tokens = []
            for i in range(n):
                token = logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(token)
                (logits, _a, steps, _p) = _op_calls(lambda: step(token, cache))
                if name == "based" and i > 0:             # (the first call compiles: the pass's probe runs too)
                    assert steps == len(model.blocks), "every layer's step must run based::recurrent_step"
            assert [t.data_ptr() for t in cache.tensors()] == addresses
            runs[name] = (cache, torch.cat(tokens, 1), logits)
    for name, (cache, tokens, logits) in runs.items():
        assert torch.equal(tokens, want_tokens), name
        assert len(set(tokens.flatten().tolist())) > 1, "degenerate decode"
        torch.testing.assert_close(logits, want_logits, rtol=1e-10, atol=1e-12)
        for i, (conv, (kv_state, k_state)) in enumerate(want):
            torch.testing.assert_close(cache.conv[i], conv, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cache.kv_state[i], kv_state, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(cache.k_state[i], k_state, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()


def test_static_step_is_rewritten_per_layer_and_compiles_once():
    """explain(): one recurrent-step site per layer and no refusal; the compiled step is one graph
    for every token (the states' addresses do not change)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model(layers=3)
    cache = StaticCache(model, 2)
    g = torch.Generator().manual_seed(3)
    for t in cache.tensors():
        t.copy_(torch.rand(t.shape, generator=g, dtype=t.dtype))
    token = torch.randint(0, 64, (2, 1), generator=g)
    with torch.no_grad():
        explanation = based_compile.explain(model.forward_static, token, cache)
    assert [s.form for s in explanation.sites] == ["recurrent step"] * 3, explanation
    assert not explanation.refusals, explanation
    counters.clear()
    step = torch.compile(model.forward_static, backend=based_compile.backend(inner="eager"))
    with torch.no_grad():
        for _ in range(4):
            token = step(token, cache)[:, -1].argmax(-1, keepdim=True)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_static_cache_arguments():
    model = _model()
    with pytest.raises(ValueError, match="batch"):
        StaticCache(model, 0)
    cache = StaticCache(model, 2)
    with pytest.raises(ValueError, match="one token"):
        model.forward_static(torch.zeros(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="forward_static"):
        model.forward_with_cache(torch.zeros(2, 1, dtype=torch.long), None, "static")
    with pytest.raises(TypeError, match="cache"):
        model.generate(torch.zeros(2, 2, dtype=torch.long), 1, mode="static", cache=[])
    _, caches = model.forward_with_cache(torch.zeros(1, 2, dtype=torch.long), None, "recurrent")
    with pytest.raises(ValueError, match="does not fit"):
        cache.load_(caches)                                  # batch 1 into a batch-2 cache
    with pytest.raises(ValueError, match="layers"):
        cache.load_(caches[:1])
    assert model.static_cache(2) is model.static_cache(2)    # kept: the same addresses every generation
    assert model.static_cache(3) is not model.static_cache(2)


def test_static_step_graph_keeps_the_cache_static_for_cuda_graphs():
    """What the inner compiler (Inductor, CUDA graphs under mode="reduce-overhead") receives after the
    pass: every cache tensor still a static input (else CUDA graphs would copy it into their own
    buffers each replay, and skip a graph that writes a non-static input), each layer's step one
    based::recurrent_step whose states are written back into the cache by copy_, no add_ left."""
    from based_compile.graph.rewrite import recurrent_step_call

    torch._dynamo.reset()
    model = _model()
    cache = StaticCache(model, 2)
    seen = {}

    def inner(gm, example_inputs):
        static = {n.name for n in gm.graph.find_nodes(op="placeholder")
                  if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")}
        seen["static"] = static
        seen["steps"] = [n for n in gm.graph.nodes if n.target is recurrent_step_call]
        seen["writes"] = [(n.target, n.args[0].name) for n in gm.graph.nodes if n.op == "call_method"
                          and n.target in ("copy_", "add_")]
        return gm.forward

    step = torch.compile(model.forward_static, backend=based_compile.backend(inner=inner))
    with torch.no_grad():
        step(torch.zeros(2, 1, dtype=torch.long), cache)
    names = [f"l_cache_{kind}_{i}_" for i in range(2) for kind in ("conv", "kv_state", "k_state")]
    assert set(names) <= seen["static"], seen["static"]
    assert len(seen["steps"]) == 2
    assert sorted(seen["writes"]) == sorted(("copy_", name) for name in names), seen["writes"]
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["inductor", "based"])
def test_gpu_static_decode_under_cuda_graphs(backend, no_tf32):
    """CUDA, mode="reduce-overhead": the static-cache step runs as CUDA graphs (none skipped: the cache
    tensors are static inputs, their in-place writes accepted), replays give eager's greedy tokens,
    and the cache after N tokens holds eager's states (float32)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GenerativeBasedLM(256, d_model=64, n_layers=2, n_heads=4, feature_dim=16, max_len=64).cuda().eval()
    prompt = torch.randint(0, 256, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    n = 12
    with torch.no_grad():
        want = model.generate(prompt, n, "static", cache=StaticCache(model, 2))
        want_cache = StaticCache(model, 2)
        model.generate(prompt, n, "static", cache=want_cache)
        counters.clear()
        step = torch.compile(model.forward_static, backend=backend, mode="reduce-overhead")
        cache = StaticCache(model, 2)
        logits, caches = model.forward_with_cache(prompt, None, "recurrent")
        cache.load_(caches)
        token = torch.empty(2, 1, dtype=torch.long, device="cuda")
        torch._dynamo.mark_static_address(token)
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        got = []
        for i in range(n):
            got.append(token.clone())
            torch.compiler.cudagraph_mark_step_begin()
            if i == 0:
                (logits, _, steps, _) = _op_calls(lambda: step(token, cache))
                if backend == "based":
                    assert steps >= 2, "every layer's step must run based::recurrent_step"
            else:
                logits = step(token, cache)
            torch.argmax(logits[:, -1], dim=-1, keepdim=True, out=token)
        torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert torch.equal(torch.cat(got, 1), want)
    for mine, theirs in zip(cache.tensors(), want_cache.tensors()):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
