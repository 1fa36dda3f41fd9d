"""Triton decode kernel: a few queries (Tq <= Tk, small Tq) against a long KV cache, Based's quadratic form.

    o_i = sum_j f(s_ij) v_j / (sum_j f(s_ij) + eps),  s_ij = scale q_i . k_j,  f(s) = c0 + c1 s + c2 s^2

over keys j <= i + Tk - Tq when causal (the mask aligned to the end), all keys otherwise.

Decoding is memory-bound: per step the whole cache is read for a handful of queries. So the cache is
split over programs, flash-decoding style, and every key and value is read once:

1. ``_decode_partial_kernel``: one program per (batch x kv head, split of Tk, block of Dv columns).
   Its rows are every (query head of the kv head's group, query) pair, G * Tq of them, so a GQA
   cache is read once for all its query heads. It reduces its slice of keys into a partial
   numerator sum_j f(s_ij) v_j and denominator sum_j f(s_ij) (float32).
2. ``_decode_combine_kernel``: sums the partials over splits and divides. Based has no running
   maximum (f is a polynomial, not an exponential), so partials simply add: no rescaling.

(K is read again for each further block of 128 value columns (Dv > 128), and K and V for each further
block of 64 rows (G * Tq > 64): neither happens at decode shapes.)

The number of splits fills the GPU (about four programs per multiprocessor) without splitting below
one key tile. z, the normaliser without eps, is returned as [B, H, Tq] float32 like the other kernels.
Forward only: the operator's backward for these calls is the PyTorch quadratic one (a decode step
is not trained).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .arguments import BasedArguments, check_kernel_device, triton_interpreting
from .launch import bhtd_strides, cdiv, dot_precision, new_buffer, next_power_of_2, scaled_coefficients

POISON_OUTPUTS = False
MAX_DK = 128
MAX_DV = 256
BLOCK_N = 64          # keys per step
MAX_BLOCK_M = 64      # (query head, query) rows per program


@triton.jit
def _decode_partial_kernel(q, k, v, part_n, part_z,
                           sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                           TQ, TK, HKV, G, M, NM, S, keys_per_split, c0, c1, c2,
                           DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    pid0, i_s, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bhk, i_m = pid0 // NM, pid0 % NM
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    rows = i_m * BM + tl.arange(0, BM)                 # (group member g, query i) = (row // TQ, row % TQ)
    row_ok = rows < M
    g, i = rows // TQ, rows % TQ
    heads = i_hk * G + g
    d_idx = tl.arange(0, BK)
    dv_idx = i_v * BV + tl.arange(0, BV)
    q_ptrs = (q + i_b.to(tl.int64) * sq_b + heads.to(tl.int64)[:, None] * sq_h + i[:, None] * sq_t
              + d_idx[None, :] * sq_d)
    qb = tl.load(q_ptrs, mask=row_ok[:, None] & (d_idx < DK)[None, :], other=0.0)          # [BM, BK]
    k_base = k + i_b.to(tl.int64) * sk_b + i_hk.to(tl.int64) * sk_h
    v_base = v + i_b.to(tl.int64) * sv_b + i_hk.to(tl.int64) * sv_h
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    start = i_s * keys_per_split
    end = tl.minimum(start + keys_per_split, TK)
    last = i + (TK - TQ)                                # causal: row's last visible key
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < end
        kt = tl.load(k_base + cols[:, None].to(tl.int64) * sk_t + d_idx[None, :] * sk_d,
                     mask=col_ok[:, None] & (d_idx < DK)[None, :], other=0.0)               # [BN, BK]
        vt = tl.load(v_base + cols[:, None].to(tl.int64) * sv_t + dv_idx[None, :] * sv_d,
                     mask=col_ok[:, None] & (dv_idx < DV)[None, :], other=0.0)              # [BN, BV]
        r = tl.dot(qb, tl.trans(kt), input_precision=PRECISION)                            # [BM, BN]
        a = c0 + r * (c1 + c2 * r)
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (cols[None, :] <= last[:, None])
        a = tl.where(keep, a, 0.0)
        z += tl.sum(a, 1)
        acc += tl.dot(a.to(vt.dtype), vt, input_precision=PRECISION)
    base = (i_bhk.to(tl.int64) * S + i_s) * M
    tl.store(part_n + (base + rows[:, None]) * DV + dv_idx[None, :], acc,
             mask=row_ok[:, None] & (dv_idx < DV)[None, :])
    tl.store(part_z + base + rows, z, mask=rows < M * (i_v == 0).to(tl.int32))     # z from the first Dv block


@triton.jit
def _decode_combine_kernel(part_n, part_z, o, zo, so_b, so_h, so_t, so_d,
                           TQ, H, HKV, G, M, S, eps,
                           DV: tl.constexpr, BV: tl.constexpr, BM: tl.constexpr, NORMALIZE: tl.constexpr):
    i_bhk, i_m, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hk = i_bhk // HKV, i_bhk % HKV
    rows = i_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    g, i = rows // TQ, rows % TQ
    heads = i_hk * G + g
    dv_idx = i_v * BV + tl.arange(0, BV)
    mask = row_ok[:, None] & (dv_idx < DV)[None, :]
    n = tl.zeros([BM, BV], dtype=tl.float32)
    z = tl.zeros([BM], dtype=tl.float32)
    for s in range(0, S):
        base = (i_bhk.to(tl.int64) * S + s) * M
        n += tl.load(part_n + (base + rows[:, None]) * DV + dv_idx[None, :], mask=mask, other=0.0)
        z += tl.load(part_z + base + rows, mask=row_ok, other=0.0)
    if NORMALIZE:
        n = n / (z + eps)[:, None]
        tl.store(zo + (i_b.to(tl.int64) * H + heads) * TQ + i, z, mask=rows < M * (i_v == 0).to(tl.int32))
    o_ptrs = (o + i_b.to(tl.int64) * so_b + heads.to(tl.int64)[:, None] * so_h + i[:, None] * so_t
              + dv_idx[None, :] * so_d)
    tl.store(o_ptrs, n.to(o.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def plan_splits(programs: int, tk: int, multiprocessors: int) -> tuple[int, int]:
    """(splits S, keys per split): about 4 programs per multiprocessor, whole key tiles per split."""
    tiles = cdiv(tk, BLOCK_N)
    want = max(1, min(tiles, cdiv(4 * multiprocessors, max(programs, 1))))
    keys = cdiv(tiles, want) * BLOCK_N
    return cdiv(tk, keys), keys


def decode_forward(q, k, v, args: BasedArguments):
    """(o, z) for Tq <= Tk: o like q with Dv features in q's dtype, z [B, H, Tq] float32 (None unnormalised)."""
    check_kernel_device(q)
    if args.dk > MAX_DK or args.dv > MAX_DV:
        raise ValueError(f"decode kernel: Dk <= {MAX_DK} and Dv <= {MAX_DV}, got Dk={args.dk}, Dv={args.dv}")
    b, h, hk, g, tq, tk, dv = args.batch, args.heads, args.kv_heads, args.group, args.length, args.tk, args.dv
    m = g * tq
    bm = min(_pow2(m), MAX_BLOCK_M)
    nm = cdiv(m, bm)
    bv = min(_pow2(dv), 128)
    nv = cdiv(dv, bv)
    sms = 4 if not q.is_cuda or triton_interpreting() else _multiprocessors(q.device.index or 0)
    s, keys = plan_splits(b * hk * nm * nv, tk, sms)
    poison = POISON_OUTPUTS
    part_n = new_buffer((b * hk, s, m, dv), torch.float32, q.device, poison=poison)
    part_z = new_buffer((b * hk, s, m), torch.float32, q.device, poison=poison)
    shape = (b, h, tq, dv) if args.layout == "BHTD" else (b, tq, h, dv)
    o = new_buffer(shape, q.dtype, q.device, poison=poison)
    z = new_buffer((b, h, tq), torch.float32, q.device, poison=poison) if args.normalize else None
    c0, c1, c2 = scaled_coefficients(args)
    _decode_partial_kernel[(b * hk * nm, s, nv)](
        q, k, v, part_n, part_z,
        *bhtd_strides(q, args.layout), *bhtd_strides(k, args.layout), *bhtd_strides(v, args.layout),
        tq, tk, hk, g, m, nm, s, keys, c0, c1, c2,
        DK=args.dk, DV=dv, BK=_pow2(args.dk), BV=bv, BM=bm, BN=BLOCK_N, CAUSAL=args.causal,
        PRECISION=dot_precision(q.dtype), num_warps=4,
    )
    _decode_combine_kernel[(b * hk, nm, nv)](
        part_n, part_z, o, z if z is not None else part_z, *bhtd_strides(o, args.layout),
        tq, h, hk, g, m, s, args.eps, DV=dv, BV=bv, BM=bm, NORMALIZE=args.normalize, num_warps=4,
    )
    return o, z
