"""One device call for the prefix-state chunked kernels (issue 16): float64 checks, a launch sweep at one
T, then forward times of the best launch against our other kernels, fla-core and SDPA at every T,
with ratios to the floor measured in the same run (B=16 H=16 Dk=16 Dv=64 bf16 causal normalised).

Usage: python benchmarks/prefix_h200.py --out DIR [--sweep-t 8192] [--ts 1024,...] [--budget-s 400]
       [--backward] [--no-sweep]
--backward checks gradients and sweeps forward+backward (kernels/prefix_backward.py at the same launch); the
table's ours_chunked is the shipped chunked kernel at its default launch.
Prints a short table last; writes prefix_h200.json into --out (after every stage).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from floor import forward_backward_floor, forward_floor, measure_ceilings  # noqa: E402

from based_compile.kernels import naive_parallel_based, prefix_chunked  # noqa: E402
from based_compile.kernels.arguments import check_arguments  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", os.path.join(HERE, "kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
B, H, DK, DV = bench.B, bench.H, bench.DK, bench.DV
START = time.time()
Cfg = prefix_chunked.PrefixConfig


def prefix_run(cfg):
    def run(q, k, v, causal=True):
        return prefix_chunked.prefix_forward(q, k, v, check_arguments(q, k, v, causal=causal), cfg)[0]
    return run


def prefix_train(cfg):
    """This forward launch with the prefix-state backward (kernels/prefix_backward.py) at the same launch."""
    from based_compile.kernels.function import BasedKernelFunction
    from based_compile.kernels.prefix_backward import prefix_backward
    fwd = lambda q, k, v, a: prefix_chunked.prefix_forward(q, k, v, a, cfg)  # noqa: E731
    bwd = lambda q, k, v, o, z, do, a: prefix_backward(q, k, v, o, z, do, a, cfg)  # noqa: E731

    def run(q, k, v, causal=True):
        return BasedKernelFunction.apply(q, k, v, check_arguments(q, k, v, causal=causal), fwd, bwd)
    return run


def check(run, t=777, b=2, h=4, causal=True, hk=None, dtype=torch.bfloat16, grads=False):
    """Relative max errors (o and, with grads, dq dk dv) against float64, and the parallel kernel's on the same
    inputs."""
    from based_compile.kernels import parallel_based
    hk = hk or h
    q = torch.randn(b, h, t, DK, device="cuda", dtype=dtype)
    k = torch.randn(b, hk, t, DK, device="cuda", dtype=dtype)
    v = torch.randn(b, hk, t, DV, device="cuda", dtype=dtype)
    do = torch.randn(b, h, t, DV, device="cuda", dtype=dtype)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = naive_parallel_based(*leaves, causal=causal)
    out = {}
    refg = torch.autograd.grad(ref, leaves, do.double()) if grads else ()
    for name, fn in (("ours", lambda q, k, v: run(q, k, v, causal=causal)),
                     ("parallel", lambda q, k, v: parallel_based(q, k, v, causal=causal))):
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = fn(*xs)
        e = [((o.double() - ref).abs().max() / ref.abs().max()).item()]
        if grads:
            g = torch.autograd.grad(o, xs, do)
            e += [((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(g, refg)]
        out[name] = e
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sweep-t", type=int, default=8192)
    p.add_argument("--ts", default="1024,2048,4096,8192,16384,32768,65536")
    p.add_argument("--budget-s", type=float, default=400)
    p.add_argument("--backward", action="store_true")
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton
    res["triton"] = triton.__version__

    def save():
        with open(os.path.join(a.out, "prefix_h200.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)

    ceil = measure_ceilings()
    res["ceilings"] = dataclasses.asdict(ceil) if dataclasses.is_dataclass(ceil) else str(ceil)
    print("ceilings", res["ceilings"], flush=True)
    base = Cfg()
    res["checks"] = {}
    for name, kw in (("causal", {}), ("noncausal", {"causal": False}), ("gqa", {"hk": 2}),
                     ("fp32", {"dtype": torch.float32})):
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            res["checks"][name] = check(prefix_train(base) if a.backward else prefix_run(base),
                                        grads=a.backward, **kw)
        except Exception as e:
            res["checks"][name] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        print("check", name, res["checks"][name], flush=True)
    save()

    def fwd_ms(run, t):
        return bench.time_entry("x", "BHTD", run, t)

    sweep = [base] + [dataclasses.replace(base, **kw) for kw in (
        dict(c=128), dict(c=512), dict(bt=128, warps=8), dict(stages=3), dict(state_warps=8),
        dict(bts=128, state_warps=8), dict(bv=32), dict(target=4096), dict(target=256),
        dict(maxnreg=128), dict(state_maxnreg=128), dict(bt=128, bs=64, warps=4),
        dict(c=512, bt=128, warps=8), dict(state_stages=3),
        dict(dkv_warps=4), dict(reverse_warps=4), dict(warps=8), dict(c=128, bt=64, bs=32),
    )]
    res["sweep"] = []
    best, best_ms = base, float("inf")
    if not a.no_sweep:
        for cfg in sweep:
            if time.time() - START > a.budget_s * 0.45:
                break
            try:
                r = fwd_ms(prefix_train(cfg) if a.backward else prefix_run(cfg), a.sweep_t)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            key = "fwdbwd_ms" if a.backward else "fwd_ms"
            ms = r.get(key) or float("inf")
            print("sweep", cfg, r, flush=True)
            res["sweep"].append({"cfg": dataclasses.asdict(cfg), **r})
            if ms < best_ms:
                best, best_ms = cfg, ms
            save()
    res["best"] = dataclasses.asdict(best)
    rows = []
    entries = {"prefix": ("BHTD", prefix_train(best))}
    for name in ("ours_parallel", "ours_fused_chunk", "ours_chunked", "sdpa_causal_d64", "fla_parallel",
                 "fla_fused_chunk"):
        try:
            entries[name] = bench.ENTRIES[name]()
        except Exception as e:
            print("entry", name, "unavailable:", e, flush=True)
    res["table"] = rows
    for t in [int(x) for x in a.ts.split(",")]:
        ff = forward_floor(ceil, B, H, t, DK, DV)
        fb = forward_backward_floor(ceil, B, H, t, DK, DV)
        row = {"T": t, "floor_fwd_ms": ff * 1e3, "floor_fwdbwd_ms": fb * 1e3}
        for name, (layout, run) in entries.items():
            if time.time() - START > a.budget_s:
                row[name] = "budget"
                continue
            if t > 16384 and name in ("ours_parallel", "fla_parallel"):
                continue
            try:
                r = bench.time_entry(name, layout, run, t)
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            row[name] = r
            print(t, name, r, flush=True)
            torch.cuda.empty_cache()
        rows.append(row)
        save()
    print(f"\ndevice {res['device']}; best {best}")
    names = list(entries)
    print("| T | floor fwd | " + " | ".join(names) + " |")
    for row in rows:
        cells = []
        for n in names:
            r = row.get(n)
            if isinstance(r, dict) and r.get("fwd_ms"):
                s = f"{r['fwd_ms']:.3f} ({r['fwd_ms'] / row['floor_fwd_ms']:.1f})"
                if r.get("fwdbwd_ms"):
                    s += f" / {r['fwdbwd_ms']:.3f} ({r['fwdbwd_ms'] / row['floor_fwdbwd_ms']:.1f})"
                cells.append(s)
            else:
                cells.append("-")
        print(f"| {row['T']} | {row['floor_fwd_ms']:.4f} | " + " | ".join(cells) + " |")
    save()


if __name__ == "__main__":
    main()
