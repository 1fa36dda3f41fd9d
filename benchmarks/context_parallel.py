"""Context parallelism on 2 GPUs (issue 18): the naive 12-layer Based LM, one sequence split over ranks.

One spawn of ``--world`` ranks (NCCL; gloo with ``--device cpu``) runs, most important first:
  (a) one GPU vs context parallel at T = ``--seqlen`` (131072), batch 1: median step time
      (forward, backward, AdamW; the first step, which compiles, left out) on one GPU and on all
      GPUs with ``based_compile.context_parallel``; efficiency = t1 / (world * t_world), the bar
      t_world <= 0.55 t1 on 2 GPUs (efficiency >= 0.9);
  (b) one more context-parallel step under torch.profiler: the share of the step spent in the
      all-gather kernels (the state and halo exchange) and in the all-reduce (the gradients);
  (c) the largest T that fits one GPU (doubling from ``--seqlen`` until out of memory, at most
      ``--probe-max``), then the first T that did not fit, trained with context parallelism;
  (d) loss curves at that largest T: ``--curve-steps`` steps on one GPU and context parallel,
      same initial weights and tokens; the largest absolute difference.
``--parts`` picks which of them run (``--parts ab``: only the step times and the profile, about 2
minutes); (b) also profiles one single-GPU step, and both profiles list the GPU kernels that took the
most time (``top_kernels``: name, ms, calls), so that a gap between the two shows where it is.
The single-GPU runs execute on every rank at once, each on its own GPU (rank 0's numbers are
reported). The model is examples/naive_based_lm.py, unchanged, compiled with backend="based"
(``shard_causal_convs`` makes its short convolutions exact); the loss (cross entropy summed over
this rank's tokens) is compiled with it, so the logits are not copied to float32. Under context
parallelism the parameter gradients are summed over ranks with one all-reduce. ``--budget-s``
starts no run that would end after it (reported as skipped). Writes OUT/context_parallel.json.

    python benchmarks/context_parallel.py --out OUT                        # 2 GPUs, about 6 minutes
    python benchmarks/context_parallel.py --out OUT --parts ab             # T = 131072 only, about 2 minutes
    python benchmarks/context_parallel.py --device cpu --world 2 --tiny    # the logic, on the CPU
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from naive_based_lm import BasedLM  # noqa: E402

MODEL = dict(vocab_size=8192, d_model=768, n_layers=12, n_heads=12, feature_dim=16, conv_size=4)
TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, feature_dim=4, conv_size=3)
STEP_BAR = 0.55              # 2-GPU step time <= 0.55 x one GPU's at T = 131072
EXCHANGE_BAR = 0.05          # the state exchange under 5% of the step


class LossModel(torch.nn.Module):
    """The LM and its summed cross entropy, compiled together."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, targets):
        logits = self.lm(ids)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def tokens(step: int, seqlen: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (1, seqlen + 1), generator=g)


class Trainer:
    """One model per rank, reset to the same initial weights before every run (so that no run
    recompiles for a new module)."""

    def __init__(self, args, rank, world, device):
        import based_compile

        self.args, self.rank, self.world, self.device = args, rank, world, device
        torch.manual_seed(0)
        self.model_kwargs = TINY if args.tiny else MODEL
        lm = BasedLM(**self.model_kwargs, max_len=1 << 24).to(device=device, dtype=getattr(torch, args.dtype))
        based_compile.shard_causal_convs(lm)
        self.lm = lm
        self.initial = {k: v.detach().clone() for k, v in lm.state_dict().items()}
        self.compiled = torch.compile(LossModel(lm), backend=based_compile.backend(inner=args.inner), dynamic=False)
        self.group = dist.group.WORLD

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset(self):
        with torch.no_grad():
            for k, v in self.lm.state_dict().items():
                v.copy_(self.initial[k])
        self.lm.zero_grad(set_to_none=True)
        return torch.optim.AdamW(self.lm.parameters(), lr=1e-3, foreach=self.device.type == "cuda")

    def step(self, opt, seqlen: int, step: int, cp: bool) -> float:
        """One training step over T = seqlen tokens; returns the loss per token of the whole sequence."""
        import based_compile

        batch = tokens(step, seqlen, self.model_kwargs["vocab_size"]).to(self.device)
        ids, targets = batch[:, :-1], batch[:, 1:]
        if cp:
            with based_compile.context_parallel(self.group):
                ids = based_compile.shard_sequence(ids, seq_dim=1)
                targets = based_compile.shard_sequence(targets, seq_dim=1)
                loss = self.compiled(ids, targets) / seqlen
                loss.backward()
            grads = [p.grad for p in self.lm.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)            # the gradient of the whole sequence's loss
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=self.group)
        else:
            loss = self.compiled(ids, targets) / seqlen
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def run(self, seqlen: int, steps: int, cp: bool) -> dict:
        """``steps`` steps from the initial weights: losses, step times (the first compiles), peak memory."""
        opt = self.reset()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        losses, times = [], []
        for i in range(steps):
            self.sync()
            start = time.perf_counter()
            losses.append(self.step(opt, seqlen, i, cp))
            self.sync()
            times.append(time.perf_counter() - start)
        out = dict(losses=losses, step_times_s=times,
                   step_s=statistics.median(times[1:]) if len(times) > 1 else None)
        if self.device.type == "cuda":
            out["peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return out

    def profiled_step(self, seqlen: int, cp: bool) -> dict:
        """One more step (compiled already) under torch.profiler: the collectives' kernel time and the
        based operators the forward ran."""
        opt = self.reset()
        self.step(opt, seqlen, 0, cp)                         # warm (compiled by the timed run)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sync()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            self.step(opt, seqlen, 1, cp)
            self.sync()
        wall = time.perf_counter() - start
        return dict(profiled_step_s=wall, **collective_times(prof.events()))


TOP_KERNELS = 15


def collective_times(events) -> dict:
    """Seconds of NCCL all-gather and all-reduce kernels, based operator calls, and the GPU kernels
    that took the most time (name, ms, calls; summed over the step), in profiler events."""
    gather = reduce = 0.0
    calls = {}
    kernels = {}
    for e in events:
        name = e.name
        if name.startswith("based::"):
            calls[name] = calls.get(name, 0) + 1
        if str(getattr(e, "device_type", "")).split(".")[-1] != "CUDA":
            continue
        seconds = e.time_range.elapsed_us() * 1e-6
        total, count = kernels.get(name, (0.0, 0))
        kernels[name] = (total + seconds, count + 1)
        # NCCL's own "nccl:all_gather" ranges on the GPU span its kernels: counting both would count
        # the exchange twice (the run of 2026-11-30 did: 38.9 ms, its kernels alone 19.3 ms).
        if "nccl" not in name.lower() or name.lower().startswith("nccl:"):
            continue
        if "allgather" in name.lower().replace("_", ""):
            gather += seconds
        elif "allreduce" in name.lower().replace("_", ""):
            reduce += seconds
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    return dict(allgather_s=gather, allreduce_s=reduce, based_calls=calls,
                kernel_s=sum(t for t, _ in kernels.values()),
                top_kernels=[[name[:120], round(t * 1e3, 3), n] for name, (t, n) in top])


def log_kernels(log, label: str, prof: dict) -> None:
    if not prof.get("top_kernels"):
        return
    log(f"{label}: GPU kernels {prof['kernel_s'] * 1e3:.1f} ms in all; the most time:")
    for name, ms, n in prof["top_kernels"]:
        log(f"    {ms:9.2f} ms  {n:5d}x  {name}")


def _oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Budget:
    """Starts a run only when rank 0 expects it to end before the deadline (all ranks agree)."""

    def __init__(self, seconds, device):
        self.deadline = time.time() + seconds if seconds else None
        self.device = device
        self.compile_s = 0.0                  # the longest first (compiling) step seen
        self.per_token_s = 0.0                # the slowest step per token seen

    def allows(self, seqlen: int, steps: int) -> bool:
        ok = self.deadline is None or time.time() + self.compile_s + steps * self.per_token_s * seqlen < self.deadline
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.broadcast(flag, 0)
        return bool(flag.item())

    def record(self, seqlen: int, result: dict) -> None:
        times = result.get("step_times_s") or []
        if times:
            self.compile_s = max(self.compile_s, times[0])
        if len(times) > 1:
            self.per_token_s = max(self.per_token_s, max(times[1:]) / seqlen)


def agree(flag: bool, device) -> bool:
    """True when ``flag`` holds on every rank."""
    t = torch.tensor([0 if flag else 1], device=device)
    dist.all_reduce(t)
    return t.item() == 0


def attempt(trainer, budget, log, label: str, seqlen: int, steps: int, cp: bool) -> dict:
    """One run, or why not: skipped (budget), out of memory (agreed by all ranks)."""
    if not budget.allows(seqlen, steps):
        log(f"{label}: skipped (budget)")
        return dict(status="skipped (budget)")
    log(f"{label}: T={seqlen}, {steps} step(s){' context parallel' if cp else ', one GPU per rank'} ...")
    result, error = None, None
    try:
        result = trainer.run(seqlen, steps, cp)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _oom(err):
            raise
        error = "out of memory"
    trainer.lm.zero_grad(set_to_none=True)
    gc.collect()
    if trainer.device.type == "cuda":
        torch.cuda.empty_cache()
    if not agree(error is None, trainer.device):
        log(f"{label}: out of memory")
        return dict(status="out of memory")
    budget.record(seqlen, result)
    step = f", {result['step_s'] * 1e3:.1f} ms/step" if result["step_s"] else ""
    peak = f", peak {result['peak_gb']:.1f} GiB" if "peak_gb" in result else ""
    log(f"{label}: ok, first step {result['step_times_s'][0]:.1f} s{step}{peak}")
    return dict(status="ok", **result)


def measure(rank, world, args, device) -> dict:
    trainer = Trainer(args, rank, world, device)
    budget = Budget(args.budget_s, device)

    def log(msg):
        if rank == 0:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t = args.seqlen
    out = {"runs": []}

    def record(name, seqlen, cp, result):
        out["runs"].append(dict(name=name, T=seqlen, gpus=world if cp else 1, **result))
        return result

    # (a) one GPU vs context parallel at T
    single = record("step time", t, False, attempt(trainer, budget, log, "(a) one GPU", t, args.steps, False))
    parallel = record("step time", t, True, attempt(trainer, budget, log, f"(a) {world} GPUs", t, args.steps, True))
    if "b" in args.parts and single.get("status") == "ok" and budget.allows(t, 2):
        out["profile_single"] = trainer.profiled_step(t, False)
        log_kernels(log, "(b) one GPU", out["profile_single"])
    if single.get("step_s") and parallel.get("step_s"):
        out["step_ratio"] = parallel["step_s"] / single["step_s"]
        out["efficiency"] = single["step_s"] / (world * parallel["step_s"])
        log(f"(a) step ratio {out['step_ratio']:.3f} (bar {STEP_BAR}), efficiency {out['efficiency']:.3f}")
    # (b) the exchange's share of a context-parallel step
    if "b" in args.parts and parallel.get("status") == "ok" and budget.allows(t, 2):
        prof = trainer.profiled_step(t, True)
        log_kernels(log, f"(b) {world} GPUs", prof)
        if device.type == "cuda":             # NCCL kernels; gloo's collectives run no kernels to time
            prof["exchange_share"] = prof["allgather_s"] / parallel["step_s"]
            prof["allreduce_share"] = prof["allreduce_s"] / parallel["step_s"]
            log(f"(b) all-gather {prof['allgather_s'] * 1e3:.2f} ms ({prof['exchange_share']:.2%} of the step), "
                f"gradient all-reduce {prof['allreduce_s'] * 1e3:.2f} ms")
        out["profile"] = prof
        log(f"(b) based operators in the profiled step: {prof['based_calls']}")
    # (c) the largest T that fits one GPU, then the first that did not, on all GPUs
    if not ("c" in args.parts or "d" in args.parts):
        return out
    fits, failed = (t if single.get("status") == "ok" else None), None
    probe = t * 2
    while "c" in args.parts and fits is not None and probe <= args.probe_max:
        result = record("fits one GPU?", probe, False, attempt(trainer, budget, log, "(c) probe", probe, 1, False))
        if result["status"] == "ok":
            fits, probe = probe, probe * 2
        else:
            failed = probe if result["status"] == "out of memory" else None
            break
    out["largest_fit_T"] = fits
    if failed:
        out["not_fit_T"] = failed
        record("trains on all GPUs", failed, True, attempt(trainer, budget, log, f"(c) {world} GPUs", failed, 2, True))
    # (d) loss curves at the largest T that fits one GPU
    if fits and "d" in args.parts:
        one = record("loss curve", fits, False, attempt(trainer, budget, log, "(d) one GPU", fits, args.curve_steps, False))
        many = record("loss curve", fits, True,
                      attempt(trainer, budget, log, f"(d) {world} GPUs", fits, args.curve_steps, True))
        if one.get("status") == many.get("status") == "ok":
            out["loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(one["losses"], many["losses"]))
            log(f"(d) losses one GPU {[round(x, 5) for x in one['losses']]}, {world} GPUs "
                f"{[round(x, 5) for x in many['losses']]}: max abs diff {out['loss_max_abs_diff']:.2e}")
    return out


def _worker(rank, world, args, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    for name in ("cache_size_limit", "recompile_limit"):      # one graph per length, about 8 lengths
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    try:
        out = measure(rank, world, args, device)
        if rank == 0:
            results["out"] = out
    finally:
        dist.destroy_process_group()


def table(data: dict) -> str:
    lines = ["| run | T | GPUs | step ms | peak GiB | status |", "| --- | --- | --- | --- | --- | --- |"]
    for r in data["runs"]:
        step = f"{r['step_s'] * 1e3:.1f}" if r.get("step_s") else ""
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") is not None else ""
        lines.append(f"| {r['name']} | {r['T']} | {r['gpus']} | {step} | {peak} | {r['status']} |")
    return "\n".join(lines)


def verdicts(data: dict) -> list[str]:
    out = []
    if "step_ratio" in data:
        ok = data["step_ratio"] <= STEP_BAR
        out.append(f"{'PASS' if ok else 'BELOW BAR'} step time {data['world']} GPUs / one GPU = "
                   f"{data['step_ratio']:.3f} (bar <= {STEP_BAR}; efficiency {data['efficiency']:.3f})")
    if data.get("profile", {}).get("exchange_share") is not None:
        share = data["profile"]["exchange_share"]
        out.append(f"{'PASS' if share < EXCHANGE_BAR else 'BELOW BAR'} state exchange (all-gather kernels) "
                   f"{share:.2%} of the step (bar < {EXCHANGE_BAR:.0%})")
    trained = [r for r in data["runs"] if r["name"] == "trains on all GPUs"]
    if trained:
        ok = trained[0]["status"] == "ok"
        out.append(f"{'PASS' if ok else 'FAIL'} T={trained[0]['T']} (out of memory on one GPU) on "
                   f"{data['world']} GPUs: {trained[0]['status']}")
    if "loss_max_abs_diff" in data:
        out.append(f"loss curves at T={data['largest_fit_T']}: max abs diff {data['loss_max_abs_diff']:.2e}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--seqlen", type=int, default=131072, help="T of the step-time comparison (a)")
    p.add_argument("--steps", type=int, default=5, help="steps of (a), the first (compiling) not timed")
    p.add_argument("--probe-max", type=int, default=1 << 21, help="largest T the memory probe (c) tries")
    p.add_argument("--curve-steps", type=int, default=4, help="steps of each loss curve (d)")
    p.add_argument("--dtype", default=None, choices=("bfloat16", "float32", "float64"),
                   help="bfloat16 on cuda, float32 on cpu by default")
    p.add_argument("--inner", default="inductor", help="the based backend's inner compiler")
    p.add_argument("--tiny", action="store_true", help="a 2-layer d_model 32 model (the CPU smoke run)")
    p.add_argument("--budget-s", type=float, default=None, help="start no run that would end after this many seconds")
    p.add_argument("--parts", default="abcd",
                   help="which parts run: a step times, b profiles, c memory probe, d loss curves (e.g. ab)")
    args = p.parse_args(argv)
    if not args.parts or set(args.parts) - set("abcd") or "a" not in args.parts:
        p.error(f"--parts takes letters of abcd, a among them (the others build on its runs), got {args.parts!r}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.world < 2:
        p.error("--world must be at least 2")
    if args.device == "cuda" and torch.cuda.device_count() < args.world:
        sys.exit(f"needs {args.world} GPUs, found {torch.cuda.device_count()}")
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(name, "0" if name == "NCCL_NVLS_ENABLE" else "1")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    start = time.time()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(args.world, args, port, results), nprocs=args.world, join=True)
        out = dict(results["out"])
    import based_compile  # noqa: F401 - versions below

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device = (f"{args.world}x {torch.cuda.get_device_name()}" if args.device == "cuda"
              else f"{args.world} CPU processes (gloo)")
    data = dict(device=device, world=args.world, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton_version, model=TINY if args.tiny else MODEL, dtype=args.dtype, batch=1,
                command=os.environ.get("BENCH_COMMAND", "python " + " ".join(["benchmarks/context_parallel.py"]
                                                                              + (argv if argv is not None else sys.argv[1:]))),
                **out)
    data["seconds"] = time.time() - start
    text = table(data)
    data["table"] = text
    data["verdicts"] = verdicts(data)
    print(text)
    for line in data["verdicts"]:
        print(line)
    print(f"total {data['seconds']:.0f} s")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "context_parallel.json"), "w") as f:
        json.dump(data, f, indent=1)
    return data


if __name__ == "__main__":
    main()
