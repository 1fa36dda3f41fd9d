"""Chunkwise-parallel Based attention with stored prefix states, in Triton (DESIGN.md section 2): the
forward of the chunked kernel (kernels/chunked.py holds its backward).

T is cut into state chunks of C tokens. Three kernels, none of which carries a full state:

  1. prefix-state kernel, one program per (feature block, value block, batch x kv head, segment):
     walks its segment in steps of BTS keys and, at the start of each chunk c, writes the running sum
         S_{<c} = sum_{j < c, j in segment} phi_k(k_j)^T v_j      (its feature block: 64 rows by default)
     into chunk c's slot, in the input dtype (the dtype its dot rounds it to anyway; float32 for
     float16 inputs, whose range sums over many keys exceed; the normaliser rows sum_j phi_k(k_j)
     in float32). Each program holds a [64, BV] float32 block, not the
     [161, BV] state: the state is split over programs by its rows, so nothing spills
     (PrefixConfig.pair_rows = 128 at Dk <= 16: one program for all rows, K and V read once);
  2. with more than one segment, a scan over the segments' totals (kernels/segment_scan.py);
  3. output kernel, one program per (query tile of BT, value block, batch x query head), all in
     parallel, nothing carried:
         o = phi_q(Q) S_{<c} + f(Q K^T)|causal V  over the keys of chunk c up to the tile,
     feature block by feature block on the tensor cores, the intra-chunk part as the parallel
     kernel's loop (kernels/parallel.py); with segments S_{<c} adds the scanned float32 slot of its
     segment. Non-causal: phi_q(Q) S_total and nothing else.

The features are the symmetric basis of kernels/symmetric_basis.py over the padded BK: block A the
rolled pairs x_a x_{(a + d) mod BK}, d = 1 .. BK / 2 (BK / 2 x BK rows, in blocks of DB offsets),
block B (x_a, x_a^2) and the constant; 161 rows at Dk <= 16. The pair factors come from the tile in
registers (one-hot dots or tl.gather) or from gathered loads (_pair_features' MODE). The state kernels
form theirs transposed, [rows, keys] (PrefixConfig.state_trans: one-hot [rows, BK] times the tile's
transpose), so that phi(K)^T meets V as a dot's first operand straight from registers: a [keys, rows]
tile had to be transposed through shared memory first, the stall ncu found (21% faster). The normaliser's
sums can run as dots too (PrefixConfig.zdot; a float32 value is split into two columns, its rounding
and the remainder, so it loses nothing to the dtype).

Bytes of stored states: ceil(T / C) x 161 x (Dv x itemsize + 4) per (batch, kv head), plus the
segment slots in float32 (state_bytes); at C = 256, Dv = 64, bf16: 84 bytes a token, against 320
for q, k, v, o. H200 numbers and profiles: benchmarks/NOTES.md (2026-11-30, eleventh session).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kept_states import carried, carrier
from .arguments import BasedArguments, check_kernel_device, triton_interpreting
from .segment_scan import segment_scan_kernel
from .launch import (bhtd_strides, cdiv, dot_precision, new_buffer, next_power_of_2, register_cap,
                     scaled_coefficients)
from .parallel import _fwd_step
from .tiles import load_rows

# When True, every output and buffer is filled with NaN before a kernel writes it (tests set this).
POISON_OUTPUTS = False


@triton.jit
def _pair_features(x, ptr, rows, s_t, s_d, T, DK, D0, DB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   PRECISION: tl.constexpr, MODE: tl.constexpr):
    # [BT, DB * BK] float32, row order (d, a): x_a x_{(a + d + 1) mod BK} for d = D0 .. D0 + DB - 1, from
    # the tile x [BT, BK] at ptr (zeros beyond T and Dk). How the rolled factor is formed:
    #   MODE 0: gathered loads of the tile just read (L1 hits), [BT, DB, BK];
    #   MODE 1: tl.gather from x in registers;
    #   MODE 2: both factors as one-hot dots (exact: one nonzero product per element).
    p = tl.arange(0, DB * BK)
    a = p % BK
    col = (a + D0 + p // BK + 1) % BK
    if MODE == 0:
        c3 = tl.reshape(col, (DB, BK))
        mask = (rows < T)[:, None, None] & (c3 < DK)[None, :, :]
        xr = tl.load(ptr + rows[:, None, None] * s_t + c3[None, :, :] * s_d, mask=mask, other=0.0)
        return tl.reshape(x.to(tl.float32)[:, None, :] * xr.to(tl.float32), (BT, DB * BK))
    elif MODE == 1:
        xf = x.to(tl.float32)
        first = tl.gather(xf, tl.broadcast_to(a[None, :], (BT, DB * BK)), axis=1)
        second = tl.gather(xf, tl.broadcast_to(col[None, :], (BT, DB * BK)), axis=1)
        return first * second
    else:
        src = tl.arange(0, BK)[:, None]
        first = tl.dot(x, (src == a[None, :]).to(x.dtype), input_precision=PRECISION)       # x_a
        second = tl.dot(x, (src == col[None, :]).to(x.dtype), input_precision=PRECISION)    # x_{a + d + 1}
        return first * second


@triton.jit
def _pair_weights(D0, c2, DB: tl.constexpr, BK: tl.constexpr):
    # phi_k's weights of _pair_features' rows: 2 c2, and c2 at offset BK / 2 (it meets every pair twice)
    p = tl.arange(0, DB * BK)
    return tl.where(D0 + p // BK == BK // 2 - 1, c2, 2.0 * c2)


@triton.jit
def _square_features(xf, BT: tl.constexpr, BK: tl.constexpr):
    # [BT, 2 BK] float32, row order (a, j): x_a (j = 0), x_a^2 (j = 1)
    return tl.reshape(tl.join(xf, xf * xf), (BT, 2 * BK))


@triton.jit
def _square_weights(c1, c2, BK: tl.constexpr):
    p = tl.arange(0, 2 * BK)
    return tl.where(p % 2 == 0, c1, c2)


@triton.jit
def _pair_features_t(x, D0, DB: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # [DB * BK, BT] float32: _pair_features' MODE 2 transposed, formed transposed (one-hot [DB BK, BK] times
    # x^T), so that it meets the values [BT, BV] as a dot's first operand without a transpose in between
    p = tl.arange(0, DB * BK)
    a = p % BK
    col = (a + D0 + p // BK + 1) % BK
    src = tl.arange(0, BK)[None, :]
    xt = tl.trans(x)
    first = tl.dot((a[:, None] == src).to(x.dtype), xt, input_precision=PRECISION)       # x_a
    second = tl.dot((col[:, None] == src).to(x.dtype), xt, input_precision=PRECISION)    # x_{a + d + 1}
    return first * second


@triton.jit
def _square_features_t(x, BK: tl.constexpr, PRECISION: tl.constexpr):
    # [2 BK, BT] float32: _square_features transposed (rows (a, j): x_a for j = 0, x_a^2 for j = 1), by one
    # one-hot dot
    p = tl.arange(0, 2 * BK)
    xa = tl.dot((p[:, None] // 2 == tl.arange(0, BK)[None, :]).to(x.dtype), tl.trans(x), input_precision=PRECISION)
    return tl.where((p % 2 == 1)[:, None], xa * xa, xa)


@triton.jit
def _row_sums_t(ft, zmat, BT: tl.constexpr, PRECISION: tl.constexpr):
    # _column_sums of ft^T: zmat [R, 16] += ft e0, ft [R, BT] in the dots' dtype
    e0 = tl.zeros([BT, 16], dtype=ft.dtype) + (tl.arange(0, 16)[None, :] == 0).to(ft.dtype)
    return tl.dot(ft, e0, zmat, input_precision=PRECISION)


@triton.jit
def _column_sums(f, zmat, BT: tl.constexpr, PRECISION: tl.constexpr):
    # zmat [R, 16] float32 += f^T e0, f [BT, R] in the dots' dtype, e0 [BT, 16] ones in column 0: the
    # column sums of f on the tensor cores (zmat's other columns stay 0)
    e0 = tl.zeros([BT, 16], dtype=f.dtype) + (tl.arange(0, 16)[None, :] == 0).to(f.dtype)
    return tl.dot(tl.trans(f), e0, zmat, input_precision=PRECISION)


@triton.jit
def _row_products(f, zs, PRECISION: tl.constexpr):
    # [BT] = f zs for f [BT, R] in the dots' dtype and zs [R] float32, as one dot: zs split into its
    # rounding to f's dtype (column 0) and the remainder (column 1), so zs loses nothing to the dtype
    dt = f.dtype
    hi = zs.to(dt).to(tl.float32)
    lo = zs - hi
    j = tl.arange(0, 16)[None, :]
    m = tl.where(j == 0, hi[:, None], tl.where(j == 1, lo[:, None], 0.0))               # [R, 16]
    return tl.sum(tl.dot(f, m.to(dt), input_precision=PRECISION), axis=1)


# ----------------------------------------------------------------------------------------------
# 1. prefix states
# ----------------------------------------------------------------------------------------------
@triton.jit
def _square_step(kt, vt, rows, T, wb, bacc, zbacc, s0, z0, c0, BTS: tl.constexpr, BK: tl.constexpr,
                 NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, TRANS: tl.constexpr):
    # block B (x_a, x_a^2) and the constant: one step of BTS keys (TRANS: the features formed transposed)
    if TRANS:
        ft = _square_features_t(kt, BK, PRECISION) * wb[:, None]
        bacc = tl.dot(ft.to(vt.dtype), vt, bacc, input_precision=PRECISION)
        if NORMALIZE:
            zbacc += tl.sum(ft, axis=1)
    else:
        f = _square_features(kt.to(tl.float32), BTS, BK) * wb[None, :]
        bacc = tl.dot(tl.trans(f.to(vt.dtype)), vt, bacc, input_precision=PRECISION)
        if NORMALIZE:
            zbacc += tl.sum(f, axis=0)
    s0 += c0 * tl.sum(vt.to(tl.float32), axis=0)
    if NORMALIZE:
        z0 += c0 * tl.sum((rows < T).to(tl.float32), axis=0)
    return bacc, zbacc, s0, z0


@triton.jit
def _store_square(vals, zs, bacc, zbacc, s0, z0, FA: tl.constexpr, FB: tl.constexpr, offs_v, DV,
                  NORMALIZE: tl.constexpr, i_v):
    # block B's rows and the constant's into a state ([NF, DV] values at vals, [NF] normaliser at zs)
    rb = FA + tl.arange(0, FB)
    vmask = offs_v < DV
    et = vals.dtype.element_ty
    tl.store(vals + rb[:, None] * DV + offs_v[None, :], bacc.to(et), mask=vmask[None, :])
    tl.store(vals + (FA + FB) * DV + offs_v, s0.to(et), mask=vmask)
    if NORMALIZE:
        if i_v == 0:
            tl.store(zs + rb, zbacc)
            tl.store(zs + FA + FB, z0)


@triton.jit
def _store_pairs(vals, zs, acc, zacc, r0, R: tl.constexpr, offs_v, DV, NORMALIZE: tl.constexpr, i_v):
    # R pair rows from r0 into a state
    rr = r0 + tl.arange(0, R)
    vmask = offs_v < DV
    tl.store(vals + rr[:, None] * DV + offs_v[None, :], acc.to(vals.dtype.element_ty), mask=vmask[None, :])
    if NORMALIZE:
        if i_v == 0:
            tl.store(zs + rr, zacc)


@triton.jit(do_not_specialize=["T", "NC", "SEGC", "NSEG"])
def _prefix_state_kernel(
    k, v, cs, cz, seg,
    sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
    T, HK, DK, DV, NC, SEGC, NSEG, W, c0, c1, c2,
    C: tl.constexpr, BTS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DB: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, ZDOT: tl.constexpr, MODE: tl.constexpr,
    STORE_TOTAL: tl.constexpr, MERGE_B: tl.constexpr, TRANS: tl.constexpr,
):
    # program (i_f, i_v, i_p): feature block i_f (< NA: block A's offsets i_f DB ..; NA: block B and the
    # constant, or with MERGE_B (NA == 1) all of them in program 0, which reads K and V once), value
    # block i_v, batch x kv head i_p // NSEG, segment i_p % NSEG.
    # CAUSAL: slot c of cs / cz gets the sum over the segment's chunks before c. STORE_TOTAL (NSEG > 1,
    # or non-causal): the segment's total goes to seg [B * HK, NSEG + 1, W] (float32, scanned after).
    NA: tl.constexpr = BK // 2 // DB
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    i_f, i_v, i_p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_bhk = i_p // NSEG
    i_s = i_p % NSEG
    b = (i_bhk // HK).to(tl.int64)
    hk = (i_bhk % HK).to(tl.int64)
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    dt = k.dtype.element_ty
    offs_t = tl.arange(0, BTS)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    c_start = i_s * SEGC
    c_end = tl.minimum(c_start + SEGC, NC)
    slots = cs + i_bhk.to(tl.int64) * NC * NF * DV
    zslots = cz + i_bhk.to(tl.int64) * NC * NF
    total = seg + (i_bhk.to(tl.int64) * (NSEG + 1) + i_s) * W
    wb = _square_weights(c1, c2, BK)
    if i_f < NA:
        d0 = i_f * DB
        w = _pair_weights(d0, c2, DB, BK)
        r0 = d0 * BK                                                  # first slot row of the block
        acc = tl.zeros([DB * BK, BV], dtype=tl.float32)
        zacc = tl.zeros([DB * BK], dtype=tl.float32)
        zmat = tl.zeros([DB * BK, 16], dtype=tl.float32)
        if MERGE_B:
            bacc = tl.zeros([FB, BV], dtype=tl.float32)
            zbacc = tl.zeros([FB], dtype=tl.float32)
            s0 = tl.zeros([BV], dtype=tl.float32)
            z0 = 0.0
        for j in range(c_start * C, c_end * C, BTS):     # one flat loop: the pipeliner sees every step
            if CAUSAL:
                if j % C == 0:
                    c = j // C
                    if ZDOT:
                        zacc = tl.sum(zmat, axis=1)
                    _store_pairs(slots + c * NF * DV, zslots + c * NF, acc, zacc, r0, DB * BK, offs_v, DV,
                                 NORMALIZE, i_v)
                    if MERGE_B:
                        _store_square(slots + c * NF * DV, zslots + c * NF, bacc, zbacc, s0, z0, FA, FB, offs_v,
                                      DV, NORMALIZE, i_v)
            rows = j + offs_t
            kt = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vt = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            if TRANS:
                ft = (_pair_features_t(kt, d0, DB, BK, PRECISION) * w[:, None]).to(dt)           # [DB BK, BTS]
                acc = tl.dot(ft, vt, acc, input_precision=PRECISION)
                if NORMALIZE:
                    if ZDOT:
                        zmat = _row_sums_t(ft, zmat, BTS, PRECISION)
                    else:
                        zacc += tl.sum(ft.to(tl.float32), axis=1)
            else:
                f = (_pair_features(kt, k, rows, sk_t, sk_d, T, DK, d0, DB, BTS, BK, PRECISION, MODE) * w[None, :]).to(dt)
                acc = tl.dot(tl.trans(f), vt, acc, input_precision=PRECISION)
                if NORMALIZE:
                    if ZDOT:
                        zmat = _column_sums(f, zmat, BTS, PRECISION)
                    else:
                        zacc += tl.sum(f.to(tl.float32), axis=0)
            if MERGE_B:
                bacc, zbacc, s0, z0 = _square_step(kt, vt, rows, T, wb, bacc, zbacc, s0, z0, c0, BTS, BK,
                                                   NORMALIZE, PRECISION, TRANS)
        if STORE_TOTAL:
            if ZDOT:
                zacc = tl.sum(zmat, axis=1)
            _store_pairs(total, total + NF * DV, acc, zacc, r0, DB * BK, offs_v, DV, NORMALIZE, i_v)
            if MERGE_B:
                _store_square(total, total + NF * DV, bacc, zbacc, s0, z0, FA, FB, offs_v, DV, NORMALIZE, i_v)
    else:
        bacc = tl.zeros([FB, BV], dtype=tl.float32)
        zbacc = tl.zeros([FB], dtype=tl.float32)
        s0 = tl.zeros([BV], dtype=tl.float32)
        z0 = 0.0
        for j in range(c_start * C, c_end * C, BTS):
            if CAUSAL:
                if j % C == 0:
                    c = j // C
                    _store_square(slots + c * NF * DV, zslots + c * NF, bacc, zbacc, s0, z0, FA, FB, offs_v, DV,
                                  NORMALIZE, i_v)
            rows = j + offs_t
            kt = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vt = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            bacc, zbacc, s0, z0 = _square_step(kt, vt, rows, T, wb, bacc, zbacc, s0, z0, c0, BTS, BK, NORMALIZE,
                                               PRECISION, TRANS)
        if STORE_TOTAL:
            _store_square(total, total + NF * DV, bacc, zbacc, s0, z0, FA, FB, offs_v, DV, NORMALIZE, i_v)


# ----------------------------------------------------------------------------------------------
# 3. outputs
# ----------------------------------------------------------------------------------------------
@triton.jit
def _state_rows(slots, zslots, total, r0, R: tl.constexpr, BV: tl.constexpr, offs_v, DV, NF, FROM_SLOT: tl.constexpr,
                FROM_TOTAL: tl.constexpr, NORMALIZE: tl.constexpr, dt: tl.constexpr):
    # rows r0 .. r0 + R of the state the tile reads: [R, BV] in dt and [R] float32 normaliser rows
    rr = r0 + tl.arange(0, R)
    vmask = (offs_v < DV)[None, :]
    s = tl.zeros([R, BV], dtype=tl.float32)
    zs = tl.zeros([R], dtype=tl.float32)
    if FROM_SLOT:
        s += tl.load(slots + rr[:, None] * DV + offs_v[None, :], mask=vmask, other=0.0).to(tl.float32)
        if NORMALIZE:
            zs += tl.load(zslots + rr)
    if FROM_TOTAL:
        s += tl.load(total + rr[:, None] * DV + offs_v[None, :], mask=vmask, other=0.0)
        if NORMALIZE:
            zs += tl.load(total + NF * DV + rr)
    return s.to(dt), zs


@triton.jit(do_not_specialize=["T", "NC", "SEGC", "NSEG"])
def _prefix_output_kernel(
    q, k, v, o, z, cs, cz, seg,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_b, so_h, so_t, so_d,
    T, H, GROUP, NC, SEGC, NSEG, W, c0, c1, c2, eps,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DB: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    FROM_TOTAL: tl.constexpr, ZDOT: tl.constexpr, MODE: tl.constexpr,
):
    # FROM_TOTAL: the state includes the scanned segment slot (causal with segments; non-causal: the total)
    NA: tl.constexpr = BK // 2 // DB
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    # the last query tiles have the most keys: launch them first
    i_t, i_v, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    hk = h // GROUP
    i_bhk = (i_bh // GROUP).to(tl.int64)
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    o += b * so_b + h * so_h
    dt = q.dtype.element_ty
    sd = cs.dtype.element_ty          # the states' dot dtype: dt, or float32 for float16 inputs
    rows = i_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    c = (i_t * BT) // C
    i_s = c // SEGC
    slots = cs + (i_bhk * NC + c) * NF * DV
    zslots = cz + (i_bhk * NC + c) * NF
    if CAUSAL:
        total = seg + (i_bhk * (NSEG + 1) + i_s) * W            # S before the segment (scanned)
    else:
        total = seg + (i_bhk * (NSEG + 1) + NSEG) * W           # the total

    qt = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK)                                   # [BT, BK]
    qf = qt.to(tl.float32)
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    zc = tl.zeros([BT], dtype=tl.float32)
    for ia in tl.static_range(NA):
        fa = _pair_features(qt, q, rows, sq_t, sq_d, T, DK, ia * DB, DB, BT, BK, PRECISION, MODE)                        # [BT, DB BK]
        sa, za = _state_rows(slots, zslots, total, ia * DB * BK, DB * BK, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL,
                             NORMALIZE, sd)
        fa16 = fa.to(sd)
        acc = tl.dot(fa16, sa, acc, input_precision=PRECISION)
        if NORMALIZE:
            if ZDOT:
                zc += _row_products(fa16, za, PRECISION)
            else:
                zc += tl.sum(fa * za[None, :], axis=1)
    fb = _square_features(qf, BT, BK)
    sb, zb = _state_rows(slots, zslots, total, FA, FB, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL, NORMALIZE, sd)
    fb16 = fb.to(sd)
    acc = tl.dot(fb16, sb, acc, input_precision=PRECISION)
    s0, z0 = _state_rows(slots, zslots, total, FA + FB, 1, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL, NORMALIZE,
                         tl.float32)
    acc += tl.reshape(s0, (1, BV))
    if NORMALIZE:
        if ZDOT:
            zc += _row_products(fb16, zb, PRECISION) + tl.sum(z0, axis=0)
        else:
            zc += tl.sum(fb * zb[None, :], axis=1) + tl.sum(z0, axis=0)

    if CAUSAL:      # the chunk's keys before the tile (unmasked), then the tile's own (masked)
        full_end = i_t * BT
        edge_end = tl.minimum(full_end + BT, T)
        for s in range(c * C, full_end, BS):
            acc, zc = _fwd_step(acc, zc, qt, k, v, rows, s, T, sk_t, sk_d, sv_t, sv_d, offs_v, c0, c1, c2,
                                DK, DV, BS, BK, DK == BK, DV % BV == 0, False, CAUSAL, PRECISION)
        for s in range(full_end, edge_end, BS):
            acc, zc = _fwd_step(acc, zc, qt, k, v, rows, s, T, sk_t, sk_d, sv_t, sv_d, offs_v, c0, c1, c2,
                                DK, DV, BS, BK, DK == BK, DV % BV == 0, True, CAUSAL, PRECISION)
    if NORMALIZE:
        acc = acc / (zc + eps)[:, None]
        if i_v == 0:
            tl.store(z + i_bh.to(tl.int64) * T + rows, zc, mask=rows < T)
    omask = (rows < T)[:, None] & (offs_v < DV)[None, :]
    tl.store(o + rows[:, None] * so_t + offs_v[None, :] * so_d, acc.to(o.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixConfig:
    """Launches: state chunk c, query tile bt, key tile bs, state step bts, value block bv, warps and stages
    of the output and state kernels. The defaults are the H200's best at T = 8192 (benchmarks/NOTES.md)."""

    c: int = 256
    bt: int = 64
    bs: int = 64
    # state steps of 128 keys and one-hot pair factors in the state kernel: its time at T = 8192 went from 0.81 to
    # 0.58 ms a call, the reverse-state kernel's from 0.95 to 0.68 (64 and tl.gather before; benchmarks/NOTES.md,
    # thirteenth session)
    bts: int = 128
    bv: int = 64
    warps: int = 4
    stages: int = 2
    state_warps: int = 4
    state_stages: int = 3
    target: int = 256           # programs wanted in the state kernel (segments follow from it)
    mode: int = 2               # how the rolled pair factors are formed (see _pair_features)
    # normaliser sums as tensor-core dots (else float32 reductions). Causal only in the output kernel: without
    # its intra-chunk loop (non-causal) the H200 (triton 3.6) made an illegal memory access with them at 4
    # warps and 64-query tiles (benchmarks/NOTES.md, 2026-11-30); the float32 sums ran exact there.
    zdot: bool = True
    pair_rows: int = 64         # rows of block A per state program (128 at Dk <= 16: one program, block B too)
    maxnreg: int = 0            # register cap of the output kernel (0: none)
    state_maxnreg: int = 0
    state_mode: int = 2         # the state kernel's mode (-1: mode) when state_trans is off
    state_bv: int = 0           # the state kernel's value block (0: bv)
    # the state kernel forms its features transposed ([rows, keys], one-hot dots: MODE 2's values; state_mode
    # unused), so they meet the values as a dot's first operand with no transpose in between: 0.581 -> 0.457 ms
    # at T = 8192 (Dv 128: 0.988 -> 0.777, Dk 32: 1.055 -> 0.986; benchmarks/NOTES.md, sixteenth session)
    state_trans: bool = True
    # the backward (kernels/prefix_backward.py): warps of its dk/dv and reverse-state kernels (dq: warps);
    # 4 and 4 the H200's best at T = 8192 (fwd+bwd 5.34 ms; 8 and 8: 7.31; benchmarks/NOTES.md, twelfth session)
    dkv_warps: int = 4
    reverse_warps: int = 4
    dq_maxnreg: int = 0         # register caps of the backward's dq, dk/dv and reverse-state kernels (0: none)
    dkv_maxnreg: int = 0
    reverse_maxnreg: int = 0
    # the same in the backward's reverse-state kernel: 0.687 -> 0.508 ms (Dk 32: 1.447 -> 0.982), but slower at
    # Dv 128 (1.263 -> 1.545): prefix_config takes it at Dv <= 64 only
    reverse_trans: bool = True


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def feature_rows(dk: int) -> int:
    bk = _pow2(dk)
    return bk // 2 * bk + 2 * bk + 1


def prefix_config(args: BasedArguments, dtype: torch.dtype | None = None) -> PrefixConfig:
    """The launch for these arguments and inputs of ``dtype`` (None: as bfloat16). One frozen object per
    (Dk, Dv, dtype): a call's forward and backward both ask, and building a PrefixConfig costs microseconds."""
    return _launch_for(args.dk, args.dv, dtype, triton_interpreting())


@functools.lru_cache(maxsize=None)
def _launch_for(dk: int, dv: int, dtype: torch.dtype | None, interpreting: bool) -> PrefixConfig:
    reverse_trans = dv <= 64
    if interpreting:
        return PrefixConfig(c=32, bt=16, bs=16, bts=16, bv=min(64, _pow2(dv)), target=1, reverse_trans=reverse_trans)
    return PrefixConfig(bv=min(64, _pow2(dv)), reverse_trans=reverse_trans, **_register_caps(dk, dv, dtype))


@functools.lru_cache(maxsize=None)
def one_value_block(cfg: PrefixConfig, bv: int) -> PrefixConfig:
    """``cfg`` with one value block of ``bv`` in every kernel (the backward's launch)."""
    return dataclasses.replace(cfg, bv=bv, state_bv=0)


def _register_caps(dk: int, dv: int, dtype: torch.dtype | None) -> dict:
    """Register caps that let more programs share an SM, where the H200 measured them faster (bfloat16,
    Dk <= 16; benchmarks/NOTES.md, fifteenth session). At T = 8192, B=16 H=16 bf16: Dv = 64 fwd+bwd 4.03 ->
    3.60 ms (output kernel 0.66 -> 0.59, dq 0.83 -> 0.60, dk/dv 1.10 -> 0.97); Dv = 128 output 1.31 -> 1.16,
    dq 1.06 -> 0.91 (its dk/dv slower capped: 1.52 -> 1.64). At Dk = 32 every cap was slower (dq 2.7 -> 5.3 ms)."""
    if dtype not in (None, torch.bfloat16) or dk > 16:     # float16 (float32 slots), float32: not measured
        return {}
    if dv <= 64:
        return {"maxnreg": 128, "dq_maxnreg": 128, "dkv_maxnreg": 168}
    if dv <= 128:
        return {"maxnreg": 128, "dq_maxnreg": 168}
    return {}


def _segments(args: BasedArguments, cfg: PrefixConfig, n_feature_blocks: int, n_v: int) -> int:
    """Chunks per segment: all of them, unless the state kernel would have fewer than cfg.target programs."""
    nc = cdiv(args.length, cfg.c)
    per_segment = n_feature_blocks * n_v * args.batch * args.kv_heads
    nseg = 1
    while nseg * 2 <= nc and nseg * per_segment < cfg.target:
        nseg *= 2
    return cdiv(nc, nseg)


@dataclass(frozen=True)
class _Plan:
    bk: int         # padded key dim
    db: int         # pair offsets per feature block
    na: int         # pair feature blocks (the state kernel has na + 1 feature programs)
    nf: int         # state rows
    nc: int         # state chunks
    segc: int       # chunks per segment
    nseg: int       # segments


@functools.lru_cache(maxsize=256)
def _plan(args: BasedArguments, cfg: PrefixConfig) -> _Plan:
    bk = _pow2(args.dk)
    db = max(1, min(bk // 2, cfg.pair_rows // bk))
    na = bk // 2 // db
    nc = cdiv(args.length, cfg.c)
    segc = _segments(args, cfg, na + (na > 1), cdiv(args.dv, cfg.state_bv or cfg.bv)) if args.causal else nc
    return _Plan(bk, db, na, feature_rows(args.dk), nc, segc, cdiv(nc, segc))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The chunk slots' dtype: the input dtype, but float32 for float16 inputs. float16's range (65504) is
    too small for sums over thousands of keys (the constant row alone is c0 sum_j v_j), so their states
    stay float32 and meet float32 features in tf32 dots; bfloat16 has float32's range."""
    return torch.float32 if dtype == torch.float16 else dtype


def state_bytes(args: BasedArguments, cfg: PrefixConfig, itemsize: int = 2) -> int:
    """Bytes of the stored states: per (batch, kv head), every chunk's slot (values of ``itemsize`` bytes:
    that of state_dtype,
    float32 normaliser rows; non-causal: one) and, with segments or non-causal, (NSEG + 1) float32
    segment slots."""
    p = _plan(args, cfg)
    slots = (p.nc if args.causal else 1) * p.nf * (args.dv * itemsize + 4)
    if p.nseg > 1 or not args.causal:
        slots += (p.nseg + 1) * p.nf * (args.dv + 1) * 4
    return args.batch * args.kv_heads * slots


def _check_config(cfg: PrefixConfig) -> None:
    tiles = {"c": cfg.c, "bt": cfg.bt, "bs": cfg.bs, "bts": cfg.bts, "bv": cfg.bv}
    for name, n in tiles.items():
        if n < 16 or n & (n - 1):
            raise ValueError(f"PrefixConfig.{name} must be a power of two >= 16, got {n}")
    if cfg.c % cfg.bt or cfg.c % cfg.bts or cfg.bt % cfg.bs:
        raise ValueError(f"PrefixConfig: a state chunk (c={cfg.c}) must hold whole query tiles (bt={cfg.bt}) and "
                         f"state steps (bts={cfg.bts}), a query tile whole key tiles (bs={cfg.bs})")
    if cfg.state_bv and (cfg.state_bv < 16 or cfg.state_bv & (cfg.state_bv - 1)):
        raise ValueError(f"PrefixConfig.state_bv must be 0 or a power of two >= 16, got {cfg.state_bv}")
    if cfg.pair_rows not in (64, 128):
        raise ValueError(f"PrefixConfig.pair_rows must be 64 or 128, got {cfg.pair_rows}")
    if cfg.mode not in (0, 1, 2) or cfg.state_mode not in (-1, 0, 1, 2):
        raise ValueError(f"PrefixConfig: mode must be 0, 1 or 2 and state_mode -1, 0, 1 or 2, got {cfg.mode}, "
                         f"{cfg.state_mode}")


def state_parts(args: BasedArguments, p: _Plan, dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of forward_states' three buffers for inputs of ``dtype``: the slots, their normaliser rows,
    the segment slots."""
    b, hk = args.batch, args.kv_heads
    n_slots = p.nc if args.causal else 1
    use_total = p.nseg > 1 or not args.causal
    return [((b * hk, n_slots, p.nf, args.dv), state_dtype(dtype)),
            ((b * hk, n_slots, p.nf), torch.float32),
            ((b * hk, p.nseg + 1, p.nf * args.dv + p.nf) if use_total else (1,), torch.float32)]


def forward_states(k, v, args: BasedArguments, cfg: PrefixConfig, p: _Plan, out=None):
    """Stages 1-2: (slots [B * Hkv, NC, NF, Dv] in state_dtype(k's dtype), normaliser slots [B * Hkv, NC, NF] float32, the
    segment slots [B * Hkv, NSEG + 1, W] float32 (scanned), whether the output kernels read them), written into
    ``out`` (three tensors as state_parts says) when given."""
    b, hk, t = args.batch, args.kv_heads, args.length
    w = p.nf * args.dv + p.nf
    parts = state_parts(args, p, k.dtype)
    if out is None:
        out = [new_buffer(shape, dtype, k.device, poison=POISON_OUTPUTS) for shape, dtype in parts]
    elif POISON_OUTPUTS:
        for x in out:
            x.fill_(float("nan"))
    cs, cz, sg = out
    use_total = p.nseg > 1 or not args.causal
    c0, c1, c2 = scaled_coefficients(args)
    sbv = cfg.state_bv or cfg.bv
    merge_b = p.na == 1
    _prefix_state_kernel[(p.na + (not merge_b), cdiv(args.dv, sbv), b * hk * p.nseg)](
        k, v, cs, cz, sg, *bhtd_strides(k, args.layout), *bhtd_strides(v, args.layout), t, hk, args.dk, args.dv,
        p.nc, p.segc, p.nseg, w, c0, c1, c2,
        C=cfg.c, BTS=cfg.bts, BK=p.bk, BV=sbv, DB=p.db, CAUSAL=args.causal, NORMALIZE=args.normalize,
        PRECISION=dot_precision(k.dtype), ZDOT=cfg.zdot, MODE=cfg.mode if cfg.state_mode < 0 else cfg.state_mode,
        STORE_TOTAL=use_total, MERGE_B=merge_b, TRANS=cfg.state_trans,
        num_warps=cfg.state_warps, num_stages=cfg.state_stages, **register_cap(cfg.state_maxnreg))
    if use_total:
        n_in = p.nseg - 1 if args.causal else p.nseg
        block = 1024
        segment_scan_kernel[(b * hk, cdiv(w, block))](sg, p.nseg, n_in, w, REVERSE=False, BLOCK=block, num_warps=4)
    return cs, cz, sg, use_total


def prefix_forward(q, k, v, args: BasedArguments, cfg: PrefixConfig | None = None, keep: bool = False):
    """(o, z): o like q, z the float32 normaliser [B, H, T] or None. q, k, v as checked by ``args``
    (kernels/chunked.py checks the kernel's limits first); ``cfg``: the launches (prefix_config's).
    ``keep`` (normalised only): z carries the states for the backward (kernels/kept_states.py)."""
    check_kernel_device(q)
    if args.tk != args.length:
        raise ValueError(f"prefix_forward takes as many queries as keys, got Tq={args.length}, Tk={args.tk}")
    cfg = cfg or prefix_config(args, q.dtype)
    _check_config(cfg)
    b, h, t = args.batch, args.heads, args.length
    p = _plan(args, cfg)
    z, out = None, None
    if keep and args.normalize:
        z, out = carrier((b, h, t), state_parts(args, p, k.dtype), q.device)
        if POISON_OUTPUTS:
            z.fill_(float("nan"))
    cs, cz, sg, use_total = forward_states(k, v, args, cfg, p, out)
    n_v = cdiv(args.dv, cfg.bv)
    w = p.nf * args.dv + p.nf
    dev = q.device
    poison = POISON_OUTPUTS
    c0, c1, c2 = scaled_coefficients(args)
    ks, vs = bhtd_strides(k, args.layout), bhtd_strides(v, args.layout)
    o = new_buffer((*q.shape[:-1], args.dv), q.dtype, dev, poison=poison)
    if z is None:
        z = new_buffer((b, h, t), torch.float32, dev, poison=poison) if args.normalize else o
    _prefix_output_kernel[(cdiv(t, cfg.bt), n_v, b * h)](
        q, k, v, o, z, cs, cz, sg,
        *bhtd_strides(q, args.layout), *ks, *vs, *bhtd_strides(o, args.layout),
        t, h, args.group, p.nc if args.causal else 1, p.segc, p.nseg, w, c0, c1, c2, args.eps,
        DK=args.dk, DV=args.dv, C=cfg.c, BT=cfg.bt, BS=cfg.bs, BK=p.bk, BV=cfg.bv, DB=p.db, CAUSAL=args.causal,
        NORMALIZE=args.normalize, PRECISION=dot_precision(q.dtype), FROM_TOTAL=use_total,
        ZDOT=cfg.zdot and args.causal, MODE=cfg.mode, num_warps=cfg.warps, num_stages=cfg.stages,
        **register_cap(cfg.maxnreg))
    return o, (z if args.normalize else None)


def recovered_states(z, args: BasedArguments, cfg: PrefixConfig, dtype: torch.dtype):
    """forward_states' result that prefix_forward(keep=True) left beside this z (same arguments and launch ``cfg``),
    or None."""
    p = _plan(args, cfg)
    out = carried(z, state_parts(args, p, dtype))
    return None if out is None else (*out, p.nseg > 1 or not args.causal)
