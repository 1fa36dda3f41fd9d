"""Context parallelism composed with FSDP2 and activation checkpointing: 4 gloo processes, float64.

A 2 x 2 DeviceMesh (dp, cp): the two dp rows each take one sequence of a batch of 2, and the two
cp ranks of a row each hold a shard of its 11 tokens (not divisible by 2). The naive Based LM of
examples/ (unchanged; short convolutions made exact by ``shard_causal_convs``), each block
compiled with the based backend (inner compiler aot_eager), is run three ways inside
``context_parallel(mesh, mesh_dim="cp")``:

- ``fsdp``: ``fully_shard`` on the 2-D mesh (HSDP: shards over cp, replicated over dp, so the
  gradient reduction sums every rank's part);
- ``fsdp_checkpoint``: the same, each compiled block called through a non-reentrant
  ``torch.utils.checkpoint`` (the recomputation runs the based operator and its exchange again);
- ``checkpoint``: checkpointing alone (parameters replicated, gradients all-reduced by hand).

Each compares the summed loss and every parameter gradient with one process's eager run over the
whole batch (1e-10), and counts the based operators of a second step: they run (a model whose
attention stayed naive would attend within the shard and fail the comparison anyway).
"""
from __future__ import annotations

import os
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from test_context_parallel import _free_port, _rel

WORLD = 4
LAYERS, T, VOCAB = 2, 11, 32


class Checkpointed(torch.nn.Module):
    """A block called through torch.utils.checkpoint (non-reentrant)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def _model():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    from naive_based_lm import BasedLM

    torch.manual_seed(0)
    return BasedLM(vocab_size=VOCAB, d_model=16, n_layers=LAYERS, n_heads=2, feature_dim=4, conv_size=3,
                   n_kv_heads=1).double()


def _loss(model, ids, targets):
    logits = model(ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def _case(kind, mesh, ids, targets, reference):
    import based_compile
    from based_calls import BasedOpCounter
    from torch.distributed.fsdp import fully_shard

    model = _model()
    based_compile.shard_causal_convs(model)
    for i, block in enumerate(model.blocks):
        # aot_eager: AOTAutograd as under Inductor (the based operator and its backward in the
        # joint graph), without Inductor's code generation, which is not what is composed here (the
        # operators are opaque to it; benchmarks/context_parallel.py runs Inductor sharded on GPUs)
        block.compile(backend=based_compile.backend(inner="aot_eager"), dynamic=False)
        if "checkpoint" in kind:
            model.blocks[i] = Checkpointed(block)
    fsdp = kind.startswith("fsdp")
    if fsdp:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    dp = mesh["dp"].get_local_rank()
    with based_compile.context_parallel(mesh, mesh_dim="cp"):
        mine = [based_compile.shard_sequence(x[dp:dp + 1], seq_dim=1) for x in (ids, targets)]
        loss = _loss(model, *mine)
        loss.backward()
        grads = [p.grad.full_tensor() * WORLD if fsdp else p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        with BasedOpCounter() as counter:                  # a second step, compiled already
            again = _loss(model, *mine)
            again.backward()
    if not fsdp:
        for g in grads:
            dist.all_reduce(g)
    total = loss.detach().clone()
    dist.all_reduce(total)
    loss_ref, grads_ref = reference
    return {"loss": abs(total.item() - loss_ref) / loss_ref,
            "again": abs(again.item() - loss.item()) / abs(loss.item()),
            "grads": max(_rel(a, b) for a, b in zip(grads, grads_ref, strict=True)),
            "calls": dict(counter.calls)}


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, VOCAB, (2, T), generator=g)
        targets = torch.randint(0, VOCAB, (2, T), generator=g)
        model = _model()                                   # one process, eager, the whole batch
        loss = _loss(model, ids, targets)
        reference = (loss.item(), torch.autograd.grad(loss, list(model.parameters())))
        results[rank] = {kind: _case(kind, mesh, ids, targets, reference)
                         for kind in ("fsdp", "fsdp_checkpoint", "checkpoint")}
    except Exception:  # noqa: BLE001 - reported to the test
        results[rank] = traceback.format_exc()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.spawn(_worker, args=(_free_port(), shared), nprocs=WORLD, join=True)
        return dict(shared)


@pytest.mark.parametrize("kind", ["fsdp", "fsdp_checkpoint", "checkpoint"])
def test_composed_training_equals_one_process(results, kind):
    for rank in range(WORLD):
        assert not isinstance(results[rank], str), results[rank]
        errors = dict(results[rank][kind])
        calls = errors.pop("calls")
        assert max(errors.values()) < 1e-10, (rank, kind, errors)
        forward = LAYERS * (2 if "checkpoint" in kind else 1)      # the recomputation runs it again
        assert calls.get("based::attention") == forward, (rank, kind, calls)
        assert calls.get("based::attention_backward") == LAYERS, (rank, kind, calls)
        assert calls.get("based::sequence_halo", 0) >= LAYERS, (rank, kind, calls)
