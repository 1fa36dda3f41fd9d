"""Per-kernel GPU times of the prefix-state chunked kernels (issue 16), from torch.profiler.

Usage: python benchmarks/prefix_profile.py [--t 8192] [--b 16] [--dk 16] [--dv 64] [--dtype bfloat16] [--cfgs '[{}, {"bt": 128}]']
       [--backward] [--once]
(--backward: also the backward, kernels/prefix_backward.py, at the same launch, the forward keeping its states
for it as in training; --recompute: the backward computes them again)
Each configuration is the shipped launch (prefix_config) with the given fields changed ('{"maxnreg": 0}' lifts
the output kernel's register cap). Prints, per launch configuration, each kernel's mean time over 10 calls (B=16 H=16 Dk=16 Dv=64 bf16
causal normalised unless said). --once runs one warm call and nothing else (for ncu).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json

import torch

from based_compile.kernels import prefix_backward, prefix_chunked
from based_compile.kernels.arguments import check_arguments


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--t", type=int, default=8192)
    p.add_argument("--b", type=int, default=16)
    p.add_argument("--dk", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cfgs", default="[{}]")
    p.add_argument("--backward", action="store_true")
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--once", action="store_true")
    a = p.parse_args()
    q, k = (torch.randn(a.b, 16, a.t, a.dk, device="cuda", dtype=getattr(torch, a.dtype)) for _ in range(2))
    v, do = (torch.randn(a.b, 16, a.t, a.dv, device="cuda", dtype=getattr(torch, a.dtype)) for _ in range(2))
    args = check_arguments(q, k, v)
    for kw in json.loads(a.cfgs):
        cfg = dataclasses.replace(prefix_chunked.prefix_config(args, q.dtype), **kw)     # the shipped launch, changed

        def step():
            o, z = prefix_chunked.prefix_forward(q, k, v, args, cfg, keep=a.backward and not a.recompute)
            if a.backward:
                prefix_backward.prefix_backward(q, k, v, o, z, do, args, cfg)
        step()
        torch.cuda.synchronize()
        if a.once:
            step()
            torch.cuda.synchronize()
            continue
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        times = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name] += e.device_time / 10 / 1e3
        total = sum(times.values())
        print(f"{a.dtype} Dk={a.dk} Dv={a.dv} cfg {kw}: total {total:.3f} ms " + ", ".join(f"{n} {ms:.3f}" for n, ms in
                                                            sorted(times.items(), key=lambda x: -x[1])), flush=True)


if __name__ == "__main__":
    main()
