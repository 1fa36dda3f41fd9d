"""Where the CPU path's chunked form overtakes the quadratic one (policy.CPU_CROSSOVERS).

Times ``based_compile.cpu_path`` directly (no operator overhead): the quadratic and the chunked
forward (inference), and forward + backward (training), over T, at the given B, H, Dk, Dv, dtype,
plus the chunked form at a few chunk sizes. Prints one table per mode and the first T from which
the chunked form is faster at every larger T measured.

    python benchmarks/cpu_crossover.py                      # B=1 H=4 Dk=16 Dv=64 float32
    python benchmarks/cpu_crossover.py --heads 16 --dv 128 --threads 2

Measured 2026-11-25 (2-core VM shared with other jobs, load average ~8; one thread, because two
OpenMP threads on an oversubscribed machine make small ops 10-100x slower), best ms of 9:

    python benchmarks/cpu_crossover.py --reps 9 --threads 1 --lengths 128,192,256,320,384,448,512,640,768,1024

    B=1 H=4 Dk=16 Dv=64 float32
    inference     T:  128   256   384   512   640   768  1024
      quadratic      0.19  0.76  3.49  9.88 17.89 30.33 80.11
      chunk 64       1.10  2.04  7.98  7.96  5.65 10.71 17.55
    training      T:  128   256   384   512   640   768  1024
      quadratic      0.72  2.77 10.34 24.91 132.2 227.6 234.0
      chunk 64       3.80 10.62 23.70 68.19 99.61 36.17 85.84

    same with --heads 16
    inference     T:  128   256   384   512   640   768  1024
      quadratic      1.03 22.78 101.4  82.4 131.1 155.5 191.2
      chunk 64      17.14 42.62 61.38 37.00 52.78 36.87 46.00
    training      T:  128   256   384   512   640   768  1024
      quadratic      3.12 14.52 66.18 151.7 295.9 744.5  1259
      chunk 64      19.70 56.38 112.4 168.8 258.3 332.7 516.7

Chunked faster from T=512 / 384 (inference, H=4 / 16) and T=640 (training): policy.CPU_CROSSOVERS
uses 512 and 640. Chunk sizes 64 and 128 are within noise of each other; cpu_path.CHUNK_SIZE = 64.
"""
from __future__ import annotations

import argparse
import time

import torch

from based_compile.op import cpu_path
from based_compile.kernels.arguments import check_arguments


def best_seconds(fn, reps: int) -> float:
    """The fastest of ``reps`` calls after a warm-up: robust to other work on a shared machine."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(b, h, t, dk, dv, dtype, training: bool, form: str, chunk_size: int, reps: int) -> float:
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype) for d in (dk, dk, dv))
    args = check_arguments(q, k, v, dk ** -0.5, (1.0, 1.0, 0.5), True, True, 1e-6, "BHTD")
    do = torch.randn(b, h, t, dv, generator=g).to(dtype)

    def forward():
        if form == "quadratic":
            return cpu_path.quadratic_forward(q, k, v, args)
        return cpu_path.chunked_forward(q, k, v, args, chunk_size)

    def forward_backward():
        o, z = forward()
        if form == "quadratic":
            return cpu_path.quadratic_backward(q, k, v, o, z, do, args)
        return cpu_path.chunked_backward(q, k, v, o, z, do, args, chunk_size)

    with torch.no_grad():
        return best_seconds(forward_backward if training else forward, reps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dk", type=int, default=16)
    p.add_argument("--dv", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--lengths", default="64,128,256,384,512,768,1024,2048,4096")
    p.add_argument("--chunks", default="32,64,128", help="chunk sizes of the chunked form")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    lengths = [int(x) for x in a.lengths.split(",")]
    chunks = [int(x) for x in a.chunks.split(",")]
    print(f"B={a.batch} H={a.heads} Dk={a.dk} Dv={a.dv} {a.dtype} threads={torch.get_num_threads()} "
          f"torch {torch.__version__}; best ms of {a.reps}")
    for training in (False, True):
        mode = "training (forward+backward)" if training else "inference (forward)"
        print(f"\n{mode}\n{'T':>6} {'quadratic':>10} " + " ".join(f"{'chunk' + str(c):>10}" for c in chunks))
        faster = []
        for t in lengths:
            quad = measure(a.batch, a.heads, t, a.dk, a.dv, dtype, training, "quadratic", 0, a.reps)
            chk = [measure(a.batch, a.heads, t, a.dk, a.dv, dtype, training, "chunked", c, a.reps) for c in chunks]
            faster.append(chk[chunks.index(cpu_path.CHUNK_SIZE)] < quad if cpu_path.CHUNK_SIZE in chunks
                          else min(chk) < quad)
            print(f"{t:>6} {quad * 1e3:>10.2f} " + " ".join(f"{x * 1e3:>10.2f}" for x in chk))
        cross = next((t for i, t in enumerate(lengths) if all(faster[i:])), None)
        print(f"chunked (C={cpu_path.CHUNK_SIZE}) faster from T = {cross} on" if cross else
              "chunked never faster at every larger T measured")


if __name__ == "__main__":
    main()
