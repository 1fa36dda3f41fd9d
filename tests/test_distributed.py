"""backend="based" composes with DDP and FSDP2: 2 CPU processes (gloo), losses match one process.

Under DDP, Dynamo's DDP optimizer cuts the graph where DDP's gradient buckets end and compiles
each piece alone. The model (examples/distributed_training.MODEL) is cut at 1 MB between each
block's k and v projections and at 1.1 MB between q and k: every attention site is spread over
two pieces, and before the pass saw the whole graph (based_compile/ddp_split.py) no site was
rewritten at those sizes (issue 17). Each spawn costs seconds: one for DDP at three bucket caps,
one for FSDP2; every check runs inside them.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import distributed_training as dt  # noqa: E402

KW = dict(steps=3, batch=4, seqlen=24, dtype=torch.float64, inner="aot_eager")
# DDP's default bucket cap; 1 MB (cuts each block between its k and v projections); 1.1 MB (between q and k).
BUCKET_CAPS = (25, 1, 1.1)

needs_gloo = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def single():
    result = dt.train("single", 0, 1, torch.device("cpu"), **KW)
    assert result["based_calls"] == dt.MODEL["n_layers"]
    # The losses change over the steps: the model trains, the comparison is not of constants.
    assert len(set(result["losses"])) == KW["steps"]
    return result


def _same_losses(run, single):
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(single["losses"]), rtol=0, atol=1e-10)


@needs_gloo
def test_ddp_rewrites_every_site_at_any_bucket_cap(single):
    layers = dt.MODEL["n_layers"]
    # The 1 MB run goes through AOTAutograd and explain(); the others compile eagerly (time).
    runs = [dict(KW, mode="ddp", bucket_cap_mb=cap, explain=cap == 1, inner="aot_eager" if cap == 1 else "eager")
            for cap in BUCKET_CAPS]
    # Each block compiled before DDP wraps the model (PyTorch's advice: compile inside the wrapper): the
    # DDP optimizer splits each block's graph (1 MB: between k and v), and every block is rewritten.
    runs.append(dict(KW, mode="ddp", bucket_cap_mb=1, explain=False, placement="blocks"))
    ranks = dt.run_distributed_many(2, "cpu", runs)
    for rank, results in enumerate(ranks):
        for run, r in zip(runs, results):
            cap = run["bucket_cap_mb"]
            where = f"rank {rank}, bucket_cap_mb={cap}: {r}"
            assert r["graphs"] > 1, f"DDP's graph splitting did not split the graph ({where})"
            # Every Based site is rewritten, whatever the pieces.
            assert r["based_calls"] == layers, where
            _same_losses(r, single)
            if run["explain"]:
                # explain() reports each site once, with the pieces it lies in; the cut ones say so.
                assert r["explained_sites"] == layers and r["cut_sites"] == layers, r["explanation"]
                assert "piece 1:" in r["explanation"] and "cut the graph into" in r["explanation"], r["explanation"]
    assert ranks[0][-1]["placement"] == "blocks", ranks[0][-1]
    for i in range(len(runs)):
        assert ranks[0][i]["losses"] == ranks[1][i]["losses"]


@needs_gloo
def test_fsdp2_rewrites_every_site(single):
    """The wrapped model compiled (graph breaks at FSDP2's hooks), and each block compiled before
    fully_shard (what PyTorch recommends for FSDP2): every block is rewritten either way. With the whole
    model one FSDP2 unit (the "root" layout: FSDP2's hooks once a step, not once per block) the model
    is one graph holding every site."""
    runs = [dict(KW, mode="fsdp2", placement=p) for p in dt.PLACEMENTS]
    runs.append(dict(KW, mode="fsdp2", placement="model", fsdp_layout="root"))
    ranks = dt.run_distributed_many(2, "cpu", runs)
    for results in ranks:
        for run, r in zip(runs, results):
            assert r["placement"] == run["placement"] and r["based_calls"] == dt.MODEL["n_layers"], r
            assert r["fsdp_layout"] == run.get("fsdp_layout", "blocks"), r
            _same_losses(r, single)
        # The per-block layout breaks the graph at each block's hooks (the block's graph is reused for
        # every block); the root layout leaves one graph with every site in it.
        assert results[-1]["graphs"] == 1 and results[-1]["rewritten_sites"] == dt.MODEL["n_layers"], results[-1]
    for i in range(len(runs)):
        assert ranks[0][i]["losses"] == ranks[1][i]["losses"]


def test_fsdp_layout_and_group_are_checked():
    """wrap() names a bad FSDP2 layout or unit size before it touches the process group."""
    model = dt.build_model(dict(dt.MODEL, n_layers=1, d_model=16, n_heads=2), torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="fsdp_layout"):
        dt.wrap(model, "fsdp2", torch.device("cpu"), fsdp_layout="layers")
    for group in (0, 1.5, True):
        with pytest.raises(ValueError, match="fsdp_group"):
            dt.wrap(model, "fsdp2", torch.device("cpu"), fsdp_group=group)


def test_benchmark_plan_runs_fsdp2_layouts():
    """benchmarks/distributed.py runs FSDP2 once per layout asked for, and under CUDA graphs only in the
    root layout (the per-block layout re-records every step there); --wrappers fsdp2 leaves DDP out."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from benchmarks import distributed as bench

    runs = bench.plan(2, 4, 3, 3, configs=(("bfloat16", 2048),), compile_modes=("default", "reduce-overhead"),
                      wrappers=("fsdp2",), fsdp_layouts=("blocks", "root"))
    got = [(label["run"], kw.get("fsdp_layout"), kw.get("compile_mode")) for label, kw in runs]
    assert got == [("single (per-GPU batch)", None, None), ("fsdp2 x2", "blocks", None),
                   ("fsdp2 x2 (one unit)", "root", None),
                   ("single (per-GPU batch) (CUDA graphs)", None, "reduce-overhead"),
                   ("fsdp2 x2 (one unit) (CUDA graphs)", "root", "reduce-overhead")], got
    default = [label["run"] for label, _ in bench.plan(2, 4, 3, 3)]
    assert "ddp x2" in default and "fsdp2 x2" in default and not any("one unit" in r for r in default), default


def test_blocks_placement_compiles_one_graph_for_every_block():
    """Compiling each block (the "blocks" placement) compiles the block once and reuses it for every
    block (more blocks than Dynamo's recompile limit of 8, past which a block would run uncompiled and
    unrewritten); every block runs based::attention, and the losses are the whole-model compile's."""
    kw = dict(dt.MODEL, n_layers=10, d_model=32, n_heads=2, feature_dim=4)
    run = dict(steps=2, batch=2, seqlen=12, dtype=torch.float64, inner="eager", model_kwargs=kw)
    blocks = dt.train("single", 0, 1, torch.device("cpu"), placement="blocks", **run)
    whole = dt.train("single", 0, 1, torch.device("cpu"), placement="model", **run)
    assert blocks["based_calls"] == whole["based_calls"] == kw["n_layers"], (blocks, whole)
    assert blocks["graphs"] == 1, blocks
    torch.testing.assert_close(torch.tensor(blocks["losses"]), torch.tensor(whole["losses"]), rtol=0, atol=1e-10)
