"""The physical floor of one Based attention call (../shared/DESIGN.md section 4), measured on the device.

Two ceilings measured in the same run as the kernels they judge:
  - copy bandwidth: a large device-to-device copy, counting bytes read plus bytes written;
  - bf16 matmul rate: a large random bf16 matrix product through torch.

Per (batch x head x token), in bf16 (2 bytes an element):
  forward  bytes = 2 * (Dk + Dk + Dv + Dv)                       read q, k, v; write o
           FLOPs = 4 * (1 + Dk + Dk (Dk + 1) / 2) * Dv + 2 * C * (Dk + Dv)   (chunked form, chunk C)
  backward bytes = 2 * ((Dk + Dk + Dv + Dv + Dv) + (Dk + Dk + Dv))   read q, k, v, o, do; write dq, dk, dv
           FLOPs = 2 * forward FLOPs                               (the usual backward ~ 2x forward count)
floor = max(bytes / bandwidth, FLOPs / matmul rate).

Run alone (`python benchmarks/floor.py`) it prints the two ceilings and the reference floors.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Ceilings:
    """Measured device ceilings: copy bandwidth (bytes/s, read + write) and bf16 matmul rate (FLOP/s)."""

    copy_bytes_per_s: float
    bf16_flops_per_s: float
    device: str


def _median_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy (bytes read + bytes written)."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def measure_bf16_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b)
    del a, b
    return 2 * n ** 3 / (ms * 1e-3)


def measure_ceilings() -> Ceilings:
    return Ceilings(measure_copy_bandwidth(), measure_bf16_matmul_rate(), torch.cuda.get_device_name())


def forward_cost(b: int, h: int, t: int, dk: int, dv: int, chunk: int = 64) -> tuple[float, float]:
    """(bytes, FLOPs) of the forward floor for bf16 inputs."""
    tokens = b * h * t
    nbytes = 2 * (dk + dk + dv + dv) * tokens
    flops = (4 * (1 + dk + dk * (dk + 1) / 2) * dv + 2 * chunk * (dk + dv)) * tokens
    return nbytes, flops


def backward_cost(b: int, h: int, t: int, dk: int, dv: int, chunk: int = 64) -> tuple[float, float]:
    """(bytes, FLOPs) of the backward floor for bf16 inputs."""
    tokens = b * h * t
    nbytes = 2 * ((dk + dk + dv + dv + dv) + (dk + dk + dv)) * tokens
    _, fwd_flops = forward_cost(b, h, t, dk, dv, chunk)
    return nbytes, 2 * fwd_flops


def floor_seconds(nbytes: float, flops: float, ceilings: Ceilings) -> float:
    return max(nbytes / ceilings.copy_bytes_per_s, flops / ceilings.bf16_flops_per_s)


def forward_floor(ceilings: Ceilings, b, h, t, dk, dv) -> float:
    return floor_seconds(*forward_cost(b, h, t, dk, dv), ceilings)


def forward_backward_floor(ceilings: Ceilings, b, h, t, dk, dv) -> float:
    fb, ff = forward_cost(b, h, t, dk, dv)
    bb, bf = backward_cost(b, h, t, dk, dv)
    return floor_seconds(fb + bb, ff + bf, ceilings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write floor.json here")
    opts = parser.parse_args()
    c = measure_ceilings()
    print(f"{c.device}: copy {c.copy_bytes_per_s / 1e12:.2f} TB/s, bf16 matmul {c.bf16_flops_per_s / 1e12:.0f} TFLOP/s")
    rows = []
    for t in (1024, 2048, 4096, 8192, 16384):
        f, fb = forward_floor(c, 16, 16, t, 16, 64), forward_backward_floor(c, 16, 16, t, 16, 64)
        rows.append({"T": t, "forward_floor_ms": f * 1e3, "forward_backward_floor_ms": fb * 1e3})
        print(f"T={t:6d}  forward floor {f * 1e3:.3f} ms   fwd+bwd floor {fb * 1e3:.3f} ms")
    if opts.out:
        import os
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "floor.json"), "w") as fh:
            json.dump({"ceilings": asdict(c), "floors": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
