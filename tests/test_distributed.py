"""backend="based" composes with DDP and FSDP2: 2 CPU processes (gloo), losses match one process."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import distributed_training as dt  # noqa: E402

KW = dict(steps=3, batch=4, seqlen=24, dtype=torch.float64, inner="aot_eager")


@pytest.fixture(scope="module")
def single():
    return dt.train("single", 0, 1, torch.device("cpu"), **KW)


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_matches_single_process(mode, single):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ranks = dt.run_distributed(mode, 2, "cpu", **KW)
    layers = dt.MODEL["n_layers"]
    assert single["based_calls"] == layers
    for r in ranks:
        # Every Based site is still rewritten, in whatever graph pieces the wrapper produced.
        assert r["based_calls"] == layers, r
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(single["losses"]), rtol=1e-9, atol=0)
    assert len(set(map(tuple, (r["losses"] for r in ranks)))) == 1
    if mode == "ddp":
        assert all(r["graphs"] > 1 for r in ranks), "DDP's graph splitting did not split the graph"
    # The losses change over the steps: the model trains, the comparison is not of constants.
    assert len(set(single["losses"])) == KW["steps"]
