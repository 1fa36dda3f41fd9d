"""Data-parallel training of the naive Based LM with ``backend="based"``: DDP and FSDP2.

Used by ``tests/test_distributed.py`` (2 CPU processes, gloo) and by
``benchmarks/distributed.py`` (N GPUs, NCCL). Each rank trains the same model on its slice
of a global batch; the loss it reports is the mean over ranks, which for equal slices is the
loss a single process sees on the whole batch, so the two can be compared step by step.

    python examples/distributed_training.py --mode ddp --world 2 --device cpu
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from naive_based_lm import BasedLM  # noqa: E402

MODES = ("single", "ddp", "fsdp2")
# Where torch.compile goes: "model" compiles the wrapped model (Dynamo graph-breaks at FSDP2's hooks,
# and under DDP its optimizer splits the graph at the gradient buckets); "blocks" compiles each
# block before wrapping (what PyTorch recommends for FSDP2, and its docs for DDP: compile the modules
# inside the wrapper); the embedding, final norm and LM head then run eagerly.
PLACEMENTS = ("model", "blocks")
# How FSDP2 groups the parameters into units (each unit: its own all-gather, reduce-scatter and hooks):
# "blocks" shards each run of ``fsdp_group`` blocks as a unit, then the model (the usual recipe: one
# block's parameters gathered at a time); "root" makes the whole model one unit gathered for the whole
# step (reshard_after_forward=False: one all-gather before the forward, none in the backward, one
# reduce-scatter), which needs the memory of every parameter at once, as DDP does, and runs FSDP2's
# hooks once a step instead of once per unit: about half of FSDP2's extra host work
# (benchmarks/NOTES.md, tenth session).
FSDP_LAYOUTS = ("blocks", "root")
# Parameters of 10.7 MB in float64, so that DDP's graph splitting cuts it at small bucket caps:
# at 1 MB between each block's k and v projections, at 1.1 MB between q and k (tests/test_distributed.py).
MODEL = dict(vocab_size=64, d_model=256, n_layers=2, n_heads=4, feature_dim=16, max_len=256, conv_size=0)
DDP_BUCKET_CAP_MB = 25          # DDP's default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(step: int, batch: int, seqlen: int, vocab: int) -> torch.Tensor:
    """The same [batch, seqlen + 1] token batch on every rank for a given step."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (batch, seqlen + 1), generator=g)


def build_model(model_kwargs: dict, dtype: torch.dtype, device: torch.device) -> BasedLM:
    torch.manual_seed(0)
    return BasedLM(**model_kwargs).to(device=device, dtype=dtype)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard            # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def wrap(model: BasedLM, mode: str, device: torch.device, bucket_cap_mb: float = DDP_BUCKET_CAP_MB,
         fsdp_group: int = 1, fsdp_layout: str = "blocks"):
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        # Dynamo's DDP optimizer cuts the graph where DDP's gradient buckets end (a first bucket of
        # 1 MB, the smallest cap it accepts, then bucket_cap_mb each), so there are several pieces.
        # gradient_as_bucket_view: the gradients are views into the all-reduce buckets (no copy back).
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_cap_mb,
                   gradient_as_bucket_view=True)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        # One FSDP unit per ``fsdp_group`` consecutive blocks (1: each block, the usual recipe). Fewer
        # units, fewer collectives and hooks a step, for more parameters gathered at once.
        if not isinstance(fsdp_group, int) or isinstance(fsdp_group, bool) or fsdp_group < 1:
            raise ValueError(f"fsdp_group must be a whole number of blocks >= 1, got {fsdp_group!r}")
        if fsdp_layout not in FSDP_LAYOUTS:
            raise ValueError(f"fsdp_layout must be one of {FSDP_LAYOUTS}, got {fsdp_layout!r}")
        fully_shard = _fully_shard()
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        if fsdp_layout == "root":
            fully_shard(model, mesh=mesh, reshard_after_forward=False)
            return model
        blocks = list(model.blocks)
        units = [blocks[i:i + fsdp_group] for i in range(0, len(blocks), fsdp_group)]
        for i, unit in enumerate(units):
            # The last unit's parameters stay gathered after the forward: the backward starts with them.
            fully_shard(unit[0] if len(unit) == 1 else unit, mesh=mesh, reshard_after_forward=i < len(units) - 1)
        fully_shard(model, mesh=mesh)
        return model
    return model


def train(mode: str, rank: int, world: int, device: torch.device, *, steps: int, batch: int, seqlen: int,
          dtype=torch.float32, inner="inductor", compile=True, model_kwargs=None, lr: float = 0.05,
          bucket_cap_mb: float = DDP_BUCKET_CAP_MB, explain: bool = False, placement: str = "model",
          compile_mode: str | None = None, fsdp_group: int = 1, fsdp_layout: str = "blocks"):
    """Train ``steps`` steps under ``backend=based_compile.backend(inner=inner)`` (eagerly if not ``compile``),
    compiled where ``placement`` says (PLACEMENTS), with torch.compile's ``compile_mode``
    (``"reduce-overhead"``: CUDA graphs); FSDP2's units as ``fsdp_layout`` says (FSDP_LAYOUTS), with
    ``fsdp_group`` blocks per unit in the "blocks" layout.

    Returns a dict: ``losses`` (averaged over ranks), ``step_s`` (median step seconds),
    ``graphs`` (how many graphs Dynamo handed to the backend: more than one when DDP's graph
    splitting is on) and ``based_calls`` (``based::attention`` calls in the last step's forward).
    On CUDA also ``host_s``: the median time the host took to issue a step (up to the synchronize
    that ends it; close to ``step_s``, the step is bound by the host, not the GPU) and ``syncs``:
    the host waits for the GPU (``torch.cuda.set_sync_debug_mode``) in the second step.
    With ``explain``, also ``explanation`` (``based_compile.explain`` of the wrapped model, as text),
    ``explained_sites`` and ``cut_sites`` (sites DDP's graph splitting cuts across pieces).
    """
    import based_compile

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    torch._dynamo.reset()
    model_kwargs = dict(MODEL if model_kwargs is None else model_kwargs)
    model = build_model(model_kwargs, dtype, device)
    based = based_compile.backend(inner=inner)
    graphs, rewritten = [], []

    @functools.wraps(based)         # keeps the backend's marks: under DDP it sees the whole graph first
    def counting_backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        compiled_fn = based(gm, example_inputs, **kwargs)
        # The pass edits Dynamo's graph in place: what it rewrote is now a call in gm.
        rewritten.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                             and getattr(n.target, "__name__", "") == "based_attention_call"))
        return compiled_fn

    if compile and placement == "blocks":
        for block in model.blocks:
            block.compile(backend=counting_backend, mode=compile_mode)
    model = wrap(model, mode, device, bucket_cap_mb, fsdp_group, fsdp_layout)
    compiled = torch.compile(model, backend=counting_backend, mode=compile_mode) \
        if compile and placement == "model" else model
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    per_rank = batch // world
    losses, times, host_times, based_calls, syncs = [], [], [], 0, None

    def forward_backward_step(tokens, count=False):
        nonlocal based_calls
        if compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()      # a new step: the last one's graph outputs are done
        if count:
            logits, based_calls = count_based_calls(lambda: compiled(tokens[:, :-1]))
        else:
            logits = compiled(tokens[:, :-1])
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for step in range(steps):
        tokens = global_batch(step, batch, seqlen, model_kwargs["vocab_size"])
        tokens = tokens[rank * per_rank:(rank + 1) * per_rank].to(device)
        checking = device.type == "cuda" and step == 1
        with count_syncs() if checking else contextlib.nullcontext([]) as waits:
            start = time.perf_counter()
            # Count the calls in the last step (under CUDA graphs a replay dispatches no operator: there the
            # count is of the sites rewritten in the compiled graphs, below).
            loss = forward_backward_step(tokens, count=step == steps - 1 and compile_mode != "reduce-overhead")
        host_times.append(time.perf_counter() - start)
        if checking:
            syncs = len(waits)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    step_times = times                  # in order, the first (compilation) included
    # The median leaves out the first step (compilation) and the last (run under the profiler that
    # counts based::attention calls, which slows a short step by tens of percent).
    times = sorted(times[1:-1] or times[1:] or times)
    if compile_mode == "reduce-overhead":
        based_calls = sum(rewritten) if placement == "model" else None
    result = dict(losses=losses, step_s=times[len(times) // 2], step_times_s=step_times, graphs=len(graphs),
                  based_calls=based_calls, rewritten_sites=sum(rewritten), placement=placement,
                  fsdp_layout=fsdp_layout if mode == "fsdp2" else None)
    if device.type == "cuda":
        # The second step (sync check) is left out too: a warning per wait costs host time.
        host = sorted(host_times[2:-1] or host_times[1:] or host_times)
        result.update(host_s=host[len(host) // 2], syncs=syncs)
        try:                # a diagnostic: its failure must not cost the run's numbers
            result["profile"] = profile_step(lambda: forward_backward_step(tokens), device)
        except Exception as err:
            result["profile_error"] = f"{type(err).__name__}: {err}"
    if explain:
        tokens = global_batch(0, batch, seqlen, model_kwargs["vocab_size"])[rank * per_rank:(rank + 1) * per_rank]
        with torch.no_grad():
            explanation = based_compile.explain(model, tokens[:, :-1].to(device))
        result.update(explanation=str(explanation), explained_sites=len(explanation.sites),
                      cut_sites=sum("cuts this site" in site.piece for site in explanation.sites))
    return result


@contextlib.contextmanager
def count_syncs():
    """The places where the host waits for the GPU meanwhile (a list of warning texts), from
    ``torch.cuda.set_sync_debug_mode("warn")`` (``.item()``, host copies, ``nonzero``, synchronize)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        waits = []
        try:
            yield waits
        finally:
            torch.cuda.set_sync_debug_mode("default")
            waits.extend(str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message))


# CUDA runtime calls that make the host wait (or may: cudaFree waits for the device), counted per step.
WAITING_CUDA_CALLS = ("cudaMalloc", "cudaFree", "cudaDeviceSynchronize", "cudaStreamSynchronize",
                      "cudaEventSynchronize", "cudaMemcpy", "cudaHostAlloc", "cudaStreamWaitEvent")


def profile_step(step, device: torch.device, top: int = 8) -> dict:
    """One more training step under the profiler (CPU and CUDA): its wall time, the GPU's kernel time
    (summed over streams), the CUDA runtime calls that can make the host wait, the number of launches,
    and the host's most expensive operators by self time (what a host-bound step spends its time on)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()

    def self_device_us(a):
        return getattr(a, "self_device_time_total", None) or getattr(a, "self_cuda_time_total", 0) or 0

    kernels_us = sum(self_device_us(a) for a in averages if str(getattr(a, "device_type", "")).endswith("CUDA"))
    calls = {a.key: a.count for a in averages}
    host = sorted((a for a in averages if not str(getattr(a, "device_type", "")).endswith("CUDA")),
                  key=lambda a: -a.self_cpu_time_total)[:top]
    return dict(wall_s=wall, gpu_kernels_s=kernels_us / 1e6,
                launches=sum(n for k, n in calls.items() if k in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                   "cuLaunchKernelEx", "cudaLaunchKernelExC")),
                waiting_calls={k: calls[k] for k in WAITING_CUDA_CALLS if calls.get(k)},
                top_host_ms={a.key: round(a.self_cpu_time_total / 1e3, 2) for a in host})


def count_based_calls(fn):
    """(fn(), the number of forward ``based::attention`` calls the profiler recorded meanwhile)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return out, sum(1 for n in names if n.startswith("based::attention") and "backward" not in n)


def allreduce_bandwidth(device: torch.device, world: int, megabytes: int = 256, reps: int = 7) -> dict:
    """Median time of an all-reduce of ``megabytes`` of bfloat16 and its bus bandwidth (NCCL's
    busbw: bytes x 2(world-1)/world per second), the interconnect figure the data-parallel
    runs are limited by when their step is short."""
    x = torch.ones(megabytes * 2**19, dtype=torch.bfloat16, device=device)
    dist.all_reduce(x)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(x)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    median = sorted(times)[reps // 2]
    return dict(allreduce_mb=megabytes, allreduce_s=median,
                busbw_gb_s=megabytes * 2**20 * 2 * (world - 1) / world / median / 1e9)


def worker(rank: int, world: int, port: int, device_type: str, runs: list, results, deadline=None) -> None:
    """Entry point of one spawned rank: trains once per entry of ``runs`` (``train``'s keyword
    arguments and its ``mode``; "single" runs train alone on this rank's device), then reports
    the list of results through ``results``. With ``deadline`` (seconds since the epoch), rank 0
    decides for all ranks to start no run it expects to end later (the last run's duration)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world)
    out, last = [], 0.0
    try:
        for kwargs in runs:
            kwargs = dict(kwargs)
            mode = kwargs.pop("mode")
            if deadline is not None:
                go = [time.time() + last < deadline]
                dist.broadcast_object_list(go, src=0)
                if not go[0]:
                    out.append(dict(skipped="not run (time budget)"))
                    continue
            start = time.time()
            try:
                if mode == "allreduce":
                    out.append(allreduce_bandwidth(device, world, **kwargs))
                    continue
                alone = mode == "single"
                out.append(train(mode, 0 if alone else rank, 1 if alone else world, device, **kwargs))
            except Exception as err:       # report it and go on with the next run
                out.append(dict(error=f"{type(err).__name__}: {err}"))
            last = time.time() - start
            if device_type == "cuda":
                torch.cuda.empty_cache()
            if rank == 0:
                r = out[-1]
                print(f"[{mode} {kwargs.get('dtype')} T={kwargs.get('seqlen')} batch={kwargs.get('batch')}] "
                      + (f"step {r['step_s'] * 1e3:.1f} ms, based calls {r['based_calls']}, losses {r['losses']}"
                         if "step_s" in r else r.get("error", "")) + f" ({last:.0f} s)", flush=True)
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def run_distributed_many(world: int, device_type: str, runs: list[dict], deadline: float | None = None):
    """Spawn ``world`` ranks once, each training once per entry of ``runs`` (``train``'s keyword
    arguments plus ``mode``); returns, in rank order, each rank's list of ``train`` results."""
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(worker, args=(world, free_port(), device_type, runs, results, deadline), nprocs=world,
                       start_method="spawn", join=True)
    return [r for _, r in sorted((results.get() for _ in range(world)), key=lambda x: x[0])]


def run_distributed(mode: str, world: int, device_type: str, **kwargs):
    """Spawn ``world`` ranks; returns each rank's ``train`` result, in rank order."""
    return [r[0] for r in run_distributed_many(world, device_type, [dict(kwargs, mode=mode)])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=MODES, default="ddp")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="global batch (split over ranks)")
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--bucket-cap-mb", type=float, default=DDP_BUCKET_CAP_MB, help="DDP's bucket_cap_mb")
    p.add_argument("--placement", choices=PLACEMENTS, default="model",
                   help="compile the wrapped model, or each block before wrapping")
    p.add_argument("--fsdp-layout", choices=FSDP_LAYOUTS, default="blocks",
                   help="FSDP2's units: each block and the model (blocks), or the whole model as one unit (root)")
    args = p.parse_args()
    kw = dict(steps=args.steps, batch=args.batch, seqlen=args.seqlen)
    ref = train("single", 0, 1, torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"), **kw)
    out = run_distributed(args.mode, args.world, args.device, bucket_cap_mb=args.bucket_cap_mb,
                          placement=args.placement, fsdp_layout=args.fsdp_layout, **kw)
    for step, r in enumerate(ref["losses"]):
        print(f"step {step}: single {r:.6f}  {args.mode} x{args.world} {out[0]['losses'][step]:.6f}")
    print(f"median step: single {ref['step_s'] * 1e3:.1f} ms, {args.mode} x{args.world} "
          f"{out[0]['step_s'] * 1e3:.1f} ms; graphs per rank {[o['graphs'] for o in out]}, "
          f"based::attention calls per forward {[o['based_calls'] for o in out]}")


if __name__ == "__main__":
    main()
