"""Chunkwise-parallel Based attention in Triton, states in the symmetric basis (DESIGN.md section 2).

With the feature maps phi_q, phi_k of kernels/symmetric_basis.py over the padded key dim BK (a power
of two, 16 at Dk = 16): block A = the BK (BK / 2) rolled pairs x_a x_{(a + d) mod BK}, block B =
(x_a, x_a^2), and the constant; 128 + 32 + 1 = 161 state rows at Dk = 16 (153 distinct; the full outer
product would need 273). The coefficients and the scale ride on phi_k; V' = [V, 1] (its ones column
is the normaliser, kept in float32 beside the value columns).

Forward: kernels/prefix_chunked.py (prefix states at chunk boundaries split over programs by their
rows, then every query tile in parallel); it returns o and the float32 normaliser z, all the backward
needs.

Backward: kernels/prefix_backward.py (reverse states at chunk boundaries, then every query tile and
every key tile in parallel) for bfloat16 and float32 with Dv <= 128; float16 inputs and Dv > 128 take
the segment-walking backward of this module (1.4-1.5x slower at T >= 8192 on the H200).

The segment-walking backward: T is cut into chunks of BT tokens and the chunks into segments of SEG
chunks, three stages in both directions:
  1. state kernels, one program per (segment, value block, batch x kv head), all in parallel: the
     segment's state dS_s = sum_{j in s} phi_k(k_j)^T v'_j [F, Dv + 1] float32 (and the reverse
     R below);
  2. scans (kernels/segment_scan.py): in place, slot s becomes the exclusive prefix S_{<s} (a walk
     over the NS segments, not over the tokens); non-causal: the total;
  3. the gradient kernels below, one program per (segment, value block, batch x head), each walking
     its segment from the scanned state.
Causal calls skip the one segment total no one reads (so a single segment needs no states).

The stored path (ChunkedConfig.stored, causal only) moves the walk out of the gradient kernels, whose
float32 [161, BV] state plus feature tiles exceed the register file (spills, L1-bound, 2 programs an
SM): after stages 1-2 a walk kernel per segment (state only) writes every chunk's state S_{<c} and
R_{>c} in the input dtype, the dtype the dots round it to anyway (float32 normaliser rows); the
gradient kernels then read one state per chunk and carry nothing (out_seg chunks a program).
Extra bytes: n_chunks x 161 x (2 Dv + 4) per (batch, kv head) each way, 2.7 MB a head at T = 8192
with 64-token chunks.

The pair factors x_{(a + d) mod BK} come from the tile in registers (tl.gather, or a one-hot dot),
or from gathered loads (L1 hits); their products in float32, rounded to the input dtype for the dots.

The backward's stages:
  - the forward states S (recomputed by stages 1-2) for dq;
  - reverse states R_{>s} = sum_{i after s} phi_q(q_i)^T [dn_i, dz_i] (summed over a GQA group) for
    dk and dv, scanned from the end;
  - a dq kernel walking each segment forward:   dphi_q = dn S^T + dz S_z, dq = contract(dphi_q)
    + intra-chunk dS K;  a dk/dv kernel walking each segment backward: dv = phi_k R + intra,
    dphi_k = v R^T + R_z, dk = contract(weights * dphi_k) + intra (over the group's query heads).
  contract() is the features' transpose: a sum over the rolled copies and one one-hot dot.
  dn = do / (z + eps), dz = -(do . o) / (z + eps) (normalised; plain do unnormalised).

State bytes (all O(T / (BT SEG))): (NS + 1) x 161 x (Dv + 1) float32 per (batch, kv head) at
Dk = 16 (41.9 KB a slot at Dv = 64), once for the forward and twice for the backward (S and R).

Precision: float32 accumulators and states; dot operands in the input dtype (float16/bfloat16
tensor cores; float32 inputs use exact float32 dots). In this backward, float16 states are rounded
to float16 before their dot, so sum_j k_a k_b v_j must stay within float16's range (the forward keeps
float16 inputs' states in float32: kernels/prefix_chunked.py's state_dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arguments import BasedArguments, check_arguments, check_kernel_device, triton_interpreting
from .function import BasedKernelFunction
from .launch import (bhtd_strides, cdiv, check_grid_rows, dot_precision, new_buffer, next_power_of_2,
                     scaled_coefficients)
from .parallel import _parallel_bwd_prep_kernel
from .prefix_backward import prefix_backward, supports as prefix_backward_supports
from .prefix_chunked import prefix_forward
from .segment_scan import segment_scan_kernel
from .tiles import load_rows, store_rows

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DK = 32
MAX_DV = 256
MAX_SEGMENT_CHUNKS = 32
# The backward's GPU launches, (chunk tokens, value block, warps, pipeline stages, programs wanted in
# the gradient kernels (the stored path: in the walk): the segment length follows from it, how the
# rolled pair factors are formed: 0 gathered loads, 1 tl.gather from registers, 2 a one-hot dot[, the
# stored path (0/1), chunks per gradient program on the stored path, the state kernels' value block
# and warps (0: as the gradient kernels)]), for 16-bit inputs and for float32. The value block is
# capped by the state kept in registers: (slot rows) x BV <= 161 x 64. H200 sweeps at T=8192
# (benchmarks/NOTES.md, chunked calls 1-2): forward+backward 8.80 ms with this backward.
BACKWARD_LAUNCH = (32, 64, 4, 1, 1024, 2, 0, 1)
FLOAT32_LAUNCH = (32, 64, 4, 1, 1024, 0, 0, 1)
STATE_REGISTER_BUDGET = 161 * 64
# When True, every output and buffer is filled with NaN before a kernel writes it (tests set this).
POISON_OUTPUTS = False


# The kernels take the length and segment counts unspecialised: one compilation serves every T.
# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------
@triton.jit
def _poly(r, c0, c1, c2):
    # f(scale r) with (c1, c2) already multiplied by (scale, scale^2)
    return c0 + r * (c1 + c2 * r)


@triton.jit
def _poly_slope(r, c1, c2):
    return c1 + 2.0 * c2 * r


@triton.jit
def _rolled(ptr, rows, s_t, s_d, T, DK, x, BT: tl.constexpr, BK: tl.constexpr, MODE: tl.constexpr,
            PRECISION: tl.constexpr):
    # [BT, BK // 2, BK]: element (t, d, a) = x[t, (a + d + 1) % BK] (0 outside T and Dk), x the
    # tile [BT, BK] at ptr. MODE 0: gathered loads (L1); 1: tl.gather from registers; 2: a one-hot dot
    d = tl.arange(0, BK // 2)
    a = tl.arange(0, BK)
    if MODE == 0:
        col = (a[None, :] + d[:, None] + 1) % BK                                      # [BK/2, BK]
        mask = (rows < T)[:, None, None] & (col < DK)[None, :, :]
        xr = tl.load(ptr + rows[:, None, None] * s_t + col[None, :, :] * s_d, mask=mask, other=0.0)
    else:
        p = tl.arange(0, BK // 2 * BK)
        col = (p % BK + p // BK + 1) % BK                                             # [FA]
        if MODE == 1:
            xr = tl.gather(x, tl.broadcast_to(col[None, :], (BT, BK // 2 * BK)), axis=1)
        else:
            e = (tl.arange(0, BK)[:, None] == col[None, :]).to(x.dtype)              # [BK, FA]
            xr = tl.dot(x, e, input_precision=PRECISION)
        xr = tl.reshape(xr, (BT, BK // 2, BK))
    return xr


@triton.jit
def _features(xf, xr, BT: tl.constexpr, BK: tl.constexpr):
    # phi without the constant, unweighted, float32: block A [BT, FA] = x_a x_{a+d+1} (rolled pairs),
    # block B [BT, FB] = (x_a, x_a^2) interleaved. xf: the tile [BT, BK] in float32, xr: _rolled
    fa = tl.reshape(xf[:, None, :] * xr.to(tl.float32), (BT, BK // 2 * BK))
    fb = tl.reshape(tl.join(xf, xf * xf), (BT, 2 * BK))
    return fa, fb


@triton.jit
def _key_weights(c1, c2, BK: tl.constexpr):
    # phi_k's weights: block A 2 c2 (c2 at offset BK / 2, which meets every pair twice), block B (c1, c2)
    pa = tl.arange(0, BK // 2 * BK)
    wa = tl.where(pa // BK == BK // 2 - 1, c2, 2.0 * c2)
    pb = tl.arange(0, 2 * BK)
    wb = tl.where(pb % 2 == 0, c1, c2)
    return wa, wb


@triton.jit
def _contract(ga, gb, xf, xr, dt: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # gradients w.r.t. the features (ga [BT, FA], gb [BT, FB]) -> w.r.t. x [BT, BK], float32:
    #   x_a x_c (c = a + d + 1): d x_a += g x_c (a sum over d), d x_c += g x_a (a one-hot dot);
    #   (x_a, x_a^2): d x_a += g_lin + 2 x_a g_sq
    ga3 = tl.reshape(ga, (BT, BK // 2, BK))
    out = tl.sum(ga3 * xr.to(tl.float32), axis=1)
    u = tl.reshape(ga3 * xf[:, None, :], (BT, BK // 2 * BK))
    p = tl.arange(0, BK // 2 * BK)
    col = (p % BK + p // BK + 1) % BK
    e = (col[:, None] == tl.arange(0, BK)[None, :]).to(dt)                           # [FA, BK]
    out += tl.dot(u.to(dt), e, input_precision=PRECISION)
    g_lin, g_sq = tl.split(tl.reshape(gb, (BT, BK, 2)))
    return out + g_lin + 2.0 * xf * g_sq


@triton.jit
def _slot_offsets(FX: tl.constexpr, OFF: tl.constexpr, offs_v, DV):
    # [FX, BV] offsets of features OFF.. within a state slot ([NF, DV] values, then [NF] normaliser)
    return (OFF + tl.arange(0, FX))[:, None] * DV + offs_v[None, :]


@triton.jit
def _load_state(slot, FA: tl.constexpr, FB: tl.constexpr, offs_v, DV, NORMALIZE: tl.constexpr):
    # slot rows: block A (FA), block B (FB), the constant (1)
    NF: tl.constexpr = FA + FB + 1
    vmask = (offs_v < DV)[None, :]
    sa = tl.load(slot + _slot_offsets(FA, 0, offs_v, DV), mask=vmask, other=0.0)
    sb = tl.load(slot + _slot_offsets(FB, FA, offs_v, DV), mask=vmask, other=0.0)
    s0 = tl.load(slot + (FA + FB) * DV + offs_v, mask=offs_v < DV, other=0.0)
    if NORMALIZE:
        za = tl.load(slot + NF * DV + tl.arange(0, FA))
        zb = tl.load(slot + NF * DV + FA + tl.arange(0, FB))
        z0 = tl.load(slot + NF * DV + FA + FB)
    else:
        za = tl.zeros([FA], dtype=tl.float32)
        zb = tl.zeros([FB], dtype=tl.float32)
        z0 = 0.0
    return sa, sb, s0, za, zb, z0


@triton.jit
def _store_state(slot, sa, sb, s0, za, zb, z0, FA: tl.constexpr, FB: tl.constexpr, offs_v, DV,
                 NORMALIZE: tl.constexpr, i_v):
    NF: tl.constexpr = FA + FB + 1
    vmask = (offs_v < DV)[None, :]
    tl.store(slot + _slot_offsets(FA, 0, offs_v, DV), sa, mask=vmask)
    tl.store(slot + _slot_offsets(FB, FA, offs_v, DV), sb, mask=vmask)
    tl.store(slot + (FA + FB) * DV + offs_v, s0, mask=offs_v < DV)
    if NORMALIZE:
        if i_v == 0:        # the normaliser's column: value block 0 writes it
            tl.store(slot + NF * DV + tl.arange(0, FA), za)
            tl.store(slot + NF * DV + FA + tl.arange(0, FB), zb)
            tl.store(slot + NF * DV + FA + FB, z0)


@triton.jit
def _chunk_slot(cs, cz, i_bhk, c, T, BT: tl.constexpr, NF: tl.constexpr, DV):
    # the per-chunk state slots of the stored path: values [NF, DV] in the input dtype, normaliser [NF] float32
    slot = i_bhk.to(tl.int64) * tl.cdiv(T, BT) + c
    return cs + slot * NF * DV, cz + slot * NF


@triton.jit
def _store_chunk_state(cs, cz, sa, sb, s0, za, zb, z0, FA: tl.constexpr, FB: tl.constexpr, offs_v, DV,
                       NORMALIZE: tl.constexpr, i_v):
    vmask = (offs_v < DV)[None, :]
    et = cs.dtype.element_ty
    tl.store(cs + _slot_offsets(FA, 0, offs_v, DV), sa.to(et), mask=vmask)
    tl.store(cs + _slot_offsets(FB, FA, offs_v, DV), sb.to(et), mask=vmask)
    tl.store(cs + (FA + FB) * DV + offs_v, s0.to(et), mask=offs_v < DV)
    if NORMALIZE:
        if i_v == 0:
            tl.store(cz + tl.arange(0, FA), za)
            tl.store(cz + FA + tl.arange(0, FB), zb)
            tl.store(cz + FA + FB, z0)


@triton.jit
def _load_chunk_state(cs, cz, FA: tl.constexpr, FB: tl.constexpr, offs_v, DV, NORMALIZE: tl.constexpr):
    vmask = (offs_v < DV)[None, :]
    sa = tl.load(cs + _slot_offsets(FA, 0, offs_v, DV), mask=vmask, other=0.0)
    sb = tl.load(cs + _slot_offsets(FB, FA, offs_v, DV), mask=vmask, other=0.0)
    s0 = tl.load(cs + (FA + FB) * DV + offs_v, mask=offs_v < DV, other=0.0).to(tl.float32)
    if NORMALIZE:
        za = tl.load(cz + tl.arange(0, FA))
        zb = tl.load(cz + FA + tl.arange(0, FB))
        z0 = tl.load(cz + FA + FB)
    else:
        za = tl.zeros([FA], dtype=tl.float32)
        zb = tl.zeros([FB], dtype=tl.float32)
        z0 = 0.0
    return sa, sb, s0, za, zb, z0


# ----------------------------------------------------------------------------------------------
# Stage 1: segment states (forward: keys and values; backward: queries and output gradients)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "SEG", "NS", "S_OFF"])
def _segment_state_kernel(
    x, y, dz, st, cs, cz,
    sx_b, sx_h, sx_t, sx_d, sy_b, sy_h, sy_t, sy_d,
    T, HX, GROUP, DK, DV, SEG, NS, W, S_OFF, c0, c1, c2,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    KEYS: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, MODE: tl.constexpr,
    WALK: tl.constexpr,
):
    # KEYS: dS_s = sum_j phi_k(k_j)^T [v_j, 1]  (x = k, y = v; one program per kv head)
    # else: dR_s = sum_i phi_q(q_i)^T [dn_i, dz_i] summed over the GROUP query heads of a kv head
    #       (x = q, y = dn, dz [B*H, T] float32); the chunks are taken last first
    # program i_s sums segment i_s + S_OFF (causal: the segment whose total no one reads is skipped)
    # WALK (the stored path): start from slot i_s (the scanned S_{<s} / R_{>s}) and, before adding each
    # chunk, store the running state into that chunk's slot of cs / cz (S_{<c}, or R_{>c} for queries)
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    i_s, i_v, i_bhk = tl.program_id(0) + S_OFF, tl.program_id(1), tl.program_id(2)
    if KEYS:
        hk_n = HX
        n_heads = 1
        cw = c0
    else:
        hk_n = HX // GROUP
        n_heads = GROUP
        cw = 1.0
    b = (i_bhk // hk_n).to(tl.int64)
    hk = (i_bhk % hk_n).to(tl.int64)
    dt = x.dtype.element_ty
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    wa, wb = _key_weights(c1, c2, BK)
    slot = st + (i_bhk.to(tl.int64) * (NS + 1) + i_s) * W
    if WALK:
        sa, sb, s0, za, zb, z0 = _load_state(slot, FA, FB, offs_v, DV, NORMALIZE)
    else:
        sa = tl.zeros([FA, BV], dtype=tl.float32)
        sb = tl.zeros([FB, BV], dtype=tl.float32)
        s0 = tl.zeros([BV], dtype=tl.float32)
        za = tl.zeros([FA], dtype=tl.float32)
        zb = tl.zeros([FB], dtype=tl.float32)
        z0 = 0.0
    n_chunks = tl.cdiv(T, BT)
    c_start = i_s * SEG
    c_end = tl.minimum(c_start + SEG, n_chunks)
    for i in range(0, c_end - c_start):
        if KEYS:
            c = c_start + i
        else:
            c = c_end - 1 - i
        if WALK:
            ps, pz = _chunk_slot(cs, cz, i_bhk, c, T, BT, NF, DV)
            _store_chunk_state(ps, pz, sa, sb, s0, za, zb, z0, FA, FB, offs_v, DV, NORMALIZE, i_v)
        rows = c * BT + offs_t
        valid = rows < T
        for g in range(0, n_heads):
            h = hk * n_heads + g                  # keys: the kv head itself; queries: the group's heads
            xp = x + b * sx_b + h * sx_h
            yp = y + b * sy_b + h * sy_h
            xt = load_rows(xp, rows, offs_k, sx_t, sx_d, T, DK)                        # [BT, BK]
            xc = xt.to(tl.float32)
            yc = load_rows(yp, rows, offs_v, sy_t, sy_d, T, DV).to(dt)                 # [BT, BV]
            fa, fb = _features(xc, _rolled(xp, rows, sx_t, sx_d, T, DK, xt, BT, BK, MODE, PRECISION), BT, BK)
            if KEYS:
                fa = fa * wa[None, :]
                fb = fb * wb[None, :]
            sa = tl.dot(tl.trans(fa.to(dt)), yc, sa, input_precision=PRECISION)
            sb = tl.dot(tl.trans(fb.to(dt)), yc, sb, input_precision=PRECISION)
            s0 += cw * tl.sum(yc.to(tl.float32), axis=0)
            if NORMALIZE:
                if KEYS:
                    za += tl.sum(fa, axis=0)
                    zb += tl.sum(fb, axis=0)
                    z0 += cw * tl.sum(valid.to(tl.float32), axis=0)
                else:
                    dzc = tl.load(dz + (b * HX + h) * T + rows, mask=valid, other=0.0)
                    za += tl.sum(fa * dzc[:, None], axis=0)
                    zb += tl.sum(fb * dzc[:, None], axis=0)
                    z0 += tl.sum(dzc, axis=0)
    if not WALK:
        _store_state(slot, sa, sb, s0, za, zb, z0, FA, FB, offs_v, DV, NORMALIZE, i_v)


# ----------------------------------------------------------------------------------------------
# Stage 3, backward: dq (segments walked forward)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "SEG", "NS"])
def _chunked_dq_kernel(
    q, k, v, dn, dz, dq, st, cz,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sdn_b, sdn_h, sdn_t, sdn_d,
    sdq_v, sdq_b, sdq_h, sdq_t, sdq_d,
    T, H, GROUP, DK, DV, SEG, NS, W, c0, c1, c2,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, MODE: tl.constexpr,
    STORED: tl.constexpr,
):
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    i_s, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    hk = h // GROUP
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    dn += b * sdn_b + h * sdn_h
    dz += i_bh.to(tl.int64) * T
    dq += i_v.to(tl.int64) * sdq_v + b * sdq_b + h * sdq_h
    dt = q.dtype.element_ty
    zw = (i_v == 0).to(tl.float32)           # the normaliser's terms: value block 0 only
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    wa, wb = _key_weights(c1, c2, BK)
    if not STORED:
        if CAUSAL:
            slot = st + ((i_bh // GROUP).to(tl.int64) * (NS + 1) + i_s) * W
        else:
            slot = st + ((i_bh // GROUP).to(tl.int64) * (NS + 1) + NS) * W
        sa, sb, s0, za, zb, z0 = _load_state(slot, FA, FB, offs_v, DV, NORMALIZE)

    n_chunks = tl.cdiv(T, BT)
    for c in range(i_s * SEG, tl.minimum(i_s * SEG + SEG, n_chunks)):
        if STORED:
            ps, pz = _chunk_slot(st, cz, i_bh // GROUP, c, T, BT, NF, DV)
            sa, sb, s0, za, zb, z0 = _load_chunk_state(ps, pz, FA, FB, offs_v, DV, NORMALIZE)
        rows = c * BT + offs_t
        valid = rows < T
        qc = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK)                          # [BT, BK]
        qf = qc.to(tl.float32)
        qr = _rolled(q, rows, sq_t, sq_d, T, DK, qc, BT, BK, MODE, PRECISION)
        dnc = load_rows(dn, rows, offs_v, sdn_t, sdn_d, T, DV).to(dt)                # [BT, BV]
        # inter: d phi_q = dn S^T (+ dz S_z), then through the features
        ga = tl.dot(dnc, tl.trans(sa.to(dt)), input_precision=PRECISION)              # [BT, FA]
        gb = tl.dot(dnc, tl.trans(sb.to(dt)), input_precision=PRECISION)              # [BT, FB]
        if NORMALIZE:
            dzc = zw * tl.load(dz + rows, mask=valid, other=0.0)                      # [BT]
            ga += dzc[:, None] * za[None, :]
            gb += dzc[:, None] * zb[None, :]
        acc = _contract(ga, gb, qf, qr, dt, BT, BK, PRECISION)                        # [BT, BK]
        if CAUSAL:
            kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            keep = (offs_t[:, None] >= offs_t[None, :]) & valid[None, :]
            r = tl.dot(qc, tl.trans(kc), input_precision=PRECISION)                   # [BT, BT]
            da = tl.dot(dnc, tl.trans(vc), input_precision=PRECISION)
            if NORMALIZE:
                da += dzc[:, None]
            ds = tl.where(keep, da * _poly_slope(r, c1, c2), 0.0)
            acc = tl.dot(ds.to(dt), kc, acc, input_precision=PRECISION)
            if not STORED:
                ka, kb = _features(kc.to(tl.float32), _rolled(k, rows, sk_t, sk_d, T, DK, kc, BT, BK, MODE, PRECISION), BT, BK)
                ka = ka * wa[None, :]
                kb = kb * wb[None, :]
                sa = tl.dot(tl.trans(ka.to(dt)), vc, sa, input_precision=PRECISION)
                sb = tl.dot(tl.trans(kb.to(dt)), vc, sb, input_precision=PRECISION)
                if NORMALIZE:
                    za += tl.sum(ka, axis=0)
                    zb += tl.sum(kb, axis=0)
        store_rows(dq, acc, rows, offs_k, sdq_t, sdq_d, T, DK)


# ----------------------------------------------------------------------------------------------
# Stage 3, backward: dk, dv (segments walked backward; one program per kv head)
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "SEG", "NS"])
def _chunked_dkv_kernel(
    q, k, v, dn, dz, dk, dv, rt, cz,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sdn_b, sdn_h, sdn_t, sdn_d,
    sdk_v, sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
    T, H, GROUP, DK, DV, SEG, NS, W, c0, c1, c2,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, MODE: tl.constexpr,
    STORED: tl.constexpr,
):
    # STORED (causal only): rt / cz are the per-chunk reverse states R_{>c} of the walk
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    i_s, i_v, i_bhk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    HK = H // GROUP
    b = (i_bhk // HK).to(tl.int64)
    hk = (i_bhk % HK).to(tl.int64)
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    dk += i_v.to(tl.int64) * sdk_v + b * sdk_b + hk * sdk_h
    dv += b * sdv_b + hk * sdv_h
    dt = k.dtype.element_ty
    zw = (i_v == 0).to(tl.float32)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    wa, wb = _key_weights(c1, c2, BK)
    if not STORED:
        if CAUSAL:
            slot = rt + (i_bhk.to(tl.int64) * (NS + 1) + i_s) * W                # R_{>s}
        else:
            slot = rt + (i_bhk.to(tl.int64) * (NS + 1) + NS) * W                 # the total
        ra, rb, r0, rza, rzb, rz0 = _load_state(slot, FA, FB, offs_v, DV, NORMALIZE)
        rza = rza * zw
        rzb = rzb * zw

    n_chunks = tl.cdiv(T, BT)
    c_start = i_s * SEG
    c_end = tl.minimum(c_start + SEG, n_chunks)
    for i in range(0, c_end - c_start):
        c = c_end - 1 - i                                                             # last chunk first
        if STORED:
            ps, pz = _chunk_slot(rt, cz, i_bhk, c, T, BT, NF, DV)
            ra, rb, r0, rza, rzb, rz0 = _load_chunk_state(ps, pz, FA, FB, offs_v, DV, NORMALIZE)
            rza = rza * zw
            rzb = rzb * zw
        rows = c * BT + offs_t
        valid = rows < T
        kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)                          # [BT, BK]
        kf = kc.to(tl.float32)
        kr = _rolled(k, rows, sk_t, sk_d, T, DK, kc, BT, BK, MODE, PRECISION)
        vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)                          # [BT, BV]
        # inter: dv = phi_k R;  d phi_k = v R^T + R_z, times the key weights, through the features
        ka, kb = _features(kf, kr, BT, BK)
        acc_v = tl.dot((ka * wa[None, :]).to(dt), ra.to(dt), input_precision=PRECISION)   # [BT, BV]
        acc_v = tl.dot((kb * wb[None, :]).to(dt), rb.to(dt), acc_v, input_precision=PRECISION)
        acc_v += c0 * r0[None, :]
        ga = tl.dot(vc, tl.trans(ra.to(dt)), input_precision=PRECISION)               # [BT, FA]
        gb = tl.dot(vc, tl.trans(rb.to(dt)), input_precision=PRECISION)
        if NORMALIZE:
            ga += rza[None, :]
            gb += rzb[None, :]
        acc_k = _contract(ga * wa[None, :], gb * wb[None, :], kf, kr, dt, BT, BK, PRECISION)   # [BT, BK]
        if CAUSAL:
            for g in range(0, GROUP):
                h = hk * GROUP + g
                qp = q + b * sq_b + h * sq_h
                dnp = dn + b * sdn_b + h * sdn_h
                qc = load_rows(qp, rows, offs_k, sq_t, sq_d, T, DK)
                dnc = load_rows(dnp, rows, offs_v, sdn_t, sdn_d, T, DV).to(dt)
                # intra, transposed (rows: keys j, columns: queries i >= j)
                keep = offs_t[None, :] >= offs_t[:, None]
                st_ = tl.dot(kc, tl.trans(qc), input_precision=PRECISION)             # [BT, BT]
                at = tl.where(keep, _poly(st_, c0, c1, c2), 0.0)
                acc_v = tl.dot(at.to(dt), dnc, acc_v, input_precision=PRECISION)
                dat = tl.dot(vc, tl.trans(dnc), input_precision=PRECISION)
                if NORMALIZE:
                    dzc = zw * tl.load(dz + (b * H + h) * T + rows, mask=valid, other=0.0)
                    dat += dzc[None, :]
                dst = tl.where(keep, dat * _poly_slope(st_, c1, c2), 0.0)
                acc_k = tl.dot(dst.to(dt), qc, acc_k, input_precision=PRECISION)
                if not STORED:      # this chunk's queries join the reverse states
                    qa, qb = _features(qc.to(tl.float32), _rolled(qp, rows, sq_t, sq_d, T, DK, qc, BT, BK, MODE, PRECISION), BT, BK)
                    ra = tl.dot(tl.trans(qa.to(dt)), dnc, ra, input_precision=PRECISION)
                    rb = tl.dot(tl.trans(qb.to(dt)), dnc, rb, input_precision=PRECISION)
                    r0 += tl.sum(dnc.to(tl.float32), axis=0)
                    if NORMALIZE:
                        rza += tl.sum(qa * dzc[:, None], axis=0)
                        rzb += tl.sum(qb * dzc[:, None], axis=0)
        store_rows(dk, acc_k, rows, offs_k, sdk_t, sdk_d, T, DK)
        store_rows(dv, acc_v, rows, offs_v, sdv_t, sdv_d, T, DV)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkedConfig:
    """Chunk length bt, chunks per segment seg, value block bv, warps and pipeline stages."""

    bt: int
    seg: int
    bv: int
    num_warps: int = 4
    num_stages: int = 1
    features: int = 0               # how the rolled pair factors are formed (see _rolled)
    # The stored path (causal only): a walk per segment writes every chunk's state (S_{<c}, and R_{>c}
    # for the backward) in the input dtype, the dtype its dots round it to anyway; the output kernels
    # then read them, out_seg chunks per program, and carry nothing. Off: the output kernels carry the
    # state from the segment's start (float32, in registers).
    stored: bool = False
    out_seg: int = 1
    # value block and warps of the state kernels (segment sums and the walk; 0: bv and num_warps): they
    # hold a float32 state but form no outputs, so a smaller value block can pay for more programs
    state_bv: int = 0
    state_warps: int = 0

    def stored_for(self, args: BasedArguments) -> bool:
        return self.stored and args.causal


def _pow2(n: int) -> int:
    return max(16, next_power_of_2(n))


def _slot_rows(dk: int) -> int:
    """Rows of a state slot: the Triton feature blocks over the padded BK (FA + FB) and the constant."""
    bk = _pow2(dk)
    return bk // 2 * bk + 2 * bk + 1


def _value_block(args: BasedArguments, most: int = 128) -> int:
    nf = _slot_rows(args.dk)
    bv = 16
    while bv * 2 <= min(_pow2(args.dv), most) and nf * bv * 2 <= STATE_REGISTER_BUDGET:
        bv *= 2
    return bv


def _segment_chunks(args: BasedArguments, bt: int, bv: int, target: int) -> int:
    """Chunks per segment: the longest segments (at most MAX_SEGMENT_CHUNKS chunks) that still give
    the output kernels ``target`` programs."""
    n_chunks = cdiv(args.length, bt)
    programs_per_segment = args.batch * args.heads * cdiv(args.dv, bv)
    seg = 1
    while seg < MAX_SEGMENT_CHUNKS and cdiv(n_chunks, seg * 2) * programs_per_segment >= target:
        seg *= 2
    return seg


def config_from_launch(args: BasedArguments, launch: tuple) -> ChunkedConfig:
    """A launch tuple (see BACKWARD_LAUNCH) resolved for these arguments."""
    bt, bv, warps, stages, target, mode, stored, out_seg, state_bv, state_warps = (
        tuple(launch) + (0, 1, 0, 0)[len(launch) - 6:])
    if stored and bt > 64:
        # On the H200 (triton 3.6) the stored path at 128-token chunks made an illegal memory access
        # (benchmarks/NOTES.md, 2026-11-30 kernel sweep); the interpreter does not reproduce it.
        raise ValueError(f"launch {tuple(launch)}: the stored path takes chunks of at most 64 tokens, got {bt}")
    bv = _value_block(args, bv)
    state_bv = _value_block(args, state_bv) if state_bv else 0
    return ChunkedConfig(bt=bt, seg=_segment_chunks(args, bt, bv, target), bv=bv, num_warps=warps,
                         num_stages=stages, features=mode, stored=bool(stored), out_seg=out_seg,
                         state_bv=state_bv, state_warps=state_warps)


def chunked_config(args: BasedArguments, dtype: torch.dtype) -> ChunkedConfig:
    """The backward's block sizes for these arguments (small, fixed ones under the interpreter)."""
    if triton_interpreting():
        return ChunkedConfig(bt=16, seg=2, bv=_value_block(args))
    if dtype == torch.float32:       # exact float32 dots: small tiles (the reference path, not the fast one)
        return config_from_launch(args, FLOAT32_LAUNCH)
    return config_from_launch(args, BACKWARD_LAUNCH)


def _check_supported(q: torch.Tensor, args: BasedArguments) -> None:
    if q.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"q, k, v dtype must be one of (float16, bfloat16, float32), got {q.dtype}")
    if not 1 <= args.dk <= MAX_DK:
        raise ValueError(f"chunked_based supports feature dims Dk from 1 to {MAX_DK}, got Dk={args.dk}")
    if not 1 <= args.dv <= MAX_DV:
        raise ValueError(f"chunked_based supports value dims Dv from 1 to {MAX_DV}, got Dv={args.dv}")
    check_grid_rows(args)
    check_kernel_device(q)


def state_bytes(args: BasedArguments, cfg: ChunkedConfig, itemsize: int = 2) -> int:
    """Bytes of one set of states: (NS + 1) float32 segment slots per batch x kv head, and on the stored
    path also every chunk's state (values in the input dtype of ``itemsize`` bytes, normaliser float32)."""
    n_chunks = cdiv(args.length, cfg.bt)
    ns = cdiv(n_chunks, cfg.seg)
    nf = _slot_rows(args.dk)
    total = (ns + 1) * nf * (args.dv + 1) * 4
    if cfg.stored_for(args):
        total += n_chunks * nf * (args.dv * itemsize + (4 if args.normalize else 0))
    return args.batch * args.kv_heads * total


def _states(x, y, dz, args: BasedArguments, cfg: ChunkedConfig, keys: bool, x_strides, y_strides):
    """Stages 1 and 2: slots [B * Hkv, NS + 1, W] float32. Causal: slot s holds the state before
    segment s (keys) or after it (queries: the reverse states); non-causal: slot NS the total.
    Returns (states, normaliser states, NS, W): on the stored path the walk's per-chunk states
    [B * Hkv, n_chunks, NF, Dv] (x's dtype) and [B * Hkv, n_chunks, NF] float32; else (slots, slots, ...)."""
    nf = _slot_rows(args.dk)
    n_chunks = cdiv(args.length, cfg.bt)
    ns = cdiv(n_chunks, cfg.seg)
    w = nf * (args.dv + 1)
    bhk = args.batch * args.kv_heads
    st = _new_buffer((bhk, ns + 1, w), torch.float32, x.device)
    c0, c1, c2 = scaled_coefficients(args)
    # causal: the last segment's total (keys) or the first's (queries) is read by no one
    n_in = ns - 1 if args.causal else ns
    s_off = 1 if args.causal and not keys else 0
    bv = cfg.state_bv or cfg.bv
    common = dict(BT=cfg.bt, BK=_pow2(args.dk), BV=bv, KEYS=keys, NORMALIZE=args.normalize,
                  PRECISION=dot_precision(x.dtype), MODE=cfg.features,
                  num_warps=cfg.state_warps or cfg.num_warps, num_stages=cfg.num_stages)
    sizes = (args.length, args.kv_heads if keys else args.heads, args.group, args.dk, args.dv, cfg.seg, ns, w)
    n_v = cdiv(args.dv, bv)
    if n_in > 0:
        _segment_state_kernel[(n_in, n_v, bhk)](
            x, y, dz, st, st, st, *x_strides, *y_strides, *sizes, s_off, c0, c1, c2, WALK=False, **common)
    block = 1024
    segment_scan_kernel[(bhk, cdiv(w, block))](
        st, ns, n_in, w, REVERSE=args.causal and not keys, BLOCK=block, num_warps=4)
    if not cfg.stored_for(args):
        return st, st, ns, w
    cs = _new_buffer((bhk, n_chunks, nf, args.dv), x.dtype, x.device)
    cz = _new_buffer((bhk, n_chunks, nf), torch.float32, x.device) if args.normalize else cs
    _segment_state_kernel[(ns, n_v, bhk)](
        x, y, dz, st, cs, cz, *x_strides, *y_strides, *sizes, 0, c0, c1, c2, WALK=True, **common)
    return cs, cz, ns, w


def _stage3(args: BasedArguments, cfg: ChunkedConfig, ns: int, heads: int):
    """(grid, SEG, NS) of an output kernel: per segment carrying, or out_seg chunks a program stored."""
    n_v = cdiv(args.dv, cfg.bv)
    if cfg.stored_for(args):
        n_chunks = cdiv(args.length, cfg.bt)
        return (cdiv(n_chunks, cfg.out_seg), n_v, args.batch * heads), cfg.out_seg, ns
    return (ns, n_v, args.batch * heads), cfg.seg, ns


def chunked_forward(q, k, v, args: BasedArguments):
    """Kernel contract: (o, z), o like q (dtype and layout), z the float32 normaliser [B, H, T] or None."""
    _check_supported(q, args)
    return prefix_forward(q, k, v, args)


def chunked_training_forward(q, k, v, args: BasedArguments):
    """chunked_forward for a call whose backward will run: a normalised z also carries the prefix states, so
    that the backward does not compute them again (kernels/kept_states.py)."""
    _check_supported(q, args)
    return prefix_forward(q, k, v, args, keep=prefix_backward_supports(args, q.dtype))


def _backward(q, k, v, o, z, do, args: BasedArguments, cfg: ChunkedConfig):
    b, h, hk, t, dk_, dv_ = args.batch, args.heads, args.kv_heads, args.length, args.dk, args.dv
    dev = q.device
    if args.normalize:
        dn = _new_buffer((b, h, t, dv_), do.dtype, dev)                 # do / (z + eps)
        dz = _new_buffer((b, h, t), torch.float32, dev)                 # -(do . o) / (z + eps)
        bv = _pow2(dv_)
        prep_bt = 32 if bv > 128 else 64
        _parallel_bwd_prep_kernel[(cdiv(t, prep_bt), b * h)](
            o, do, z, dn, dz, *bhtd_strides(o, args.layout), *bhtd_strides(do, args.layout),
            t, h, args.eps, DV=dv_, BV=bv, BT=prep_bt, num_warps=4,
        )
        dn_strides = dn.stride()
    else:
        dn, dz = do, do                                                 # dz unused
        dn_strides = bhtd_strides(do, args.layout)
    qs, ks, vs = (bhtd_strides(x, args.layout) for x in (q, k, v))
    st, sz, ns, w = _states(k, v, k, args, cfg, True, ks, vs)           # S_{<s} (or S_{<c}), recomputed
    rt, rz, _, _ = _states(q, dn, dz, args, cfg, False, qs, dn_strides)  # R_{>s} (or R_{>c})
    n_v = cdiv(dv_, cfg.bv)
    if n_v == 1:
        dq = _new_buffer(q.shape, q.dtype, dev)
        dq_target, dq_strides = dq, (0, *bhtd_strides(dq, args.layout))
        dk = _new_buffer(k.shape, k.dtype, dev)
        dk_target, dk_strides = dk, (0, *bhtd_strides(dk, args.layout))
    else:                                   # partial sums over value blocks, in float32
        dq_target = _new_buffer((n_v, b, h, t, dk_), torch.float32, dev)
        dk_target = _new_buffer((n_v, b, hk, t, dk_), torch.float32, dev)
        dq_strides, dk_strides = dq_target.stride(), dk_target.stride()
    dv = _new_buffer(v.shape, v.dtype, dev)
    c0, c1, c2 = scaled_coefficients(args)
    common = dict(BT=cfg.bt, BK=_pow2(dk_), BV=cfg.bv,
                  CAUSAL=args.causal, NORMALIZE=args.normalize, PRECISION=dot_precision(q.dtype), MODE=cfg.features,
                  STORED=cfg.stored_for(args), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    grid, seg, ns = _stage3(args, cfg, ns, h)
    _chunked_dq_kernel[grid](
        q, k, v, dn, dz, dq_target, st, sz, *qs, *ks, *vs, *dn_strides, *dq_strides,
        t, h, args.group, dk_, dv_, seg, ns, w, c0, c1, c2, **common)
    grid, seg, ns = _stage3(args, cfg, ns, hk)
    _chunked_dkv_kernel[grid](
        q, k, v, dn, dz, dk_target, dv, rt, rz, *qs, *ks, *vs, *dn_strides, *dk_strides,
        *bhtd_strides(dv, args.layout),
        t, h, args.group, dk_, dv_, seg, ns, w, c0, c1, c2, **common)
    if n_v > 1:
        dq, dk = dq_target.sum(0).to(q.dtype), dk_target.sum(0).to(k.dtype)
        if args.layout == "BTHD":
            dq, dk = dq.transpose(1, 2).contiguous(), dk.transpose(1, 2).contiguous()
    return dq, dk, dv


def chunked_backward(q, k, v, o, z, do, args: BasedArguments):
    """Kernel contract: (dq, dk, dv) with the shapes and dtypes of q, k, v (dk, dv summed over a group)."""
    _check_supported(q, args)
    if prefix_backward_supports(args, q.dtype):
        return prefix_backward(q, k, v, o, z, do, args)
    return _backward(q, k, v, o, z, do, args, chunked_config(args, q.dtype))


def check_chunked_arguments(q, k, v, scale=None, coeffs=(1.0, 1.0, 0.5), causal=True, normalize=True, eps=1e-6,
                            layout="BHTD") -> BasedArguments:
    """check_arguments plus the chunked kernel's limits (dtypes, Dk <= 32, Dv <= 256, device)."""
    args = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout, dtypes=ACCEPTED_DTYPES)
    _check_supported(q, args)
    return args


def chunked_based(q, k, v, scale=None, coeffs=(1.0, 1.0, 0.5), causal=True, normalize=True, eps=1e-6,
                  layout="BHTD"):
    """Differentiable chunkwise-parallel Based attention (O(T) memory); see ``naive_parallel_based``.

    q: [B, H, T, Dk], k: [B, Hkv, T, Dk], v: [B, Hkv, T, Dv] (or [B, T, H, D] with layout="BTHD");
    Dk from 1 to 32, Dv up to 256; float16, bfloat16 or float32; CUDA tensors (CPU under TRITON_INTERPRET=1, float16
    or float32 only: the interpreter's bfloat16 tl.dot is wrong, so bfloat16 raises there).
    """
    args = check_chunked_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout)
    training = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    forward = chunked_training_forward if training else chunked_forward
    return BasedKernelFunction.apply(q, k, v, args, forward, chunked_backward)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    return new_buffer(shape, dtype, device, poison=POISON_OUTPUTS)
