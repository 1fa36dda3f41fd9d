"""The kernel policy's CUDA crossovers (based_compile/op/policy.py), measured in one run: forward (inference)
and forward+backward (training) medians of our three Triton kernels at B*H = 16 and 256 (H=16, Dk=16,
Dv=64, bf16, causal, normalised).

Usage: python benchmarks/crossover_h200.py --out DIR [--ts 2048,4096,8192,16384,32768] [--bs 1,16]
Prints the table last; writes crossover.json into --out (the README's table: benchmarks/results/crossover.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for b in [int(x) for x in a.bs.split(",")]:
        for t in [int(x) for x in a.ts.split(",")]:
            if b * t > 16 * 32768:
                continue
            q, k = (torch.randn(b, 16, t, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qk")
            v = torch.randn(b, 16, t, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            do = torch.randn_like(v)
            row = {"B": b, "T": t}
            for name, fn in KERNELS.items():
                if name == "parallel" and b * t > 16 * 16384:
                    continue
                with torch.no_grad():
                    row[f"{name}_fwd"] = _ms(lambda: fn(q, k, v))
                row[f"{name}_fwdbwd"] = _ms(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
            rows.append(row)
            print(row, flush=True)
            with open(os.path.join(a.out, "crossover.json"), "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "python " + " ".join(sys.argv),
                           "config": {"H": 16, "Dk": 16, "Dv": 64, "dtype": "bf16", "causal": True,
                                      "normalize": True},
                           "rows": rows}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}, H=16 Dk=16 Dv=64 bf16 causal normalised, median ms")
    print("| B | T | parallel fwd | fused_chunk fwd | chunked fwd | parallel fwd+bwd | fused_chunk fwd+bwd | "
          "chunked fwd+bwd |")
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in (
            "parallel_fwd", "fused_chunk_fwd", "chunked_fwd", "parallel_fwdbwd", "fused_chunk_fwdbwd",
            "chunked_fwdbwd")]
        print(f"| {r['B']} | {r['T']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
