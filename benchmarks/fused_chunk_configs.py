"""Block-configuration timings for tuning the fused-chunk kernel (the issue-3 benchmark is benchmarks/kernels.py).

One run on the GPU: the two ceilings (copy bandwidth, bf16 matmul rate), then at the reference
configuration (B=16, H=16, Dk=16, Dv=64, bf16, causal, normalised) the forward of several block
configurations of ours next to fla-core's kernels and our parallel kernel, then forward+backward.
Prints a table last and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
from triton.testing import do_bench

from based_compile.kernels import fused_chunk
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.fused_chunk import FusedChunkConfig

B, H, DK, DV = 16, 16, 16, 64
FWD_CONFIGS = [FusedChunkConfig(bt, bv, w, s) for bt, bv, w, s in [(64, 32, 4, 1), (64, 64, 4, 1)]]
# backward: BT <= 32 (BT=64 miscompiled on Triton 3.6, see backward_config)
BWD_CONFIGS = [FusedChunkConfig(bt, bv, w, s) for bt, bv, w, s in [
    (32, 32, 4, 1), (32, 64, 4, 1), (32, 64, 8, 1), (16, 32, 4, 1), (32, 16, 4, 1), (16, 64, 4, 1)]]


def ms(fn) -> float:
    return do_bench(fn, warmup=50, rep=200, return_mode="median")


def ceilings() -> dict:
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_s = ms(lambda: y.copy_(x)) * 1e-3
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = ms(lambda: a @ a) * 1e-3
    return {"copy_GBps": 2 * x.numel() / copy_s / 1e9, "bf16_TFLOPs": 2 * 8192 ** 3 / mm_s / 1e12}


def floor_ms(t: int, ceil: dict, chunk: int = 64) -> float:
    tokens = B * H * t
    bytes_ = 2 * (DK + DK + DV + DV) * tokens
    flops = (4 * (1 + DK + DK * (DK + 1) // 2) * DV + 2 * chunk * (DK + DV)) * tokens
    return 1e3 * max(bytes_ / (ceil["copy_GBps"] * 1e9), flops / (ceil["bf16_TFLOPs"] * 1e12))


def compiled_kernel_report() -> list:
    rows = []
    for fn in (fused_chunk._fused_chunk_fwd_kernel, fused_chunk._fused_chunk_bwd_dq_kernel,
               fused_chunk._fused_chunk_bwd_dkv_kernel):
        try:
            for cache in fn.device_caches.values():
                for kern in cache[0].values():
                    c = kern.metadata.constants if hasattr(kern.metadata, "constants") else {}
                    rows.append({"kernel": fn.__name__, "n_regs": kern.n_regs, "n_spills": kern.n_spills,
                                 "num_warps": kern.metadata.num_warps, "shared": kern.metadata.shared,
                                 "constants": str(c)[:200]})
        except Exception as e:  # the cache layout differs between Triton versions
            rows.append({"kernel": fn.__name__, "error": repr(e)})
    return rows


def parse_configs(text: str) -> list:
    """"bt:bv:warps[:stages]" entries separated by commas."""
    out = []
    for item in text.split(","):
        f = [int(x) for x in item.split(":")]
        out.append(FusedChunkConfig(f[0], f[1], f[2], f[3] if len(f) > 3 else 1))
    return out


def probe(spec: str, t: int) -> None:
    """One backward launch (spec "which:bt:bv:warps", which in dq/dkv/all) vs float64."""
    from based_compile.kernels.naive import naive_chunk_based
    which, bt, bv, w = spec.split(":")[:4]
    cfg = FusedChunkConfig(int(bt), int(bv), int(w), 1)

    class Skip:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    if which == "dq":
        fused_chunk._fused_chunk_bwd_dkv_kernel = Skip()
    if which == "dkv":
        fused_chunk._fused_chunk_bwd_dq_kernel = Skip()
    q, k = (torch.randn(2, t, 4, DK, device="cuda").to(torch.bfloat16) for _ in range(2))
    v, do = (torch.randn(2, t, 4, DV, device="cuda").to(torch.bfloat16) for _ in range(2))
    args = check_arguments(q, k, v, layout="BTHD")
    o, z = fused_chunk._forward(q, k, v, args, cfg)
    grads = fused_chunk._backward(q, k, v, o, z, do, args, cfg)
    torch.cuda.synchronize()
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = naive_chunk_based(qd, kd, vd, layout="BTHD")
    rg = torch.autograd.grad(ref, (qd, kd, vd), do.double())
    err = [((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, rg)]
    print(f"PROBE {spec} T={t} o={((o.double() - ref).norm() / ref.norm()).item():.2e} "
          f"dq={err[0]:.2e} dk={err[1]:.2e} dv={err[2]:.2e}", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--bwd-lengths", default="1024,4096,8192")
    p.add_argument("--fwd-configs", default=None)
    p.add_argument("--bwd-configs", default=None)
    p.add_argument("--probe", default=None, help="which:bt:bv:warps")
    p.add_argument("--probe-t", type=int, default=1000)
    p.add_argument("--probes", default=None, help="several probes, each in its own process")
    a = p.parse_args()
    if a.probe:
        return probe(a.probe, a.probe_t)
    if a.probes:
        for spec in a.probes.split(","):
            r = subprocess.run([sys.executable, __file__, "--probe", spec, "--probe-t", str(a.probe_t)],
                               capture_output=True, text=True, timeout=40)
            lines = [x for x in (r.stdout + r.stderr).splitlines() if "PROBE" in x or "Error" in x]
            print(f"probe {spec}: rc={r.returncode}", *lines[-3:], flush=True)
        return
    global FWD_CONFIGS, BWD_CONFIGS
    FWD_CONFIGS = parse_configs(a.fwd_configs) if a.fwd_configs else FWD_CONFIGS
    BWD_CONFIGS = parse_configs(a.bwd_configs) if a.bwd_configs else BWD_CONFIGS
    torch.backends.cuda.matmul.allow_tf32 = False
    ceil = ceilings()
    print("ceilings", ceil, torch.cuda.get_device_name(), flush=True)
    try:
        from fla.ops.based import fused_chunk_based as fla_fused, parallel_based as fla_parallel
    except Exception as e:
        print("fla-core not importable:", e)
        fla_fused = fla_parallel = None
    try:
        from based_compile.kernels import parallel_based as our_parallel
    except Exception:
        our_parallel = None
    results = {"ceilings": ceil, "device": torch.cuda.get_device_name(), "fwd": [], "fwdbwd": []}
    table = []
    for t in [int(x) for x in a.lengths.split(",") if x != "none"]:
        g = torch.Generator(device="cuda").manual_seed(t)
        q, k = (torch.randn(B, t, H, DK, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2))
        v = torch.randn(B, t, H, DV, device="cuda", generator=g).to(torch.bfloat16)
        args = check_arguments(q, k, v, layout="BTHD")
        row = {"T": t, "floor_ms": floor_ms(t, ceil)}
        ref = None
        if fla_fused is not None:
            ref = fla_parallel(q, k, v) if t <= 4096 else fla_fused(q, k, v)
            row["fla_fused_ms"] = ms(lambda: fla_fused(q, k, v))
            row["fla_parallel_ms"] = ms(lambda: fla_parallel(q, k, v))
        if our_parallel is not None:
            try:
                row["our_parallel_ms"] = ms(lambda: our_parallel(q, k, v, layout="BTHD"))
            except Exception as e:
                row["our_parallel_error"] = repr(e)[:200]
        for cfg in FWD_CONFIGS:
            name = f"fc_bt{cfg.bt}_bv{cfg.bv}_w{cfg.num_warps}_s{cfg.num_stages}"
            try:
                o, _ = fused_chunk._forward(q, k, v, args, cfg)
                if ref is not None:
                    row[name + "_err_vs_fla"] = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                row[name + "_ms"] = ms(lambda: fused_chunk._forward(q, k, v, args, cfg))
            except Exception as e:
                row[name + "_error"] = repr(e)[:300]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fused_chunk.fused_chunk_forward(q, k, v, args)
        row["fc_default_peak_extra_MB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        best = min((val, key) for key, val in row.items() if key.startswith("fc_") and key.endswith("_ms"))
        fla_best = min(row.get("fla_fused_ms", float("inf")), row.get("fla_parallel_ms", float("inf")))
        table.append((t, best[1], best[0], row["floor_ms"], row.get("fla_fused_ms"), row.get("fla_parallel_ms"),
                      row.get("our_parallel_ms"), fla_best / best[0]))
        results["fwd"].append(row)
        print(json.dumps(row), flush=True)
    bwd_table = []
    for t in [int(x) for x in a.bwd_lengths.split(",")]:
        q, k = (torch.randn(B, t, H, DK, device="cuda").to(torch.bfloat16) for _ in range(2))
        v, do = (torch.randn(B, t, H, DV, device="cuda").to(torch.bfloat16) for _ in range(2))
        args = check_arguments(q, k, v, layout="BTHD")
        row = {"T": t}
        o, z = fused_chunk.fused_chunk_forward(q, k, v, args)
        ref_grads = fused_chunk.fused_chunk_backward(q, k, v, o, z, do, args)
        fwd_ms = ms(lambda: fused_chunk.fused_chunk_forward(q, k, v, args))
        for cfg in BWD_CONFIGS:
            name = f"bwd_bt{cfg.bt}_bv{cfg.bv}_w{cfg.num_warps}_s{cfg.num_stages}"
            try:
                grads = fused_chunk._backward(q, k, v, o, z, do, args, cfg)
                diff = max(((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in zip(grads, ref_grads))
                row[name + "_diff_vs_default"] = diff
                if not diff < 2e-2:
                    continue
                row[name + "_ms"] = ms(lambda: fused_chunk._backward(q, k, v, o, z, do, args, cfg))
            except Exception as e:
                row[name + "_error"] = repr(e)[:300]
        best = min((val, key) for key, val in row.items() if key.startswith("bwd_") and key.endswith("_ms"))
        row["fc_fwd_ms"] = fwd_ms
        if fla_fused is not None:
            for name, fn in (("fla_fused", fla_fused), ("fla_parallel", fla_parallel)):
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

                def step():
                    fn(qg, kg, vg).backward(do)
                row[name + "_fwdbwd_ms"] = ms(step)
        results["fwdbwd"].append(row)
        fla_best = min(row.get("fla_fused_fwdbwd_ms", float("inf")), row.get("fla_parallel_fwdbwd_ms", float("inf")))
        bwd_table.append((t, best[1], fwd_ms + best[0], fla_best, fla_best / (fwd_ms + best[0])))
        print(json.dumps(row), flush=True)
    results["kernels"] = compiled_kernel_report()
    for r in results["kernels"]:
        print(r)
    with open(os.path.join(a.out, "fused_chunk_configs.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'T':>6} {'best fc config':>28} {'fc ms':>8} {'floor':>7} {'fla_fc':>8} {'fla_par':>8} {'our_par':>8} {'fla/fc':>7}")
    for t, name, best, fl, ff, fp, op in [r[:7] for r in table]:
        sp = min(x for x in (ff, fp) if x is not None) / best if (ff or fp) else float("nan")
        print(f"{t:>6} {name:>28} {best:8.3f} {fl:7.3f} {ff or float('nan'):8.3f} {fp or float('nan'):8.3f} "
              f"{op or float('nan'):8.3f} {sp:7.2f}")
    print(f"\n{'T':>6} {'best bwd config':>28} {'fc f+b':>8} {'fla best f+b':>12} {'ratio':>7}")
    for t, name, fb, flb, r in bwd_table:
        print(f"{t:>6} {name:>28} {fb:8.3f} {flb:12.3f} {r:7.2f}")


if __name__ == "__main__":
    main()
