"""examples/generate.py, tiny, on the CPU: both modes compiled with the based backend produce eager's
greedy tokens, agree with each other, and run the rewritten operators (KV-cache attention with
Tq < Tk; the recurrent step)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import based_compile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from generate import GenerativeBasedLM, run  # noqa: E402


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
    for mode in ("kv_cache", "recurrent"):
        tokens[mode, "eager"], _ = run(model, prompt, 6, mode, compiled=False)
        (tokens[mode, "based"], _), attention, steps, prefills = _op_calls(
            lambda: run(model, prompt, 6, mode, compiled=True, backend=backend))
        if mode == "kv_cache":
            assert attention >= 8, "prefill and decode steps must run based::attention"
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
