"""Triton parallel Based attention (training regime; ../shared/DESIGN.md section 2), forward and backward.

FlashAttention-style tiling without a running max (the Taylor map needs none): a block of
queries against blocks of keys, with r = q . k (the scale folded into the coefficients),

    A = f(r) = c0 + (c1 * scale) r + (c2 * scale^2) r^2          [BT, BS], fp32 in registers
    N += A V      Z += rowsum(A)                                  (A cast to the input dtype for the dot)

masked only on the diagonal block (causal) and on the last, partial block of T; no T x T
matrix ever reaches memory. o = N / (Z + eps) when normalised.

Backward (dN' = [dn, dz], dn = do / (z + eps), dz = -(do . o) / (z + eps), or dn = do
unnormalised), written per element of the [queries, keys] tile:

    dA = dn v^T + dz          dR = dA * f'(r),  f'(r) = c1 scale + 2 c2 scale^2 r
    dq = dR k                 dk = dR^T q       dv = A^T dn

split into a dq kernel (one program per query block, loops over keys) and a dk/dv kernel
(one program per key block and kv head, loops over the group's query heads and the
queries), so no atomics are needed and GQA gradients sum over the group in registers.
A small preprocessing kernel computes dn and dz once.

Layouts BHTD and BTHD are read through strides (q, k, v are never copied); the kv head of
query head h is h // group.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from .arguments import DEFAULT_COEFFS, BasedArguments, check_arguments, check_kernel_device, triton_interpreting
from .function import BasedKernelFunction
from .launch import (bhtd_strides, cdiv, check_grid_rows, dot_precision, next_power_of_2, register_cap,
                     scaled_coefficients)

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Backward scheme: False = separate dq and dk/dv kernels (deterministic); True = dq added
# atomically by the dk/dv kernel (see parallel_backward): 8-20% faster fwd+bwd on an H100 at
# T >= 2048 (benchmarks/NOTES.md). torch.use_deterministic_algorithms(True) selects the split scheme.
ATOMIC_DQ_DEFAULT = True
MAX_DK = 128
MAX_DV = 256


# ----------------------------------------------------------------------------------------------
# Small jit helpers: tile loads/stores and the polynomial.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, t_idx, d_idx, T, D: tl.constexpr, stride_t, stride_d,
               CHECK_T: tl.constexpr, EVEN_D: tl.constexpr):
    # [BT, BD] tile at rows t_idx ([BT]) and columns d_idx ([BD]); zeros outside T and D.
    ptrs = base + t_idx[:, None] * stride_t + d_idx[None, :] * stride_d
    if CHECK_T:
        if EVEN_D:
            x = tl.load(ptrs, mask=(t_idx < T)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(t_idx < T)[:, None] & (d_idx < D)[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(d_idx < D)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(base, x, t_idx, d_idx, T, D: tl.constexpr, stride_t, stride_d, EVEN_D: tl.constexpr):
    # x: [BT, BD] written at rows t_idx < T, columns d_idx < D.
    ptrs = base + t_idx[:, None] * stride_t + d_idx[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(t_idx < T)[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=(t_idx < T)[:, None] & (d_idx < D)[None, :])


@triton.jit
def _poly(r, c0, c1, c2):
    # f(s) with s = scale * r and (c1, c2) already multiplied by (scale, scale^2): c0 + c1 r + c2 r^2.
    return c0 + r * (c1 + c2 * r)


@triton.jit
def _poly_slope(r, c1, c2x2):
    # df/dr = c1 + 2 c2 r (scale folded as in _poly; c2x2 = 2 * c2).
    return c1 + c2x2 * r


@triton.jit
def _keep(q_idx, k_idx, T, CAUSAL: tl.constexpr):
    # [len(q_idx), len(k_idx)] mask of the (query, key) pairs that contribute.
    keep = (q_idx < T)[:, None] & (k_idx < T)[None, :]
    if CAUSAL:
        keep = keep & (k_idx[None, :] <= q_idx[:, None])
    return keep


# ----------------------------------------------------------------------------------------------
# Forward: one program per (query block, Dv block, batch x head).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_step(acc, z_acc, q, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, dv_idx, c0, c1, c2,
              DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
              EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    cols = s0 + tl.arange(0, BS)                                                      # [BS] key positions
    k = _load_tile(k_base, cols, tl.arange(0, BK), T, DK, sk_t, sk_d, MASK, EVEN_DK)  # [BS, BK]
    v = _load_tile(v_base, cols, dv_idx, T, DV, sv_t, sv_d, MASK, EVEN_DV)            # [BS, BV]
    r = tl.dot(q, tl.trans(k), input_precision=PRECISION)                             # [BT, BS] q . k
    a = _poly(r, c0, c1, c2)                                                          # [BT, BS]
    if MASK:
        a = tl.where(_keep(rows, cols, T, CAUSAL), a, 0.0)
    z_acc += tl.sum(a, 1)                                                             # [BT]
    acc += tl.dot(a.to(v.dtype), v, input_precision=PRECISION)                        # [BT, BV]
    return acc, z_acc


@triton.jit
def _parallel_fwd_kernel(
    q, k, v, o, z,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
    T, H, G, c0, c1, c2, eps,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
):
    # Causal: the last query blocks have the most keys; launch them first for a balanced tail.
    i_t, i_v, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    EVEN_DK: tl.constexpr = DK == BK
    EVEN_DV: tl.constexpr = DV % BV == 0
    q_base = q + i_b.to(tl.int64) * sq_b + i_h.to(tl.int64) * sq_h
    k_base = k + i_b.to(tl.int64) * sk_b + i_hk.to(tl.int64) * sk_h
    v_base = v + i_b.to(tl.int64) * sv_b + i_hk.to(tl.int64) * sv_h
    o_base = o + i_b.to(tl.int64) * so_b + i_h.to(tl.int64) * so_h

    rows = i_t * BT + tl.arange(0, BT)                                                # [BT] query positions
    dv_idx = i_v * BV + tl.arange(0, BV)                                              # [BV]
    q_blk = _load_tile(q_base, rows, tl.arange(0, BK), T, DK, sq_t, sq_d, True, EVEN_DK)  # [BT, BK]
    acc = tl.zeros([BT, BV], dtype=tl.float32)                                        # N = A V
    z_acc = tl.zeros([BT], dtype=tl.float32)                                          # Z = rowsum(A)

    if CAUSAL:  # keys before the block: unmasked; the diagonal block: masked
        full_end = i_t * BT
        edge_end = tl.minimum(full_end + BT, T)
    else:       # whole key blocks unmasked; the partial last block masked
        full_end = (T // BS) * BS
        edge_end = T
    for s0 in range(0, full_end, BS):
        acc, z_acc = _fwd_step(acc, z_acc, q_blk, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, dv_idx,
                               c0, c1, c2, DK, DV, BS, BK, EVEN_DK, EVEN_DV, False, CAUSAL, PRECISION)
    for s0 in range(full_end, edge_end, BS):
        acc, z_acc = _fwd_step(acc, z_acc, q_blk, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, dv_idx,
                               c0, c1, c2, DK, DV, BS, BK, EVEN_DK, EVEN_DV, True, CAUSAL, PRECISION)

    if NORMALIZE:
        acc = acc / (z_acc + eps)[:, None]
        if i_v == 0:
            tl.store(z + i_bh.to(tl.int64) * T + rows, z_acc, mask=rows < T)
    _store_tile(o_base, acc, rows, dv_idx, T, DV, so_t, so_d, EVEN_DV)


# ----------------------------------------------------------------------------------------------
# Backward preprocessing: dn = do / (z + eps) and dz = -(do . o) / (z + eps) (normalised only).
# ----------------------------------------------------------------------------------------------

@triton.jit
def _parallel_bwd_prep_kernel(
    o, do, z, dn, dz,
    so_b, so_h, so_t, so_d, sdo_b, sdo_h, sdo_t, sdo_d,
    T, H, eps,
    DV: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    EVEN_DV: tl.constexpr = DV == BV
    rows = i_t * BT + tl.arange(0, BT)                                                # [BT]
    dv_idx = tl.arange(0, BV)                                                         # [BV]
    o_blk = _load_tile(o + i_b.to(tl.int64) * so_b + i_h.to(tl.int64) * so_h, rows, dv_idx, T, DV,
                       so_t, so_d, True, EVEN_DV).to(tl.float32)                      # [BT, BV]
    do_blk = _load_tile(do + i_b.to(tl.int64) * sdo_b + i_h.to(tl.int64) * sdo_h, rows, dv_idx, T, DV,
                        sdo_t, sdo_d, True, EVEN_DV).to(tl.float32)                   # [BT, BV]
    z_blk = tl.load(z + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)      # [BT]
    inv = 1.0 / (z_blk + eps)                                                         # [BT]
    # dn: contiguous [B, H, T, DV]
    _store_tile(dn + i_bh.to(tl.int64) * T * DV, do_blk * inv[:, None], rows, dv_idx, T, DV, DV, 1, EVEN_DV)
    tl.store(dz + i_bh.to(tl.int64) * T + rows, -tl.sum(do_blk * o_blk, 1) * inv, mask=rows < T)


# ----------------------------------------------------------------------------------------------
# Backward dq: one program per (query block, batch x head); loops over keys.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dq_step(acc, q, dn, dz, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, c1, c2x2,
             DK: tl.constexpr, DV: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr):
    cols = s0 + tl.arange(0, BS)                                                      # [BS]
    k = _load_tile(k_base, cols, tl.arange(0, BK), T, DK, sk_t, sk_d, MASK, EVEN_DK)  # [BS, BK]
    v = _load_tile(v_base, cols, tl.arange(0, BV), T, DV, sv_t, sv_d, MASK, EVEN_DV)  # [BS, BV]
    r = tl.dot(q, tl.trans(k), input_precision=PRECISION)                             # [BT, BS]
    da = tl.dot(dn, tl.trans(v), input_precision=PRECISION)                           # [BT, BS] dn . v
    if NORMALIZE:
        da += dz[:, None]
    dr = da * _poly_slope(r, c1, c2x2)                                                # [BT, BS]
    if MASK:
        dr = tl.where(_keep(rows, cols, T, CAUSAL), dr, 0.0)
    acc += tl.dot(dr.to(k.dtype), k, input_precision=PRECISION)                       # [BT, BK]
    return acc


@triton.jit
def _parallel_dq_kernel(
    q, k, v, dn, dz, dq,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sdn_b, sdn_h, sdn_t, sdn_d, sdq_b, sdq_h, sdq_t, sdq_d,
    T, H, G, c1, c2x2,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
):
    i_t, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)  # heaviest query blocks first
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    EVEN_DK: tl.constexpr = DK == BK
    EVEN_DV: tl.constexpr = DV == BV
    k_base = k + i_b.to(tl.int64) * sk_b + i_hk.to(tl.int64) * sk_h
    v_base = v + i_b.to(tl.int64) * sv_b + i_hk.to(tl.int64) * sv_h

    rows = i_t * BT + tl.arange(0, BT)                                                # [BT]
    q_blk = _load_tile(q + i_b.to(tl.int64) * sq_b + i_h.to(tl.int64) * sq_h, rows, tl.arange(0, BK), T, DK,
                       sq_t, sq_d, True, EVEN_DK)                                     # [BT, BK]
    dn_blk = _load_tile(dn + i_b.to(tl.int64) * sdn_b + i_h.to(tl.int64) * sdn_h, rows, tl.arange(0, BV), T, DV,
                        sdn_t, sdn_d, True, EVEN_DV)                                  # [BT, BV]
    if NORMALIZE:
        dz_blk = tl.load(dz + i_bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)  # [BT]
    else:
        dz_blk = tl.zeros([BT], dtype=tl.float32)
    acc = tl.zeros([BT, BK], dtype=tl.float32)

    if CAUSAL:
        full_end = i_t * BT
        edge_end = tl.minimum(full_end + BT, T)
    else:
        full_end = (T // BS) * BS
        edge_end = T
    for s0 in range(0, full_end, BS):
        acc = _dq_step(acc, q_blk, dn_blk, dz_blk, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, c1, c2x2,
                       DK, DV, BS, BK, BV, EVEN_DK, EVEN_DV, False, CAUSAL, NORMALIZE, PRECISION)
    for s0 in range(full_end, edge_end, BS):
        acc = _dq_step(acc, q_blk, dn_blk, dz_blk, k_base, v_base, rows, s0, T, sk_t, sk_d, sv_t, sv_d, c1, c2x2,
                       DK, DV, BS, BK, BV, EVEN_DK, EVEN_DV, True, CAUSAL, NORMALIZE, PRECISION)
    _store_tile(dq + i_b.to(tl.int64) * sdq_b + i_h.to(tl.int64) * sdq_h, acc, rows, tl.arange(0, BK), T, DK,
                sdq_t, sdq_d, EVEN_DK)


# ----------------------------------------------------------------------------------------------
# Backward dk, dv: one program per (key block, batch x kv head); loops over the group's query
# heads and over the queries that see the block.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _dkv_step(dk_acc, dv_acc, k, v, q_base, dn_base, dz_base, dq_base, cols, t0, T, sq_t, sq_d, sdn_t, sdn_d,
              c0, c1, c2, c2x2,
              DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
              EVEN_DK: tl.constexpr, EVEN_DV: tl.constexpr,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
              ATOMIC_DQ: tl.constexpr):
    rows = t0 + tl.arange(0, BT)                                                      # [BT] query positions
    q = _load_tile(q_base, rows, tl.arange(0, BK), T, DK, sq_t, sq_d, MASK, EVEN_DK)   # [BT, BK]
    dn = _load_tile(dn_base, rows, tl.arange(0, BV), T, DV, sdn_t, sdn_d, MASK, EVEN_DV)  # [BT, BV]
    r_t = tl.dot(k, tl.trans(q), input_precision=PRECISION)                           # [BS, BT] (q . k)^T
    a_t = _poly(r_t, c0, c1, c2)                                                      # [BS, BT] A^T
    da_t = tl.dot(v, tl.trans(dn), input_precision=PRECISION)                         # [BS, BT] dA^T
    if NORMALIZE:
        if MASK:
            dz = tl.load(dz_base + rows, mask=rows < T, other=0.0)
        else:
            dz = tl.load(dz_base + rows)                                              # [BT]
        da_t += dz[None, :]
    dr_t = da_t * _poly_slope(r_t, c1, c2x2)                                          # [BS, BT] dR^T
    if MASK:
        keep_t = _keep(cols, rows, T, False)
        if CAUSAL:
            keep_t = keep_t & (rows[None, :] >= cols[:, None])
        a_t = tl.where(keep_t, a_t, 0.0)
        dr_t = tl.where(keep_t, dr_t, 0.0)
    dr_t = dr_t.to(q.dtype)
    dk_acc += tl.dot(dr_t, q, input_precision=PRECISION)                              # [BS, BK]
    dv_acc += tl.dot(a_t.to(dn.dtype), dn, input_precision=PRECISION)                 # [BS, BV]
    if ATOMIC_DQ:  # dq[rows] += dR k, summed over key blocks in a float32 buffer [B, H, T, BK]
        dq_part = tl.dot(tl.trans(dr_t), k, input_precision=PRECISION)                 # [BT, BK]
        dq_ptrs = dq_base + rows[:, None] * BK + tl.arange(0, BK)[None, :]
        if MASK:
            tl.atomic_add(dq_ptrs, dq_part, mask=(rows < T)[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq_part, sem="relaxed")
    return dk_acc, dv_acc


@triton.jit
def _parallel_dkv_kernel(
    q, k, v, dn, dz, dk, dv, dq,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    sdn_b, sdn_h, sdn_t, sdn_d, sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
    T, H, HK, G, c0, c1, c2, c2x2,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    BT: tl.constexpr, BS: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    # ATOMIC_DQ: also accumulate dq (float32 buffer [B, H, T, BK], zeroed) with atomic adds,
    # which saves the separate dq kernel's recomputation of r and dA.
    i_s, i_bhk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bhk // HK, i_bhk % HK
    EVEN_DK: tl.constexpr = DK == BK
    EVEN_DV: tl.constexpr = DV == BV
    k_base = k + i_b.to(tl.int64) * sk_b + i_hk.to(tl.int64) * sk_h
    v_base = v + i_b.to(tl.int64) * sv_b + i_hk.to(tl.int64) * sv_h

    cols = i_s * BS + tl.arange(0, BS)                                                # [BS] key positions
    k_blk = _load_tile(k_base, cols, tl.arange(0, BK), T, DK, sk_t, sk_d, True, EVEN_DK)  # [BS, BK]
    v_blk = _load_tile(v_base, cols, tl.arange(0, BV), T, DV, sv_t, sv_d, True, EVEN_DV)  # [BS, BV]
    dk_acc = tl.zeros([BS, BK], dtype=tl.float32)
    dv_acc = tl.zeros([BS, BV], dtype=tl.float32)

    full_end = (T // BT) * BT                      # queries [.., full_end) come in whole blocks
    for g in range(0, G):
        i_h = i_hk * G + g
        q_base = q + i_b.to(tl.int64) * sq_b + i_h.to(tl.int64) * sq_h
        dn_base = dn + i_b.to(tl.int64) * sdn_b + i_h.to(tl.int64) * sdn_h
        dz_base = dz + (i_b * H + i_h).to(tl.int64) * T
        dq_base = dq + (i_b * H + i_h).to(tl.int64) * T * BK
        if CAUSAL:  # the diagonal block (masked), then the queries after it
            diag_end = tl.minimum(i_s * BS + BS, T)
            for t0 in range(i_s * BS, diag_end, BT):
                dk_acc, dv_acc = _dkv_step(dk_acc, dv_acc, k_blk, v_blk, q_base, dn_base, dz_base, dq_base, cols, t0, T,
                                           sq_t, sq_d, sdn_t, sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV,
                                           EVEN_DK, EVEN_DV, True, CAUSAL, NORMALIZE, PRECISION, ATOMIC_DQ)
            full_start = i_s * BS + BS
        else:
            full_start = 0
        for t0 in range(full_start, full_end, BT):
            dk_acc, dv_acc = _dkv_step(dk_acc, dv_acc, k_blk, v_blk, q_base, dn_base, dz_base, dq_base, cols, t0, T,
                                       sq_t, sq_d, sdn_t, sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV,
                                       EVEN_DK, EVEN_DV, False, CAUSAL, NORMALIZE, PRECISION, ATOMIC_DQ)
        for t0 in range(tl.maximum(full_start, full_end), T, BT):  # the partial last query block
            dk_acc, dv_acc = _dkv_step(dk_acc, dv_acc, k_blk, v_blk, q_base, dn_base, dz_base, dq_base, cols, t0, T,
                                       sq_t, sq_d, sdn_t, sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV,
                                       EVEN_DK, EVEN_DV, True, CAUSAL, NORMALIZE, PRECISION, ATOMIC_DQ)
    _store_tile(dk + i_b.to(tl.int64) * sdk_b + i_hk.to(tl.int64) * sdk_h, dk_acc, cols, tl.arange(0, BK), T, DK,
                sdk_t, sdk_d, EVEN_DK)
    _store_tile(dv + i_b.to(tl.int64) * sdv_b + i_hk.to(tl.int64) * sdv_h, dv_acc, cols, tl.arange(0, BV), T, DV,
                sdv_t, sdv_d, EVEN_DV)


# ----------------------------------------------------------------------------------------------
# Launch configuration: a hand-picked table keyed on (Dk, Dv) (tuned on an H100 with
# benchmarks/kernels.py --tune); one small configuration under the Triton interpreter.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes of one kernel: block_t rows of the program's own axis, block_s of the looped axis."""

    block_t: int
    block_s: int
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int = 0            # register cap per thread (0: none)


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def launch_configs(args: BasedArguments, dtype: torch.dtype = torch.bfloat16) -> dict[str, LaunchConfig]:
    """Configurations of the 'fwd', 'dq', 'dkv' and 'dkv_atomic' kernels for these arguments.

    fwd/dq: block_t queries per program, block_s keys per step (block_t % block_s == 0);
    dkv (split backward) and dkv_atomic (the dk/dv kernel that also adds dq): block_t keys per
    program, block_s queries per step (block_t % block_s == 0). The tables are built once (this runs
    on every launch) and read-only: copy one to change an entry.
    """
    if triton_interpreting():
        return _INTERPRETER_CONFIGS
    if dtype == torch.float32:
        return _FLOAT32_CONFIGS
    bk, bv = _pow2(args.dk), _pow2(args.dv)
    if bk <= 16 and bv <= 64:
        return _SMALL_KEY_CONFIGS
    if bk <= 32 and bv <= 64:
        return _SMALL_HEAD_CONFIGS
    if bk <= 64 and bv <= 128:
        return _MEDIUM_HEAD_CONFIGS
    return _LARGE_HEAD_CONFIGS


def _table(fwd: LaunchConfig, dq: LaunchConfig, dkv: LaunchConfig, dkv_atomic: LaunchConfig):
    return MappingProxyType({"fwd": fwd, "dq": dq, "dkv": dkv, "dkv_atomic": dkv_atomic})


_INTERPRETER_CONFIGS = _table(*[LaunchConfig(32, 16, 4, 1)] * 4)
# Exact fp32 dots run on the FMA pipes, and their unrolled code compiles slowly (a 64 x 64 dk/dv tile
# took ~90 s to compile): small tiles; fp32 is the reference path, not the fast one.
_FLOAT32_CONFIGS = _table(LaunchConfig(64, 32, 4, 1), *[LaunchConfig(32, 32, 4, 1)] * 3)
# Dk <= 32, Dv <= 64: H100 sweeps at Dk=16, Dv=64, T=2048/8192 (benchmarks/NOTES.md); the atomic dk/dv kernel
# re-measured on the H200 (seventeenth session): 64-key programs capped at 168 registers, bf16 and fp16 alike,
# 0.76-0.82x the time of (128, 64, 4, 2) at Dk = 32, 0.86x at Dk = 16 T = 1024, 0.96-1.03x elsewhere
_DKV_ATOMIC_SMALL = LaunchConfig(64, 64, 4, 2, maxnreg=168)
_SMALL_HEAD_CONFIGS = _table(LaunchConfig(128, 32, 4, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 64, 4, 3),
                             _DKV_ATOMIC_SMALL)
# Dk <= 16 (the same, but 64-query forward programs with 64-key steps): H200 forward 0.86-0.91x at T = 1024
# (B=16 H=16), 0.87x at B=1 T=8192, 0.96x at Dv = 32; 1.02x at B=16 T=4096, where the chunked kernel runs
# instead. At Dk = 32 (Dv = 64) it was 1.02-1.07x: the table above keeps 128-query programs there.
_SMALL_KEY_CONFIGS = _table(LaunchConfig(64, 64, 4, 3), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 64, 4, 3),
                            _DKV_ATOMIC_SMALL)
_MEDIUM_HEAD_CONFIGS = _table(LaunchConfig(128, 64, 8, 2), LaunchConfig(64, 64, 4, 2), LaunchConfig(64, 32, 4, 2),
                              LaunchConfig(64, 32, 4, 2))
_LARGE_HEAD_CONFIGS = _table(LaunchConfig(64, 32, 4, 2), *[LaunchConfig(64, 32, 8, 1)] * 3)


def _output_shape(args: BasedArguments, d: int) -> tuple[int, int, int, int]:
    if args.layout == "BHTD":
        return args.batch, args.heads, args.length, d
    return args.batch, args.length, args.heads, d


def parallel_forward(q, k, v, args: BasedArguments, configs: dict[str, LaunchConfig] | None = None):
    """(o, z): o [B, H, T, Dv] or [B, T, H, Dv] in q's dtype, z [B, H, T] float32 (None unnormalised)."""
    check_kernel_device(q)
    check_grid_rows(args)
    cfg = (configs or launch_configs(args, q.dtype))["fwd"]
    b, h, t = args.batch, args.heads, args.length
    bk = _pow2(args.dk)
    bv = min(_pow2(args.dv), 128)
    o = torch.empty(_output_shape(args, args.dv), dtype=q.dtype, device=q.device)
    z = torch.empty(b, h, t, dtype=torch.float32, device=q.device) if args.normalize else None
    c0, c1, c2 = scaled_coefficients(args)
    grid = (cdiv(t, cfg.block_t), cdiv(args.dv, bv), b * h)
    _parallel_fwd_kernel[grid](
        q, k, v, o, z if z is not None else o,
        *bhtd_strides(q, args.layout), *bhtd_strides(k, args.layout), *bhtd_strides(v, args.layout),
        *bhtd_strides(o, args.layout),
        t, h, args.group, c0, c1, c2, args.eps,
        DK=args.dk, DV=args.dv, BK=bk, BV=bv, BT=cfg.block_t, BS=cfg.block_s,
        CAUSAL=args.causal, NORMALIZE=args.normalize, PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **register_cap(cfg.maxnreg),
    )
    return o, z


def parallel_backward(q, k, v, o, z, do, args: BasedArguments, configs: dict[str, LaunchConfig] | None = None,
                      atomic_dq: bool | None = None):
    """(dq, dk, dv) with the shapes and dtypes of (q, k, v); dk/dv sum over each GQA group.

    atomic_dq=False: a dq kernel and a dk/dv kernel (deterministic, no atomics);
    atomic_dq=True: one dk/dv kernel that also adds dq into a float32 buffer atomically (saves the
    dq kernel's recomputation of q.k and dn.v; dq's float32 sums then vary in the last bits from
    run to run). None: ATOMIC_DQ_DEFAULT, unless torch.use_deterministic_algorithms(True) is on.
    """
    check_kernel_device(q)
    check_grid_rows(args)
    cfgs = configs or launch_configs(args, q.dtype)
    if atomic_dq is None:
        atomic_dq = ATOMIC_DQ_DEFAULT and not torch.are_deterministic_algorithms_enabled()
    b, h, hk, t = args.batch, args.heads, args.kv_heads, args.length
    bk, bv = _pow2(args.dk), _pow2(args.dv)
    if args.normalize:
        dn = torch.empty(b, h, t, args.dv, dtype=do.dtype, device=do.device)       # do / (z + eps)
        dz = torch.empty(b, h, t, dtype=torch.float32, device=do.device)           # -(do . o) / (z + eps)
        prep_bt = 32 if bv > 128 else 64
        _parallel_bwd_prep_kernel[(cdiv(t, prep_bt), b * h)](
            o, do, z, dn, dz, *bhtd_strides(o, args.layout), *bhtd_strides(do, args.layout),
            t, h, args.eps, DV=args.dv, BV=bv, BT=prep_bt, num_warps=4,
        )
        dn_strides = dn.stride()
    else:
        dn, dz = do, do  # dz unused
        dn_strides = bhtd_strides(do, args.layout)
    # Contiguous whatever the inputs' strides (the kernels write through strides), as fused_chunk's:
    # the op promises contiguous gradients and would otherwise copy strided ones.
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    c0, c1, c2 = scaled_coefficients(args)
    common = dict(DK=args.dk, DV=args.dv, BK=bk, BV=bv, CAUSAL=args.causal, NORMALIZE=args.normalize,
                  PRECISION=dot_precision(q.dtype))
    qs, ks, vs = (bhtd_strides(x, args.layout) for x in (q, k, v))
    if atomic_dq:
        dq_acc = torch.zeros(b, h, t, bk, dtype=torch.float32, device=q.device)    # [B, H, T, BK]
    else:
        dq_acc = dq  # unused by the dk/dv kernel
        cfg = cfgs["dq"]
        _parallel_dq_kernel[(cdiv(t, cfg.block_t), b * h)](
            q, k, v, dn, dz, dq, *qs, *ks, *vs, *dn_strides, *bhtd_strides(dq, args.layout),
            t, h, args.group, c1, 2.0 * c2, BT=cfg.block_t, BS=cfg.block_s, **common,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **register_cap(cfg.maxnreg),
        )
    cfg = cfgs["dkv_atomic" if atomic_dq else "dkv"]
    _parallel_dkv_kernel[(cdiv(t, cfg.block_t), b * hk)](
        q, k, v, dn, dz, dk, dv, dq_acc, *qs, *ks, *vs, *dn_strides,
        *bhtd_strides(dk, args.layout), *bhtd_strides(dv, args.layout),
        t, h, hk, args.group, c0, c1, c2, 2.0 * c2, BT=cfg.block_s, BS=cfg.block_t, **common,
        ATOMIC_DQ=atomic_dq, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **register_cap(cfg.maxnreg),
    )
    if atomic_dq:  # [B, H, T, BK] float32 -> dq's dtype and layout
        dq_bhtd = dq if args.layout == "BHTD" else dq.transpose(1, 2)
        dq_bhtd.copy_(dq_acc[..., :args.dk])
    return dq, dk, dv


def check_parallel_arguments(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True, eps=1e-6,
                             layout="BHTD") -> BasedArguments:
    """check_arguments plus the parallel kernel's limits (dtypes, Dk <= 128, Dv <= 256, B * H, device)."""
    args = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout, dtypes=KERNEL_DTYPES)
    if args.dk > MAX_DK:
        raise ValueError(f"q, k feature dim Dk must be in 1..{MAX_DK} for the parallel kernel, got {args.dk}")
    if args.dv > MAX_DV:
        raise ValueError(f"v feature dim Dv must be in 1..{MAX_DV} for the parallel kernel, got {args.dv}")
    check_grid_rows(args)
    check_kernel_device(q)
    return args


def parallel_based(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True, eps=1e-6,
                   layout="BHTD"):
    """Based attention on the Triton parallel kernel; differentiable in q, k and v.

    q: [B, H, T, Dk], k: [B, Hkv, T, Dk], v: [B, Hkv, T, Dv] (layout "BHTD"; "BTHD" swaps H and T),
    H a multiple of Hkv. Returns o with q's dtype and layout, last dim Dv.
    """
    args = check_parallel_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout)
    return BasedKernelFunction.apply(q, k, v, args, parallel_forward, parallel_backward)
