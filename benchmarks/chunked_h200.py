"""One device call for the chunked kernel (issue 16): correctness against float64, a small launch
sweep, then the kernels.py table (B=16 H=16 Dk=16 Dv=64 bf16 causal normalised) for the chunked
kernel, our parallel and fused-chunk kernels and SDPA, with ratios to the floor measured in the run.

Usage: python benchmarks/chunked_h200.py --out DIR [--sweep] [--ts 1024,...] [--budget-s 420]
Prints a short table last; writes chunked_h200.json into --out (updated after every stage).
Stages past --budget-s seconds of wall time are skipped (and say so).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import sys
import time
import traceback

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from floor import forward_backward_floor, forward_floor, measure_ceilings  # noqa: E402

from based_compile.kernels import chunked, naive_parallel_based, parallel_based  # noqa: E402
from based_compile.kernels.arguments import check_arguments  # noqa: E402
from based_compile.kernels.function import BasedKernelFunction  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", os.path.join(HERE, "kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

B, H, DK, DV = bench.B, bench.H, bench.DK, bench.DV
START = time.time()


def elapsed() -> float:
    return time.time() - START


def rel(a, r) -> float:
    a = a.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - r).norm() / r.norm()).item()


def correctness(dtype, cases):
    """Errors of o, dq, dk, dv against float64 for chunked (and parallel, for scale) on fresh inputs."""
    rows = []
    for b, h, hk, t, layout, causal in cases:
        shape = (lambda n, d: (b, n, t, d)) if layout == "BHTD" else (lambda n, d: (b, t, n, d))
        q, k, v = (torch.randn(shape(n, d), device="cuda", dtype=torch.float64).to(dtype).double()
                   for n, d in ((h, DK), (hk, DK), (hk, DV)))
        kw = dict(causal=causal, layout=layout)
        refs = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = naive_parallel_based(*refs, **kw)
        do = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, refs, do)
        row = {"dtype": str(dtype), "B": b, "H": h, "Hkv": hk, "T": t, "layout": layout, "causal": causal}
        for name, fn in (("chunked", chunked.chunked_based), ("parallel", parallel_based)):
            xs = [x.to(dtype).requires_grad_() for x in (q, k, v)]
            out = fn(*xs, **kw)
            grads = torch.autograd.grad(out, xs, do.to(dtype))
            row[name] = {"o": rel(out, ref), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
        print("correct", json.dumps(row), flush=True)
        rows.append(row)
    return rows


# (chunk, value block, warps, stages, target programs, feature mode); call 1 (2026-11-29) measured
# (64, 64, 8, 2) forward and (32, 64, 4, 1) backward best of its sweep, with feature mode 0.
FWD_SWEEP = [(64, 64, 8, 2, 1024, 0), (64, 64, 8, 2, 1024, 1), (64, 64, 8, 2, 1024, 2), (32, 64, 8, 1, 1024, 1),
             (32, 64, 4, 1, 1024, 1), (64, 64, 8, 2, 1 << 20, 1)]
BWD_SWEEP = [(32, 64, 4, 1, 1024, 0), (32, 64, 4, 1, 1024, 1), (32, 64, 4, 1, 1024, 2), (32, 64, 8, 1, 1024, 1),
             (32, 64, 8, 1, 1024, 2)]


def _config(args, launch):
    bt, bv, w, st, target, mode = launch
    bv = chunked._value_block(args, bv)
    return chunked.ChunkedConfig(bt, chunked._segment_chunks(args, bt, bv, target), bv, w, st, mode)


def _warm(task):
    """Compile one configuration in a worker process (Triton's disk cache then serves the parent)."""
    kind, launch, dtype_name, layout, hk = task
    t0 = time.time()
    try:
        dtype = getattr(torch, dtype_name)
        b, h, t = 1, 4, 300
        shape = (lambda n, d: (b, n, t, d)) if layout == "BHTD" else (lambda n, d: (b, t, n, d))
        q, k, v = (torch.randn(shape(n, d), device="cuda", dtype=dtype).requires_grad_()
                   for n, d in ((h, DK), (hk, DK), (hk, DV)))
        for causal in (True, False) if kind == "chunked_all" else (True,):
            if kind in ("chunked", "chunked_all"):
                args = check_arguments(q, k, v, causal=causal, layout=layout)
                cfg_f = _config(args, launch[0]) if launch else chunked.chunked_config(args, dtype)
                cfg_b = _config(args, launch[1]) if launch else chunked.chunked_config(args, dtype, backward=True)
                out = _fns(cfg_f, cfg_b)(q, k, v, args)
            elif kind == "parallel":
                out = parallel_based(q, k, v, causal=causal, layout=layout)
            else:
                from based_compile.kernels.fused_chunk import fused_chunk_based
                out = fused_chunk_based(q, k, v, causal=causal, layout=layout)
            out.sum().backward()
        torch.cuda.synchronize()
        return f"warm {task}: {time.time() - t0:.1f}s"
    except Exception as e:  # noqa: BLE001
        return f"warm {task}: {type(e).__name__}: {str(e)[:300]}"


def warm_all(sweep_on: bool, fp32: bool):
    import concurrent.futures
    import multiprocessing
    tasks = [("chunked_all", None, "bfloat16", "BHTD", 4), ("chunked_all", None, "bfloat16", "BTHD", 2),
             ("parallel", None, "bfloat16", "BHTD", 4),
             ("parallel", None, "bfloat16", "BTHD", 2), ("parallel", None, "float32", "BTHD", 2),
             ("fused", None, "bfloat16", "BHTD", 4)]
    if sweep_on:
        tasks += [("chunked", (f, b), "bfloat16", "BHTD", 4) for f, b in zip(FWD_SWEEP, BWD_SWEEP)]
    if fp32:
        tasks += [("chunked", None, "float32", "BTHD", 2), ("parallel", None, "float32", "BTHD", 2)]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(len(tasks), 14), mp_context=ctx) as ex:
        for line in ex.map(_warm, tasks):
            print(line, flush=True)


def _fns(fwd_cfg, bwd_cfg):
    fwd = functools.partial(chunked._forward, cfg=fwd_cfg)
    bwd = functools.partial(chunked._backward, cfg=bwd_cfg)
    return lambda q, k, v, args: BasedKernelFunction.apply(q, k, v, args, fwd, bwd)


def sweep(ts, fwd_launches, bwd_launches):
    """Median ms of the chunked forward and forward+backward per launch (bt, bv, warps, stages, target programs)."""
    out = []
    for t in ts:
        q, k, v = bench._inputs(t)
        args = check_arguments(q, k, v)
        for launch in fwd_launches:
            cfg = _config(args, launch)
            try:
                with torch.no_grad():
                    ms = bench._median_ms(lambda: chunked._forward(q, k, v, args, cfg))
            except Exception as e:  # noqa: BLE001
                ms = None
                print(f"sweep fwd {launch}: {type(e).__name__}: {str(e)[:200]}")
            out.append({"T": t, "mode": "fwd", "launch": launch, "seg": cfg.seg, "ms": ms})
            print(f"sweep T={t} fwd {launch} seg={cfg.seg}: {ms}", flush=True)
        best_f = min((r for r in out if r["T"] == t and r["mode"] == "fwd" and r["ms"]), key=lambda r: r["ms"])
        fwd_cfg = _config(args, best_f["launch"])
        args_un = check_arguments(q, k, v, normalize=False)
        with torch.no_grad():
            ms = bench._median_ms(lambda: chunked._forward(q, k, v, args_un, fwd_cfg))
        out.append({"T": t, "mode": "fwd_unnormalised", "launch": best_f["launch"], "seg": fwd_cfg.seg, "ms": ms})
        print(f"sweep T={t} fwd unnormalised {best_f['launch']}: {ms}", flush=True)
        for launch in bwd_launches:
            cfg = _config(args, launch)
            run = _fns(fwd_cfg, cfg)
            do = torch.randn(B, H, t, DV, device="cuda", dtype=q.dtype)
            try:
                ms = bench._median_ms(lambda: run(q, k, v, args).backward(do), grad_to_none=[q, k, v])
            except Exception as e:  # noqa: BLE001
                ms = None
                print(f"sweep fwdbwd {launch}: {type(e).__name__}: {str(e)[:200]}")
            out.append({"T": t, "mode": "fwdbwd", "launch": launch, "seg": cfg.seg, "ms": ms})
            print(f"sweep T={t} fwd+bwd {launch} seg={cfg.seg}: {ms}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="chunked_out")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-ts", default="8192")
    p.add_argument("--ts", default=",".join(str(t) for t in bench.ALL_TS))
    p.add_argument("--entries", default="ours_chunked,ours_parallel,ours_fused_chunk,sdpa_causal_d64")
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--fp32", action="store_true", help="also check float32 against float64 (slow compiles)")
    p.add_argument("--profile-once", action="store_true",
                   help="one chunked forward+backward at T=8192 and exit (to run under ncu)")
    opts = p.parse_args()
    if opts.profile_once:
        q, k, v = bench._inputs(8192)
        out = chunked.chunked_based(q, k, v)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        return
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "config": {"B": B, "H": H, "Dk": DK, "Dv": DV, "dtype": "bf16", "causal": True, "normalize": True},
              "launch": {"forward": chunked.FORWARD_LAUNCH, "backward": chunked.BACKWARD_LAUNCH}}
    path = os.path.join(opts.out, "chunked_h200.json")

    def save():
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)

    print(report["device"], report["torch"], report["triton"], flush=True)
    c = measure_ceilings()
    report["ceilings"] = {"copy_TBps": c.copy_bytes_per_s / 1e12, "bf16_TFLOPs": c.bf16_flops_per_s / 1e12}
    print("ceilings", report["ceilings"], flush=True)
    warm_all(opts.sweep, opts.fp32)
    print(f"warm-up done at {elapsed():.0f} s", flush=True)
    report["correct_bf16"] = correctness(torch.bfloat16, [(2, 4, 4, 4097, "BHTD", True), (2, 4, 2, 2047, "BTHD", False)])
    save()
    if opts.sweep:
        report["sweep"] = sweep([int(x) for x in opts.sweep_ts.split(",")], FWD_SWEEP, BWD_SWEEP)
        save()
        best = {}
        for mode in ("fwd", "fwdbwd"):
            rows = [r for r in report["sweep"] if r["mode"] == mode and r["ms"]]
            if rows:
                best[mode] = min(rows, key=lambda r: r["ms"])["launch"]
        if "fwd" in best:
            chunked.FORWARD_LAUNCH = tuple(best["fwd"])
        if "fwdbwd" in best:
            chunked.BACKWARD_LAUNCH = tuple(best["fwdbwd"])
        report["launch"] = {"forward": chunked.FORWARD_LAUNCH, "backward": chunked.BACKWARD_LAUNCH}
        print("launch", report["launch"], flush=True)
        save()

    results = []
    report["results"] = results
    entries = {}
    for name in opts.entries.split(","):
        layout, run = bench.ENTRIES[name]()
        entries[name] = (layout, run)
    for t in [int(x) for x in opts.ts.split(",")]:
        ff = forward_floor(c, B, H, t, DK, DV) * 1e3
        fbf = forward_backward_floor(c, B, H, t, DK, DV) * 1e3
        for name, (layout, run) in entries.items():
            if t >= bench.LONG_TS_FROM and name not in bench.LONG_ENTRIES:
                continue
            if elapsed() > opts.budget_s:
                print(f"T={t} {name}: skipped (budget)", flush=True)
                results.append({"T": t, "entry": name, "skipped": "budget"})
                continue
            try:
                row = bench.time_entry(name, layout, run, t)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = {"error": f"{type(e).__name__}: {e}"}
            row.update({"T": t, "entry": name, "fwd_floor_ms": ff, "fwdbwd_floor_ms": fbf})
            results.append(row)
            print(f"T={t} {name} fwd {row.get('fwd_ms')} fwd+bwd {row.get('fwdbwd_ms')} "
                  f"{row.get('fwd_error', '')} {row.get('fwdbwd_error', '')}", flush=True)
            save()
    if opts.fp32 and elapsed() < opts.budget_s + 60:
        torch.backends.cuda.matmul.allow_tf32 = False
        report["correct_fp32"] = correctness(torch.float32, [(1, 4, 2, 1023, "BTHD", True)])
        save()

    print()
    print(f"{report['device']} ceilings {report['ceilings']}; launch {report['launch']}")
    for r in report.get("correct_bf16", []) + report.get("correct_fp32", []):
        ch, pa = r["chunked"], r["parallel"]
        print(f"err {r['dtype'][6:]:8s} T={r['T']} {r['layout']} causal={r['causal']} Hkv={r['Hkv']}: chunked "
              + " ".join(f"{k}={v:.1e}" for k, v in ch.items()) + " | parallel "
              + " ".join(f"{k}={v:.1e}" for k, v in pa.items()))
    by = {(r["T"], r["entry"]): r for r in results}
    print(f"{'T':>6} {'entry':17s} {'fwd ms':>8} {'xfl':>5} {'fb ms':>8} {'xfl':>5} {'fwd/sdpa':>8} {'fb/sdpa':>8}"
          f" {'peakMiB':>7}")
    for r in results:
        if "fwd_floor_ms" not in r:
            continue
        s = by.get((r["T"], "sdpa_causal_d64"), {})

        def f(x, spec=".3f"):
            return "-" if x is None else format(x, spec)

        fm, bm = r.get("fwd_ms"), r.get("fwdbwd_ms")
        print(f"{r['T']:6d} {r['entry']:17s} {f(fm):>8} {f(fm and fm / r['fwd_floor_ms'], '.1f'):>5} "
              f"{f(bm):>8} {f(bm and bm / r['fwdbwd_floor_ms'], '.1f'):>5} "
              f"{f(fm and s.get('fwd_ms') and fm / s['fwd_ms'], '.2f'):>8} "
              f"{f(bm and s.get('fwdbwd_ms') and bm / s['fwdbwd_ms'], '.2f'):>8} "
              f"{f(r.get('fwdbwd_peak_mb'), '.0f'):>7}")
    print(f"wall {elapsed():.0f} s")


if __name__ == "__main__":
    main()
