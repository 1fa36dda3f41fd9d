"""One device call for issue 16's kernel variants: correctness, then times against the floor.

Every variant (launch configurations of the chunked kernel, its stored path, the parallel kernel's
tiles, the fused chunk's default) is compiled and checked in a worker process of its own (values and
the three gradients against float64 at B=2 H=4 T=999, bf16, causal, normalised), all at once; the
parent then times forward and forward+backward at the benchmark shape (B=16 H=16 Dk=16 Dv=64 bf16
causal normalised, BHTD) for each T, with the floor of DESIGN.md section 4 measured in the same run.

Usage: python -P benchmarks/kernel_sweep.py --out DIR [--ts 1024,...,16384] [--only a,b] [--budget-s 380]
       TRITON_INTERPRET=1 python benchmarks/kernel_sweep.py --dry-run --ts 64   (the script itself, on a CPU)
Prints progress, then a table per T (ms, x floor, ratio to the current default of the same kernel)
and the best launch per kernel and direction; writes kernel_sweep.json into --out after every T.
The backward of a variant is (fwd+bwd) - fwd, so the best forward and the best backward launch can
come from different rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import sys
import time
import traceback

# --dry-run: tiny shapes on the CPU through Triton's interpreter (to try the script without a GPU)
DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from floor import forward_backward_floor, forward_floor, measure_ceilings  # noqa: E402

from based_compile.kernels import chunked, fused_chunk, naive_parallel_based, parallel  # noqa: E402
from based_compile.kernels.arguments import check_arguments  # noqa: E402
from based_compile.kernels.function import BasedKernelFunction  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", os.path.join(HERE, "kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

B, H, DK, DV = (1, 2, 16, 64) if DRY else (bench.B, bench.H, bench.DK, bench.DV)
DEVICE = "cpu" if DRY else "cuda"
DT = torch.float16 if DRY else torch.bfloat16                  # the interpreter computes bf16 wrongly on CPUs
CHECK_SHAPE = (1, 2, 64, 150) if DRY else (2, 4, 1024, 999)     # B, H, T compiled at, T checked at
START = time.time()

# ---------------------------------------------------------------------------------------------- variants
# chunked: launches of its segment-walking backward (kernels/chunked.py's _backward, which float16 inputs and
# Dv > 128 take), tuples as chunked.BACKWARD_LAUNCH (the forward is kernels/prefix_chunked.py's default;
# benchmarks/prefix_h200.py sweeps its launches and, with --backward, the prefix-state backward's):
# (chunk, value block, warps, stages, target programs, feature mode, stored, chunks per output program,
#  state kernels' value block, state kernels' warps)
CHUNKED = {
    "ch_default": chunked.BACKWARD_LAUNCH,
    "ch_bv32": (32, 32, 4, 1, 1024, 2),
    "ch_bt64w8": (64, 64, 8, 1, 1024, 2),
    "st_bt32w4": (32, 64, 4, 2, 1024, 2, 1, 4, 0, 4),
    "st_bt64w4": (64, 64, 4, 2, 1024, 2, 1, 2, 0, 8),
    "st_bt64w8": (64, 64, 8, 2, 1024, 2, 1, 2, 0, 8),
    "st_bt64sv32": (64, 64, 4, 3, 2048, 2, 1, 4, 32, 4),
    "st_bt64bv32": (64, 32, 4, 2, 1024, 2, 1, 2, 32, 4),
    "st_bt64m1": (64, 64, 4, 2, 1024, 1, 1, 2, 0, 8),
}
# parallel: {kernel: (block_t, block_s, warps, stages)} over the defaults; the backward is the atomic one
_P = parallel.LaunchConfig
PARALLEL = {
    "par_default": {},
    "par_f64x32": {"fwd": _P(64, 32, 4, 2)},
    "par_f128x64s3": {"fwd": _P(128, 64, 4, 3), "dkv_atomic": _P(64, 64, 4, 3)},
    "par_f128x64w8": {"fwd": _P(128, 64, 8, 3), "dkv_atomic": _P(128, 64, 8, 2)},
    "par_f64x64s3": {"fwd": _P(64, 64, 4, 3), "dkv_atomic": _P(128, 32, 4, 2)},
    "par_f128x32s4": {"fwd": _P(128, 32, 4, 4), "dkv_atomic": _P(64, 32, 4, 2)},
}
FUSED = {"fc_default": None}
PARALLEL_MAX_T = 8192           # quadratic: its variants stop here (the default runs at every T)


def _chunked_fn(name):
    launch = CHUNKED[name]

    def run(q, k, v):
        args = check_arguments(q, k, v)
        bwd = functools.partial(chunked._backward, cfg=chunked.config_from_launch(args, launch))
        return BasedKernelFunction.apply(q, k, v, args, chunked.chunked_forward, bwd)
    return run


def _parallel_fn(name):
    over = PARALLEL[name]

    def run(q, k, v):
        args = parallel.check_parallel_arguments(q, k, v)
        cfgs = {**parallel.launch_configs(args, q.dtype), **over}
        fwd = functools.partial(parallel.parallel_forward, configs=cfgs)
        bwd = functools.partial(parallel.parallel_backward, configs=cfgs)
        return BasedKernelFunction.apply(q, k, v, args, fwd, bwd)
    return run


def _fused_fn(name):
    return lambda q, k, v: fused_chunk.fused_chunk_based(q, k, v)


def variant(name):
    """(kernel family, run(q, k, v) -> o)."""
    if name in CHUNKED:
        return "chunked", _chunked_fn(name)
    if name in PARALLEL:
        return "parallel", _parallel_fn(name)
    return "fused_chunk", _fused_fn(name)


DEFAULT_OF = {"chunked": "ch_default", "parallel": "par_default", "fused_chunk": "fc_default"}


# ---------------------------------------------------------------------------------------------- checks

def rel(a, r) -> float:
    a = a.double()
    return float("inf") if not torch.isfinite(a).all() else ((a - r).norm() / r.norm()).item()


def check_variant(name):
    """Compile (at the benchmark's specialisation) and check one variant against float64, in a worker."""
    t0 = time.time()
    try:
        _, run = variant(name)
        torch.manual_seed(1)
        b, h, t, t_check = CHECK_SHAPE
        q, k, v = (torch.randn(b, h, t, d, device=DEVICE, dtype=DT).requires_grad_() for d in (DK, DK, DV))
        run(q, k, v).sum().backward()                 # compile at T = 1024 (as timed: T a multiple of 64)
        _sync()
        t_compile = time.time() - t0
        q, k, v = (torch.randn(b, h, t_check, d, device=DEVICE, dtype=torch.float64).to(DT)
                   for d in (DK, DK, DV))
        refs = [x.double().requires_grad_() for x in (q, k, v)]
        ref = naive_parallel_based(*refs)
        do = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, refs, do)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        out = run(*xs)
        grads = torch.autograd.grad(out, xs, do.to(DT))
        err = {"o": rel(out, ref), **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}
        ok = all(e < 1.5e-2 for e in err.values())
        return {"name": name, "ok": ok, "err": err, "compile_s": t_compile, "s": time.time() - t0}
    except Exception as e:  # noqa: BLE001
        return {"name": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}", "s": time.time() - t0}


def _sync():
    if not DRY:
        torch.cuda.synchronize()


def check_all(names, workers):
    """check_variant for every name, in spawned workers; a pool a crashed worker broke is made again
    for the names it had not finished (once)."""
    import concurrent.futures
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    out = {}
    todo = list(names)
    for attempt in range(2):
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futures = {ex.submit(check_variant, n): n for n in todo}
            for fut in concurrent.futures.as_completed(futures):
                n = futures[fut]
                try:
                    r = fut.result()
                except Exception as e:  # noqa: BLE001 (BrokenProcessPool: a worker died)
                    if attempt == 0:
                        continue
                    r = {"name": n, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
                out[n] = r
                msg = (" ".join(f"{k}={v:.1e}" for k, v in r["err"].items()) + f" compile {r['compile_s']:.0f}s"
                       if "err" in r else r["error"])
                print(f"[{time.time() - START:5.0f}s] check {n:14s} {'ok ' if r['ok'] else 'BAD'} {msg}", flush=True)
        todo = [n for n in names if n not in out]
        if not todo:
            break
        print(f"worker pool broke; checking again: {todo}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- timing

def _median_ms(fn, grad_to_none=None):
    if not DRY:
        return bench._median_ms(fn, grad_to_none)
    t0 = time.time()
    fn()
    return (time.time() - t0) * 1e3


def _inputs(t, b=None):
    return tuple(torch.randn(b or B, H, t, d, device=DEVICE, dtype=DT).requires_grad_() for d in (DK, DK, DV))


def time_variant(run, q, k, v, do):
    res = {}
    try:
        with torch.no_grad():
            res["fwd_ms"] = _median_ms(lambda: run(q, k, v))
        if not DRY:
            torch.cuda.reset_peak_memory_stats()
        res["fwdbwd_ms"] = _median_ms(lambda: run(q, k, v).backward(do), grad_to_none=[q, k, v])
        if not DRY:
            res["fwdbwd_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    except Exception as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if DRY:
            traceback.print_exc()
        if not DRY:
            torch.cuda.empty_cache()
    return res


def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="kernel_sweep_out")
    p.add_argument("--ts", default="1024,2048,4096,8192,16384")
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--budget-s", type=float, default=380.0, help="stop timing new T past this wall time")
    p.add_argument("--workers", type=int, default=14)
    p.add_argument("--small-ts", default="8192,32768", help="T timed at B=1 (the policy's small-batch case)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    opts = p.parse_args()
    names = [n for n in (*CHUNKED, *PARALLEL, *FUSED) if not opts.only or n in opts.only.split(",")]
    os.makedirs(opts.out, exist_ok=True)
    path = os.path.join(opts.out, "kernel_sweep.json")
    report = {"device": "cpu (dry run)" if DRY else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "config": {"B": B, "H": H, "Dk": DK, "Dv": DV, "dtype": "bf16", "causal": True, "normalize": True},
              "chunked": {n: CHUNKED[n] for n in names if n in CHUNKED},
              "parallel": {n: {k: dataclasses.astuple(c) for k, c in PARALLEL[n].items()} for n in names if n in PARALLEL},
              "rows": []}

    def save():
        with open(path, "w") as fh:
            json.dump(report, fh, indent=1)

    print(report["device"], report["torch"], report["triton"], flush=True)
    if DRY:
        from floor import Ceilings
        c = Ceilings(1e9, 1e9, "cpu")
    else:
        c = measure_ceilings()
    report["ceilings"] = {"copy_TBps": c.copy_bytes_per_s / 1e12, "bf16_TFLOPs": c.bf16_flops_per_s / 1e12}
    print("ceilings", report["ceilings"], flush=True)
    report["checks"] = check_all(names, opts.workers)
    save()
    good = [n for n in names if report["checks"][n]["ok"]]
    print(f"[{time.time() - START:5.0f}s] checked: {len(good)} of {len(names)} variants pass", flush=True)
    runs = {n: variant(n) for n in good}
    shapes = [(B, int(x)) for x in opts.ts.split(",") if x] + [(1, int(x)) for x in opts.small_ts.split(",") if x]
    for b, t in shapes:
        if time.time() - START > opts.budget_s:
            print(f"B={b} T={t}: skipped (budget)", flush=True)
            continue
        ff = forward_floor(c, b, H, t, DK, DV) * 1e3
        fbf = forward_backward_floor(c, b, H, t, DK, DV) * 1e3
        q, k, v = _inputs(t, b)
        do = torch.randn(b, H, t, DV, device=DEVICE, dtype=q.dtype)
        for n in good:
            fam, run = runs[n]
            if fam == "parallel" and (t > PARALLEL_MAX_T or b != B) and n != "par_default":
                continue
            try:
                row = time_variant(run, q, k, v, do)
            except Exception:  # noqa: BLE001
                row = {"error": traceback.format_exc()[-300:]}
            row.update({"B": b, "T": t, "name": n, "family": fam, "fwd_floor_ms": ff, "fwdbwd_floor_ms": fbf})
            report["rows"].append(row)
            print(f"[{time.time() - START:5.0f}s] B={b} T={t:5d} {n:14s} fwd {_fmt(row.get('fwd_ms'))} "
                  f"fwd+bwd {_fmt(row.get('fwdbwd_ms'))} {row.get('error', '')}", flush=True)
        del q, k, v, do
        if not DRY:
            torch.cuda.empty_cache()
        save()

    # the short table last
    print()
    print(f"{report['device']}: copy {report['ceilings']['copy_TBps']:.2f} TB/s, "
          f"bf16 {report['ceilings']['bf16_TFLOPs']:.0f} TFLOP/s")
    for n in names:
        ch = report["checks"][n]
        print(f"check {n:14s} " + (" ".join(f"{k}={v:.1e}" for k, v in ch["err"].items()) if "err" in ch
                                    else ch.get("error", "")))
    by = {(r["B"], r["T"], r["name"]): r for r in report["rows"]}
    print(f"{'B':>2} {'T':>6} {'variant':14s} {'fwd ms':>8} {'xfl':>5} {'/def':>5} {'bwd ms':>8} {'fb ms':>8} {'xfl':>5} "
          f"{'/def':>5} {'MiB':>6}")
    best = {}
    for r in report["rows"]:
        fm, bm = r.get("fwd_ms"), r.get("fwdbwd_ms")
        d = by.get((r["B"], r["T"], DEFAULT_OF[r["family"]]), {})
        bw = bm - fm if fm and bm else None
        print(f"{r['B']:2d} {r['T']:6d} {r['name']:14s} {_fmt(fm):>8} {_fmt(fm and fm / r['fwd_floor_ms'], '.1f'):>5} "
              f"{_fmt(fm and d.get('fwd_ms') and fm / d['fwd_ms'], '.2f'):>5} {_fmt(bw):>8} {_fmt(bm):>8} "
              f"{_fmt(bm and bm / r['fwdbwd_floor_ms'], '.1f'):>5} "
              f"{_fmt(bm and d.get('fwdbwd_ms') and bm / d['fwdbwd_ms'], '.2f'):>5} "
              f"{_fmt(r.get('fwdbwd_peak_mb'), '.0f'):>6}")
        for key, val in (("fwd", fm), ("bwd", bw), ("fwdbwd", bm)):
            for scope in (r["family"], "any"):
                k2 = (r["B"], r["T"], scope, key)
                if val and (k2 not in best or val < best[k2][1]):
                    best[k2] = (r["name"], val)
    print("best per T (family: fwd / bwd / fwd+bwd, ms and x floor)")
    for b, t in sorted({(r["B"], r["T"]) for r in report["rows"]}, key=lambda x: (-x[0], x[1])):
        ff, fbf = forward_floor(c, b, H, t, DK, DV) * 1e3, forward_backward_floor(c, b, H, t, DK, DV) * 1e3
        parts = []
        for scope in ("chunked", "parallel", "fused_chunk", "any"):
            cell = []
            for key, fl in (("fwd", ff), ("bwd", None), ("fwdbwd", fbf)):
                nm, val = best.get((b, t, scope, key), ("-", None))
                cell.append(f"{nm} {_fmt(val)}" + (f" ({val / fl:.1f}x)" if val and fl else ""))
            parts.append(f"{scope}: " + " / ".join(cell))
        print(f"B={b} T={t}: " + " | ".join(parts))
    report["best"] = {f"{b}/{t}/{s}/{k}": v for (b, t, s, k), v in best.items()}
    save()
    print(f"wall {time.time() - START:.0f} s")


if __name__ == "__main__":
    main()
