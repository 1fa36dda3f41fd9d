"""The ``based::attention`` operator against the Triton kernels called directly (issue 4, on CUDA).

At the reference configuration (../shared/DESIGN.md section 4: B=16, H=16, Dk=16, Dv=64, bf16, causal),
for each T: the forward (inference) and forward+backward (training) time of
``based_compile.ops.based_attention`` in eager mode, of the same under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs), and of the best kernel called directly
(``parallel_based`` / ``fused_chunk_based``), all in one run, with the ratio op / best kernel.

    python benchmarks/op_vs_kernel.py                       # T = 1024 .. 16384
    python benchmarks/op_vs_kernel.py --lengths 2048 --batch 4
"""
from __future__ import annotations

import argparse

import torch
import triton.testing

from based_compile import BasedSpec, based_attention, policy
from based_compile.kernels import fused_chunk_based, parallel_based


def bench_ms(fn) -> float:
    for _ in range(3):              # compile, autotune and record CUDA graphs before do_bench sizes its loop
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dk", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dtype, dev = torch.bfloat16, "cuda"
    spec = BasedSpec(scale=a.dk ** -0.5)
    kernels = {"parallel": parallel_based, "fused_chunk": fused_chunk_based}
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"B={a.batch} H={a.heads} Dk={a.dk} Dv={a.dv} bf16 causal; median ms (triton.testing.do_bench)")
    print(f"{'T':>6} {'mode':>9} {'op':>8} {'op+graphs':>10} " + " ".join(f"{n:>11}" for n in kernels)
          + f" {'op/best':>8}  policy")
    for t in (int(x) for x in a.lengths.split(",")):
        q, k, v = (torch.randn(a.batch, a.heads, t, d, device=dev, dtype=dtype) for d in (a.dk, a.dk, a.dv))
        for training in (False, True):
            for x in (q, k, v):
                x.requires_grad_(training)
            do = torch.randn(a.batch, a.heads, t, a.dv, device=dev, dtype=dtype)

            def run(fn):
                if not training:
                    with torch.no_grad():
                        return lambda: fn(q, k, v)
                return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)

            op = bench_ms(run(lambda q, k, v: based_attention(q, k, v, spec)))
            torch._dynamo.reset()
            graphed = torch.compile(lambda q, k, v: based_attention(q, k, v, spec), mode="reduce-overhead",
                                    fullgraph=True)
            op_graphs = bench_ms(run(graphed))
            direct = {}
            for name, fn in kernels.items():
                try:
                    direct[name] = bench_ms(run(lambda q, k, v, fn=fn: fn(q, k, v, spec.scale)))
                except torch.OutOfMemoryError:
                    direct[name] = float("nan")
            best = min(x for x in direct.values() if x == x)
            with torch.set_grad_enabled(training):
                chosen = policy.describe(spec, q, k, v, policy.is_training(q, k, v))
            mode = "fwd+bwd" if training else "fwd"
            print(f"{t:>6} {mode:>9} {op:>8.3f} {op_graphs:>10.3f} "
                  + " ".join(f"{direct[n]:>11.3f}" for n in kernels) + f" {op / best:>8.3f}  {chosen}")


if __name__ == "__main__":
    main()
