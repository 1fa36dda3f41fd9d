"""Context parallelism: one long sequence of the naive Based LM split over processes.

The model is examples/naive_based_lm.py, unchanged. Two lines make it context parallel:
``based_compile.shard_causal_convs(model)`` (its short causal convolutions fetch the previous
shard's last tokens) and ``with based_compile.context_parallel(group):`` around the steps; each
rank feeds its contiguous shard of the tokens (``based_compile.shard_sequence``). The Based
attention of the compiled model then passes its small state between ranks (one all-gather per
layer) instead of keys and values. The script trains a few steps on one process over the whole
sequence, then on ``--world`` processes over its shards, and prints both loss curves: they agree
to rounding.

    python examples/context_parallel.py --world 2                     # CPU, gloo, float64
    python examples/context_parallel.py --world 2 --device cuda --seqlen 65536 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import based_compile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from naive_based_lm import BasedLM  # noqa: E402

MODEL = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=2, feature_dim=8, conv_size=4)


def tokens(step: int, batch: int, seqlen: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (batch, seqlen + 1), generator=g)


def train(args, device, shard: bool) -> list[float]:
    """Loss per step: the whole sequence on this process, or (``shard``) this rank's shard of it."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = BasedLM(**MODEL, max_len=args.seqlen).to(device=device, dtype=dtype)
    based_compile.shard_causal_convs(model)
    backend = "based" if args.inner == "inductor" else based_compile.backend(inner=args.inner)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    losses = []
    for step in range(args.steps):
        batch = tokens(step, args.batch, args.seqlen, MODEL["vocab_size"]).to(device)
        ids, target = batch[:, :-1], batch[:, 1:]
        if shard:
            with based_compile.context_parallel(dist.group.WORLD):
                ids = based_compile.shard_sequence(ids, seq_dim=1)
                target = based_compile.shard_sequence(target, seq_dim=1)
                logits = compiled(ids)
                loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), target.flatten(), reduction="sum")
                opt.zero_grad()
                loss.backward()
            for p in model.parameters():                 # the gradient of the whole sequence's loss
                dist.all_reduce(p.grad)
            dist.all_reduce(loss)
        else:
            logits = compiled(ids)
            loss = F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), target.flatten(), reduction="sum")
            opt.zero_grad()
            loss.backward()
        for p in model.parameters():
            p.grad /= args.batch * args.seqlen
        opt.step()
        losses.append(loss.item() / (args.batch * args.seqlen))
    return losses


def _worker(rank, args, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        losses = train(args, device, shard=True)
        if rank == 0:
            results["sharded"] = losses
    finally:
        dist.destroy_process_group()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--seqlen", type=int, default=37, help="tokens per sequence (need not divide by --world)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--dtype", default="float64", choices=("float64", "float32", "bfloat16"))
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager"),
                   help="the based backend's inner compiler (inductor: backend=\"based\")")
    args = p.parse_args(argv)
    if args.world < 2:
        p.error("--world must be at least 2")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        p.error(f"--world {args.world} needs as many GPUs; {torch.cuda.device_count()} found")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args, port, results), nprocs=args.world, join=True)
        sharded = list(results["sharded"])
    whole = train(args, torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"), shard=False)
    print(f"{'step':>4}  {'one process':>14}  {f'{args.world} shards':>14}")
    for i, (a, b) in enumerate(zip(whole, sharded)):
        print(f"{i:>4}  {a:>14.10f}  {b:>14.10f}")
    diff = max(abs(a - b) for a, b in zip(whole, sharded))
    print(f"largest loss difference: {diff:.3g}")
    return {"whole": whole, "sharded": sharded, "max_diff": diff}


if __name__ == "__main__":
    main()
