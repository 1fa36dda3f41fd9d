"""benchmarks/generate.py's logic on the CPU (--dry: tiny shapes, eager inner compilers) and the
README's generate table rendered from what it writes."""
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
    data = generate.main(["--dry", "--out", str(tmp_path), "--contexts", "64,100", "--batches", "1,2",
                          "--entries", "eager_kv,based_kv,based_rec,sdpa_d64", "--model-entries",
                          "inductor_recurrent,based_recurrent"])
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
    assert [r["status"] for r in written["model_results"]] == ["ok", "ok"]
    assert [r["based_ops"] > 0 for r in written["model_results"]] == [False, True]
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    text = tables.render("generate")
    assert "| 2 | 100 |" in text and "**based, recurrent**" in text and "based recurrent |" in text
    assert "1.00x" in text         # Inductor's own row against itself


def test_step_only_dry_run(tmp_path):
    """--step-only: the recurrent step's entries at one context, each checked against float64; the
    based entries were rewritten, the direct kernel call ran (the interpreter on the CPU)."""
    torch._dynamo.reset()
    entries = ["null", "inductor_rec", "based_rec", "based_rec_tiled", "flat_bv32"]
    data = generate.main(["--dry", "--step-only", "--out", str(tmp_path), "--batches", "1",
                          "--step-entries", ",".join(entries)])
    torch._dynamo.reset()
    written = json.loads((tmp_path / "generate_step.json").read_text())
    assert written["results"] == data["results"] and not written["model_results"]
    assert [(r["entry"], r["B"], r["status"]) for r in written["results"]] == [(e, 1, "ok") for e in entries]
    for r in written["results"]:
        assert r["ms"] > 0 and (r["based_ops"] > 0) == r["entry"].startswith("based"), r
        if r["entry"] != "null":
            assert r["rel_err"] < 2e-2 and r["over_floor"] == r["ms"] / r["floor_ms"], r
