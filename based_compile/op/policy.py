"""Kernel choice for one Based attention call: by device, mode and shape, unless the user forces one.

Kernels: "parallel", "fused_chunk", "chunked" (Triton, CUDA; CPU only under TRITON_INTERPRET=1),
"decode" (Triton, CUDA: Tq <= DECODE_MAX_TQ queries against a longer KV cache, inference) and
"cpu_quadratic", "cpu_chunked" (PyTorch, ``based_compile.cpu_path``), and "pytorch_quadratic",
"pytorch_chunked": the same PyTorch forms on CUDA tensors, for the calls with Tq < Tk that the
decode kernel does not take (more than DECODE_MAX_TQ queries, or training: the decode kernel has
no backward). That fallback is logged once per process at INFO (logger "based_compile") and named
in explain().

Tq < Tk on CUDA, inference, Tq <= DECODE_MAX_TQ: the decode kernel (kernels/decode.py), unless a
kernel is forced. Otherwise the quadratic form costs O(Tq * Tk), the chunked one pads the queries
to Tk; the quadratic form is chosen while Tq is under the crossover of the square table.

B*H over 65535 on CUDA (``kernels.launch.MAX_GRID_ROWS``: the Triton kernels put a program per
(batch, head) on a grid axis that CUDA caps there): the PyTorch form of what the tables pick
(pytorch_quadratic / pytorch_chunked); a forced Triton kernel raises a ValueError naming the limit.

Mode: training when grad mode is on and any of q, k, v requires grad (``is_training``), else
inference. The operator cannot see this itself (its implementation runs below autograd, with grad
mode off), so ``based_compile.ops.based_attention`` decides it when it is called (or traced) and
passes it to the operator; the shape-dependent part is decided when the operator runs.

Forcing: ``based_compile.config.kernel`` or the environment variable ``BASED_COMPILE_KERNEL``
(see ``based_compile.config``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import config
from ..kernels import decode, fused_chunk
from ..kernels.arguments import BasedArguments, triton_interpreting
from ..kernels.launch import MAX_GRID_ROWS

KERNELS = ("parallel", "fused_chunk", "chunked", "decode", "cpu_quadratic", "cpu_chunked", "pytorch_quadratic",
           "pytorch_chunked")
TRITON_KERNELS = ("parallel", "fused_chunk", "chunked")
CPU_FORM_OF = {"parallel": "cpu_quadratic", "fused_chunk": "cpu_chunked", "chunked": "cpu_chunked"}
PYTORCH_FORM_OF = {"parallel": "pytorch_quadratic", "fused_chunk": "pytorch_chunked", "chunked": "pytorch_chunked",
                   "cpu_quadratic": "pytorch_quadratic", "cpu_chunked": "pytorch_chunked"}

log = logging.getLogger("based_compile")
_fallback_logged = False


@dataclass(frozen=True)
class Crossover:
    """One row of a crossover table: for calls matching the row, use the linear-memory kernel
    (fused_chunk / cpu_chunked) from T >= ``t`` on, the quadratic one (parallel / cpu_quadratic) below.

    A row matches when the mode is ``training``, Dk <= ``max_dk``, Dv <= ``max_dv``,
    B * H >= ``min_bh`` and the dtype is in ``dtypes`` (empty: any). The first matching row wins.
    """

    training: bool
    t: int
    max_dk: int = 1 << 30
    max_dv: int = 1 << 30
    min_bh: int = 1
    dtypes: tuple = ()

    def matches(self, training: bool, dk: int, dv: int, bh: int, dtype: torch.dtype) -> bool:
        return (self.training == training and dk <= self.max_dk and dv <= self.max_dv and bh >= self.min_bh
                and (not self.dtypes or dtype in self.dtypes))


# CUDA: measured 2026-11-25 on an H100 80GB HBM3 (torch 2.11.0+cu130, triton 3.6.0, bf16, causal,
# normalised, do_bench medians) with `python benchmarks/op.py --out OUT` (the "crossovers" table;
# JSON in benchmarks/results/op.json). Forward / forward+backward, ms, parallel vs fused_chunk:
#   B*H=256 Dk=16 Dv=64   T=4096: 0.79/1.00  3.26/6.15    T=8192: 3.27/1.95  11.5/12.3   T=16384: 12.3/3.9  44.1/24.6
#   B*H=256 Dk=16 Dv=128  T=2048: 0.59/0.96  2.01/6.44    T=4096: 1.94/1.93  6.93/12.8   T=8192:  6.82/3.82 25.2/25.4
#   B*H=16  Dk=16 Dv=64   T=16384: 0.84/1.67  3.02/13.7   (parallel ahead at every T measured: fused_chunk
#                         walks T in order and has only B*H*(Dv/BV) programs; the rows below extrapolate x4)
#   B*H=256 Dk=32 Dv=64   fused_chunk 10-35x slower than parallel at every T (register spills): never chosen.
CUDA_CROSSOVERS = (
    # (these rows now decide only what CUDA_CHUNKED's rows do not take: Dv > 128, float16 training at Dv > 64)
    Crossover(training=False, t=4096, max_dk=16, min_bh=64),
    Crossover(training=False, t=32768, max_dk=16),
    Crossover(training=True, t=8192, max_dk=16, min_bh=64),
    Crossover(training=True, t=65536, max_dk=16),
)
# CUDA, the chunkwise-parallel kernel (kernels/chunked.py: forward kernels/prefix_chunked.py, backward
# kernels/prefix_backward.py for bfloat16/float32, its own segment walk for float16): a matching row takes it
# from T >= t on, ahead of the table above. Measured 2026-12-01 on an H200 (torch 2.11.0+cu130, triton 3.6.0,
# H=16, Dk=16, Dv=64, bf16, causal, normalised; `python benchmarks/crossover_h200.py`, one run,
# benchmarks/NOTES.md fifteenth session: the prefix kernels' register caps), ms, parallel / fused_chunk / chunked:
#   B=16 forward   T=2048 0.243 / 0.535 / 0.304   T=4096 0.864 / 1.07 / 0.590    T=8192 3.19 / 2.12 / 1.16
#   B=16 fwd+bwd   T=2048 0.977 / 3.13 / 1.48     T=4096 3.22 / 6.23 / 1.81      T=8192 11.6 / 12.5 / 3.57
#   B=1  forward   T=4096 0.082 / 0.463 / 0.408   T=8192 0.241 / 0.919 / 0.162   T=16384 0.818 / 1.84 / 0.261
#   B=1  fwd+bwd   T=8192 0.895 / 6.95 / 1.15     T=16384 3.01 / 14.5 / 1.17     T=32768 10.8 / 29.6 / 1.70
# float16 training keeps the segment-walking backward (the prefix backward refuses float16), measured the
# twelfth session with it at B=16: T=4096 3.22 / 6.27 / 3.74, T=8192 11.6 / 12.5 / 7.71: from 8192.
# Dk=16 Dv=128 (`--dk 16 --dv 128`, the same run; README table):
#   Dv=128 B=16 fwd      T=2048 0.602 / 1.05 / 0.553   T=4096 2.02 / 2.08 / 1.08
#   Dv=128 B=16 fwd+bwd  T=2048 2.01 / 6.43 / 1.61     T=4096 6.99 / 12.7 / 3.18
#   Dv=128 B=1  fwd      T=4096 0.169 / 0.468 / 0.339  T=8192 0.518 / 0.934 / 0.278
#   Dv=128 B=1  fwd+bwd  T=4096 0.939 / 3.71 / 1.38    T=8192 1.79 / 7.47 / 1.22
# Dk=32 Dv=64 (`--dk 32 --dv 64`, thirteenth session; the register caps do not apply there):
#   Dk=32  B=16 fwd      T=4096 0.949 / 28.3 / 1.40    T=8192 3.51 / 57.9 / 2.77     (fused chunk never)
#   Dk=32  B=16 fwd+bwd  T=4096 4.56 / 65.3 / 4.88     T=8192 16.8 / 131 / 9.70
#   Dk=32  B=1  fwd      T=8192 0.263 / 7.60 / 0.352   T=16384 0.901 / 15.2 / 0.676
#   Dk=32  B=1  fwd+bwd  T=8192 1.29 / 20.2 / 1.58     T=16384 4.41 / 40.2 / 1.95
# Training rows name bfloat16 and float32 where the measurement used the prefix backward; the Dv = 128
# inference row from 2048 names bfloat16, the dtype the register caps were measured in. Dk 17-32 with
# Dv > 64 and Dv > 128 were not measured: the table above keeps them. Dv 65-127 follow the Dv = 128 rows.
# Sixteenth session (the state kernels' transposed features; `crossover_h200.py --ts 1024,2048 --bs 4,16`, one
# run, benchmarks/NOTES.md), bf16 training at Dv=64, ms, parallel / fused_chunk / chunked:
#   B=16 fwd+bwd   T=1024 0.346 / 1.55 / 0.878    T=2048 0.975 / 3.10 / 0.848
#   B=4  fwd+bwd   T=1024 0.349 / 0.880 / 0.714   T=2048 0.293 / 1.83 / 0.907   (host-bound: chunked's 6 launches)
# so bfloat16 training at B*H >= 256 takes chunked from 2048 (the first row); B*H 64-255 from 4096, as before.
# Rows are read in order.
CUDA_CHUNKED = (
    Crossover(training=True, t=2048, max_dk=16, max_dv=64, min_bh=256, dtypes=(torch.bfloat16,)),
    Crossover(training=True, t=4096, max_dk=16, max_dv=64, min_bh=64, dtypes=(torch.bfloat16, torch.float32)),
    Crossover(training=True, t=8192, max_dk=16, max_dv=64, min_bh=64),
    Crossover(training=True, t=2048, max_dk=16, max_dv=128, min_bh=64, dtypes=(torch.bfloat16, torch.float32)),
    Crossover(training=True, t=8192, max_dk=32, max_dv=64, min_bh=64, dtypes=(torch.bfloat16, torch.float32)),
    Crossover(training=True, t=16384, max_dk=16, max_dv=64),
    Crossover(training=True, t=8192, max_dk=16, max_dv=128, dtypes=(torch.bfloat16, torch.float32)),
    Crossover(training=True, t=16384, max_dk=32, max_dv=64, dtypes=(torch.bfloat16, torch.float32)),
    Crossover(training=False, t=4096, max_dk=16, max_dv=64, min_bh=64),
    Crossover(training=False, t=2048, max_dk=16, max_dv=128, min_bh=64, dtypes=(torch.bfloat16,)),
    Crossover(training=False, t=4096, max_dk=16, max_dv=128, min_bh=64),
    Crossover(training=False, t=8192, max_dk=32, max_dv=64, min_bh=64),
    Crossover(training=False, t=8192, max_dk=16, max_dv=128),
    Crossover(training=False, t=16384, max_dk=32, max_dv=64),
)
# The decode kernel takes Tq <= DECODE_MAX_TQ queries against a longer cache (inference). It reads the
# cache once for all G * Tq rows of a kv head (tl.dot tiles of up to 64 rows): for such a handful of
# rows a step is bound by reading K and V (about 2 G Tq (Dk + Dv) FLOPs per 2 (Dk + Dv) bytes, far
# under an H100/H200's ~200 bf16 FLOP/byte), which is what the kernel is built for: decoding (Tq = 1)
# and speculative verification or small chunks (Tq of a few tokens). Longer query blocks (chunked
# prefill) keep the PyTorch forms; their kernel is the fused chunk with an initial state.
DECODE_MAX_TQ = 16
# No matching row: the quadratic kernel at every T.
NO_CROSSOVER_T = 1 << 62

# CPU: measured 2026-11-25 on this project's CI-like VM (2 cores, x86-64, torch 2.13.0+cpu, float32,
# Dk=16, Dv=64, causal, best of 9, one thread: the VM was shared with other jobs, load average ~8, and
# two OpenMP threads then slow tiny ops down 10-100x, so timings are noisy) with
#   python benchmarks/cpu_crossover.py --reps 9 --threads 1 --lengths 128,192,256,320,384,448,512,640,768,1024
#   (and the same with --heads 16). Chunked (C=64) faster than quadratic, inference: from T=512 (H=4)
#   and T=384 (H=16), e.g. T=768: 30.3 vs 10.7 ms (H=4); training (forward+backward): from T=640 for
#   both, e.g. T=1024 H=16: 1259 vs 517 ms. Below ~256 the quadratic form is 3-10x faster.
CPU_CROSSOVERS = (
    Crossover(training=False, t=512),
    Crossover(training=True, t=640),
)


@dataclass(frozen=True)
class Decision:
    kernel: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kernel}: {self.reason}"


def is_training(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Training mode: grad mode on and any of q, k, v requires grad."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _sizes(spec_or_args, q, v):
    if isinstance(spec_or_args, BasedArguments):
        a = spec_or_args
        return a.batch * a.heads, a.length, a.dk, a.dv, a.tk
    layout = spec_or_args.layout
    if layout == "BHTD":
        b, h, t, dk = q.shape
        tk = v.shape[2]
    elif layout == "BTHD":
        b, t, h, dk = q.shape
        tk = v.shape[1]
    else:
        raise ValueError(f"layout must be one of ('BHTD', 'BTHD'), got {layout!r}")
    return b * h, t, dk, v.shape[-1], tk


def _crossover_t(table, training, dk, dv, bh, dtype) -> int:
    for row in table:
        if row.matches(training, dk, dv, bh, dtype):
            return row.t
    return NO_CROSSOVER_T


def decide_for(device: str, training: bool, t: int, dk: int, dv: int, bh: int, dtype: torch.dtype,
               tk: int | None = None) -> Decision:
    """The kernel for a call on ``device`` ("cpu" or "cuda") with these sizes, and why.

    ``tk``: the number of keys when it differs from the number of queries ``t`` (a KV cache)."""
    decision = _decide_square(device, training, t, dk, dv, bh, dtype)
    if tk is None or tk == t:
        return decision
    if (device == "cuda" and not training and t <= DECODE_MAX_TQ and dk <= decode.MAX_DK and dv <= decode.MAX_DV
            and config.forced_kernel()[0] == "auto"):
        return Decision("decode", f"Tq={t} <= {DECODE_MAX_TQ} queries against Tk={tk} keys (a KV cache), "
                                  f"inference: the split-cache decode kernel")
    kernel = decision.kernel
    if kernel in TRITON_KERNELS and device == "cpu":
        kernel = CPU_FORM_OF[kernel]
    if device == "cuda":
        kernel = PYTORCH_FORM_OF.get(kernel, kernel)       # already a PyTorch form over the grid limit
        _log_fallback()
    why = (f"Tq={t} < Tk={tk} (queries at the end of a KV cache): the decode kernel takes inference with "
           f"Tq <= {DECODE_MAX_TQ} and no forced kernel, the other Triton kernels Tq == Tk; this runs the PyTorch "
           f"form on {device}" if device == "cuda" else f"Tq={t} < Tk={tk} (KV cache)")
    return Decision(kernel, f"{why}; {decision.reason}")


def _log_fallback() -> None:
    global _fallback_logged
    if not _fallback_logged:
        _fallback_logged = True
        log.info("based_compile: based::attention with fewer queries than keys (Tq < Tk, a KV cache) runs "
                 "a PyTorch fallback on CUDA (pytorch_quadratic / pytorch_chunked) when it is not inference "
                 "with Tq <= %d (the decode kernel's calls)", DECODE_MAX_TQ)


def _decide_square(device: str, training: bool, t: int, dk: int, dv: int, bh: int, dtype: torch.dtype) -> Decision:
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {training!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"q, k, v are on {device}; based attention runs on cpu or cuda tensors")
    forced, source = config.forced_kernel()
    if forced != "auto":
        if device == "cuda" and forced not in TRITON_KERNELS:
            raise ValueError(f"{source}={forced!r} runs on CPU tensors only, these are CUDA tensors "
                             f"(accepted for CUDA: auto, {', '.join(TRITON_KERNELS)})")
        if device == "cpu" and forced in TRITON_KERNELS and not triton_interpreting():
            return Decision(CPU_FORM_OF[forced], f"forced {forced} by {source}; CPU tensors run its PyTorch form")
        return Decision(forced, f"forced by {source}")
    decision = _decide_auto(device, training, t, dk, dv, bh, dtype)
    if device == "cuda" and bh > MAX_GRID_ROWS:
        return Decision(PYTORCH_FORM_OF[decision.kernel], f"B*H={bh} > {MAX_GRID_ROWS}, the Triton kernels' grid "
                                                          f"limit: the PyTorch form of {decision}")
    return decision


def _decide_auto(device: str, training: bool, t: int, dk: int, dv: int, bh: int, dtype: torch.dtype) -> Decision:
    mode = "training" if training else "inference"
    if device == "cuda":
        cross = _crossover_t(CUDA_CHUNKED, training, dk, dv, bh, dtype)
        if t >= cross:
            return Decision("chunked", f"{mode}, T={t} >= {cross} (chunked)")
        table, short, long = CUDA_CROSSOVERS, "parallel", "fused_chunk"
    else:
        table, short, long = CPU_CROSSOVERS, "cpu_quadratic", "cpu_chunked"
    cross = _crossover_t(table, training, dk, dv, bh, dtype)
    if t >= cross:
        return Decision(long, f"{mode}, T={t} >= {cross}")
    if cross < NO_CROSSOVER_T:
        return Decision(short, f"{mode}, T={t} < {cross}")
    if device == "cuda" and dk > fused_chunk.MAX_DK:
        return Decision(short, f"{mode}, Dk={dk} > {fused_chunk.MAX_DK} (fused_chunk's limit)")
    return Decision(short, f"{mode}, Dk={dk} Dv={dv}: no crossover row, always {short}")


def decide(spec_or_args, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool) -> Decision:
    """The kernel for this call and why. ``spec_or_args``: a BasedSpec or BasedArguments (for the layout)."""
    bh, t, dk, dv, tk = _sizes(spec_or_args, q, v)
    return decide_for(q.device.type, training, t, dk, dv, bh, q.dtype, tk)


def choose_kernel(spec_or_args, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool) -> str:
    """One of KERNELS for this call (see ``decide``)."""
    return decide(spec_or_args, q, k, v, training).kernel


def describe(spec_or_args, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool) -> str:
    """A one-line reason for explain(), e.g. "fused_chunk: inference, T=8192 >= 2048"."""
    return str(decide(spec_or_args, q, k, v, training))
