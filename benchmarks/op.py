"""Issue-4 device check: the ``based::attention`` operator against the kernels called directly,
CUDA graphs / max-autotune through torch.compile, and the parallel / fused-chunk crossovers
that ``based_compile/op/policy.py`` records.

    python benchmarks/op.py --out DIR [--quick] [--no-crossover] [--profile] [--blocks N]

0. Host time per call (B=1 H=1 T=64, where the GPU waits on the host): the op, the kernels'
   own autograd.Function, and the bare Triton launches; ``--profile`` prints a cProfile of the op.
1. Overhead at the reference configuration (B=16, H=16, Dk=16, Dv=64, bf16, causal,
   normalised; DESIGN.md section 4): median forward (inference) and forward+backward
   (training) of ``based_attention`` with the policy on "auto", next to the best kernel
   called directly (``parallel_based`` / ``fused_chunk_based``), timed in short blocks that
   alternate between the three (``--blocks``, median per step). Bar: within 5%. Eager at small T
   this compares host overheads (rows "T"); rows "Tg" take the host out (CUDA graphs: the forward
   captured, forward+backward through ``torch.cuda.make_graphed_callables``) at the two smallest T.
2. ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) and ``mode="max-autotune"`` of a
   function calling the op: output checked against the float64 reference, replay time.
3. Crossovers: forward and forward+backward of both kernels over T for a few (B*H, Dk, Dv),
   and the smallest T from which fused chunk is faster.
Prints tables; writes op.json into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import triton.testing

from based_compile import config
from based_compile.kernels import fused_chunk_based, naive_parallel_based, parallel_based
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.parallel import parallel_backward, parallel_forward
from based_compile.op.custom_op import based_attention
from based_compile.op.spec import BasedSpec

B, H, DK, DV = 16, 16, 16, 64
DTYPE = torch.bfloat16
BLOCKS = 30         # alternating timing blocks per function and T in the op-vs-kernel comparison


def inputs(b, h, t, dk, dv, grad=False):
    q, k = (torch.randn(b, h, t, dk, device="cuda", dtype=DTYPE, requires_grad=grad) for _ in range(2))
    v = torch.randn(b, h, t, dv, device="cuda", dtype=DTYPE, requires_grad=grad)
    return q, k, v


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_ms(fn, q, k, v):
    with torch.no_grad():
        return median_ms(lambda: fn(q, k, v))


def fwd_bwd_ms(fn, q, k, v):
    do = torch.randn_like(fn(q, k, v))

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), do)
    return median_ms(step)


def interleaved_ms(steps: dict, blocks: int, per_block: int) -> dict:
    """Median time per step of each callable in ``steps``, timed (CUDA events) in blocks of
    ``per_block`` back-to-back steps that alternate between the callables, the order reversed every
    other block. Where the GPU waits on the host (small T) a step's time is the host's, and this
    host's speed drifts by tens of percent over seconds: alternating every few milliseconds puts
    the same drift on every callable, where timing each for a second in turn does not."""
    for step in steps.values():
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = {name: [] for name in steps}
    for block in range(blocks):
        for name, step in (steps.items() if block % 2 == 0 else reversed(steps.items())):
            torch.cuda.synchronize()
            start.record()
            for _ in range(per_block):
                step()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / per_block)
    return {name: statistics.median(v) for name, v in times.items()}


def overhead(ts, blocks=BLOCKS):
    """Op vs kernels at each T, eager: forward without grad (inference) and forward+backward
    (``torch.autograd.grad``), per-step medians from ``interleaved_ms`` (about 20 ms per block)."""
    spec = BasedSpec(scale=DK ** -0.5)
    fns = {"op": lambda q, k, v: based_attention(q, k, v, spec),
           "parallel": parallel_based, "fused_chunk": fused_chunk_based}
    rows = []
    for t in ts:
        q, k, v = inputs(B, H, t, DK, DV, grad=True)
        do = torch.randn(B, H, t, DV, device="cuda", dtype=DTYPE)
        per_block = max(2, 20 * 1024 // t)

        def forward(fn):
            def step():
                with torch.no_grad():
                    fn(q, k, v)
            return step

        def forward_backward(fn):
            return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)

        row = {"T": t, "steps_per_block": per_block, "blocks": blocks}
        for kind, make in (("fwd", forward), ("fwdbwd", forward_backward)):
            medians = interleaved_ms({name: make(fn) for name, fn in fns.items()}, blocks, per_block)
            row.update({f"{name}_{kind}": ms for name, ms in medians.items()})
            row[f"{kind}_ratio"] = row[f"op_{kind}"] / min(row[f"parallel_{kind}"], row[f"fused_chunk_{kind}"])
        rows.append(row)
        del q, k, v, do
    return rows


def graphed(ts):
    """The same comparison with the host out of the way: forward captured in a CUDA graph, forward +
    backward through ``torch.cuda.make_graphed_callables``, so the times are the GPU's alone."""
    spec = BasedSpec(scale=DK ** -0.5)
    fns = {"op": lambda q, k, v: based_attention(q, k, v, spec),
           "parallel": parallel_based, "fused_chunk": fused_chunk_based}
    rows = []
    for t in ts:
        row = {"T": t}
        for name, fn in fns.items():
            q, k, v = inputs(B, H, t, DK, DV)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):
                    fn(q, k, v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                fn(q, k, v)
            row[f"{name}_fwd"] = median_ms(graph.replay)
            q, k, v = inputs(B, H, t, DK, DV, grad=True)
            train = torch.cuda.make_graphed_callables(fn, (q, k, v))
            row[f"{name}_fwdbwd"] = fwd_bwd_ms(train, q, k, v)
            del graph, train, q, k, v
        for kind in ("fwd", "fwdbwd"):
            row[f"{kind}_ratio"] = row[f"op_{kind}"] / min(row[f"parallel_{kind}"], row[f"fused_chunk_{kind}"])
        rows.append(row)
    return rows


def host_overhead(profile: bool):
    """Per-call host time of the op and of the kernels called directly (B=1 H=1 T=64), and of the
    kernels' launch functions alone (parallel_forward + parallel_backward, no autograd, no checks):
    what is left for the GPU to hide at small T. Medians of alternating blocks (interleaved_ms)."""
    spec = BasedSpec(scale=DK ** -0.5)
    q, k, v = inputs(1, 1, 64, DK, DV, grad=True)
    do = torch.randn(1, 1, 64, DV, device="cuda", dtype=DTYPE)
    args = check_arguments(q, k, v, spec.scale)
    o, z = parallel_forward(q, k, v, args)

    def op_step():
        torch.autograd.grad(based_attention(q, k, v, spec), (q, k, v), do)

    def direct_step():
        torch.autograd.grad(parallel_based(q, k, v, scale=spec.scale), (q, k, v), do)

    def launches():
        parallel_forward(q, k, v, args)
        parallel_backward(q, k, v, o, z, do, args)

    def no_grad(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    # At this size the GPU finishes each kernel before the next launch: a step's time is the host's.
    steps = {"op_fwdbwd_us": op_step, "parallel_fwdbwd_us": direct_step, "launches_only_us": launches,
             "op_fwd_us": no_grad(lambda: based_attention(q, k, v, spec)),
             "parallel_fwd_us": no_grad(lambda: parallel_based(q, k, v, scale=spec.scale))}
    out = {name: ms * 1e3 for name, ms in interleaved_ms(steps, blocks=20, per_block=50).items()}
    if profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.runcall(lambda: [op_step() for _ in range(300)])
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


def compiled_modes(t=2048):
    spec = BasedSpec(scale=DK ** -0.5)
    out = {}
    for mode in ("reduce-overhead", "max-autotune"):
        torch._dynamo.reset()
        try:
            fn = torch.compile(lambda q, k, v: based_attention(q, k, v, spec) * 2.0, mode=mode, fullgraph=True)
            q, k, v = inputs(2, 4, t, DK, DV)
            with torch.no_grad():
                for _ in range(3):
                    o = fn(q, k, v)
                ref = naive_parallel_based(q.double(), k.double(), v.double()) * 2.0
                err = ((o.double() - ref).norm() / ref.norm()).item()
                ms = median_ms(lambda: fn(q, k, v))
            out[mode] = {"rel_err": err, "ms": ms, "ok": err < 1e-2}
        except Exception as e:  # report and go on
            out[mode] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


def crossovers(ts, shapes):
    rows = []
    for bh, dk, dv in shapes:
        for t in ts:
            b = max(1, bh // 16)
            h = bh // b
            q, k, v = inputs(b, h, t, dk, dv, grad=True)
            row = {"BH": bh, "Dk": dk, "Dv": dv, "T": t}
            for name, fn in (("parallel", parallel_based), ("fused_chunk", fused_chunk_based)):
                row[f"{name}_fwd"] = fwd_ms(fn, q, k, v)
                row[f"{name}_fwdbwd"] = fwd_bwd_ms(fn, q, k, v)
            rows.append(row)
            del q, k, v
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-crossover", action="store_true", help="skip the crossover sweep")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the op's host time")
    p.add_argument("--blocks", type=int, default=BLOCKS, help="alternating timing blocks per function and T")
    args = p.parse_args()
    torch.manual_seed(0)
    config.kernel = "auto"
    ts = (1024, 4096) if args.quick else (1024, 2048, 4096, 8192, 16384)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "host": host_overhead(args.profile), "overhead": overhead(ts, args.blocks), "graphed": graphed(ts[:2]),
           "compiled": compiled_modes()}
    cts = (256, 512, 1024, 2048, 4096, 8192, 16384)
    shapes = ((16, 16, 64), (256, 16, 64), (256, 16, 128), (256, 32, 64))
    res["crossover"] = [] if args.no_crossover else crossovers(cts, shapes[:2] if args.quick else shapes)
    with open(os.path.join(args.out, "op.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n== crossovers (ms) on {res['device']}")
    print(f"{'BH':>5}{'Dk':>4}{'Dv':>5}{'T':>7}{'par fwd':>9}{'fc fwd':>9}{'par f+b':>9}{'fc f+b':>9}")
    for r in res["crossover"]:
        print(f"{r['BH']:>5}{r['Dk']:>4}{r['Dv']:>5}{r['T']:>7}{r['parallel_fwd']:>9.3f}{r['fused_chunk_fwd']:>9.3f}"
              f"{r['parallel_fwdbwd']:>9.3f}{r['fused_chunk_fwdbwd']:>9.3f}")
    print("\n== compiled modes:", json.dumps(res["compiled"]))
    print("\n== host time per call (us, B=1 H=1 T=64):", json.dumps({k: round(v, 1) for k, v in res["host"].items()}))
    print(f"\n== based::attention vs best kernel called directly ({res['device']}, ms, B={B} H={H} Dk={DK} Dv={DV} bf16)")
    print(f"{'T':>6}{'op fwd':>9}{'best fwd':>9}{'ratio':>7}{'op f+b':>9}{'best f+b':>9}{'ratio':>7}")
    for r in res["overhead"] + [{**r, "T": f"{r['T']}g"} for r in res["graphed"]]:   # g: CUDA graphs
        print(f"{r['T']:>6}{r['op_fwd']:>9.3f}{min(r['parallel_fwd'], r['fused_chunk_fwd']):>9.3f}{r['fwd_ratio']:>7.3f}"
              f"{r['op_fwdbwd']:>9.3f}{min(r['parallel_fwdbwd'], r['fused_chunk_fwdbwd']):>9.3f}{r['fwdbwd_ratio']:>7.3f}")


if __name__ == "__main__":
    main()
