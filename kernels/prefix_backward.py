"""The backward of the prefix-state chunked kernels (kernels/prefix_chunked.py), in Triton.

With dn = do / (z + eps) and dz = -(do . o) / (z + eps) (normalised; dn = do, no dz unnormalised):

  1. forward states S_{<c} at every state chunk (prefix_chunked's state kernel, recomputed);
  2. reverse states, one program per (feature block, batch x kv head, segment), walking its segment
     from the end: before adding chunk c it writes
         R_{>c} = sum_{i > chunk c} phi_q(q_i)^T dn_i  and  sum phi_q(q_i) dz_i   (over the GQA group)
     (segments: a reverse scan over their totals);
  3. dq, one program per (query tile, batch x head):  d phi_q = dn S^T + dz S_z, contracted through the
     features; plus the intra-chunk part over the chunk's keys up to the tile (the parallel kernel's step);
  4. dk and dv, one program per (key tile, batch x kv head):  dv = phi_k R,  d phi_k = v R^T + R_z (times
     phi_k's weights, contracted); plus the intra-chunk part over the chunk's queries from the tile on,
     summed over the group's query heads.

No T x T memory; states O(T / C). One value block (BV = the padded Dv) in the gradient kernels, so
Dv <= MAX_DV (128). float16 inputs are refused (FLOAT16_REFUSAL): their float32 state dots beside
float16 tiles made the dq kernel read shared memory out of range on the H200 (Triton 3.6); the
chunked kernel's float16 calls take kernels/chunked.py's backward. H200 times: benchmarks/NOTES.md.
The features' contraction uses the same one-hot matrices as the forward's pair factors: for
f = x_a x_b, d x_a += g x_b and d x_b += g x_a, two dots with the transposed selections.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .arguments import BasedArguments, check_kernel_device
from .launch import (bhtd_strides, cdiv, dot_precision, new_buffer, next_power_of_2, register_cap,
                     scaled_coefficients)
from .parallel import _dkv_step, _dq_step, _parallel_bwd_prep_kernel
from .prefix_chunked import (
    PrefixConfig,
    _check_config,
    _pair_features_t,
    _pair_weights,
    _plan,
    _square_features,
    _square_features_t,
    _square_weights,
    _state_rows,
    forward_states,
    one_value_block,
    prefix_config,
    recovered_states,
    state_dtype,
)
from .segment_scan import segment_scan_kernel
from .tiles import load_rows

# When True, every output and buffer is filled with NaN before a kernel writes it (tests set this).
POISON_OUTPUTS = False
MAX_DV = 128
FLOAT16_REFUSAL = ("the prefix-state backward does not take float16 inputs: on the H200 (Triton 3.6) its dq kernel "
                   "read shared memory out of range with float16 tiles beside float32 states "
                   "(benchmarks/NOTES.md, twelfth session)")


def supports(args: BasedArguments, dtype: torch.dtype) -> bool:
    """Whether prefix_backward takes these arguments (the chunked kernel's other calls take its own backward)."""
    return dtype != torch.float16 and args.dv <= MAX_DV


@triton.jit
def _pair_factors(x, D0, DB: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    # (x_a, x_{(a + d + 1) mod BK}) for the rows (d, a), d = D0 .. D0 + DB - 1: [BT, DB BK] float32 each,
    # as one-hot dots (exact), and the two selections [BK, DB BK]
    p = tl.arange(0, DB * BK)
    a = p % BK
    col = (a + D0 + p // BK + 1) % BK
    src = tl.arange(0, BK)[:, None]
    e1 = (src == a[None, :]).to(x.dtype)
    e2 = (src == col[None, :]).to(x.dtype)
    return (tl.dot(x, e1, input_precision=PRECISION), tl.dot(x, e2, input_precision=PRECISION), e1, e2)


@triton.jit
def _pair_contract(g, first, second, e1, e2, PRECISION: tl.constexpr):
    # d/dx of sum g * first * second: [BT, BK] float32
    dt = e1.dtype
    out = tl.dot((g * second).to(dt), tl.trans(e1), input_precision=PRECISION)
    return tl.dot((g * first).to(dt), tl.trans(e2), out, input_precision=PRECISION)


@triton.jit
def _square_contract(g, xf, BT: tl.constexpr, BK: tl.constexpr):
    # d/dx of sum g * [x_a, x_a^2] (interleaved): g_lin + 2 x g_sq
    g_lin, g_sq = tl.split(tl.reshape(g, (BT, BK, 2)))
    return g_lin + 2.0 * xf * g_sq


# ----------------------------------------------------------------------------------------------
# 2. reverse states
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "NC", "SEGC", "NSEG"])
def _reverse_state_kernel(
    q, dn, dz, rs, rz, seg,
    sq_b, sq_h, sq_t, sq_d, sdn_b, sdn_h, sdn_t, sdn_d,
    T, H, GROUP, DK, DV, NC, SEGC, NSEG, W,
    C: tl.constexpr, BTS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DB: tl.constexpr,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, STORE_TOTAL: tl.constexpr,
    TRANS: tl.constexpr,
):
    # TRANS: the features formed transposed ([rows, BTS], the dot's first operand without a transpose)
    # program (i_f, i_p): feature block i_f (< NA: pair offsets i_f DB ..; NA: block B and the constant),
    # batch x kv head i_p // NSEG, segment i_p % NSEG. Walks its segment from the end; CAUSAL: before
    # adding chunk c, its slot gets the sum over the segment's later chunks. STORE_TOTAL: the segment's
    # total goes to seg (reverse-scanned after).
    NA: tl.constexpr = BK // 2 // DB
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    i_f, i_p = tl.program_id(0), tl.program_id(1)
    i_bhk = i_p // NSEG
    i_s = i_p % NSEG
    HK = H // GROUP
    b = (i_bhk // HK).to(tl.int64)
    hk = (i_bhk % HK).to(tl.int64)
    dt = q.dtype.element_ty
    offs_t = tl.arange(0, BTS)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    vmask = offs_v < DV
    c_start = i_s * SEGC
    c_end = tl.minimum(c_start + SEGC, NC)
    slots = rs + i_bhk.to(tl.int64) * NC * NF * DV
    zslots = rz + i_bhk.to(tl.int64) * NC * NF
    total = seg + (i_bhk.to(tl.int64) * (NSEG + 1) + i_s) * W
    n_steps = (c_end - c_start) * (C // BTS)
    last = c_end * C - BTS
    if i_f < NA:
        d0 = i_f * DB
        rr = d0 * BK + tl.arange(0, DB * BK)
        acc = tl.zeros([DB * BK, BV], dtype=tl.float32)
        zacc = tl.zeros([DB * BK], dtype=tl.float32)
        for i in range(0, n_steps):
            j = last - i * BTS
            if CAUSAL:
                if (j + BTS) % C == 0:
                    c = j // C
                    tl.store(slots + (c * NF + rr)[:, None] * DV + offs_v[None, :], acc.to(rs.dtype.element_ty), mask=vmask[None, :])
                    if NORMALIZE:
                        tl.store(zslots + c * NF + rr, zacc)
            rows = j + offs_t
            for g in range(0, GROUP):
                h = hk * GROUP + g
                qt = load_rows(q + b * sq_b + h * sq_h, rows, offs_k, sq_t, sq_d, T, DK)
                dnt = load_rows(dn + b * sdn_b + h * sdn_h, rows, offs_v, sdn_t, sdn_d, T, DV).to(dt)
                if TRANS:
                    ft = _pair_features_t(qt, d0, DB, BK, PRECISION)
                    acc = tl.dot(ft.to(dt), dnt, acc, input_precision=PRECISION)
                    if NORMALIZE:
                        dzt = tl.load(dz + (b * H + h) * T + rows, mask=rows < T, other=0.0)
                        zacc += tl.sum(ft * dzt[None, :], axis=1)
                else:
                    first, second, e1, e2 = _pair_factors(qt, d0, DB, BK, PRECISION)
                    f = first * second
                    acc = tl.dot(tl.trans(f.to(dt)), dnt, acc, input_precision=PRECISION)
                    if NORMALIZE:
                        dzt = tl.load(dz + (b * H + h) * T + rows, mask=rows < T, other=0.0)
                        zacc += tl.sum(f * dzt[:, None], axis=0)
        if STORE_TOTAL:
            tl.store(total + rr[:, None] * DV + offs_v[None, :], acc, mask=vmask[None, :])
            if NORMALIZE:
                tl.store(total + NF * DV + rr, zacc)
    else:
        rb = FA + tl.arange(0, FB)
        bacc = tl.zeros([FB, BV], dtype=tl.float32)
        zbacc = tl.zeros([FB], dtype=tl.float32)
        s0 = tl.zeros([BV], dtype=tl.float32)
        z0 = 0.0
        for i in range(0, n_steps):
            j = last - i * BTS
            if CAUSAL:
                if (j + BTS) % C == 0:
                    c = j // C
                    tl.store(slots + (c * NF + rb)[:, None] * DV + offs_v[None, :], bacc.to(rs.dtype.element_ty), mask=vmask[None, :])
                    tl.store(slots + (c * NF + FA + FB) * DV + offs_v, s0.to(rs.dtype.element_ty), mask=vmask)
                    if NORMALIZE:
                        tl.store(zslots + c * NF + rb, zbacc)
                        tl.store(zslots + c * NF + FA + FB, z0)
            rows = j + offs_t
            for g in range(0, GROUP):
                h = hk * GROUP + g
                qt = load_rows(q + b * sq_b + h * sq_h, rows, offs_k, sq_t, sq_d, T, DK)
                dnt = load_rows(dn + b * sdn_b + h * sdn_h, rows, offs_v, sdn_t, sdn_d, T, DV).to(dt)
                s0 += tl.sum(dnt.to(tl.float32), axis=0)
                if NORMALIZE:
                    dzt = tl.load(dz + (b * H + h) * T + rows, mask=rows < T, other=0.0)
                    z0 += tl.sum(dzt, axis=0)
                if TRANS:
                    ft = _square_features_t(qt, BK, PRECISION)
                    bacc = tl.dot(ft.to(dt), dnt, bacc, input_precision=PRECISION)
                    if NORMALIZE:
                        zbacc += tl.sum(ft * dzt[None, :], axis=1)
                else:
                    f = _square_features(qt.to(tl.float32), BTS, BK)
                    bacc = tl.dot(tl.trans(f.to(dt)), dnt, bacc, input_precision=PRECISION)
                    if NORMALIZE:
                        zbacc += tl.sum(f * dzt[:, None], axis=0)
        if STORE_TOTAL:
            tl.store(total + rb[:, None] * DV + offs_v[None, :], bacc, mask=vmask[None, :])
            tl.store(total + (FA + FB) * DV + offs_v, s0, mask=vmask)
            if NORMALIZE:
                tl.store(total + NF * DV + rb, zbacc)
                tl.store(total + NF * DV + FA + FB, z0)


# ----------------------------------------------------------------------------------------------
# 3. dq
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "NC", "SEGC", "NSEG"])
def _prefix_dq_kernel(
    q, k, v, dn, dz, dq, cs, cz, seg,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sdn_b, sdn_h, sdn_t, sdn_d,
    sdq_b, sdq_h, sdq_t, sdq_d,
    T, H, GROUP, NC, SEGC, NSEG, W, c1, c2,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DB: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    FROM_TOTAL: tl.constexpr,
):
    NA: tl.constexpr = BK // 2 // DB
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    EVEN_DK: tl.constexpr = DK == BK
    EVEN_DV: tl.constexpr = DV == BV
    i_t, i_bh = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1)
    b = (i_bh // H).to(tl.int64)
    h = (i_bh % H).to(tl.int64)
    hk = h // GROUP
    i_bhk = (i_bh // GROUP).to(tl.int64)
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    dn += b * sdn_b + h * sdn_h
    dz += i_bh.to(tl.int64) * T
    dt = q.dtype.element_ty
    sd = cs.dtype.element_ty          # the states' dot dtype: dt, or float32 for float16 inputs
    rows = i_t * BT + tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    c = (i_t * BT) // C
    slots = cs + (i_bhk * NC + c) * NF * DV
    zslots = cz + (i_bhk * NC + c) * NF
    if CAUSAL:
        total = seg + (i_bhk * (NSEG + 1) + c // SEGC) * W
    else:
        total = seg + (i_bhk * (NSEG + 1) + NSEG) * W
    qt = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK)
    qf = qt.to(tl.float32)
    dnt = load_rows(dn, rows, offs_v, sdn_t, sdn_d, T, DV).to(dt)
    if NORMALIZE:
        dzt = tl.load(dz + rows, mask=rows < T, other=0.0)
    else:
        dzt = tl.zeros([BT], dtype=tl.float32)
    acc = tl.zeros([BT, BK], dtype=tl.float32)
    for ia in tl.static_range(NA):
        sa, za = _state_rows(slots, zslots, total, ia * DB * BK, DB * BK, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL,
                             NORMALIZE, sd)
        g = tl.dot(dnt.to(sd), tl.trans(sa), input_precision=PRECISION)                        # [BT, DB BK]
        if NORMALIZE:
            g += dzt[:, None] * za[None, :]
        first, second, e1, e2 = _pair_factors(qt, ia * DB, DB, BK, PRECISION)
        acc += _pair_contract(g, first, second, e1, e2, PRECISION)
    sb, zb = _state_rows(slots, zslots, total, FA, FB, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL, NORMALIZE, sd)
    gb = tl.dot(dnt.to(sd), tl.trans(sb), input_precision=PRECISION)
    if NORMALIZE:
        gb += dzt[:, None] * zb[None, :]
    acc += _square_contract(gb, qf, BT, BK)
    if CAUSAL:
        c2x2 = 2.0 * c2
        full_end = i_t * BT
        edge_end = tl.minimum(full_end + BT, T)
        for s in range(c * C, full_end, BS):
            acc = _dq_step(acc, qt, dnt, dzt, k, v, rows, s, T, sk_t, sk_d, sv_t, sv_d, c1, c2x2, DK, DV, BS, BK, BV,
                           EVEN_DK, EVEN_DV, False, CAUSAL, NORMALIZE, PRECISION)
        for s in range(full_end, edge_end, BS):
            acc = _dq_step(acc, qt, dnt, dzt, k, v, rows, s, T, sk_t, sk_d, sv_t, sv_d, c1, c2x2, DK, DV, BS, BK, BV,
                           EVEN_DK, EVEN_DV, True, CAUSAL, NORMALIZE, PRECISION)
    mask = (rows < T)[:, None] & (offs_k < DK)[None, :]
    tl.store(dq + b * sdq_b + h * sdq_h + rows[:, None] * sdq_t + offs_k[None, :] * sdq_d,
             acc.to(dq.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# 4. dk, dv
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["T", "NC", "SEGC", "NSEG"])
def _prefix_dkv_kernel(
    q, k, v, dn, dz, dk, dv, rs, rz, seg,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, sdn_b, sdn_h, sdn_t, sdn_d,
    sdk_b, sdk_h, sdk_t, sdk_d, sdv_b, sdv_h, sdv_t, sdv_d,
    T, H, GROUP, NC, SEGC, NSEG, W, c0, c1, c2,
    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BT: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, DB: tl.constexpr, CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    FROM_TOTAL: tl.constexpr,
):
    # program (i_t, i_bhk): the key tile of BS keys i_t; BT: the query tiles of the intra-chunk loop
    NA: tl.constexpr = BK // 2 // DB
    FA: tl.constexpr = BK // 2 * BK
    FB: tl.constexpr = 2 * BK
    NF: tl.constexpr = FA + FB + 1
    EVEN_DK: tl.constexpr = DK == BK
    EVEN_DV: tl.constexpr = DV == BV
    i_t, i_bhk = tl.program_id(0), tl.program_id(1)
    HK = H // GROUP
    b = (i_bhk // HK).to(tl.int64)
    hk = (i_bhk % HK).to(tl.int64)
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    dt = k.dtype.element_ty
    sd = rs.dtype.element_ty
    cols = i_t * BS + tl.arange(0, BS)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    c = (i_t * BS) // C
    slots = rs + (i_bhk.to(tl.int64) * NC + c) * NF * DV
    zslots = rz + (i_bhk.to(tl.int64) * NC + c) * NF
    if CAUSAL:
        total = seg + (i_bhk.to(tl.int64) * (NSEG + 1) + c // SEGC) * W
    else:
        total = seg + (i_bhk.to(tl.int64) * (NSEG + 1) + NSEG) * W
    kt = load_rows(k, cols, offs_k, sk_t, sk_d, T, DK)
    kf = kt.to(tl.float32)
    vt = load_rows(v, cols, offs_v, sv_t, sv_d, T, DV)
    acc_k = tl.zeros([BS, BK], dtype=tl.float32)
    acc_v = tl.zeros([BS, BV], dtype=tl.float32)
    for ia in tl.static_range(NA):
        ra, rza = _state_rows(slots, zslots, total, ia * DB * BK, DB * BK, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL,
                              NORMALIZE, sd)
        w = _pair_weights(ia * DB, c2, DB, BK)
        first, second, e1, e2 = _pair_factors(kt, ia * DB, DB, BK, PRECISION)
        acc_v = tl.dot((first * second * w[None, :]).to(sd), ra, acc_v, input_precision=PRECISION)
        g = tl.dot(vt.to(sd), tl.trans(ra), input_precision=PRECISION)                         # [BS, DB BK]
        if NORMALIZE:
            g += rza[None, :]
        acc_k += _pair_contract(g * w[None, :], first, second, e1, e2, PRECISION)
    rb, rzb = _state_rows(slots, zslots, total, FA, FB, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL, NORMALIZE, sd)
    wb = _square_weights(c1, c2, BK)
    acc_v = tl.dot((_square_features(kf, BS, BK) * wb[None, :]).to(sd), rb, acc_v, input_precision=PRECISION)
    gb = tl.dot(vt.to(sd), tl.trans(rb), input_precision=PRECISION)
    if NORMALIZE:
        gb += rzb[None, :]
    acc_k += _square_contract(gb * wb[None, :], kf, BS, BK)
    r0, _ = _state_rows(slots, zslots, total, FA + FB, 1, BV, offs_v, DV, NF, CAUSAL, FROM_TOTAL, NORMALIZE,
                        tl.float32)
    acc_v += c0 * r0
    if CAUSAL:      # the chunk's queries from the tile on: the diagonal tile masked, the rest of the chunk not
        c2x2 = 2.0 * c2
        diag_end = tl.minimum(i_t * BS + BS, T)
        chunk_end = tl.minimum(c * C + C, T)
        full_end = i_t * BS + BS + ((chunk_end - i_t * BS - BS) // BT) * BT
        for g in range(0, GROUP):
            h = hk * GROUP + g
            qb = q + b * sq_b + h * sq_h
            dnb = dn + b * sdn_b + h * sdn_h
            dzb = dz + (b * H + h) * T
            for t0 in range(i_t * BS, diag_end, BT):
                acc_k, acc_v = _dkv_step(acc_k, acc_v, kt, vt, qb, dnb, dzb, dzb, cols, t0, T, sq_t, sq_d, sdn_t,
                                         sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV, EVEN_DK, EVEN_DV, True,
                                         CAUSAL, NORMALIZE, PRECISION, False)
            for t0 in range(i_t * BS + BS, full_end, BT):
                acc_k, acc_v = _dkv_step(acc_k, acc_v, kt, vt, qb, dnb, dzb, dzb, cols, t0, T, sq_t, sq_d, sdn_t,
                                         sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV, EVEN_DK, EVEN_DV, False,
                                         CAUSAL, NORMALIZE, PRECISION, False)
            for t0 in range(tl.maximum(i_t * BS + BS, full_end), chunk_end, BT):
                acc_k, acc_v = _dkv_step(acc_k, acc_v, kt, vt, qb, dnb, dzb, dzb, cols, t0, T, sq_t, sq_d, sdn_t,
                                         sdn_d, c0, c1, c2, c2x2, DK, DV, BT, BK, BV, EVEN_DK, EVEN_DV, True,
                                         CAUSAL, NORMALIZE, PRECISION, False)
    kmask = (cols < T)[:, None] & (offs_k < DK)[None, :]
    tl.store(dk + b * sdk_b + hk * sdk_h + cols[:, None] * sdk_t + offs_k[None, :] * sdk_d,
             acc_k.to(dk.dtype.element_ty), mask=kmask)
    vmask = (cols < T)[:, None] & (offs_v < DV)[None, :]
    tl.store(dv + b * sdv_b + hk * sdv_h + cols[:, None] * sdv_t + offs_v[None, :] * sdv_d,
             acc_v.to(dv.dtype.element_ty), mask=vmask)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
def prefix_backward(q, k, v, o, z, do, args: BasedArguments, cfg: PrefixConfig | None = None):
    """(dq, dk, dv) with the shapes, dtypes and layout of q, k, v (dk, dv summed over a GQA group)."""
    check_kernel_device(q)
    if q.dtype == torch.float16:
        raise TypeError(FLOAT16_REFUSAL)
    if args.dv > MAX_DV:
        raise ValueError(f"the prefix-state backward takes Dv up to {MAX_DV}, got Dv={args.dv}")
    cfg = cfg or prefix_config(args, q.dtype)
    _check_config(cfg)
    kept = recovered_states(z, args, cfg, q.dtype) if args.normalize else None    # the forward's (keep=True)
    fwd_plan = _plan(args, cfg)
    b, h, hk, t, dk_, dv_ = args.batch, args.heads, args.kv_heads, args.length, args.dk, args.dv
    dev = q.device
    poison = POISON_OUTPUTS
    bv = max(16, next_power_of_2(dv_))
    cfg = one_value_block(cfg, bv)
    p = _plan(args, cfg)
    if args.normalize:
        dn = new_buffer((b, h, t, dv_), do.dtype, dev, poison=poison)
        dz = new_buffer((b, h, t), torch.float32, dev, poison=poison)
        prep_bt = 32 if bv > 128 else 64
        _parallel_bwd_prep_kernel[(cdiv(t, prep_bt), b * h)](
            o, do, z, dn, dz, *bhtd_strides(o, args.layout), *bhtd_strides(do, args.layout),
            t, h, args.eps, DV=dv_, BV=bv, BT=prep_bt, num_warps=4)
        dn_strides = dn.stride()
    else:
        dn, dz = do, do
        dn_strides = bhtd_strides(do, args.layout)
    if kept is None:
        fwd_plan = p
        kept = forward_states(k, v, args, cfg, p)
    cs, cz, sg, fwd_total = kept
    use_total = p.nseg > 1 or not args.causal
    nf, nc, w = p.nf, p.nc, p.nf * dv_ + p.nf
    prec = dot_precision(q.dtype)
    c0, c1, c2 = scaled_coefficients(args)
    rs = new_buffer((b * hk, nc if args.causal else 1, nf, dv_), state_dtype(q.dtype), dev, poison=poison)
    rz = new_buffer((b * hk, nc if args.causal else 1, nf), torch.float32, dev, poison=poison)
    rg = new_buffer((b * hk, p.nseg + 1, w) if use_total else (1,), torch.float32, dev, poison=poison)
    qs, ks, vs = (bhtd_strides(x, args.layout) for x in (q, k, v))
    _reverse_state_kernel[(p.na + 1, b * hk * p.nseg)](
        q, dn, dz, rs, rz, rg, *qs, *dn_strides, t, h, args.group, dk_, dv_, nc, p.segc, p.nseg, w,
        C=cfg.c, BTS=cfg.bts, BK=p.bk, BV=bv, DB=p.db, CAUSAL=args.causal, NORMALIZE=args.normalize,
        PRECISION=prec, STORE_TOTAL=use_total, TRANS=cfg.reverse_trans, num_warps=cfg.reverse_warps, num_stages=cfg.state_stages,
        **register_cap(cfg.reverse_maxnreg))
    if use_total:
        n_in = p.nseg - 1 if args.causal else p.nseg
        segment_scan_kernel[(b * hk, cdiv(w, 1024))](rg, p.nseg, n_in, w, REVERSE=args.causal, BLOCK=1024,
                                                     num_warps=4)
    dq = new_buffer(q.shape, q.dtype, dev, poison=poison)
    dk = new_buffer(k.shape, k.dtype, dev, poison=poison)
    dv = new_buffer(v.shape, v.dtype, dev, poison=poison)
    nc_arg = nc if args.causal else 1
    common = dict(DK=dk_, DV=dv_, C=cfg.c, BK=p.bk, BV=bv, DB=p.db, CAUSAL=args.causal,
                  NORMALIZE=args.normalize, PRECISION=prec, num_stages=cfg.stages)
    _prefix_dq_kernel[(cdiv(t, cfg.bt), b * h)](
        q, k, v, dn, dz, dq, cs, cz, sg, *qs, *ks, *vs, *dn_strides, *bhtd_strides(dq, args.layout),
        t, h, args.group, nc_arg, fwd_plan.segc, fwd_plan.nseg, w, c1, c2, BT=cfg.bt, BS=cfg.bs,
        FROM_TOTAL=fwd_total, num_warps=cfg.warps, **common, **register_cap(cfg.dq_maxnreg))
    _prefix_dkv_kernel[(cdiv(t, cfg.bt), b * hk)](
        q, k, v, dn, dz, dk, dv, rs, rz, rg, *qs, *ks, *vs, *dn_strides, *bhtd_strides(dk, args.layout),
        *bhtd_strides(dv, args.layout), t, h, args.group, nc_arg, p.segc, p.nseg, w, c0, c1, c2,
        BT=cfg.bs, BS=cfg.bt, FROM_TOTAL=use_total, num_warps=cfg.dkv_warps, **common,
        **register_cap(cfg.dkv_maxnreg))
    return dq, dk, dv
