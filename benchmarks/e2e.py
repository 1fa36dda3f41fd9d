"""End-to-end benchmark (issue 6): a 113M-parameter naive Based LM, trained and prefilled
(the issue's ~125M configuration: 12 layers, d_model 768, 12 heads, feature dim 16).

    python benchmarks/e2e.py --out bench_out                  # the full run (GPU)
    python benchmarks/e2e.py --out bench_out --quick          # a short run (2 layers, T=2048, few reps)
    python benchmarks/e2e.py --out bench_out --lengths 8192 --modes train --variants based,inductor
    python benchmarks/e2e.py --out bench_out --report         # table and plot from the JSON only

Model: examples/naive_based_lm.py (12 layers, d_model 768, 12 heads, feature dim 16, vocab
50304, tied head, short convolutions, GELU MLPs), its Based mixers written the naive way
(explicit Taylor feature map, T x T matrix, tril mask, row-sum normaliser).

Entries (``--variants``), all on the same weights:
  eager             the naive code as written
  inductor          torch.compile(model)                       (Inductor on the naive code)
  based             torch.compile(model, backend="based")      (our rewrite + Inductor for the rest)
  fla               the model with its attention swapped for fla-core's Based kernels called directly
                    (parallel_based for training, fused_chunk_based for prefill), the rest eager
  fla_inductor      the same, with torch.compile(model) around it (the hand-optimised reference with the
                    same compiler help as ours; fla's call is left out of the graph with
                    torch.compiler.disable, because Inductor 2.11 fails to compile its kernels)
fla entries need fla-core importable; its layout is found from its signature and checked against
the naive form before use. Modes (``--modes``):
  train     one optimiser step: forward, cross-entropy, backward, AdamW (fused on CUDA); median step time,
            tokens/s, peak memory allocated (weights and optimiser state included)
  prefill   one forward without gradients; median time, tokens/s, peak memory above the weights

Batch: ``--tokens`` per step (default 32768: B=16 at T=2048, B=4 at T=8192). An entry that runs
out of memory is retried at half the batch (down to 1) and the batch it ran with is recorded; one
that fails otherwise prints its error and the run goes on. Results are merged into
``OUT/e2e.json`` after every entry (keyed by mode, T, variant), so runs split over several device
calls add up; the table is printed last and ``OUT/e2e.png`` is drawn when matplotlib is installed.

Inductor in torch 2.11 fails to compile the feature-map spelling at T=2048 (a TypeError from
``CantSplit``); ``--fix-inductor-cantsplit`` applies the workaround in benchmarks/inductor_cantsplit.py
(the upstream fix's effect) to every compiled entry and records it in the run. ``--attention-share``
profiles two more calls of each entry on the GPU and records the GPU time of all kernels and of the
attention kernels (ours or fla-core's, by kernel name) per call.

Budget: every compiled entry compiles the 12-layer model (tens of seconds to a few minutes each, and
again when an OOM halves the batch), so the full run may not fit one 10-minute device call. Split it,
with the same --out, for example: (1) --modes train --lengths 2048, (2) --modes train --lengths 8192,
(3) --modes prefill; then --report. Progress lines are flushed as entries finish.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from measure import synchronize, timed_calls  # noqa: E402
from naive_based_lm import ATTENTION_FORMS, BasedLM, count_parameters, fla_based_attention  # noqa: E402

VARIANTS = ("eager", "inductor", "based", "fla", "fla_inductor")
MODES = ("train", "prefill")


# ----------------------------------------------------------------------------------------------- setup

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for e2e.json and e2e.png")
    p.add_argument("--quick", action="store_true", help="2 layers, T=2048, 3 reps, 16384 tokens")
    p.add_argument("--report", action="store_true", help="only print the table and draw the plot from OUT/e2e.json")
    p.add_argument("--lengths", help="comma-separated sequence lengths (default 2048,8192)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--tokens", type=int, help="tokens per step, B = tokens // T (default 32768)")
    p.add_argument("--layers", type=int, help="default 12")
    p.add_argument("--d-model", type=int, default=768, dest="d_model")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab-size", type=int, default=50304, dest="vocab_size")
    p.add_argument("--precision", default="bf16", choices=("bf16", "autocast", "fp32"),
                   help="bf16: bf16 weights; autocast: fp32 weights under bf16 autocast; fp32")
    p.add_argument("--reps", type=int, help="timed repetitions per entry (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation happens here)")
    p.add_argument("--min-batch", type=int, default=1, dest="min_batch",
                   help="halve the batch on OOM down to this (set it to the requested batch to never halve)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attention-form", default="feature_map", choices=ATTENTION_FORMS, dest="attention_form",
                   help="how the naive mixers spell Based attention (examples/naive_based_lm.py)")
    p.add_argument("--fix-inductor-cantsplit", action="store_true", dest="fix_cantsplit",
                   help="work around torch 2.11's CantSplit TypeError in Inductor (benchmarks/inductor_cantsplit.py), "
                        "for every compiled entry; recorded in the run")
    p.add_argument("--attention-share", action="store_true", dest="attention_share",
                   help="after timing, profile 2 calls on the GPU: GPU time in all kernels and in the attention "
                        "kernels (based and fla entries), recorded as gpu_ms and attention_gpu_ms")
    args = p.parse_args(argv)
    quick = args.quick
    args.lengths = [int(t) for t in (args.lengths or ("2048" if quick else "2048,8192")).split(",")]
    args.tokens = args.tokens or (16384 if quick else 32768)
    args.layers = args.layers or (2 if quick else 12)
    args.reps = args.reps or (3 if quick else 10)
    args.modes = [m for m in args.modes.split(",") if m]
    args.variants = [v for v in args.variants.split(",") if v]
    for name, given, allowed in (("--modes", args.modes, MODES), ("--variants", args.variants, VARIANTS)):
        if set(given) - set(allowed):
            p.error(f"{name} must be a subset of {allowed}, got {sorted(set(given) - set(allowed))}")
    return args


def is_out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "outofmemory" in text


def free_memory(device):
    import gc
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_model(args, device) -> BasedLM:
    torch.manual_seed(0)
    model = BasedLM(args.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    feature_dim=16, mlp_ratio=4.0, max_len=max(args.lengths), attention_form=args.attention_form)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return model.to(device=device, dtype=dtype)


def autocast(args, device):
    if args.precision == "autocast":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


# ---------------------------------------------------------------------------------------- fla checks

def naive_based(q, k, v, eps=1e-6):
    """The naive mixer's function, [B, H, T, d] x2, [B, H, T, Dv] -> [B, H, T, Dv], in float32."""
    q, k, v = q.float(), k.float(), v.float()
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    a = (1 + s + 0.5 * s * s).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + eps)


def checked_fla_impl(kind: str, device, dtype):
    """fla's kernel adapted to the mixer, in the layout whose output matches the naive form."""
    import inspect

    import fla.ops.based as fla_based
    fn = getattr(fla_based, f"{kind}_based")
    print(f"  fla {kind}_based{inspect.signature(fn)}")
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(2, 4, 256, 16, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(2, 4, 256, 64, generator=g).to(device, dtype)
    ref = naive_based(q, k, v)
    notes = []
    for layout in ("auto", "BHTD", "BTHD"):
        try:
            impl = fla_based_attention(kind, layout)
            out = impl(q, k, v).float()
            err = ((out - ref).norm() / ref.norm()).item()
        except Exception as error:  # noqa: BLE001 - a layout fla refuses
            notes.append(f"{layout}: {type(error).__name__}: {error}")
            continue
        notes.append(f"{layout}: rel. error {err:.1e}")
        if err < 3e-2:
            print(f"  fla {kind}: using layout {layout} ({notes[-1]})")
            return impl
    raise RuntimeError(f"fla {kind}_based matches the naive form in no layout: {'; '.join(notes)}")


# ------------------------------------------------------------------------------------------- entries

def runner_for(model, initial_state, variant: str, mode: str, device, dtype):
    """Reset the model's weights, set its attention for ``variant``, return the callable to time."""
    torch._dynamo.reset()
    model.load_state_dict(initial_state)                       # every entry starts from the same weights
    if variant in ("fla", "fla_inductor"):
        impl = checked_fla_impl("parallel" if mode == "train" else "fused_chunk", device, dtype)
        if variant == "fla_inductor":
            # Inductor fails to compile fla's Triton kernels inside the graph (torch 2.11, fla-core
            # 0.6.0: a compile error in a subprocess): they run as they are, Inductor compiles the
            # rest between them (a graph break at each mixer).
            impl = torch.compiler.disable(impl)
        model.set_attention_impl(impl)
    else:
        model.set_attention_impl(None)
    if variant in ("inductor", "fla_inductor"):
        return torch.compile(model, dynamic=False)
    if variant == "based":
        import based_compile  # noqa: F401  registers backend="based"
        return torch.compile(model, backend="based", dynamic=False)
    return model


# Kernel names of the attention: ours (kernels/parallel.py, kernels/fused_chunk.py, whose
# _moments_kernel sums a call's states for context parallelism) and fla-core's.
ATTENTION_KERNEL_MARKS = ("_parallel_", "_fused_chunk_", "_moments_kernel", "based")


def is_attention_kernel(name: str) -> bool:
    return any(mark in name for mark in ATTENTION_KERNEL_MARKS)


def gpu_time_split(fn, calls: int = 2) -> dict:
    """GPU time per call of ``fn`` in all kernels and in the attention kernels (``is_attention_kernel``),
    from the profiler's kernel records over ``calls`` calls. Meaningful for the based and fla entries,
    whose attention runs in kernels of its own; Inductor's attention is fused into generic kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = attention = 0.0
    for event in prof.key_averages():
        if event.device_type != DeviceType.CUDA:
            continue
        us = getattr(event, "self_device_time_total", None)
        us = event.self_cuda_time_total if us is None else us
        total += us
        if is_attention_kernel(event.key):
            attention += us
    return dict(gpu_ms=total / calls / 1e3, attention_gpu_ms=attention / calls / 1e3)


def measure_train(args, model, run, batch, t, device) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")
    g = torch.Generator(device="cpu").manual_seed(t)
    ids = torch.randint(0, args.vocab_size, (batch, t + 1), generator=g).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        with autocast(args, device):
            logits = run(x)                                    # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        losses = [step().item() for _ in range(args.warmup)]
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = timed_calls(step, device, args.reps)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        split = gpu_time_split(step) if args.attention_share and device.type == "cuda" else {}
        return dict(**time_summary(times, batch * t), peak_bytes=peak, first_losses=losses, **split)
    finally:
        opt.zero_grad(set_to_none=True)
        del opt


def time_summary(times: list[float], tokens: int) -> dict:
    median = statistics.median(times)
    return dict(ms=median * 1e3, ms_all=[s * 1e3 for s in times], tokens_per_s=tokens / median)


def measure_prefill(args, model, run, batch, t, device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(t)
    x = torch.randint(0, args.vocab_size, (batch, t), generator=g).to(device)

    def forward():
        with torch.no_grad(), autocast(args, device):
            return run(x)

    for _ in range(args.warmup):
        forward()
    synchronize(device)
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed_calls(forward, device, args.reps)
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
    split = gpu_time_split(forward) if args.attention_share and device.type == "cuda" else {}
    return dict(**time_summary(times, batch * t), peak_bytes=peak, **split)


def run_entry(args, model, initial_state, variant, mode, t, device, dtype) -> dict:
    """One (mode, T, variant) entry, halving the batch on OOM; never raises."""
    batch = max(1, args.tokens // t)
    entry = dict(mode=mode, seq_len=t, variant=variant, batch_requested=batch)
    while True:
        start = time.perf_counter()
        try:
            run = runner_for(model, initial_state, variant, mode, device, dtype)
            measure = measure_train if mode == "train" else measure_prefill
            entry.update(measure(args, model, run, batch, t, device), status="ok", batch=batch)
            entry.pop("error", None)
            break
        except ImportError as error:                           # fla-core not installed
            entry.update(status="unavailable", batch=batch, error=f"{type(error).__name__}: {error}")
            print(f"  {mode} T={t} {variant}: unavailable ({error})", flush=True)
            break
        except Exception as error:  # noqa: BLE001 - every entry reports, the run goes on
            oom = is_out_of_memory(error)
            entry.update(status="OOM" if oom else "error", batch=batch,
                         error=f"{type(error).__name__}: {str(error)[:400]}")
            if not oom:
                traceback.print_exc(limit=4)
            print(f"  {mode} T={t} {variant} B={batch}: {'OOM' if oom else 'FAILED'}: "
                  f"{entry['error'].splitlines()[0][:200]}", flush=True)
            if not oom or batch <= args.min_batch:
                break
            entry.setdefault("oom_at_batch", []).append(batch)
            batch //= 2
        finally:
            model.set_attention_impl(None)
            model.zero_grad(set_to_none=True)
            free_memory(device)
            entry["wall_s"] = round(time.perf_counter() - start, 1)
    return entry


# --------------------------------------------------------------------------------------- reporting

def describe_device(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def load_results(path: Path) -> dict:
    if path.exists():
        with open(path) as f:
            return json.load(f)
    return dict(runs=[], results=[])


def save_result(path: Path, data: dict, entry: dict) -> None:
    key = (entry["mode"], entry["seq_len"], entry["variant"])
    data["results"] = [r for r in data["results"] if (r["mode"], r["seq_len"], r["variant"]) != key] + [entry]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.1f} GiB"


def print_table(data: dict) -> None:
    results = sorted(data["results"], key=lambda r: (MODES.index(r["mode"]), r["seq_len"],
                                                     VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else 99))
    print()
    for run in data.get("runs", []):
        print(f"# run {run['date']}: {run['device']}, torch {run['torch']}, {run['params'] / 1e6:.1f}M params, "
              f"{run['layers']} layers, {run['precision']}, {run['reps']} reps")
    print(f"| mode | T | entry | batch | ms/step | tokens/s | peak memory | vs inductor | vs fla best | first loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        same = [o for o in results if o["mode"] == r["mode"] and o["seq_len"] == r["seq_len"] and o["status"] == "ok"]
        ind = next((o for o in same if o["variant"] == "inductor"), None)
        fla = max((o for o in same if o["variant"].startswith("fla")), key=lambda o: o["tokens_per_s"], default=None)
        if r["status"] != "ok":
            print(f"| {r['mode']} | {r['seq_len']} | {r['variant']} | {r.get('batch', '-')} | {r['status']} | | | | | |")
            continue
        vs_ind = f"{r['tokens_per_s'] / ind['tokens_per_s']:.2f}x" if ind else "-"
        vs_fla = f"{r['tokens_per_s'] / fla['tokens_per_s']:.2f}x" if fla else "-"
        loss0 = f"{r['first_losses'][0]:.4f}" if r.get("first_losses") else "-"
        oom_at = r.get("oom_at_batch")
        batch = f"{r['batch']} (OOM at {', '.join(map(str, oom_at))})" if oom_at else f"{r['batch']}"
        print(f"| {r['mode']} | {r['seq_len']} | {r['variant']} | {batch} | {r['ms']:.1f} | "
              f"{r['tokens_per_s']:,.0f} | {fmt_bytes(r['peak_bytes'])} | {vs_ind} | {vs_fla} | {loss0} |")
    print("(vs: throughput ratio, tokens/s of the row over tokens/s of Inductor / of the faster fla entry, "
          "at the same mode and T; batches may differ where an entry had to halve it. first loss: the loss of "
          "the first step, same weights and data in every entry of a T: entries that compute the same "
          "function agree to bf16 rounding)")


def plot(data: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    modes = [m for m in MODES if any(r["mode"] == m for r in data["results"])]
    if not modes:
        return
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
    for col, mode in enumerate(modes):
        lengths = sorted({r["seq_len"] for r in data["results"] if r["mode"] == mode})
        variants = [v for v in VARIANTS if any(r["variant"] == v for r in data["results"] if r["mode"] == mode)]
        width = 0.8 / max(1, len(variants))
        for row, (key, label, scale) in enumerate((("tokens_per_s", "tokens/s (thousands)", 1e-3),
                                                   ("peak_bytes", "peak memory (GiB)", 2 ** -30))):
            ax = axes[row][col]
            for i, v in enumerate(variants):
                ys, notes = [], []
                for t in lengths:
                    r = next((r for r in data["results"]
                              if r["mode"] == mode and r["seq_len"] == t and r["variant"] == v), None)
                    ok = r is not None and r["status"] == "ok" and r.get(key) is not None
                    ys.append(r[key] * scale if ok else 0.0)
                    notes.append("" if ok else "n/a" if r is None or r["status"] == "ok" else r["status"])
                xs = [j + (i - (len(variants) - 1) / 2) * width for j in range(len(lengths))]
                ax.bar(xs, ys, width, label=v)
                for x_, note in zip(xs, notes):
                    if note:
                        ax.text(x_, 0, note, rotation=90, ha="center", va="bottom", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"T={t}" for t in lengths])
            ax.set_title(f"{mode}: {label}")
            if row == 0 and col == 0:
                ax.legend(fontsize=8)
    runs = data.get("runs", [])
    if runs:
        fig.suptitle(f"naive Based LM ({runs[-1]['params'] / 1e6:.1f}M params), {runs[-1]['device']}, {runs[-1]['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# -------------------------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "e2e.json"
    data = load_results(path)
    if args.report:
        print_table(data)
        plot(data, out / "e2e.png")
        return data

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (this benchmark is meant for the GPU; "
                         "--device cpu runs it on the CPU, slowly)")
    model = build_model(args, device)
    dtype = next(model.parameters()).dtype if args.precision != "autocast" else torch.bfloat16
    params = count_parameters(model)
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    run_info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    command=os.environ.get("BENCH_COMMAND") or "python " + " ".join(sys.argv),
                    device=describe_device(device), torch=torch.__version__, params=params,
                    attention_form=args.attention_form, layers=args.layers, d_model=args.d_model,
                    heads=args.heads, precision=args.precision, reps=args.reps, tokens=args.tokens, quick=args.quick)
    if args.fix_cantsplit:
        import inductor_cantsplit
        run_info["inductor_patch"] = inductor_cantsplit.patch() or "not needed on this torch"
    try:
        import triton
        run_info["triton"] = triton.__version__
    except ImportError:
        pass
    data.setdefault("runs", []).append(run_info)
    print(f"naive Based LM: {params / 1e6:.1f}M parameters, {args.layers} layers, d_model {args.d_model}, "
          f"{args.heads} heads, feature dim 16, {args.precision}, on {run_info['device']}; "
          f"{args.tokens} tokens per step", flush=True)

    for mode in args.modes:
        for t in args.lengths:
            for variant in args.variants:
                print(f"[{mode} T={t} {variant}] ...", flush=True)
                entry = run_entry(args, model, initial_state, variant, mode, t, device, dtype)
                entry["run"] = run_info["date"]
                if entry["status"] == "ok":
                    print(f"  {mode} T={t} {variant} B={entry['batch']}: {entry['ms']:.1f} ms, "
                          f"{entry['tokens_per_s']:,.0f} tok/s, peak {fmt_bytes(entry['peak_bytes'])} "
                          f"({entry['wall_s']} s incl. compile)", flush=True)
                save_result(path, data, entry)

    print_table(data)
    plot(data, out / "e2e.png")
    print(f"wrote {path}")
    return data


if __name__ == "__main__":
    main()
