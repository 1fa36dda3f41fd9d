"""Decode (generation) speed of Based attention: per layer and for the whole naive LM, on one GPU.

    python benchmarks/generate.py --out OUT            # ~4-5 minutes on an H200
    python benchmarks/generate.py --quick --out OUT    # fewer contexts and reps
    python benchmarks/generate.py --dry --out OUT      # tiny shapes on the CPU: checks the script's logic
    python benchmarks/generate.py --step-only --out OUT    # ~2-3 minutes: the per-layer recurrent step only
    python benchmarks/generate.py --model-only --out OUT   # ~3 minutes: the whole model only

Per layer (H=16, Dk=16, Dv=64, bfloat16; contexts 1k, 8k, 32k, 64k; B = 1 and 16), the time of one
decode step (one new query per head) for:

- ``eager_kv`` / ``inductor_kv`` / ``based_kv``: the naive KV-cache form (examples/generate.py's
  ``_attend_kv_cache`` without the cache append: scores against the whole cache, 1 + s + s^2/2,
  the end-aligned mask, row-sum normaliser) eagerly, under Inductor, under ``backend="based"``
  (the decode kernel);
- ``eager_rec`` / ``inductor_rec`` / ``based_rec``: the naive recurrent step (kv_state + phi(k)^T v,
  k_state + phi(k), phi(q) kv_state / (phi(q) . k_state + eps)), states [B, H, 273, 64] and
  [B, H, 1, 273] in bfloat16 (``based_rec``: the step kernel);
- ``sdpa_d64``: ``F.scaled_dot_product_attention`` of one query against a head-dim-64 KV cache
  (FlashAttention decode), the softmax reference.

Times: ``ms`` is GPU time: the call captured once in a CUDA graph, replayed with the L2 cache flushed
before each replay (a real model's other layers evict it), median of CUDA-event timings. ``call_ms``
is the plain call in a loop (CUDA events, median), launch overheads included: what a decode loop
without CUDA graphs pays. Each entry's floor is the bytes it must move per token (KV cache: read K
and V, and q, write o; recurrent: read and write both states, read q, k, v, write o; SDPA: read K and
V at d64) over the copy bandwidth measured in the same run (benchmarks/floor.py); ``over_floor`` =
ms / floor.

Whole model (examples/generate.py's GenerativeBasedLM, bfloat16, B = ``--model-batch`` (1), caches of
``--model-context`` (32768) tokens, synthetic: decode speed does not depend on their values), the same
model code for Inductor and ``backend="based"``: greedy decode steps in the KV-cache mode, the
recurrent mode (functional states) and the static-cache mode (``StaticCache``, states written in
place), without and with CUDA graphs (``mode="reduce-overhead"``; the KV-cache mode grows its cache
every step, a new shape each token, so CUDA graphs do not apply to it as written). Per token, the
static-cache loop under CUDA graphs is ``cudagraph_mark_step_begin()``, the compiled call (a graph
replay) and an argmax into a static token buffer; ``*_recurrent_cudagraphs`` (functional states)
also clones every state after each replay, because the next replay overwrites the graph's outputs.
Each entry records tokens/s and ``ms`` (the loop's wall time per token), ``gpu_ms`` (the GPU's own
time per token: a sleep kernel holds the stream while the host queues the tokens, CUDA events time
them back to back; ``gpu_timed`` false when the host could not get ahead), ``host_bound`` (wall >
1.25x GPU) and ``rel_err`` (the first token's logits against eager's on the same caches).
``--model-only`` runs this part alone and writes OUT/generate_model.json.

Writes OUT/generate.json and OUT/generate.png (ms/token against context; needs matplotlib); prints
progress as it goes and a short table last.

``--step-only``: the per-layer recurrent step alone (B = 1, 16, 64 by default), to compare the step
kernels against the bar of issue 15 (the recurrent mode >= 5x Inductor's recurrent and KV-cache
forms): ``inductor_kv`` (at the shortest context, 1k: the KV-cache form's fastest), ``inductor_rec``,
``based_rec`` (the operator's own choice, ``based_compile.config.step_kernel = "auto"``) and
``based_rec_tiled`` (the first step kernel) through torch.compile; the step kernel called directly,
``flat_bvN`` ("flat", N Dv columns per program) and ``tiled``; and ``null``, a CUDA graph of one
kernel that adds 1 to one number: the least this timer reports for any kernel (launch and
completion of a graph). Writes OUT/generate_step.json and prints, per B, each entry's GPU time,
its ratio to the floor and Inductor's best time over it (the bar wants >= 5).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

from benchmarks.floor import measure_copy_bandwidth  # noqa: E402

H, DK, DV = 16, 16, 64
FEATURES = 1 + DK + DK * DK
KV_ENTRIES = ("eager_kv", "inductor_kv", "based_kv")
REC_ENTRIES = ("eager_rec", "inductor_rec", "based_rec")
ENTRIES = KV_ENTRIES + REC_ENTRIES + ("sdpa_d64",)
STEP_KERNEL_ENTRIES = ("flat_bv4", "flat_bv8", "flat_bv16", "flat_bv32", "tiled")
STEP_ENTRIES = ("null", "inductor_kv", "inductor_rec", "based_rec", "based_rec_tiled") + STEP_KERNEL_ENTRIES
MODEL_ENTRIES = ("inductor_kv_cache", "based_kv_cache", "inductor_recurrent", "based_recurrent",
                 "inductor_static", "based_static", "inductor_static_cudagraphs", "based_static_cudagraphs",
                 "inductor_recurrent_cudagraphs", "based_recurrent_cudagraphs")


# ----------------------------------------------------------------------------- the code people write

def taylor(x):
    d = x.shape[-1]
    x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / (math.sqrt(2) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)


def kv_cache_step(q, k, v):                   # q [B, H, 1, Dk] against the cache k [B, H, T, Dk], v [B, H, T, Dv]
    tq, tk = q.shape[2], k.shape[2]
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    a = 1 + s + 0.5 * s ** 2
    causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    a = a.masked_fill(~causal, 0.0)
    return (a @ v) / (a.sum(dim=-1, keepdim=True) + 1e-6)


def recurrent_step(q, k, v, kv_state, k_state):
    phi_q, phi_k = taylor(q), taylor(k)
    kv_state = kv_state + phi_k.transpose(-2, -1) @ v
    k_state = k_state + phi_k
    y = (phi_q @ kv_state) / ((phi_q * k_state).sum(dim=-1, keepdim=True) + 1e-6)
    return y, kv_state, k_state


def sdpa_step(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- floors

def kv_bytes(b, t, dk=DK, dv=DV, h=H, elt=2):
    return elt * b * h * (t * (dk + dv) + dk + dv)


def rec_bytes(b, dk=DK, dv=DV, h=H, elt=2):
    f = 1 + dk + dk * dk
    return elt * b * h * (2 * (f * dv + f) + 2 * dk + 2 * dv)


def sdpa_bytes(b, t, h=H, elt=2):
    return elt * b * h * (t * 128 + 128)


# ----------------------------------------------------------------------------- timing

class Timer:
    """GPU time through a CUDA graph replay with a flushed L2, and the plain call time (CUDA events);
    on the CPU (--dry) both are wall-clock medians."""

    def __init__(self, device, samples: int):
        self.device, self.samples = device, samples
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if self.cuda else None

    def _events(self, fn, before=None) -> float:
        times = []
        for _ in range(self.samples):
            if before is not None:
                before()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def call_ms(self, fn, inner: int = 10) -> float:
        inner = inner if self.cuda else 1           # --dry: the logic, not the time
        def loop():
            for _ in range(inner):
                fn()
        return self._events(loop) / inner

    def gpu_ms(self, fn) -> tuple[float, str]:
        """(ms, how): "graph" (CUDA graph replay, L2 flushed) or "call" when the call cannot be captured."""
        if not self.cuda:
            return self._events(fn), "call"
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            torch.cuda.synchronize()
        except Exception as e:          # noqa: BLE001  (report and fall back: the table says which)
            print(f"    (not capturable in a CUDA graph: {type(e).__name__}: {str(e)[:120]}; timing the call)")
            torch.cuda.synchronize()
            return self._events(fn, self.flush.zero_), "call"
        ms = self._events(graph.replay, self.flush.zero_)
        del graph
        return ms, "graph"


# ----------------------------------------------------------------------------- per layer

def based_ops(fn):
    """(fn(), how many based:: operators it ran): a based entry that ran none was not rewritten."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, sum(e.count for e in prof.key_averages() if e.key.startswith("based::"))


def compilers(dry: bool):
    """name -> compile function. --dry: aot_eager for Inductor and the based pass over eager (no codegen)."""
    import based_compile

    if dry:
        based = based_compile.backend(inner="eager")
        return {"inductor": lambda fn, **kw: torch.compile(fn, backend="aot_eager", **kw),
                "based": lambda fn, **kw: torch.compile(fn, backend=based, **kw)}
    return {"inductor": lambda fn, **kw: torch.compile(fn, **kw),
            "based": lambda fn, **kw: torch.compile(fn, backend="based", **kw)}


def layer_benchmark(args, device, timer, bandwidth, results):
    comp = compilers(args.dry)
    # Default dynamism: B and T become dynamic when they change (dynamic=True would also make Dk symbolic;
    # the pass then specialises Dk for the scale q.shape[-1] ** -0.5: tests/test_dynamic_dk.py).
    fns = {"eager_kv": kv_cache_step, "inductor_kv": comp["inductor"](kv_cache_step),
           "based_kv": comp["based"](kv_cache_step),
           "eager_rec": recurrent_step, "inductor_rec": comp["inductor"](recurrent_step),
           "based_rec": comp["based"](recurrent_step), "sdpa_d64": sdpa_step}
    dtype = torch.bfloat16
    torch.manual_seed(0)

    def rand(*shape):                 # made on the device: a 64k cache at B=16 is 10^9 numbers
        return torch.randn(*shape, device=device, dtype=dtype)

    for b in args.batches:
        q, k1, v1 = rand(b, H, 1, DK), rand(b, H, 1, DK), rand(b, H, 1, DV)
        # States as after 256 tokens (sums of phi(k) v^T and phi(k)), so the readout is a weighted
        # mean of values like the real one, not a cancellation of unrelated random numbers.
        phi = taylor(rand(b, H, 256, DK).float())
        kv_state = (phi.transpose(-2, -1) @ rand(b, H, 256, DV).float()).to(dtype)
        k_state = phi.sum(2, keepdim=True).to(dtype)
        q64 = rand(b, H, 1, 64)
        for t in args.contexts:
            k, v = rand(b, H, t, DK), rand(b, H, t, DV)
            k64, v64 = rand(b, H, t, 64), rand(b, H, t, 64)
            calls = {name: (lambda f=fns[name]: f(q, k, v)) for name in KV_ENTRIES}
            calls.update({name: (lambda f=fns[name]: f(q, k1, v1, kv_state, k_state)) for name in REC_ENTRIES})
            calls["sdpa_d64"] = lambda: sdpa_step(q64, k64, v64)
            floors = {**{n: kv_bytes(b, t) for n in KV_ENTRIES}, **{n: rec_bytes(b) for n in REC_ENTRIES},
                      "sdpa_d64": sdpa_bytes(b, t)}
            with torch.no_grad():
                ref = kv_cache_step(q.double(), k.double(), v.double())
                ref_rec = recurrent_step(q.double(), k1.double(), v1.double(), kv_state.double(), k_state.double())[0]
                for name in args.entries:
                    row = dict(entry=name, B=b, T=t, floor_bytes=floors[name],
                               floor_ms=floors[name] / bandwidth * 1e3)
                    try:
                        out, row["based_ops"] = based_ops(calls[name])   # compiles; the values are checked
                        out = out[0] if isinstance(out, tuple) else out
                        if name.startswith("based") and not row["based_ops"]:
                            raise RuntimeError("backend='based' did not rewrite the step (no based:: operator ran)")
                        if name != "sdpa_d64":
                            want = ref if name in KV_ENTRIES else ref_rec
                            row["rel_err"] = ((out.double() - want).norm() / want.norm()).item()
                        row["ms"], row["timing"] = timer.gpu_ms(calls[name])
                        row["call_ms"] = timer.call_ms(calls[name])
                        row["over_floor"] = row["ms"] / row["floor_ms"]
                        row["status"] = "ok"
                    except torch.OutOfMemoryError:
                        row["status"] = "OOM"
                    except Exception as e:              # noqa: BLE001  (a failed entry is reported, not fatal)
                        row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                    results.append(row)
                    if row["status"] == "ok":
                        print(f"  B={b:2d} T={t:6d} {name:13s} {row['ms']:8.4f} ms ({row['timing']}), "
                              f"call {row['call_ms']:8.4f} ms, floor {row['floor_ms']:.4f} ms, "
                              f"x{row['over_floor']:.1f}, rel err {row.get('rel_err', float('nan')):.1e}", flush=True)
                    else:
                        print(f"  B={b:2d} T={t:6d} {name:13s} {row['status']}", flush=True)
            del k, v, k64, v64, calls
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the step alone

def _step_kernel_call(name, q, k, v, kv_state, k_state):
    """A direct call of the step kernel for entry ``name`` ("flat_bvN" or "tiled")."""
    from based_compile.kernels import recurrent_step as step_kernel

    factors = (1.0, DK ** -0.25, 1 / (math.sqrt(2) * math.sqrt(DK)))           # taylor()'s
    variant, block_v = ("tiled", None) if name == "tiled" else ("flat", int(name.removeprefix("flat_bv")))
    return lambda: step_kernel.recurrent_step(q, k, v, kv_state, k_state, ("const:1", "linear", "outer"),
                                              factors, factors, True, 1e-6, variant=variant, block_v=block_v)


def _with_step_kernel(setting, fn):
    """fn run with ``based_compile.config.step_kernel = setting`` (the operator reads it per call; a
    CUDA graph keeps the kernel the call launched when it was captured)."""
    from based_compile import config

    def call():
        old, config.step_kernel = config.step_kernel, setting
        try:
            return fn()
        finally:
            config.step_kernel = old
    return call


def step_benchmark(args, device, timer, bandwidth, results):
    comp = compilers(args.dry)
    inductor_kv, inductor_rec = comp["inductor"](kv_cache_step), comp["inductor"](recurrent_step)
    based_rec = comp["based"](recurrent_step)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    t = args.contexts[0]

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    for b in args.batches:
        q, k1, v1 = rand(b, H, 1, DK), rand(b, H, 1, DK), rand(b, H, 1, DV)
        phi = taylor(rand(b, H, 256, DK).float())           # states as after 256 tokens (layer_benchmark's)
        kv_state = (phi.transpose(-2, -1) @ rand(b, H, 256, DV).float()).to(dtype)
        k_state = phi.sum(2, keepdim=True).to(dtype)
        k, v = rand(b, H, t, DK), rand(b, H, t, DV)
        one = torch.zeros(1, device=device)
        calls = {"null": lambda: one.add_(1), "inductor_kv": lambda: inductor_kv(q, k, v),
                 "inductor_rec": lambda: inductor_rec(q, k1, v1, kv_state, k_state),
                 "based_rec": _with_step_kernel("auto", lambda: based_rec(q, k1, v1, kv_state, k_state)),
                 "based_rec_tiled": _with_step_kernel("tiled", lambda: based_rec(q, k1, v1, kv_state, k_state))}
        calls.update({name: _step_kernel_call(name, q, k1, v1, kv_state, k_state) for name in STEP_KERNEL_ENTRIES})
        with torch.no_grad():
            ref_kv = kv_cache_step(q.double(), k.double(), v.double())
            ref_rec = recurrent_step(q.double(), k1.double(), v1.double(), kv_state.double(), k_state.double())[0]
            for name in args.step_entries:
                floor = 0 if name == "null" else kv_bytes(b, t) if name == "inductor_kv" else rec_bytes(b)
                row = dict(entry=name, B=b, T=t, floor_bytes=floor, floor_ms=floor / bandwidth * 1e3)
                try:
                    out, row["based_ops"] = based_ops(calls[name])
                    if name.startswith("based") and not row["based_ops"]:
                        raise RuntimeError("backend='based' did not rewrite the step (no based:: operator ran)")
                    if name != "null":
                        out = out[0] if isinstance(out, tuple) else out
                        want = ref_kv if name == "inductor_kv" else ref_rec
                        row["rel_err"] = ((out.double() - want).norm() / want.norm()).item()
                    row["ms"], row["timing"] = timer.gpu_ms(calls[name])
                    row["call_ms"] = timer.call_ms(calls[name])
                    row["over_floor"] = row["ms"] / row["floor_ms"] if floor else None
                    row["status"] = "ok"
                except Exception as e:              # noqa: BLE001  (a failed entry is reported, not fatal)
                    row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                results.append(row)
                if row["status"] == "ok":
                    print(f"  B={b:2d} {name:16s} {row['ms'] * 1e3:8.2f} us ({row['timing']}), "
                          f"call {row['call_ms'] * 1e3:8.2f} us" + (f", x{row['over_floor']:.1f} its floor, "
                          f"rel err {row['rel_err']:.1e}" if floor else ""), flush=True)
                else:
                    print(f"  B={b:2d} {name:16s} {row['status']}", flush=True)
        del k, v, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()


def print_step_table(data):
    print("\nrecurrent step per layer (H=16, Dk=16, Dv=64, bf16): GPU us per decode step; 'x floor': over "
          "the bytes it must move at the measured copy bandwidth; 'Inductor / it': min(inductor_rec, "
          f"inductor_kv at T={data['results'][0]['T'] if data['results'] else '?'}) over its time (bar: >= 5)")
    for b in sorted({r["B"] for r in data["results"]}):
        rows = {r["entry"]: r for r in data["results"] if r["B"] == b}
        ok = {e: r["ms"] for e, r in rows.items() if r["status"] == "ok"}
        inductor = min([ok[e] for e in ("inductor_rec", "inductor_kv") if e in ok], default=None)
        print(f"| B={b} | us | x floor | Inductor / it |")
        for e, r in rows.items():
            if r["status"] != "ok":
                print(f"| {e} | {r['status']} | | |")
                continue
            floor = "" if r["over_floor"] is None else f"{r['over_floor']:.1f}"
            bar = "" if inductor is None else f"{inductor / r['ms']:.2f}"
            print(f"| {e} | {r['ms'] * 1e3:.2f} | {floor} | {bar} |")


# ----------------------------------------------------------------------------- whole model

def synthetic_caches(model, b, context, mode, device, dtype):
    """Per layer (conv cache, attention cache) as after ``context`` tokens (``mode`` "kv_cache": K and V
    of that length; "recurrent": the states of 256 random tokens, the values do not change the speed)."""
    caches = []
    for block in model.blocks:
        attn = block.attn
        conv = None
        if block.conv is not None:
            size = block.conv.conv.kernel_size[0]
            conv = torch.randn(b, size - 1, model.embed.embedding_dim, device=device, dtype=dtype)
        if mode == "kv_cache":
            cache = (torch.randn(b, attn.n_kv_heads, context, attn.feature_dim, device=device, dtype=dtype),
                     torch.randn(b, attn.n_kv_heads, context, attn.head_dim, device=device, dtype=dtype))
        else:
            phi = taylor(torch.randn(b, attn.n_heads, 256, attn.feature_dim, device=device))
            v = torch.randn(b, attn.n_heads, 256, attn.head_dim, device=device)
            cache = ((phi.transpose(-2, -1) @ v).to(dtype), phi.sum(2, keepdim=True).to(dtype))
        caches.append((conv, cache))
    return caches


def _clone(caches):
    return [(None if c is None else c.clone(), tuple(x.clone() for x in a)) for c, a in caches]


def model_entry(name):
    """(mode, cudagraphs) of a whole-model entry: mode "kv_cache", "recurrent" (functional caches, new
    tensors every token) or "static" (examples/generate.py's StaticCache, written in place)."""
    mode = "kv_cache" if "kv_cache" in name else "static" if "static" in name else "recurrent"
    return mode, name.endswith("_cudagraphs")


class Decoder:
    """One entry's greedy decode loop, as a server writes it for that mode.

    kv_cache / recurrent: ``logits, caches = step(token, caches, mode)``, ``token = argmax``; under CUDA
    graphs (recurrent only) every cache is cloned after the call, because the next replay overwrites
    the graph's outputs. static: ``logits = step(token, cache)`` with ``cache`` a StaticCache (every
    state written in place by the graph) and ``token`` a static buffer the argmax writes into: per
    token, ``cudagraph_mark_step_begin()`` (under CUDA graphs), the compiled call, one argmax."""

    def __init__(self, model, step, mode, graphs, caches, token):
        from generate import StaticCache

        self.step, self.mode, self.graphs = step, mode, graphs
        if mode == "static":
            self.cache = StaticCache(model, token.shape[0], token.device).load_(caches)
            self.token = token.clone()
            torch._dynamo.mark_static_address(self.token)
        else:
            self.caches, self.token = caches, token.clone()

    def __call__(self):
        """One token; returns its logits (valid until the next call)."""
        if self.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if self.mode == "static":
            logits = self.step(self.token, self.cache)
            torch.argmax(logits[:, -1], dim=-1, keepdim=True, out=self.token)
            return logits
        logits, caches = self.step(self.token, self.caches, self.mode)
        self.caches = _clone(caches) if self.graphs else caches
        self.token = logits[:, -1].argmax(-1, keepdim=True)
        return logits


def device_ms_per_token(decode, steps, device, host_ms):
    """(GPU ms per token with the host out of the way, whether that held). A sleep kernel holds the
    stream while the host queues ``steps`` tokens; CUDA events after the sleep and after the last token
    then time the GPU's own work, back to back. It held if the sleep was still running when the host
    had queued them all (else the host, or a synchronisation in the loop, set the pace: the number is
    then no better than the wall time). On the CPU: (None, False)."""
    if device.type != "cuda":
        return None, False
    probe_s, probe_e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_s.record()
    torch.cuda._sleep(10_000_000)
    probe_e.record()
    torch.cuda.synchronize()
    cycles_per_ms = 10_000_000 / max(probe_s.elapsed_time(probe_e), 1e-3)
    sleep_ms = 2 * steps * host_ms + 20
    for _ in range(4):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(int(sleep_ms * cycles_per_ms))
        start.record()
        for _ in range(steps):
            decode()
        end.record()
        ahead = not start.query()          # the sleep (before ``start``) was still running
        torch.cuda.synchronize()
        if ahead:
            return start.elapsed_time(end) / steps, True
        sleep_ms *= 4
    return start.elapsed_time(end) / steps, False


def model_benchmark(args, device, results, info):
    from generate import GenerativeBasedLM
    import based_compile

    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = GenerativeBasedLM(256, d_model=args.model_d, n_layers=args.model_layers, n_heads=args.model_heads,
                              feature_dim=DK, max_len=args.model_context + 4 * args.model_steps + 16)
    model = model.to(device, dtype).eval()
    b = args.model_batch
    info.update(d_model=args.model_d, layers=args.model_layers, heads=args.model_heads, feature_dim=DK,
                context=args.model_context, steps=args.model_steps, batch=b,
                params=sum(p.numel() for p in model.parameters()))
    inner = based_compile.backend(inner="eager") if args.dry else "based"
    for name in args.model_entries:
        mode, graphs = model_entry(name)
        kw = dict(mode="reduce-overhead") if graphs and not args.dry else {}
        backend = inner if name.startswith("based") else ("aot_eager" if args.dry else "inductor")
        torch._dynamo.reset()
        fn = model.forward_static if mode == "static" else model.forward_with_cache
        step = torch.compile(fn, backend=backend, **kw)
        row = dict(entry=name, mode=mode, cudagraphs=graphs, context=args.model_context, B=b)
        try:
            with torch.no_grad():
                torch.manual_seed(1)
                caches = synthetic_caches(model, b, args.model_context, "kv_cache" if mode == "kv_cache"
                                          else "recurrent", device, dtype)
                token = torch.randint(0, 256, (b, 1), device=device)
                # eager's logits for the first token, from the same caches (the check that the entry
                # computes the model: bf16 either way)
                if mode == "static":
                    ref = Decoder(model, model.forward_static, mode, False, _clone(caches), token)()
                else:
                    ref = model.forward_with_cache(token, _clone(caches), mode)[0]
                ref = ref.double()
                decode = Decoder(model, step, mode, graphs, caches, token)
                start = time.perf_counter()
                logits, row["based_ops"] = based_ops(decode)
                row["rel_err"] = ((logits.double() - ref).norm() / ref.norm()).item()
                if name.startswith("based") and not row["based_ops"]:
                    raise RuntimeError("backend='based' did not rewrite the model's attention (no based:: operator ran)")
                for _ in range(2):                       # compiles (twice for a growing cache), records graphs
                    decode()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                row["warmup_s"] = time.perf_counter() - start
                start = time.perf_counter()
                for _ in range(args.model_steps):
                    decode()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                ms = seconds / args.model_steps * 1e3
                row.update(tokens_per_s=b * args.model_steps / seconds, ms=ms)
                row["gpu_ms"], row["gpu_timed"] = device_ms_per_token(decode, args.model_steps, device, ms)
                # host-bound: the GPU would finish a token in well under the time the loop takes
                row["host_bound"] = None if row["gpu_ms"] is None else bool(row["gpu_ms"] < 0.8 * ms)
            row["status"] = "ok"
            gpu = "" if row["gpu_ms"] is None else (
                f", GPU {row['gpu_ms']:.3f} ms/token{'' if row['gpu_timed'] else ' (host kept pace: not isolated)'}"
                f"{', host-bound' if row['host_bound'] else ''}")
            print(f"  model {name:30s} {row['tokens_per_s']:9.1f} tokens/s ({row['ms']:.3f} ms/token{gpu}; "
                  f"rel err {row['rel_err']:.1e}; compile+warm-up {row['warmup_s']:.1f} s)", flush=True)
        except Exception as e:              # noqa: BLE001
            row["status"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            print(f"  model {name:30s} {row['status']}", flush=True)
        results.append(row)
        del step
        torch._dynamo.reset()


# ----------------------------------------------------------------------------- report

def print_table(data):
    rows = {(r["entry"], r["B"], r["T"]): r for r in data["results"]}
    keys = sorted({(r["B"], r["T"]) for r in data["results"]})
    entries = [e for e in ENTRIES if any(r["entry"] == e for r in data["results"])]
    print("\nper layer (H=16, Dk=16, Dv=64, bf16): GPU ms per decode step (x its floor)")
    print("| B | T | " + " | ".join(entries) + " |")
    for b, t in keys:
        cells = []
        for e in entries:
            r = rows.get((e, b, t))
            cells.append("–" if r is None else r["status"] if r["status"] != "ok"
                         else f"{r['ms']:.4f} (x{r['over_floor']:.1f})")
        print(f"| {b} | {t} | " + " | ".join(cells) + " |")
    if data.get("model_results"):
        print_model_table(data)


def print_model_table(data):
    m = data["model"]
    print(f"\nwhole model ({m['layers']} layers, d_model {m['d_model']}, {m['heads']} heads, bf16, "
          f"B={m.get('batch', 1)}, context {m['context']}): tokens/s, wall ms per token, GPU ms per token "
          "(the host out of the way; '*': not isolated), host-bound when GPU < 0.8 x wall")
    for r in data["model_results"]:
        if r["status"] != "ok":
            print(f"  {r['entry']:30s} {r['status']}")
            continue
        gpu = "–" if r.get("gpu_ms") is None else f"{r['gpu_ms']:.3f}" + ("" if r.get("gpu_timed") else "*")
        print(f"  {r['entry']:30s} {r['tokens_per_s']:9.1f} {r['ms']:8.3f} {gpu:>9s}"
              + ("  host-bound" if r.get("host_bound") else ""))


def plot(data, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    batches = sorted({r["B"] for r in data["results"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for e in ENTRIES:
            pts = sorted((r["T"], r["ms"]) for r in data["results"] if r["entry"] == e and r["B"] == b
                         and r["status"] == "ok")
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=e,
                        linestyle="--" if e.startswith("eager") or e.startswith("sdpa") else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("GPU ms per decode step (one layer)")
        ax.set_title(f"B={b}, H=16, Dk=16, Dv=64, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(f"{data['device']}, {data['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="contexts 1k and 32k, fewer samples")
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (eager inner compilers): logic only")
    p.add_argument("--contexts", default=None, help="comma-separated (default 1024,8192,32768,65536)")
    p.add_argument("--batches", default=None, help="comma-separated (default 1,16; --step-only: 1,16,64)")
    p.add_argument("--entries", default=",".join(ENTRIES))
    p.add_argument("--model-entries", default=",".join(MODEL_ENTRIES), help="'' skips the whole-model part")
    p.add_argument("--model-only", action="store_true",
                   help="only the whole-model part (OUT/generate_model.json; the README table reads generate.json)")
    p.add_argument("--model-batch", type=int, default=1, help="the whole model's batch (default 1)")
    p.add_argument("--model-context", type=int, default=None, help="the whole model's context (default 32768)")
    p.add_argument("--model-steps", type=int, default=None, help="timed tokens per whole-model entry (default 50)")
    p.add_argument("--samples", type=int, default=None)
    p.add_argument("--step-only", action="store_true",
                   help="only the per-layer recurrent step: Inductor, based, the step kernels (OUT/generate_step.json)")
    p.add_argument("--step-entries", default=",".join(STEP_ENTRIES))
    args = p.parse_args(argv)
    args.entries = [e for e in args.entries.split(",") if e]
    args.step_entries = [e for e in args.step_entries.split(",") if e]
    for e in args.step_entries:
        if e not in STEP_ENTRIES:
            p.error(f"--step-entries: unknown {e!r}; choose from {STEP_ENTRIES}")
    args.model_entries = [e for e in args.model_entries.split(",") if e]
    for e in args.entries:
        if e not in ENTRIES:
            p.error(f"--entries: unknown {e!r}; choose from {ENTRIES}")
    for e in args.model_entries:
        if e not in MODEL_ENTRIES:
            p.error(f"--model-entries: unknown {e!r}; choose from {MODEL_ENTRIES}")
    if args.contexts is None:
        args.contexts = ("64" if args.dry else "1024") if args.step_only else \
            "64,300" if args.dry else "1024,32768" if args.quick else "1024,8192,32768,65536"
    args.contexts = [int(x) for x in args.contexts.split(",")]
    if args.batches is None:
        args.batches = "1,2" if args.dry else "1,16,64" if args.step_only else "1,16"
    args.batches = [int(x) for x in args.batches.split(",")]
    args.samples = args.samples or (3 if args.dry else 7 if args.quick else 15)
    if args.model_only and args.step_only:
        p.error("--model-only and --step-only exclude each other")
    if args.model_only and not args.model_entries:
        p.error("--model-only needs --model-entries")
    for name in ("model_batch", "model_context", "model_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.model_context = args.model_context or (200 if args.dry else 32768)
    args.model_steps = args.model_steps or (3 if args.dry else 20 if args.quick else 50)
    args.model_d, args.model_layers, args.model_heads = (64, 1, 4) if args.dry else (1024, 4, 16)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for the GPU (--dry checks its logic on the CPU)")
    for limit in ("cache_size_limit", "recompile_limit"):       # the name changed across torch versions
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    if device.type == "cuda":
        bandwidth = measure_copy_bandwidth()
        device_name = torch.cuda.get_device_name()
    else:
        bandwidth = 50e9            # --dry: a nominal figure, the ratios mean nothing
        device_name = "cpu (dry run)"
    print(f"{device_name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    data = dict(device=device_name, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                torch=torch.__version__, triton=triton_version,
                command=os.environ.get("BENCH_COMMAND") or "python " + " ".join(["benchmarks/generate.py"] + sys.argv[1:]),
                config=dict(H=H, Dk=DK, Dv=DV, dtype="bfloat16", samples=args.samples, dry=args.dry),
                ceilings=dict(copy_bytes_per_s=bandwidth), results=[], model={}, model_results=[])
    timer = Timer(device, args.samples)
    if args.step_only:
        print("the recurrent step per layer:", flush=True)
        step_benchmark(args, device, timer, bandwidth, data["results"])
        data["seconds"] = time.perf_counter() - begin
        (out / "generate_step.json").write_text(json.dumps(data, indent=1))
        print_step_table(data)
        print(f"\nwrote {out / 'generate_step.json'} after {data['seconds']:.0f} s")
        return data
    if args.model_only:
        del timer
        print(f"whole model, context {args.model_context}:", flush=True)
        model_benchmark(args, device, data["model_results"], data["model"])
        data["seconds"] = time.perf_counter() - begin
        (out / "generate_model.json").write_text(json.dumps(data, indent=1))
        print_model_table(data)
        print(f"\nwrote {out / 'generate_model.json'} after {data['seconds']:.0f} s")
        return data
    print("per layer:", flush=True)
    layer_benchmark(args, device, timer, bandwidth, data["results"])
    del timer
    if args.model_entries:
        print(f"whole model, context {args.model_context}:", flush=True)
        model_benchmark(args, device, data["model_results"], data["model"])
    data["seconds"] = time.perf_counter() - begin
    (out / "generate.json").write_text(json.dumps(data, indent=1))
    print_table(data)
    print(f"\nwrote {out / 'generate.json'} after {data['seconds']:.0f} s")
    plot(data, out / "generate.png")
    return data


if __name__ == "__main__":
    main()
