"""Issue-3 kernel benchmark: Based attention kernels against fla-core, Inductor and SDPA, on one GPU run.

Configuration (DESIGN.md section 4): B=16, H=16, Dk=16, Dv=64, bf16, causal, normalised, T in
1024..16384. For each T and entry: median forward and forward+backward time
(triton.testing.do_bench, fresh random inputs), peak memory (torch.cuda.max_memory_allocated,
inputs included) and the ratio of each time to the physical floor measured in the same run
(benchmarks/floor.py). Up to GRAPH_TS_UPTO, also the GPU time of the same calls replayed as one CUDA
graph (``*_graph_ms``): the eager time of a short call can be the host's (Python, autograd, Triton's
launcher), the graph's is the kernels' alone. Entries:
  ours_parallel, ours_fused_chunk       based_compile.kernels (fused chunk skipped if not implemented)
  ours_chunked                          the chunkwise-parallel kernel (symmetric-basis states)
  ours_parallel_split                   ours_parallel with the deterministic split backward (default: atomic dq)
  fla_parallel, fla_fused_chunk         fla.ops.based (if importable; verified against our reference first)
  inductor_naive                        torch.compile of the naive quadratic form (where it fits)
  sdpa_causal_d64                       scaled_dot_product_attention(is_causal=True), head dim 64

Beyond T=16384 (LONG_TS: 32768, 65536) only the linear-memory entries and SDPA run (LONG_ENTRIES).

Usage: python benchmarks/kernels.py --out DIR [--quick] [--ts 1024,4096] [--tune [fwd,dq,dkv,dkv_atomic]]
Prints the table last; writes kernels.json (and kernels.png with matplotlib) into --out.
--tune first sweeps launch configurations of our parallel kernels (printed, and in kernels.json).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback

import torch
import triton
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from floor import forward_backward_floor, forward_floor, measure_ceilings  # noqa: E402

from based_compile.kernels import naive_parallel_based, parallel_based  # noqa: E402
from based_compile.kernels.arguments import check_arguments  # noqa: E402

B, H, DK, DV = 16, 16, 16, 64
DTYPE = torch.bfloat16
ALL_TS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
LONG_TS_FROM = 32768                      # from here on only LONG_ENTRIES run
LONG_ENTRIES = ("ours_chunked", "ours_fused_chunk", "sdpa_causal_d64")
QUICK_TS = (1024, 4096)
GRAPH_TS_UPTO = 4096                      # CUDA-graph times up to here (beyond, the host is never the limit)
GRAPH_ENTRIES = ("ours_parallel", "ours_parallel_split", "ours_chunked", "fla_parallel", "sdpa_causal_d64")


# ---------------------------------------------------------------------------------------------- entries
# Each entry: make(t) -> (inputs, run) where run(*inputs) returns the output [B, H, T, Dv] or the
# layout of the entry; inputs are fresh random tensors requiring grad.

def _inputs(t: int, layout: str = "BHTD", dk: int = DK, dv: int = DV):
    def one(d):
        shape = (B, H, t, d) if layout == "BHTD" else (B, t, H, d)
        return torch.randn(shape, device="cuda", dtype=DTYPE).requires_grad_()
    return one(dk), one(dk), one(dv)


def ours_parallel():
    return "BHTD", lambda q, k, v: parallel_based(q, k, v)


def ours_parallel_split():
    """Our parallel kernel with the deterministic split backward (parallel_backward(atomic_dq=False))."""
    import functools

    from based_compile.kernels.function import BasedKernelFunction
    from based_compile.kernels.parallel import check_parallel_arguments, parallel_backward, parallel_forward
    backward = functools.partial(parallel_backward, atomic_dq=False)

    def run(q, k, v):
        return BasedKernelFunction.apply(q, k, v, check_parallel_arguments(q, k, v), parallel_forward, backward)
    return "BHTD", run


def ours_fused_chunk():
    from based_compile.kernels.fused_chunk import fused_chunk_based
    return "BHTD", lambda q, k, v: fused_chunk_based(q, k, v)


def ours_chunked():
    from based_compile.kernels.chunked import chunked_based
    return "BHTD", lambda q, k, v: chunked_based(q, k, v)


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _fla(name):
    """fla.ops.based.<name>, with its layout found from the signature and checked against our reference."""
    import fla.ops.based as fla_based
    fn = getattr(fla_based, name)
    params = inspect.signature(fn).parameters
    print(f"fla {name}{inspect.signature(fn)}")
    candidates = []
    if "head_first" in params:
        candidates = [("BTHD", {"head_first": False}), ("BHTD", {"head_first": True})]
    else:
        candidates = [("BTHD", {}), ("BHTD", {})]
    errors = []
    for layout, kw in candidates:
        run = (lambda kw_: lambda q, k, v: _first(fn(q, k, v, **kw_)))(kw)
        try:
            err = verify(run, layout)
        except Exception as e:  # a layout the function refuses
            errors.append(f"{layout}: {type(e).__name__}: {e}")
            continue
        errors.append(f"{layout}: rel err {err:.2e}")
        if err < 2e-2:
            return layout, run
    raise RuntimeError(f"fla {name} matches our reference in no layout ({'; '.join(errors)})")


def fla_parallel():
    return _fla("parallel_based")


def fla_fused_chunk():
    return _fla("fused_chunk_based")


def _naive_quadratic(q, k, v):
    # The quadratic form a user would write: T x T scores, Taylor map, tril mask, row-sum normaliser.
    t = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    w = 1 + s + 0.5 * s * s
    w = w.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), 0.0)
    return (w @ v) / (w.sum(-1, keepdim=True) + 1e-6)


_compiled_naive = None


def inductor_naive():
    global _compiled_naive
    if _compiled_naive is None:
        _compiled_naive = torch.compile(_naive_quadratic, dynamic=False)
    return "BHTD", _compiled_naive


def sdpa_causal_d64():
    import torch.nn.functional as F
    return "BHTD_D64", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)


ENTRIES = {
    "ours_parallel": ours_parallel,
    "ours_parallel_split": ours_parallel_split,
    "ours_fused_chunk": ours_fused_chunk,
    "ours_chunked": ours_chunked,
    "fla_parallel": fla_parallel,
    "fla_fused_chunk": fla_fused_chunk,
    "inductor_naive": inductor_naive,
    "sdpa_causal_d64": sdpa_causal_d64,
}


def verify(run, layout: str, t: int = 300) -> float:
    """Relative error of run against the float64 naive reference at a small shape (B=2, H=4)."""
    b, h = 2, 4
    shape = lambda d: (b, h, t, d) if layout == "BHTD" else (b, t, h, d)  # noqa: E731
    q, k, v = (torch.randn(shape(d), device="cuda", dtype=DTYPE) for d in (DK, DK, DV))
    ref = naive_parallel_based(q.double(), k.double(), v.double(), layout=layout)
    out = run(q, k, v)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != {tuple(ref.shape)}")
    out = out.double()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------- timing

def _median_ms(fn, grad_to_none=None) -> float:
    # 100 ms of warm-up: the first entry after a CPU-bound pause (compilation) otherwise ran up to 2x
    # slow at T=1024-2048 (device call 2, benchmarks/NOTES.md).
    return triton.testing.do_bench(fn, warmup=100, rep=150, grad_to_none=grad_to_none, return_mode="median")


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _graph_ms(fn) -> float:
    """Median GPU time of fn replayed as a CUDA graph (captured after three warm calls on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return _median_ms(graph.replay)
    finally:
        del graph
        torch.cuda.empty_cache()


def _graphable(run, q, k, v, mode, do):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                run(q, k, v)
        return fwd

    def fwdbwd():
        q.grad = k.grad = v.grad = None
        run(q, k, v).backward(do)
    return fwdbwd


def time_entry(name, layout, run, t):
    """{'fwd_ms', 'fwdbwd_ms', 'fwd_peak_mb', 'fwdbwd_peak_mb'} for one entry at one T, and
    'fwd_graph_ms', 'fwdbwd_graph_ms' (CUDA-graph replay) for GRAPH_ENTRIES up to GRAPH_TS_UPTO."""
    res = {}
    if layout == "BHTD_D64":
        q, k, v = _inputs(t, "BHTD", 64, 64)
    else:
        q, k, v = _inputs(t, layout)
    torch.cuda.synchronize()
    do = None
    for mode in ("fwd", "fwdbwd"):
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            if mode == "fwd":
                with torch.no_grad():
                    ms = _median_ms(lambda: run(q, k, v))
            else:
                do = torch.randn_like(run(q, k, v).detach())
                ms = _median_ms(lambda: run(q, k, v).backward(do), grad_to_none=[q, k, v])
            res[f"{mode}_ms"] = ms
            res[f"{mode}_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        except Exception as e:
            res[f"{mode}_ms"] = None
            res[f"{mode}_error"] = "OOM" if _is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
            torch.cuda.empty_cache()
            continue
        if name in GRAPH_ENTRIES and t <= GRAPH_TS_UPTO:
            try:
                res[f"{mode}_graph_ms"] = _graph_ms(_graphable(run, q, k, v, mode, do))
            except Exception as e:
                res[f"{mode}_graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
                torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------- tuning

TUNE_FWD = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 2), (128, 64, 4, 2), (128, 64, 8, 2), (128, 64, 4, 3),
            (128, 128, 8, 2), (256, 64, 8, 2), (256, 32, 8, 2), (128, 32, 4, 3)]
TUNE_DQ = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2),
           (128, 128, 8, 2), (64, 16, 4, 2)]
TUNE_DKV = [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 3), (128, 64, 4, 2),
            (128, 128, 8, 2), (32, 32, 4, 2), (128, 32, 4, 2)]


def tune(ts, kernels):
    """Sweep launch configurations of our parallel kernels (others held at the defaults).

    kernels: subset of fwd, dq, dkv, dkv_atomic (the dk/dv kernel of the atomic-dq backward).
    """
    from based_compile.kernels.parallel import LaunchConfig, launch_configs, parallel_backward, parallel_forward
    tables = {"fwd": TUNE_FWD, "dq": TUNE_DQ, "dkv": TUNE_DKV, "dkv_atomic": TUNE_DKV}
    results = []
    for t in ts:
        q, k, v = (x.detach() for x in _inputs(t))
        args = check_arguments(q, k, v)
        base = launch_configs(args)
        o, z = parallel_forward(q, k, v, args)
        do = torch.randn_like(o)
        for kernel in kernels:
            for bt, bs, w, st in tables[kernel]:
                cfgs = dict(base)
                cfgs[kernel] = LaunchConfig(bt, bs, w, st)
                try:
                    if kernel == "fwd":
                        ms = _median_ms(lambda: parallel_forward(q, k, v, args, cfgs))
                    else:
                        atomic = kernel == "dkv_atomic"
                        ms = _median_ms(lambda: parallel_backward(q, k, v, o, z, do, args, cfgs, atomic_dq=atomic))
                except Exception as e:
                    ms = None
                    print(f"tune {kernel} {(bt, bs, w, st)} T={t}: {type(e).__name__}: {str(e)[:120]}")
                results.append({"T": t, "kernel": kernel, "config": [bt, bs, w, st], "ms": ms})
                print(f"tune T={t:6d} {kernel:10s} BT={bt:4d} BS={bs:4d} warps={w} stages={st}: "
                      f"{'-' if ms is None else f'{ms:.3f} ms'}", flush=True)
        for kernel in kernels:
            rows = [r for r in results if r["T"] == t and r["kernel"] == kernel and r["ms"] is not None]
            if rows:
                best = min(rows, key=lambda r: r["ms"])
                print(f"BEST T={t} {kernel}: {best['config']} {best['ms']:.3f} ms")
    return results


# ---------------------------------------------------------------------------------------------- main

def _fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not available: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwdbwd")):
        for name in ENTRIES:
            pts = [(r["T"], r[f"{mode}_ms"]) for r in results if r["entry"] == name and r.get(f"{mode}_ms")]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        pts = [(r["T"], r[f"{mode}_floor_ms"]) for r in results if r["entry"] == "ours_parallel"]
        if pts:
            ax.plot(*zip(*pts), "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"{mode}: B={B} H={H} Dk={DK} Dv={DV} bf16 causal")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description="Based attention kernel benchmark (issue 3)")
    parser.add_argument("--out", default="bench_out", help="directory for kernels.json and kernels.png")
    parser.add_argument("--quick", action="store_true", help=f"only T in {QUICK_TS}")
    parser.add_argument("--ts", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--tune", default=None, const="fwd,dq,dkv,dkv_atomic", nargs="?",
                        help="sweep our parallel kernels' launch configs first (subset of fwd,dq,dkv,dkv_atomic)")
    parser.add_argument("--entries", default=",".join(ENTRIES), help="comma-separated subset of entries")
    opts = parser.parse_args()
    ts = [int(x) for x in opts.ts.split(",")] if opts.ts else (QUICK_TS if opts.quick else ALL_TS)
    os.makedirs(opts.out, exist_ok=True)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()}", flush=True)
    ceilings = measure_ceilings()
    print(f"ceilings: copy {ceilings.copy_bytes_per_s / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings.bf16_flops_per_s / 1e12:.0f} TFLOP/s", flush=True)
    report = {"config": {"B": B, "H": H, "Dk": DK, "Dv": DV, "dtype": "bf16", "causal": True, "normalize": True},
              "device": ceilings.device, "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": os.environ.get("BENCH_COMMAND") or "python " + " ".join(sys.argv),
              "ceilings": {"copy_bytes_per_s": ceilings.copy_bytes_per_s,
                           "bf16_flops_per_s": ceilings.bf16_flops_per_s},
              "entries": {}, "results": []}
    json_path = os.path.join(opts.out, "kernels.json")

    def save():
        with open(json_path, "w") as fh:
            json.dump(report, fh, indent=1)

    if opts.tune:
        report["tune"] = tune([2048, 8192], opts.tune.split(","))
        save()

    runs = {}
    for name in opts.entries.split(","):
        try:
            layout, run = ENTRIES[name]()
            if name.startswith(("ours_", "fla_")):
                err = verify(run, layout)
                if not err < 2e-2:
                    raise RuntimeError(f"relative error {err:.2e} against the float64 reference")
                report["entries"][name] = {"layout": layout, "verify_rel_err": err}
            else:
                report["entries"][name] = {"layout": layout}
            runs[name] = (layout, run)
            print(f"entry {name}: {report['entries'][name]}", flush=True)
        except NotImplementedError as e:
            report["entries"][name] = {"skipped": f"not implemented: {e}"}
            print(f"entry {name}: skipped (not implemented)")
        except Exception as e:
            report["entries"][name] = {"skipped": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"entry {name}: skipped ({type(e).__name__}: {str(e)[:300]})")
    save()

    for t in ts:
        f_floor = forward_floor(ceilings, B, H, t, DK, DV) * 1e3
        fb_floor = forward_backward_floor(ceilings, B, H, t, DK, DV) * 1e3
        for name, (layout, run) in runs.items():
            if t >= LONG_TS_FROM and name not in LONG_ENTRIES:
                continue
            if name == "inductor_naive" and B * H * t * t * 2 > 40e9:
                row = {"fwd_ms": None, "fwdbwd_ms": None, "fwd_error": "skipped: T x T scores over 40 GB"}
            else:
                t0 = time.time()
                try:
                    row = time_entry(name, layout, run, t)
                except Exception as e:
                    traceback.print_exc()
                    row = {"fwd_ms": None, "fwdbwd_ms": None, "fwd_error": f"{type(e).__name__}: {e}"}
                row["wall_s"] = time.time() - t0
            row.update({"T": t, "entry": name, "fwd_floor_ms": f_floor, "fwdbwd_floor_ms": fb_floor})
            for mode, fl in (("fwd", f_floor), ("fwdbwd", fb_floor)):
                row[f"{mode}_over_floor"] = row[f"{mode}_ms"] / fl if row.get(f"{mode}_ms") else None
            report["results"].append(row)
            print(f"T={t:6d} {name:18s} fwd {_fmt(row.get('fwd_ms'))} ms  fwd+bwd {_fmt(row.get('fwdbwd_ms'))} ms  "
                  f"{row.get('fwd_error', '')} {row.get('fwdbwd_error', '')}", flush=True)
            save()

    # Speed bars (issue 3): our best vs fla's best at each T.
    bars = []
    for t in ts:
        rows = {r["entry"]: r for r in report["results"] if r["T"] == t}

        def best(prefix, mode):
            vals = [r[f"{mode}_ms"] for n, r in rows.items() if n.startswith(prefix) and r.get(f"{mode}_ms")]
            return min(vals) if vals else None

        bar = {"T": t}
        for mode in ("fwd", "fwdbwd"):
            ours, fla = best("ours_", mode), best("fla_", mode)
            bar[f"{mode}_speedup_vs_fla"] = fla / ours if ours and fla else None
        bars.append(bar)
    report["bars"] = bars
    save()
    plot(report["results"], os.path.join(opts.out, "kernels.png"))

    print()
    print(f"{report['device']}  B={B} H={H} Dk={DK} Dv={DV} bf16 causal normalised; times: median ms "
          f"(x floor); peak MiB fwd/fwd+bwd")
    print(f"{'T':>6} {'entry':18s} {'fwd ms':>9} {'xfloor':>7} {'fwd+bwd ms':>11} {'xfloor':>7} {'peak MiB':>15} "
          f"{'graph fwd':>10} {'graph f+b':>10}")
    for r in report["results"]:
        peak = f"{_fmt(r.get('fwd_peak_mb'), '.0f')}/{_fmt(r.get('fwdbwd_peak_mb'), '.0f')}"
        print(f"{r['T']:6d} {r['entry']:18s} {_fmt(r.get('fwd_ms')):>9} {_fmt(r.get('fwd_over_floor'), '.1f'):>7} "
              f"{_fmt(r.get('fwdbwd_ms')):>11} {_fmt(r.get('fwdbwd_over_floor'), '.1f'):>7} {peak:>15} "
              f"{_fmt(r.get('fwd_graph_ms')):>10} {_fmt(r.get('fwdbwd_graph_ms')):>10}")
    for bar in bars:
        print(f"T={bar['T']:6d}: fwd speedup vs fla best {_fmt(bar['fwd_speedup_vs_fla'], '.2f')}x (bar 2x), "
              f"fwd+bwd {_fmt(bar['fwdbwd_speedup_vs_fla'], '.2f')}x (bar 1.5x up to T=8192)")
    missing = [n for n, e in report["entries"].items() if n.startswith("fla") and "skipped" in e]
    if missing:     # last, where it is seen: the README table is then without its peer
        print(f"WARNING: {', '.join(missing)} not measured ({report['entries'][missing[0]]['skipped'][:80]}); "
              f"carry fla-core's wheel to the device (.whl/, scripts/gpu_install.sh installs it)")


if __name__ == "__main__":
    main()
