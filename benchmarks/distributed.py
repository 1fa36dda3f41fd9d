"""Multi-GPU check (issue 7): DDP and FSDP2 around the naive Based LM with backend="based".

On N GPUs (NCCL): losses of each wrapper against one process on the same global batch
(Triton kernels, float32), and weak scaling: step time on 1 GPU against N GPUs at the same
per-GPU batch (efficiency = t1 / tN). Needs a machine with >= 2 GPUs; keep NVLink multicast
off (NCCL_NVLS_ENABLE=0, set here).

    python benchmarks/distributed.py --out OUT [--world 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import distributed_training as dt  # noqa: E402

MODEL = dict(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, feature_dim=16, max_len=4096, conv_size=4)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--world", type=int, default=torch.cuda.device_count())
    p.add_argument("--per-gpu-batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    if args.world < 2:
        sys.exit(f"needs >= 2 GPUs, found {torch.cuda.device_count()}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    kw = dict(steps=args.steps, seqlen=args.seqlen, model_kwargs=MODEL, dtype=torch.float32)
    cuda0 = torch.device("cuda", 0)
    single = dt.train("single", 0, 1, cuda0, batch=args.per_gpu_batch * args.world, **kw)
    single_small = dt.train("single", 0, 1, cuda0, batch=args.per_gpu_batch, **kw)
    rows = {"single (global batch)": single, "single (per-GPU batch)": single_small}
    for mode in ("ddp", "fsdp2"):
        try:
            rows[f"{mode} x{args.world}"] = dt.run_distributed(
                mode, args.world, "cuda", batch=args.per_gpu_batch * args.world, **kw)[0]
        except Exception as err:  # report and go on with the other wrapper
            rows[f"{mode} x{args.world}"] = {"error": f"{type(err).__name__}: {err}"}
    ref = torch.tensor(single["losses"])
    print(f"{'run':<26}{'step ms':>10}{'efficiency':>12}{'max |dloss|':>14}{'based calls':>13}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:<26}  {r['error']}")
            continue
        eff = single_small["step_s"] / r["step_s"] if "x" in name else float("nan")
        r["efficiency"] = eff
        r["max_loss_diff"] = (torch.tensor(r["losses"]) - ref).abs().max().item()
        print(f"{name:<26}{r['step_s'] * 1e3:>10.1f}{eff:>12.2f}{r['max_loss_diff']:>14.2e}{r['based_calls']:>13}")
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "world": args.world, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
