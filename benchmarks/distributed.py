"""Multi-GPU check (issue 17): DDP and FSDP2 around the naive Based LM with backend="based".

On N GPUs (NCCL), one spawn of N ranks runs, in this order (most important first):
  float32, T=2048: one process on the global batch (``--steps`` steps: the loss reference), one
      process on the per-GPU batch, DDP xN and FSDP2 xN on the global batch (``--steps`` steps);
  bfloat16 at T=2048, then float32 and bfloat16 at T=8192: the per-GPU single process, DDP and
      FSDP2 (``--timing-steps`` steps).
Each row: median step time (leaving out the first step, which compiles, and the last, which runs
under the profiler that counts the calls), the host's median time to issue a step (up to the
synchronize that ends it: close to the step time, the host, not the GPU, sets the pace) and its
waits for the GPU in the second step (``torch.cuda.set_sync_debug_mode``), ``based::attention`` calls in a forward
(every layer must be rewritten), the losses' largest difference from one process on the global
batch (float32, T=2048), and weak-scaling efficiency = step time of one GPU at the per-GPU
batch / step time of N GPUs (1.0: perfect). The "single" runs execute on every rank at once, each
on its own GPU (rank 0's numbers are reported). ``--budget-s`` stops starting runs that would
not finish in time (they are reported as skipped). DDP runs at its default bucket cap (25 MB).
After the table, one line per run about one more step under the CUDA profiler (GPU kernel time
against wall time, launches, CUDA calls that can wait, the host's costliest operators).
``--placements model,blocks`` also runs DDP and FSDP2 with each block compiled before wrapping;
``--compile-modes default,reduce-overhead`` also runs the per-GPU single run and DDP under CUDA
graphs (efficiency against the single run under CUDA graphs; calls counted in the first step).
``--fsdp-layouts blocks,root`` also runs FSDP2 with the whole model one unit ("(one unit)": one
all-gather and one reduce-scatter a step, FSDP2's hooks once instead of once per block; under CUDA
graphs too); ``--wrappers fsdp2`` leaves DDP out.
Keep NVLink multicast off (NCCL_NVLS_ENABLE=0 and friends, set here if unset).

    python benchmarks/distributed.py --world 2 [--out benchmarks/results] [--budget-s 240]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import distributed_training as dt  # noqa: E402

MODEL = dict(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, feature_dim=16, max_len=8192, conv_size=4)
CONFIGS = (("float32", 2048), ("bfloat16", 2048), ("float32", 8192), ("bfloat16", 8192))
LOSS_TOLERANCE = 1e-5        # float32, over --steps steps, against one process on the global batch
EFFICIENCY_BAR = 0.9


GRAPHS = " (CUDA graphs)"      # the label of runs compiled with mode="reduce-overhead"
COMPILE_MODES = ("default", "reduce-overhead")
WRAPPERS = ("ddp", "fsdp2")
# FSDP2's unit layouts in the run labels: each block a unit (the usual recipe, unlabelled), the whole model one.
FSDP_LAYOUT_LABELS = {"blocks": "", "root": " (one unit)"}


def plan(world: int, per_gpu_batch: int, steps: int, timing_steps: int, configs=CONFIGS, placements=("model",),
         compile_modes=("default",), wrappers=WRAPPERS, fsdp_layouts=("blocks",)):
    """(label, train kwargs) per run, most important first; each of ``wrappers`` (DDP, FSDP2) once per
    compile placement (examples/distributed_training.PLACEMENTS), FSDP2 once per unit layout
    (examples/distributed_training.FSDP_LAYOUTS); the single-GPU runs compile the whole model. Under
    ``compile_modes`` "reduce-overhead" (CUDA graphs) the per-GPU single run and DDP run again, and FSDP2
    in the "root" layout; FSDP2 in the "blocks" layout not: it frees each block's gathered parameters
    after use, so the graphs' input addresses change and CUDA graphs re-record every step (532 ms a step
    at bf16 T=2048 on 2 H200s, against 81 ms without). The root layout frees them once a step, after the
    backward: whether they come back at the same addresses is what its CUDA-graph row shows."""
    runs = []
    for dtype, seqlen in configs:
        first = (dtype, seqlen) == CONFIGS[0]
        kw = dict(seqlen=seqlen, model_kwargs=MODEL, dtype=getattr(torch, dtype), steps=steps if first else timing_steps)
        key = dict(dtype=dtype, T=seqlen)
        if first:
            runs.append((dict(key, run="single (global batch)"), dict(kw, mode="single", batch=per_gpu_batch * world)))
        for compile_mode in compile_modes:
            graphs = compile_mode == "reduce-overhead"
            label, ckw = (GRAPHS, dict(kw, compile_mode=compile_mode)) if graphs else ("", kw)
            runs.append((dict(key, run=f"single (per-GPU batch){label}"),
                         dict(ckw, mode="single", batch=per_gpu_batch)))
            # Under CUDA graphs only the whole model is compiled (the count of rewritten sites is per compiled
            # graph; one compiled block stands for all blocks).
            for placement in ("model",) if graphs else placements:
                suffix = "" if placement == "model" else f" ({placement} compiled)"
                for mode in wrappers:
                    for layout in fsdp_layouts if mode == "fsdp2" else (None,):
                        if graphs and layout == "blocks":
                            continue
                        unit = FSDP_LAYOUT_LABELS.get(layout, "")
                        runs.append((dict(key, run=f"{mode} x{world}{unit}{suffix}{label}"),
                                     dict(ckw, mode=mode, batch=per_gpu_batch * world, placement=placement,
                                          **({} if layout is None else dict(fsdp_layout=layout)))))
    return runs


def rows_of(labels, results, world: int) -> list[dict]:
    """One row per run, with efficiency and loss differences filled in."""
    rows = [dict(label, **result) for label, result in zip(labels, results)]
    by = {(r["dtype"], r["T"], r["run"]): r for r in rows}
    reference = by.get(("float32", CONFIGS[0][1], "single (global batch)"))
    for r in rows:
        if "step_s" not in r or f" x{world}" not in r["run"]:
            continue
        small = by.get((r["dtype"], r["T"], "single (per-GPU batch)" + (GRAPHS if GRAPHS in r["run"] else "")), {})
        if "step_s" in small:
            r["efficiency"] = small["step_s"] / r["step_s"]
        if reference is not None and "losses" in reference and r["dtype"] == "float32" \
                and r["T"] == reference["T"] and len(r["losses"]) == len(reference["losses"]):
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
    return rows


def table(rows: list[dict], layers: int) -> str:
    lines = ["| dtype | T | run | step ms | host ms | host waits | efficiency | max abs loss diff "
             "| based::attention calls per forward |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "step_s" not in r:
            why = r.get("skipped") or r.get("error", "?")
            lines.append(f"| {r['dtype']} | {r['T']} | {r['run']} | {why} | | | | | |")
            continue
        eff = f"{r['efficiency']:.2f}" if "efficiency" in r else ""
        diff = f"{r['max_loss_diff']:.1e}" if "max_loss_diff" in r else ("0 (reference)" if "global" in r["run"] else "")
        calls = f"{r['based_calls']}" + ("" if r["based_calls"] == layers else f" (of {layers})")
        host = f"{r['host_s'] * 1e3:.1f}" if "host_s" in r else ""
        waits = "" if r.get("syncs") is None else f"{r['syncs']}"
        lines.append(f"| {r['dtype']} | {r['T']} | {r['run']} | {r['step_s'] * 1e3:.1f} | {host} | {waits} | {eff} "
                     f"| {diff} | {calls} |")
    return "\n".join(lines)


def profiles(rows: list[dict]) -> str:
    """One line per run about its profiled step: is the GPU busy for the whole step (kernel time close
    to the wall time), or does the host issue work slower than the GPU runs it (host ms close to step
    ms, GPU kernels far below), and what the host waits on and spends its time in."""
    lines = ["Profiled step (one more step under the CUDA profiler): wall ms, GPU kernel ms (summed over "
             "streams), launches, CUDA calls that can make the host wait, host's top operators by self ms"]
    for r in rows:
        prof = r.get("profile")
        if not prof:
            if r.get("profile_error"):
                lines.append(f"  {r['dtype']} T={r['T']} {r['run']}: not profiled ({r['profile_error']})")
            continue
        top = ", ".join(f"{k} {v}" for k, v in list(prof["top_host_ms"].items())[:4])
        lines.append(f"  {r['dtype']} T={r['T']} {r['run']}: wall {prof['wall_s'] * 1e3:.1f}, GPU kernels "
                     f"{prof['gpu_kernels_s'] * 1e3:.1f}, launches {prof['launches']}, waits {prof['waiting_calls']}; "
                     f"host: {top}")
    return "\n".join(lines)


def verdicts(rows: list[dict], world: int, layers: int) -> list[str]:
    out = []
    for r in rows:
        if "step_s" not in r:
            continue
        if r["based_calls"] != layers:
            out.append(f"FAIL {r['dtype']} T={r['T']} {r['run']}: {r['based_calls']} of {layers} layers rewritten")
        if r.get("max_loss_diff", 0) > LOSS_TOLERANCE:
            out.append(f"FAIL {r['dtype']} T={r['T']} {r['run']}: losses differ by {r['max_loss_diff']:.1e} "
                       f"> {LOSS_TOLERANCE:g}")
        if "efficiency" in r and r["efficiency"] < EFFICIENCY_BAR:
            out.append(f"BELOW BAR {r['dtype']} T={r['T']} {r['run']}: efficiency {r['efficiency']:.2f} "
                       f"< {EFFICIENCY_BAR}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--world", type=int, default=torch.cuda.device_count())
    p.add_argument("--per-gpu-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="steps of the float32 T=2048 runs (the loss check)")
    p.add_argument("--timing-steps", type=int, default=8,
                   help="steps of the other runs (the first, compiling, and the last, profiled, are not timed)")
    p.add_argument("--configs", default=",".join(f"{d}:{t}" for d, t in CONFIGS),
                   help="comma-separated dtype:T pairs, a subset of the default (the float32:2048 one is the loss check)")
    p.add_argument("--budget-s", type=float, default=None, help="start no run that would end after this many seconds")
    p.add_argument("--placements", default="model",
                   help="comma-separated compile placements of the DDP and FSDP2 runs: model (torch.compile of the "
                        "wrapped model), blocks (each block compiled before wrapping)")
    p.add_argument("--compile-modes", default="default",
                   help="comma-separated torch.compile modes of the per-GPU single and DDP runs: default, "
                        "reduce-overhead (CUDA graphs; FSDP2 only in its root layout under them)")
    p.add_argument("--wrappers", default=",".join(WRAPPERS),
                   help="comma-separated wrappers to run beside the single-GPU runs: ddp, fsdp2")
    p.add_argument("--fsdp-layouts", default="blocks",
                   help="comma-separated FSDP2 unit layouts: blocks (each block a unit, then the model), "
                        "root (the whole model one unit, gathered for the whole step)")
    args = p.parse_args()
    if args.world < 2 or torch.cuda.device_count() < args.world:
        sys.exit(f"needs {max(args.world, 2)} GPUs, found {torch.cuda.device_count()}")
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    start = time.time()
    configs = []
    for item in args.configs.split(","):
        dtype, _, seqlen = item.partition(":")
        if dtype not in ("float32", "bfloat16") or not seqlen.isdigit():
            p.error(f"--configs: {item!r} is not dtype:T with dtype float32 or bfloat16")
        configs.append((dtype, int(seqlen)))
    placements = tuple(args.placements.split(","))
    if not set(placements) <= set(dt.PLACEMENTS):
        p.error(f"--placements: each must be one of {dt.PLACEMENTS}, got {args.placements!r}")
    compile_modes = tuple(args.compile_modes.split(","))
    if not set(compile_modes) <= set(COMPILE_MODES):
        p.error(f"--compile-modes: each must be one of {COMPILE_MODES}, got {args.compile_modes!r}")
    wrappers = tuple(args.wrappers.split(","))
    if not set(wrappers) <= set(WRAPPERS):
        p.error(f"--wrappers: each must be one of {WRAPPERS}, got {args.wrappers!r}")
    fsdp_layouts = tuple(args.fsdp_layouts.split(","))
    if not set(fsdp_layouts) <= set(dt.FSDP_LAYOUTS):
        p.error(f"--fsdp-layouts: each must be one of {dt.FSDP_LAYOUTS}, got {args.fsdp_layouts!r}")
    runs = plan(args.world, args.per_gpu_batch, args.steps, args.timing_steps, configs, placements, compile_modes,
                wrappers, fsdp_layouts)
    deadline = start + args.budget_s if args.budget_s else None
    # First the interconnect: an all-reduce's bus bandwidth bounds what a short step can scale to.
    results = dt.run_distributed_many(args.world, "cuda", [dict(mode="allreduce")] + [kw for _, kw in runs],
                                      deadline=deadline)
    interconnect, results = results[0][0], [r[1:] for r in results]
    print(f"all-reduce of {interconnect['allreduce_mb']} MB bfloat16: {interconnect['allreduce_s'] * 1e3:.1f} ms, "
          f"bus bandwidth {interconnect['busbw_gb_s']:.0f} GB/s", flush=True)
    layers = MODEL["n_layers"]
    rows = rows_of([label for label, _ in runs], results[0], args.world)
    for rank, other in enumerate(results[1:], 1):       # every rank must have rewritten every layer
        for r, o in zip(rows, other):
            if "based_calls" in o and o["based_calls"] != r.get("based_calls"):
                r[f"based_calls_rank{rank}"] = o["based_calls"]
    text = table(rows, layers)
    print(text)
    print(profiles(rows))
    for line in verdicts(rows, args.world, layers):
        print(line)
    import triton

    data = {"device": f"{args.world}x {torch.cuda.get_device_name()}", "world": args.world,
            "date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "model": MODEL, "interconnect": interconnect, "per_gpu_batch": args.per_gpu_batch, "ddp_bucket_cap_mb": dt.DDP_BUCKET_CAP_MB,
            "command": "python " + " ".join(sys.argv), "seconds": time.time() - start,
            "rows": rows, "table": text}
    with open(os.path.join(args.out, "distributed.json"), "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
