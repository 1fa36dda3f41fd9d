"""benchmarks/generate.py's logic on the CPU (--dry: tiny shapes, eager inner compilers; --samples 1:
each timing loop runs once, the kernels under Triton's interpreter) and the README's generate table
rendered from what it writes."""
from __future__ import annotations

import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import generate, tables  # noqa: E402


def test_floors_count_the_bytes_a_step_must_move():
    # KV cache: K and V of every position (Dk + Dv = 80 bf16 numbers) plus q and o
    assert generate.kv_bytes(1, 8192) == 2 * 16 * (8192 * 80 + 80)
    # recurrent: read and write [273, 64] + [273] per head, read q, k, v, write o
    assert generate.rec_bytes(16) == 2 * 16 * 16 * (2 * (273 * 64 + 273) + 2 * 16 + 2 * 64)
    assert generate.sdpa_bytes(1, 1024) == 2 * 16 * (1024 * 128 + 128)


def test_dry_run_writes_json_and_the_table_renders(tmp_path, monkeypatch):
    torch._dynamo.reset()
    data = generate.main(["--dry", "--samples", "1", "--out", str(tmp_path), "--contexts", "64,100", "--batches", "1,2",
                          "--entries", "eager_kv,based_kv,based_rec,sdpa_d64", "--model-entries",
                          "inductor_recurrent,based_recurrent,inductor_static_cudagraphs,based_static_cudagraphs"])
    torch._dynamo.reset()
    written = json.loads((tmp_path / "generate.json").read_text())
    assert written["results"] == data["results"]
    entries = ["eager_kv", "based_kv", "based_rec", "sdpa_d64"]
    assert [(r["entry"], r["B"], r["T"], r["status"]) for r in written["results"]] == [
        (e, b, t, "ok") for b in (1, 2) for t in (64, 100) for e in entries]
    for r in written["results"]:
        assert r["ms"] > 0 and r["over_floor"] == r["ms"] / r["floor_ms"]
        assert (r["based_ops"] > 0) == r["entry"].startswith("based"), r     # based entries were rewritten
        if r["entry"] != "sdpa_d64":
            assert r["rel_err"] < 2e-2, r        # every entry computes the same function (bf16)
    assert [(r["status"], r["mode"]) for r in written["model_results"]] == [
        ("ok", "recurrent"), ("ok", "recurrent"), ("ok", "static"), ("ok", "static")]
    assert [r["based_ops"] > 0 for r in written["model_results"]] == [False, True, False, True]
    for r in written["model_results"]:
        assert r["rel_err"] < 2e-2 and r["tokens_per_s"] > 0, r     # the first token's logits against eager's
        assert r["gpu_ms"] is None and r["host_bound"] is None, r   # no GPU time on the CPU
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = tables.render("generate")
    assert "| 2 | 100 |" in text and "**based, recurrent**" in text and "| based | recurrent, functional states |" in text
    assert "1.00x" in text         # Inductor's own row against itself
    assert "| based | **recurrent, static cache, CUDA graphs** |" in text


def test_model_table_says_which_entries_are_host_bound(tmp_path, monkeypatch):
    """The whole-model table: GPU ms per token where measured, marked host-bound when the loop's wall
    time is over 1.25x it, and each entry against Inductor in the same setup and Inductor's best."""
    def row(entry, tps, ms, gpu_ms, timed=True):
        return dict(entry=entry, mode=generate.model_entry(entry)[0], status="ok", tokens_per_s=tps, ms=ms,
                    gpu_ms=gpu_ms, gpu_timed=timed, host_bound=gpu_ms < 0.8 * ms)
    data = dict(_name="generate", device="GPU", torch="2.11", triton="3.6", date="d", results=[],
                config=dict(H=16, Dk=16, Dv=64, dtype="bfloat16"), ceilings=dict(copy_bytes_per_s=4e12),
                model=dict(layers=4, d_model=1024, heads=16, context=32768, steps=50, batch=1),
                model_results=[row("inductor_static_cudagraphs", 1000.0, 1.0, 0.9),
                               row("based_static_cudagraphs", 4000.0, 0.25, 0.1),
                               row("inductor_recurrent", 500.0, 2.0, 1.9, timed=False),
                               dict(entry="based_recurrent", mode="recurrent", status="error: boom")])
    text = tables._generate_model(data)
    assert "| inductor | **recurrent, static cache, CUDA graphs** | 1000.0 | 1.00 | 0.900 | 1.00x | 1.00x |" in text
    assert "| based | **recurrent, static cache, CUDA graphs** | 4000.0 | 0.250 | 0.100 (host-bound) | 4.00x | 4.00x |" \
        in text
    assert "| inductor | recurrent, functional states | 500.0 | 2.00 | 1.90 (not isolated) | 1.00x | 0.50x |" in text
    assert "| based | recurrent, functional states | error: boom | – | – | – | – |" in text


def test_step_only_dry_run(tmp_path):
    """--step-only: the recurrent step's entries at one context, each checked against float64; the
    based entries were rewritten, the direct kernel call ran (the interpreter on the CPU)."""
    torch._dynamo.reset()
    entries = ["null", "inductor_rec", "based_rec", "based_rec_tiled", "flat_bv32"]
    data = generate.main(["--dry", "--samples", "1", "--step-only", "--out", str(tmp_path), "--batches", "1",
                          "--step-entries", ",".join(entries)])
    torch._dynamo.reset()
    written = json.loads((tmp_path / "generate_step.json").read_text())
    assert written["results"] == data["results"] and not written["model_results"]
    assert [(r["entry"], r["B"], r["status"]) for r in written["results"]] == [(e, 1, "ok") for e in entries]
    for r in written["results"]:
        assert r["ms"] > 0 and (r["based_ops"] > 0) == r["entry"].startswith("based"), r
        if r["entry"] != "null":
            assert r["rel_err"] < 2e-2 and r["over_floor"] == r["ms"] / r["floor_ms"], r
