"""The kernel policy's CUDA crossovers (based_compile/op/policy.py), measured in one run: forward (inference)
and forward+backward (training) medians of our three Triton kernels at B*H = 16 and 256 (H=16, bf16,
causal, normalised; Dk=16, Dv=64 unless --dk / --dv say otherwise).

Usage: python benchmarks/crossover_h200.py --out DIR [--ts 2048,4096,8192,16384,32768] [--bs 1,16] [--dk 16] [--dv 64]
Prints the table last; writes crossover.json into --out at Dk=16, Dv=64, else crossover_dk{Dk}_dv{Dv}.json
(the README's tables: benchmarks/results/crossover*.json).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton.testing

from based_compile.kernels import chunked_based, fused_chunk_based, parallel_based

KERNELS = {"parallel": parallel_based, "fused_chunk": fused_chunk_based, "chunked": chunked_based}


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--ts", default="2048,4096,8192,16384,32768")
    p.add_argument("--bs", default="1,16")
    p.add_argument("--dk", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    a = p.parse_args()
    name = "crossover" if (a.dk, a.dv) == (16, 64) else f"crossover_dk{a.dk}_dv{a.dv}"
    command = "python benchmarks/crossover_h200.py --out OUT"
    if name != "crossover":
        command += f" --dk {a.dk} --dv {a.dv}"
    for flag in ("ts", "bs"):               # the command as run, for the README's caption
        if getattr(a, flag) != p.get_default(flag):
            command += f" --{flag} {getattr(a, flag)}"
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for b in [int(x) for x in a.bs.split(",")]:
        for t in [int(x) for x in a.ts.split(",")]:
            if b * t > 16 * 32768:
                continue
            q, k = (torch.randn(b, 16, t, a.dk, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
            v = torch.randn(b, 16, t, a.dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            do = torch.randn_like(v)
            row = {"B": b, "T": t}
            for kernel, fn in KERNELS.items():
                if kernel == "parallel" and b * t > 16 * 16384:
                    continue
                try:
                    with torch.no_grad():
                        row[f"{kernel}_fwd"] = _ms(lambda: fn(q, k, v))
                    row[f"{kernel}_fwdbwd"] = _ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
                except ValueError as e:         # a kernel's limit (Dk, Dv)
                    print(f"{kernel} at Dk={a.dk} Dv={a.dv}: {e}", flush=True)
            rows.append(row)
            print(row, flush=True)
            with open(os.path.join(a.out, f"{name}.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": command,
                           "config": {"H": 16, "Dk": a.dk, "Dv": a.dv, "dtype": "bf16", "causal": True,
                                      "normalize": True},
                           "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, H=16 Dk={a.dk} Dv={a.dv} bf16 causal normalised, median ms")
    print("| B | T | parallel fwd | fused_chunk fwd | chunked fwd | parallel fwd+bwd | fused_chunk fwd+bwd | "
          "chunked fwd+bwd |")
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in (
            "parallel_fwd", "fused_chunk_fwd", "chunked_fwd", "parallel_fwdbwd", "fused_chunk_fwdbwd",
            "chunked_fwdbwd")]
        print(f"| {r['B']} | {r['T']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
