"""Fused-chunk Based attention in Triton: O(T) memory, one pass over T (DESIGN.md section 2).

T is split into chunks of BT tokens. One program owns one (batch, head, value block of BV
columns) and walks the chunks in order, carrying in registers the states over the chunks
before it (with q~ = scale * q, the scale folded into the queries):

    S0 = sum_j v_j  [BV],   S1 = sum_j k_j v_j^T  [BK, BV],   S2 = sum_j (k_j (x) k_j) v_j^T  [BK*BK, BV]

and, for the normaliser, the same states with v_j = 1 (z-states: a count, S1z [BK], S2z [BK, BK]).
A query i of the chunk gets

    n_i = c0 S0 + c1 q~_i^T S1 + c2 (q~_i (x) q~_i)^T S2          (inter-chunk: tensor-core dots)
        + sum_{j in chunk, j <= i} f(q~_i . k_j) v_j                (intra-chunk: the parallel form, masked)

Non-causal: a first pass sums the states over all of T, a second computes n_i from them alone.
Nothing of size T x T exists and no per-chunk state goes to memory.

States in and out (``fused_chunk_forward_with_state``, prefill -> decode hand-off, issue 15): the
forward can start from the states of earlier tokens and write the states after its last token,
as float32 moments [B, Hkv, 1 + Dk + Dk^2, Dv + 1] = sum_t [1, k_t, k_t (x) k_t]^T [v_t, 1] (the
registers' S0, S1, S2 and the z-states, unscaled, in the full Dk x Dk basis). Reading and writing
them costs one load and one store of a few kilobytes per program.

Backward (two kernels, states recomputed, never stored):
  - dq: a forward-direction pass with the same states S1, S2 (and S1z, S2z):
        dq~_i = c1 S1 dn_i + 2 c2 [S2 dn_i]_(a,b) q~_ib + (dz_i terms) + intra-chunk dS K.
  - dk, dv: a reverse-direction pass with states over later queries
        R0 = sum_i dn_i, R1 = sum_i q~_i dn_i^T, R2 = sum_i (q~_i (x) q~_i) dn_i^T (+ dz-states),
        dv_j = c0 R0 + c1 k_j^T R1 + c2 (k_j (x) k_j)^T R2 + intra,
        dk_j = c1 R1 v_j + 2 c2 [R2 v_j]_(a,b) k_jb + (dz_i terms) + intra.
  where dn_i = do_i / (z_i + eps) and dz_i = -(do_i . o_i) / (z_i + eps) (plain do, no dz, when
  normalize=False). Each program handles one value block, so dq and dk are partial sums over
  value blocks, and for grouped heads dk and dv are per query head: they go to float32 buffers
  that the host sums. Backward memory, all O(T), no chunk states: with one value block (Dv <= BV)
  and no grouping the kernels write dq, dk, dv directly; otherwise float32 buffers of
  NV*B*H*T*Dk for dq (NV > 1 only) and for dk, and B*H*T*Dv for dv (NV = number of value
  blocks, H = query heads); plus, when normalised, two [B, H, T] float32 vectors (1/(z+eps), dz)
  and float32 copies of do and o (B*H*T*Dv each) to form do . o.

Precision: states and accumulators are float32. Matmul operands are the input dtype (float16 /
bfloat16 tensor cores; float32 inputs use exact float32 dots, no tf32), so the inter-chunk
states are rounded to the input dtype before their dot: with float16 inputs the value states
sum_j k_ja k_jb v_j must stay within float16's range (65504). The normaliser's states and dots
stay float32 throughout.

S2's symmetry (Dk(Dk+1)/2 distinct rows) is not exploited: Triton blocks are powers of two, so
the 136 rows of Dk=16 would be padded back to 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .arguments import BasedArguments, check_arguments, check_kernel_device, triton_interpreting
from .function import BasedKernelFunction
from .launch import bhtd_strides, cdiv, check_grid_rows, dot_precision, new_buffer, next_power_of_2
from .tiles import load_rows, store_rows

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DK = 32                  # the states S2 [BK*BK, BV] live in registers: Dk <= 32 keeps them there
MOMENT_PROGRAMS = 1024       # programs wanted for the moments of a whole sequence (segments of T in parallel)
# When True, every output and buffer is filled with NaN before a kernel writes it (tests set this).
POISON_OUTPUTS = False


# ----------------------------------------------------------------------------------------------
# Small pieces of the math
# ----------------------------------------------------------------------------------------------
@triton.jit
def _poly(s, c0, c1, c2):
    # f(s) = c0 + c1 s + c2 s^2
    return c0 + s * (c1 + c2 * s)


@triton.jit
def _poly_slope(s, c1, c2):
    # f'(s) = c1 + 2 c2 s
    return c1 + 2.0 * c2 * s


@triton.jit
def _outer(x, BT: tl.constexpr, BK: tl.constexpr):
    # [BT, BK] -> [BT, BK*BK]: row t is the flattened x_t (x) x_t (column a*BK + b holds x_ta x_tb)
    return tl.reshape(x[:, :, None] * x[:, None, :], (BT, BK * BK))


@triton.jit
def _contract_pairs(g, x, BT: tl.constexpr, BK: tl.constexpr):
    # g [BT, BK*BK] (column a*BK + b), x [BT, BK] -> [BT, BK]: out_ta = sum_b g_t(a,b) x_tb
    return tl.sum(tl.reshape(g, (BT, BK, BK)) * x[:, None, :], axis=2)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moment_rows(offs_k, DK, BK: tl.constexpr):
    # rows of the linear block [BK] and of the outer block [BK*BK] in a moments matrix
    # [1 + DK + DK*DK, ...]: row 0 the constant, 1 + a the linear k_a, 1 + DK + a*DK + b the pair k_a k_b
    lin = 1 + offs_k
    pair = tl.reshape(1 + DK + offs_k[:, None] * DK + offs_k[None, :], (BK * BK,))
    pair_ok = tl.reshape((offs_k[:, None] < DK) & (offs_k[None, :] < DK), (BK * BK,))
    return lin, pair, pair_ok


@triton.jit
def _load_moments(m, offs_k, offs_v, DK, DV, BK: tl.constexpr):
    """The states from a float32 moments matrix [1 + DK + DK*DK, DV + 1] (sum over earlier tokens of
    [1, k, k (x) k]^T [v, 1]): (S0 [BV], S1 [BK, BV], S2 [BK*BK, BV], count, S1z [BK], S2z [BK, BK])."""
    w = DV + 1
    lin, pair, pair_ok = _moment_rows(offs_k, DK, BK)
    v_ok = offs_v < DV
    s0 = tl.load(m + offs_v, mask=v_ok, other=0.0)
    s1 = tl.load(m + lin[:, None] * w + offs_v[None, :], mask=(offs_k[:, None] < DK) & v_ok[None, :], other=0.0)
    s2 = tl.load(m + pair[:, None] * w + offs_v[None, :], mask=pair_ok[:, None] & v_ok[None, :], other=0.0)
    s0z = tl.load(m + DV)
    s1z = tl.load(m + lin * w + DV, mask=offs_k < DK, other=0.0)
    s2z = tl.reshape(tl.load(m + pair * w + DV, mask=pair_ok, other=0.0), (BK, BK))
    return s0, s1, s2, s0z, s1z, s2z


@triton.jit
def _store_moments(m, s0, s1, s2, s0z, s1z, s2z, offs_k, offs_v, WITH_Z, DK, DV, BK: tl.constexpr):
    """The states into a float32 moments matrix (``_load_moments``'s layout): this program's value
    columns, and the normaliser's column when ``WITH_Z`` (one program per (b, h) writes it)."""
    w = DV + 1
    lin, pair, pair_ok = _moment_rows(offs_k, DK, BK)
    v_ok = offs_v < DV
    tl.store(m + offs_v, s0, mask=v_ok)
    tl.store(m + lin[:, None] * w + offs_v[None, :], s1, mask=(offs_k[:, None] < DK) & v_ok[None, :])
    tl.store(m + pair[:, None] * w + offs_v[None, :], s2, mask=pair_ok[:, None] & v_ok[None, :])
    if WITH_Z:
        tl.store(m + DV, s0z)
        tl.store(m + lin * w + DV, s1z, mask=offs_k < DK)
        tl.store(m + pair * w + DV, tl.reshape(s2z, (BK * BK,)), mask=pair_ok)


@triton.jit
def _fold_chunk(kc, vc, s1, s2, s1z, s2z, BT: tl.constexpr, BK: tl.constexpr, NORMALIZE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Fold one chunk (kc [BT, BK], vc [BT, BV]) into the states: S1 += k^T v [BK, BV],
    S2 += (k (x) k)^T v [BK*BK, BV]; with the normaliser also S1z += sum k [BK], S2z += k^T k [BK, BK]."""
    s1 = tl.dot(tl.trans(kc), vc, s1, input_precision=PRECISION)
    k2 = _outer(kc.to(tl.float32), BT, BK).to(kc.dtype)                         # [BT, BK*BK]
    s2 = tl.dot(tl.trans(k2), vc, s2, input_precision=PRECISION)
    if NORMALIZE:
        kf = kc.to(tl.float32)
        s1z += tl.sum(kf, axis=0)
        s2z = tl.dot(tl.trans(kf), kf, s2z, input_precision="ieee")
    return s1, s2, s1z, s2z


@triton.jit
def _fused_chunk_fwd_kernel(
    q, k, v, o, z, m_in, m_out,
    sq_b, sq_h, sq_t, sq_d,           # strides of q, k, v, o in logical [B, H, T, D] order
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    so_b, so_h, so_t, so_d,
    T, H, GROUP, DK, DV,
    scale, c0, c1, c2, eps,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr,
    STATE_IN: tl.constexpr, STATE_OUT: tl.constexpr, Z_STATES: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    o += b * so_b + h * so_h
    z += pid_bh.to(tl.int64) * T
    dt = q.dtype.element_ty                                     # dot operand dtype
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)

    s0 = tl.zeros([BV], dtype=tl.float32)                       # sum v_j
    s1 = tl.zeros([BK, BV], dtype=tl.float32)                   # sum k_j v_j^T
    s2 = tl.zeros([BK * BK, BV], dtype=tl.float32)              # sum (k_j (x) k_j) v_j^T
    s0z = tl.full([], 0.0, tl.float32)                          # the tokens before T's first (a count)
    s1z = tl.zeros([BK], dtype=tl.float32)                      # sum k_j
    s2z = tl.zeros([BK, BK], dtype=tl.float32)                  # sum k_j k_j^T
    m_off = pid_bh.to(tl.int64) * (1 + DK + DK * DK) * (DV + 1)  # this (b, h)'s moments [M, Dv + 1]
    if STATE_IN:                                                # states of earlier tokens
        s0, s1, s2, s0z, s1z, s2z = _load_moments(m_in + m_off, offs_k, offs_v, DK, DV, BK)
    if not CAUSAL:                                              # states over all of T first
        for start in range(0, T, BT):
            rows = start + offs_t
            kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)  # [BT, BK]
            vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)  # [BT, BV]
            s0 += tl.sum(vc.to(tl.float32), axis=0)
            s1, s2, s1z, s2z = _fold_chunk(kc, vc, s1, s2, s1z, s2z, BT, BK, Z_STATES, PRECISION)

    for start in range(0, T, BT):
        rows = start + offs_t
        qf = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK).to(tl.float32) * scale   # q~ [BT, BK]
        qc = qf.to(dt)
        q2 = _outer(qf, BT, BK).to(dt)                                               # [BT, BK*BK]
        # inter-chunk: c0 S0 + c1 q~ S1 + c2 (q~ (x) q~) S2                            [BT, BV]
        acc = c1 * tl.dot(qc, s1.to(dt), input_precision=PRECISION)
        acc += c2 * tl.dot(q2, s2.to(dt), input_precision=PRECISION)
        acc += c0 * s0[None, :]
        if NORMALIZE:
            if CAUSAL:
                zc = c0 * (s0z + start) + c1 * tl.sum(qf * s1z[None, :], axis=1)   # the states hold `start` tokens
            else:
                zc = c0 * (s0z + T) + c1 * tl.sum(qf * s1z[None, :], axis=1)       # the states hold all T tokens
            zc += c2 * tl.sum(tl.dot(qf, s2z, input_precision="ieee") * qf, axis=1)   # [BT]
        if CAUSAL:
            kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            # intra-chunk: A = f(q~ k^T) masked to j <= i                               [BT, BT]
            a = _poly(tl.dot(qc, tl.trans(kc), input_precision=PRECISION), c0, c1, c2)
            a = tl.where(offs_t[:, None] >= offs_t[None, :], a, 0.0)
            acc = tl.dot(a.to(dt), vc, acc, input_precision=PRECISION)
            # fold this chunk into the states
            s0 += tl.sum(vc.to(tl.float32), axis=0)
            s1, s2, s1z, s2z = _fold_chunk(kc, vc, s1, s2, s1z, s2z, BT, BK, Z_STATES, PRECISION)
            if NORMALIZE:
                zc += tl.sum(a, axis=1)
        if NORMALIZE:
            acc = acc / (zc[:, None] + eps)
            if pid_v == 0:
                tl.store(z + rows, zc, mask=rows < T)
        store_rows(o, acc, rows, offs_v, so_t, so_d, T, DV)
    if STATE_OUT:
        _store_moments(m_out + m_off, s0, s1, s2, s0z + T, s1z, s2z, offs_k, offs_v, pid_v == 0, DK, DV, BK)


# ----------------------------------------------------------------------------------------------
# Moments of a whole sequence (the states of one call, for context parallelism)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _moments_kernel(
    x, y, r, w, m,
    sx_b, sx_h, sx_t, sx_d,                  # strides of x, y in logical [B, H, T, D] order
    sy_b, sy_h, sy_t, sy_d,
    T, H, DK, DV, SEG, scale,
    ROW_SCALE: tl.constexpr, WEIGHTS: tl.constexpr, PRECISION: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """One segment's moments sum_t [1, x~_t, x~_t (x) x~_t]^T [r_t y_t, w_t] (x~ = scale x; r, w
    per-token vectors, or 1) into m[segment, b * H + h] ([1 + DK + DK*DK, DV + 1], float32): the
    states the forward folds (x = k, y = v) or the reverse states of the dk, dv walk (x = q,
    y = do, r = 1/(z + eps), w = dz), with the same roundings as those kernels."""
    pid_v, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    x += b * sx_b + h * sx_h
    y += b * sy_b + h * sy_h
    r += pid_bh.to(tl.int64) * T
    w += pid_bh.to(tl.int64) * T
    m += (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * (1 + DK + DK * DK) * (DV + 1)
    dt = x.dtype.element_ty
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    s0 = tl.zeros([BV], dtype=tl.float32)
    s1 = tl.zeros([BK, BV], dtype=tl.float32)
    s2 = tl.zeros([BK * BK, BV], dtype=tl.float32)
    s0z = tl.full([], 0.0, tl.float32)
    s1z = tl.zeros([BK], dtype=tl.float32)
    s2z = tl.zeros([BK, BK], dtype=tl.float32)
    for c in range(0, SEG):
        rows = (pid_s * SEG + c) * BT + offs_t
        inside = rows < T
        xf = load_rows(x, rows, offs_k, sx_t, sx_d, T, DK).to(tl.float32) * scale     # [BT, BK]
        yf = load_rows(y, rows, offs_v, sy_t, sy_d, T, DV).to(tl.float32)             # [BT, BV]
        if ROW_SCALE:
            yf = yf * tl.load(r + rows, mask=inside, other=0.0)[:, None]
        if WEIGHTS:
            wc = tl.load(w + rows, mask=inside, other=0.0)
        else:
            wc = inside.to(tl.float32)
        yc = yf.to(dt)
        s0 += tl.sum(yf, axis=0)
        s1 = tl.dot(tl.trans(xf.to(dt)), yc, s1, input_precision=PRECISION)
        s2 = tl.dot(tl.trans(_outer(xf, BT, BK).to(dt)), yc, s2, input_precision=PRECISION)
        s0z += tl.sum(wc, axis=0)
        s1z += tl.sum(wc[:, None] * xf, axis=0)
        s2z = tl.dot(tl.trans(wc[:, None] * xf), xf, s2z, input_precision="ieee")
    _store_moments(m, s0, s1, s2, s0z, s1z, s2z, offs_k, offs_v, pid_v == 0, DK, DV, BK)


# ----------------------------------------------------------------------------------------------
# Backward: dq (forward direction)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fused_chunk_bwd_dq_kernel(
    q, k, v, do, rz, dz, dq, m_in,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdq_v, sdq_b, sdq_h, sdq_t, sdq_d,       # dq buffer: [NV, B, H, T, Dk] (value block first)
    T, H, GROUP, DK, DV,
    scale, c1, c2,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, STATE_IN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    do += b * sdo_b + h * sdo_h
    dq += pid_v.to(tl.int64) * sdq_v + b * sdq_b + h * sdq_h
    rz += pid_bh.to(tl.int64) * T
    dz += pid_bh.to(tl.int64) * T
    dt = q.dtype.element_ty
    zw = (pid_v == 0).to(tl.float32)          # the normaliser's terms are added by value block 0 only
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)

    s1 = tl.zeros([BK, BV], dtype=tl.float32)                   # sum k_j v_j^T
    s2 = tl.zeros([BK * BK, BV], dtype=tl.float32)              # sum (k_j (x) k_j) v_j^T
    s1z = tl.zeros([BK], dtype=tl.float32)                      # sum k_j
    s2z = tl.zeros([BK, BK], dtype=tl.float32)                  # sum k_j k_j^T
    if STATE_IN:                                                # states of earlier tokens (the forward's)
        m_in += pid_bh.to(tl.int64) * (1 + DK + DK * DK) * (DV + 1)
        _s0, s1, s2, _s0z, s1z, s2z = _load_moments(m_in, offs_k, offs_v, DK, DV, BK)
    if not CAUSAL:
        for start in range(0, T, BT):
            rows = start + offs_t
            kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            s1, s2, s1z, s2z = _fold_chunk(kc, vc, s1, s2, s1z, s2z, BT, BK, NORMALIZE, PRECISION)

    for start in range(0, T, BT):
        rows = start + offs_t
        qf = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK).to(tl.float32) * scale   # q~ [BT, BK]
        qc = qf.to(dt)
        dn = load_rows(do, rows, offs_v, sdo_t, sdo_d, T, DV).to(tl.float32)        # [BT, BV]
        if NORMALIZE:
            dn = dn * tl.load(rz + rows, mask=rows < T, other=0.0)[:, None]
            dzc = zw * tl.load(dz + rows, mask=rows < T, other=0.0)                 # [BT]
        dnc = dn.to(dt)
        # inter-chunk: dq~ = c1 dn S1^T + 2 c2 sum_b [dn S2^T]_(a,b) q~_b             [BT, BK]
        acc = c1 * tl.dot(dnc, tl.trans(s1.to(dt)), input_precision=PRECISION)
        g2 = tl.dot(dnc, tl.trans(s2.to(dt)), input_precision=PRECISION)             # [BT, BK*BK]
        acc += 2.0 * c2 * _contract_pairs(g2, qf, BT, BK)
        if NORMALIZE:
            gz = c1 * s1z[None, :] + 2.0 * c2 * tl.dot(qf, s2z, input_precision="ieee")
            acc += dzc[:, None] * gz
        if CAUSAL:
            kc = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK)
            vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)
            # intra-chunk: dA = dn v^T (+ dz), dS = dA f'(s) masked, dq~ += dS k        [BT, BT]
            sc = tl.dot(qc, tl.trans(kc), input_precision=PRECISION)
            da = tl.dot(dnc, tl.trans(vc), input_precision=PRECISION)
            if NORMALIZE:
                da += dzc[:, None]
            ds = tl.where(offs_t[:, None] >= offs_t[None, :], da * _poly_slope(sc, c1, c2), 0.0)
            acc = tl.dot(ds.to(dt), kc, acc, input_precision=PRECISION)
            s1, s2, s1z, s2z = _fold_chunk(kc, vc, s1, s2, s1z, s2z, BT, BK, NORMALIZE, PRECISION)
        store_rows(dq, acc * scale, rows, offs_k, sdq_t, sdq_d, T, DK)


# ----------------------------------------------------------------------------------------------
# Backward: dk, dv (reverse direction)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fused_chunk_bwd_dkv_kernel(
    q, k, v, do, rz, dz, dk, dv, r_in,
    sq_b, sq_h, sq_t, sq_d,
    sk_b, sk_h, sk_t, sk_d,
    sv_b, sv_h, sv_t, sv_d,
    sdo_b, sdo_h, sdo_t, sdo_d,
    sdk_v, sdk_b, sdk_h, sdk_t, sdk_d,       # dk buffer: [NV, B, H, T, Dk], per query head
    sdv_b, sdv_h, sdv_t, sdv_d,              # dv buffer: [B, H, T, Dv], per query head
    T, H, GROUP, DK, DV,
    scale, c0, c1, c2,
    CAUSAL: tl.constexpr, NORMALIZE: tl.constexpr, PRECISION: tl.constexpr, STATE_IN: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    pid_v, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q += b * sq_b + h * sq_h
    k += b * sk_b + hk * sk_h
    v += b * sv_b + hk * sv_h
    do += b * sdo_b + h * sdo_h
    dk += pid_v.to(tl.int64) * sdk_v + b * sdk_b + h * sdk_h
    dv += b * sdv_b + h * sdv_h
    rz += pid_bh.to(tl.int64) * T
    dz += pid_bh.to(tl.int64) * T
    dt = q.dtype.element_ty
    zw = (pid_v == 0).to(tl.float32)
    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)

    r0 = tl.zeros([BV], dtype=tl.float32)                       # sum dn_i
    r1 = tl.zeros([BK, BV], dtype=tl.float32)                   # sum q~_i dn_i^T
    r2 = tl.zeros([BK * BK, BV], dtype=tl.float32)              # sum (q~_i (x) q~_i) dn_i^T
    r1z = tl.zeros([BK], dtype=tl.float32)                      # sum dz_i q~_i
    r2z = tl.zeros([BK, BK], dtype=tl.float32)                  # sum dz_i q~_i q~_i^T
    if STATE_IN:               # the reverse states of later queries (moments of [1, q~, q~ (x) q~], [dn, dz])
        r_in += pid_bh.to(tl.int64) * (1 + DK + DK * DK) * (DV + 1)
        r0, r1, r2, _r0z, r1z, r2z = _load_moments(r_in, offs_k, offs_v, DK, DV, BK)
        r1z = r1z * zw                                          # the normaliser's terms: value block 0 only
        r2z = r2z * zw
    n_chunks = tl.cdiv(T, BT)
    if not CAUSAL:
        for c in range(0, n_chunks):
            rows = c * BT + offs_t
            qf = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK).to(tl.float32) * scale
            dn = load_rows(do, rows, offs_v, sdo_t, sdo_d, T, DV).to(tl.float32)
            if NORMALIZE:
                dn = dn * tl.load(rz + rows, mask=rows < T, other=0.0)[:, None]
                dzc = zw * tl.load(dz + rows, mask=rows < T, other=0.0)
                r1z += tl.sum(dzc[:, None] * qf, axis=0)
                r2z = tl.dot(tl.trans(dzc[:, None] * qf), qf, r2z, input_precision="ieee")
            dnc = dn.to(dt)
            r0 += tl.sum(dn, axis=0)
            r1 = tl.dot(tl.trans(qf.to(dt)), dnc, r1, input_precision=PRECISION)
            r2 = tl.dot(tl.trans(_outer(qf, BT, BK).to(dt)), dnc, r2, input_precision=PRECISION)

    for c in range(0, n_chunks):
        rows = (n_chunks - 1 - c) * BT + offs_t                 # chunks from last to first
        kf = load_rows(k, rows, offs_k, sk_t, sk_d, T, DK).to(tl.float32)           # [BT, BK]
        kc = kf.to(dt)
        vc = load_rows(v, rows, offs_v, sv_t, sv_d, T, DV)                          # [BT, BV]
        # inter-chunk: dv = c0 R0 + c1 k R1 + c2 (k (x) k) R2                          [BT, BV]
        acc_v = c1 * tl.dot(kc, r1.to(dt), input_precision=PRECISION)
        acc_v += c2 * tl.dot(_outer(kf, BT, BK).to(dt), r2.to(dt), input_precision=PRECISION)
        acc_v += c0 * r0[None, :]
        # inter-chunk: dk = c1 v R1^T + 2 c2 sum_b [v R2^T]_(a,b) k_b                   [BT, BK]
        acc_k = c1 * tl.dot(vc, tl.trans(r1.to(dt)), input_precision=PRECISION)
        g2 = tl.dot(vc, tl.trans(r2.to(dt)), input_precision=PRECISION)              # [BT, BK*BK]
        acc_k += 2.0 * c2 * _contract_pairs(g2, kf, BT, BK)
        if NORMALIZE:
            acc_k += c1 * r1z[None, :] + 2.0 * c2 * tl.dot(kf, r2z, input_precision="ieee")
        if CAUSAL:
            qf = load_rows(q, rows, offs_k, sq_t, sq_d, T, DK).to(tl.float32) * scale
            qc = qf.to(dt)
            dn = load_rows(do, rows, offs_v, sdo_t, sdo_d, T, DV).to(tl.float32)
            if NORMALIZE:
                dn = dn * tl.load(rz + rows, mask=rows < T, other=0.0)[:, None]
                dzc = zw * tl.load(dz + rows, mask=rows < T, other=0.0)
            dnc = dn.to(dt)
            # intra-chunk, transposed (rows: keys j, columns: queries i >= j)           [BT, BT]
            keep = offs_t[None, :] >= offs_t[:, None]
            st = tl.dot(kc, tl.trans(qc), input_precision=PRECISION)
            at = tl.where(keep, _poly(st, c0, c1, c2), 0.0)
            acc_v = tl.dot(at.to(dt), dnc, acc_v, input_precision=PRECISION)
            dat = tl.dot(vc, tl.trans(dnc), input_precision=PRECISION)
            if NORMALIZE:
                dat += dzc[None, :]
            dst = tl.where(keep, dat * _poly_slope(st, c1, c2), 0.0)
            acc_k = tl.dot(dst.to(dt), qc, acc_k, input_precision=PRECISION)
            # fold this chunk's queries into the states
            r0 += tl.sum(dn, axis=0)
            r1 = tl.dot(tl.trans(qc), dnc, r1, input_precision=PRECISION)
            r2 = tl.dot(tl.trans(_outer(qf, BT, BK).to(dt)), dnc, r2, input_precision=PRECISION)
            if NORMALIZE:
                r1z += tl.sum(dzc[:, None] * qf, axis=0)
                r2z = tl.dot(tl.trans(dzc[:, None] * qf), qf, r2z, input_precision="ieee")
        store_rows(dk, acc_k, rows, offs_k, sdk_t, sdk_d, T, DK)
        store_rows(dv, acc_v, rows, offs_v, sdv_t, sdv_d, T, DV)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusedChunkConfig:
    """Block sizes of one launch: chunk length BT, value block BV, warps and pipeline stages."""

    bt: int
    bv: int
    num_warps: int = 4
    num_stages: int = 1


def _block_k(dk: int) -> int:
    return max(16, next_power_of_2(dk))


def forward_config(args: BasedArguments, dtype: torch.dtype) -> FusedChunkConfig:
    """The forward's block sizes for these arguments (one fixed choice under the interpreter)."""
    if triton_interpreting():
        return FusedChunkConfig(bt=16, bv=min(64, max(16, next_power_of_2(args.dv))))
    if _block_k(args.dk) > 16:
        return FusedChunkConfig(bt=16, bv=16, num_warps=4, num_stages=1)
    # H100, B=H=16, Dk=16, Dv=64, bf16, T=16384: 3.94 ms (BV=64: 4.08 ms; BT=32: 4.6-6.3 ms; 8 warps: 4.7-6.9 ms)
    return FusedChunkConfig(bt=64, bv=32, num_warps=4, num_stages=1)


def backward_config(args: BasedArguments, dtype: torch.dtype) -> FusedChunkConfig:
    """The backward kernels' block sizes (one fixed choice under the interpreter).

    Chunks of 32 tokens at most: with BT=64 (8 warps) Triton 3.6 on an H100 produced a wrong dq or
    an illegal memory access, while the interpreter agreed with float64 at BT=64.
    """
    if triton_interpreting():
        return FusedChunkConfig(bt=16, bv=min(64, max(16, next_power_of_2(args.dv))))
    if _block_k(args.dk) > 16:
        return FusedChunkConfig(bt=16, bv=16, num_warps=4, num_stages=1)
    # H100, B=H=16, Dk=16, Dv=64, bf16: 5.24 ms at T=4096 against 6.82 ms for (32, 32, 4 warps)
    return FusedChunkConfig(bt=16, bv=64, num_warps=4, num_stages=1)


def _check_supported(q: torch.Tensor, args: BasedArguments) -> None:
    if q.dtype not in ACCEPTED_DTYPES:
        raise TypeError(f"q, k, v dtype must be one of (float16, bfloat16, float32), got {q.dtype}")
    if not 1 <= args.dk <= MAX_DK:
        raise ValueError(f"fused_chunk_based supports feature dims Dk from 1 to {MAX_DK}, got Dk={args.dk}")
    check_grid_rows(args)
    check_kernel_device(q)








def moment_rows(dk: int) -> int:
    """Rows of a moments matrix: the constant, Dk linear and Dk * Dk pair features."""
    return 1 + dk + dk * dk


def _forward(q, k, v, args: BasedArguments, cfg: FusedChunkConfig, initial=None, final=False):
    b, h, t = args.batch, args.heads, args.length
    o = _new_buffer((*q.shape[:-1], args.dv), q.dtype, q.device)   # q's layout, last dim Dv
    z = _new_buffer((b, h, t), torch.float32, q.device) if args.normalize else o  # o: unused pointer
    moments = (b, h, moment_rows(args.dk), args.dv + 1)
    if initial is not None:       # per key/value head: every query head of a group starts from it
        initial = initial.to(torch.float32).unsqueeze(2).expand(b, args.kv_heads, args.group, *moments[2:])
        initial = initial.reshape(moments).contiguous()
    m_out = _new_buffer(moments, torch.float32, q.device) if final else o
    grid = (cdiv(args.dv, cfg.bv), b * h)
    c0, c1, c2 = args.coeffs
    _fused_chunk_fwd_kernel[grid](
        q, k, v, o, z, o if initial is None else initial, m_out,
        *bhtd_strides(q, args.layout), *bhtd_strides(k, args.layout),
        *bhtd_strides(v, args.layout), *bhtd_strides(o, args.layout),
        t, h, args.group, args.dk, args.dv,
        args.scale, c0, c1, c2, args.eps,
        CAUSAL=args.causal, NORMALIZE=args.normalize, PRECISION=dot_precision(q.dtype),
        STATE_IN=initial is not None, STATE_OUT=final,
        Z_STATES=args.normalize or final or initial is not None,
        BT=cfg.bt, BK=_block_k(args.dk), BV=cfg.bv,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if final:    # the query heads of a group hold the same states: one per key/value head
        m_out = m_out.view(b, args.kv_heads, args.group, *moments[2:])[:, :, 0]
        return o, (z if args.normalize else None), m_out
    return o, (z if args.normalize else None)


def fused_chunk_forward(q, k, v, args: BasedArguments):
    """Kernel contract: (o, z), o like q (dtype and layout), z the float32 normaliser [B, H, T] or None."""
    _check_supported(q, args)
    return _forward(q, k, v, args, forward_config(args, q.dtype))


def fused_chunk_forward_with_state(q, k, v, args: BasedArguments, initial=None, final: bool = True):
    """(o, z, final): the forward starting from the states ``initial`` of earlier tokens (None: none)
    and the states after the last token ((o, z) alone with ``final=False``). States are float32
    moments [B, Hkv, 1 + Dk + Dk^2, Dv + 1]: sum over tokens of [1, k, flatten(k (x) k)]^T [v, 1]
    (row 1 + Dk + a Dk + b: k_a k_b; the last column sums the features alone, the normaliser's
    state). Non-causal: ``initial`` holds the states of tokens every query sees besides these.
    Not differentiable."""
    _check_supported(q, args)
    if args.offset:
        raise ValueError(f"fused_chunk_forward_with_state takes q, k, v of one length, got Tq={args.length}, "
                         f"Tk={args.tk}")
    if initial is not None:
        _check_moments("initial", initial, q, args, "key/value head")
    return _forward(q, k, v, args, forward_config(args, q.dtype), initial, final=final)


def _normaliser_terms(o, z, do, args: BasedArguments):
    """(1/(z + eps), dz = -(do . o)/(z + eps)) as float32 [B, H, T], or None when unnormalised."""
    if not args.normalize:
        return None
    rz = 1.0 / (z + args.eps)                                                         # [B, H, T]
    dot_o = (do.float() * o.float()).sum(-1)
    dz = -(dot_o if args.layout == "BHTD" else dot_o.transpose(1, 2)) * rz              # [B, H, T]
    return rz.contiguous(), dz.contiguous()


def _per_query_head(m: torch.Tensor, args: BasedArguments) -> torch.Tensor:
    """Moments per key/value head [B, Hkv, M, Dv + 1] -> per query head [B, H, M, Dv + 1], float32."""
    b = args.batch
    m = m.to(torch.float32).unsqueeze(2).expand(b, args.kv_heads, args.group, *m.shape[2:])
    return m.reshape(b, args.heads, *m.shape[3:]).contiguous()


def _check_moments(name: str, m, q: torch.Tensor, args: BasedArguments, per: str) -> None:
    """Moments [B, heads, 1 + Dk + Dk^2, Dv + 1] per ``per`` ("key/value head" or "query head"),
    floating (read as float32), on q's device."""
    heads = args.kv_heads if per == "key/value head" else args.heads
    want = (args.batch, heads, moment_rows(args.dk), args.dv + 1)
    if not isinstance(m, torch.Tensor) or not m.is_floating_point():
        got = m.dtype if isinstance(m, torch.Tensor) else type(m).__name__
        raise TypeError(f"{name} must be a floating tensor (float32 moments per {per}), got {got}")
    if tuple(m.shape) != want or m.device != q.device:
        raise ValueError(f"{name} must be a {list(want)} tensor on {q.device} (moments per {per}), "
                         f"got {list(m.shape)} on {m.device}")


def _backward(q, k, v, o, z, do, args: BasedArguments, cfg: FusedChunkConfig, initial=None, later=None,
              terms=None):
    b, h, hk, t, dk_, dv_ = args.batch, args.heads, args.kv_heads, args.length, args.dk, args.dv
    dev = q.device
    n_v = cdiv(dv_, cfg.bv)
    terms = terms if terms is not None else _normaliser_terms(o, z, do, args)
    if args.normalize:
        rz, dz = terms
    else:
        rz = dz = torch.empty(1, dtype=torch.float32, device=dev)                     # unused
    m_in = _per_query_head(initial, args) if initial is not None else rz              # rz: an unused pointer
    r_in = later.to(torch.float32).contiguous() if later is not None else rz
    # dq: straight into q's dtype and layout when one value block holds all of Dv
    if n_v == 1:
        dq = _new_buffer(q.shape, q.dtype, dev)
        dq_strides = (0, *bhtd_strides(dq, args.layout))
    else:
        dq_buf = _new_buffer((n_v, b, h, t, dk_), torch.float32, dev)
        dq_strides = dq_buf.stride()
    dq_target = dq if n_v == 1 else dq_buf
    direct_kv = n_v == 1 and args.group == 1
    if direct_kv:
        dk = _new_buffer(k.shape, k.dtype, dev)
        dv = _new_buffer(v.shape, v.dtype, dev)
        dk_strides = (0, *bhtd_strides(dk, args.layout))
        dv_strides = bhtd_strides(dv, args.layout)
        dk_target, dv_target = dk, dv
    else:
        dk_target = _new_buffer((n_v, b, h, t, dk_), torch.float32, dev)
        dv_target = _new_buffer((b, h, t, dv_), torch.float32, dev)
        dk_strides, dv_strides = dk_target.stride(), dv_target.stride()
    c0, c1, c2 = args.coeffs
    grid = (n_v, b * h)
    common = dict(CAUSAL=args.causal, NORMALIZE=args.normalize, PRECISION=dot_precision(q.dtype),
                  BT=cfg.bt, BK=_block_k(dk_), BV=cfg.bv, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    in_strides = (*bhtd_strides(q, args.layout), *bhtd_strides(k, args.layout),
                  *bhtd_strides(v, args.layout), *bhtd_strides(do, args.layout))
    _fused_chunk_bwd_dq_kernel[grid](
        q, k, v, do, rz, dz, dq_target, m_in, *in_strides, *dq_strides,
        t, h, args.group, dk_, dv_, args.scale, c1, c2, STATE_IN=initial is not None, **common)
    _fused_chunk_bwd_dkv_kernel[grid](
        q, k, v, do, rz, dz, dk_target, dv_target, r_in, *in_strides, *dk_strides, *dv_strides,
        t, h, args.group, dk_, dv_, args.scale, c0, c1, c2, STATE_IN=later is not None, **common)
    if n_v > 1:
        dq = dq_buf.sum(0).to(q.dtype)                                               # [B, H, T, Dk]
        dq = dq if args.layout == "BHTD" else dq.transpose(1, 2).contiguous()
    if not direct_kv:
        dk = dk_target.sum(0).view(b, hk, args.group, t, dk_).sum(2).to(k.dtype)     # [B, Hkv, T, Dk]
        dv = dv_target.view(b, hk, args.group, t, dv_).sum(2).to(v.dtype)            # [B, Hkv, T, Dv]
        if args.layout == "BTHD":
            dk, dv = dk.transpose(1, 2).contiguous(), dv.transpose(1, 2).contiguous()
    return dq, dk, dv


def fused_chunk_backward(q, k, v, o, z, do, args: BasedArguments):
    """Kernel contract: (dq, dk, dv) with the shapes and dtypes of q, k, v (dk, dv summed over a group)."""
    _check_supported(q, args)
    return _backward(q, k, v, o, z, do, args, backward_config(args, q.dtype))


def fused_chunk_backward_with_state(q, k, v, o, z, do, args: BasedArguments, initial=None, later=None):
    """(dq, dk, dv) of ``fused_chunk_forward_with_state(q, k, v, args, initial)``, whose outputs o and
    z also went on to the queries of later calls (a sequence split into consecutive calls, e.g. over
    the ranks of context parallelism): ``later`` is the sum of those calls' ``query_moments`` (their
    reverse states; None: no later queries). Non-causal: ``initial`` and ``later`` are the other
    parts' sums, which every token sees. dk and dv then hold the gradients through the later
    queries too; the gradient of ``initial`` itself is this call's ``query_moments`` (scaled by the
    coefficients). Not differentiable."""
    _check_supported(q, args)
    if args.offset:
        raise ValueError(f"fused_chunk_backward_with_state takes q, k, v of one length, got Tq={args.length}, "
                         f"Tk={args.tk}")
    if initial is not None:
        _check_moments("initial", initial, q, args, "key/value head")
    if later is not None:
        _check_moments("later", later, q, args, "query head")
    return _backward(q, k, v, o, z, do, args, backward_config(args, q.dtype), initial, later)


def _moments(x, y, args: BasedArguments, scale: float, row_scale=None, weights=None) -> torch.Tensor:
    """sum_t [1, x~_t, x~_t (x) x~_t]^T [r_t y_t, w_t] per (b, head of x) as float32
    [B, Hx, 1 + Dk + Dk^2, Dv + 1] (x~ = scale x; r, w: float32 [B, Hx, T] or 1), summed over
    segments of T that run in parallel (the moments are a plain sum: no walk over T)."""
    b, hx, t = x.shape[0], x.shape[1 if args.layout == "BHTD" else 2], args.length
    cfg = forward_config(args, x.dtype)
    n_chunks = cdiv(t, cfg.bt)
    n_v = cdiv(args.dv, cfg.bv)
    seg = 2 if triton_interpreting() else max(1, cdiv(n_chunks * n_v * b * hx, MOMENT_PROGRAMS))
    n_seg = cdiv(n_chunks, seg)
    parts = _new_buffer((n_seg, b * hx, moment_rows(args.dk), args.dv + 1), torch.float32, x.device)
    dummy = parts
    _moments_kernel[(n_v, b * hx, n_seg)](
        x, y, row_scale if row_scale is not None else dummy, weights if weights is not None else dummy, parts,
        *bhtd_strides(x, args.layout), *bhtd_strides(y, args.layout),
        t, hx, args.dk, args.dv, seg, scale,
        ROW_SCALE=row_scale is not None, WEIGHTS=weights is not None, PRECISION=dot_precision(x.dtype),
        BT=cfg.bt, BK=_block_k(args.dk), BV=cfg.bv, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return parts.sum(0).view(b, hx, moment_rows(args.dk), args.dv + 1)


def state_moments(k, v, args: BasedArguments) -> torch.Tensor:
    """The states of these keys and values, as ``fused_chunk_forward_with_state`` reads and writes
    them: float32 [B, Hkv, 1 + Dk + Dk^2, Dv + 1] = sum_t [1, k_t, k_t (x) k_t]^T [v_t, 1]."""
    _check_supported(k, args)
    return _moments(k, v, args, 1.0)


def query_moments(q, o, z, do, args: BasedArguments) -> torch.Tensor:
    """The reverse states of these queries for ``fused_chunk_backward_with_state``'s ``later``:
    float32 [B, H, 1 + Dk + Dk^2, Dv + 1] = sum_i [1, q~_i, q~_i (x) q~_i]^T [dn_i, dz_i] with
    q~ = scale q, dn = do / (z + eps), dz = -(do . o) / (z + eps) (unnormalised: dn = do, dz = 0).
    With the coefficients (c0, c1, c2 on the three row blocks) it is the gradient of the loss in
    the states the forward started from (``initial``)."""
    _check_supported(q, args)
    terms = _normaliser_terms(o, z, do, args)
    if terms is None:
        zero = torch.zeros((args.batch, args.heads, args.length), dtype=torch.float32, device=q.device)
        return _moments(q, do, args, args.scale, weights=zero)
    rz, dz = terms
    return _moments(q, do, args, args.scale, row_scale=rz, weights=dz)


def fused_chunk_based(q, k, v, scale=None, coeffs=(1.0, 1.0, 0.5), causal=True, normalize=True, eps=1e-6,
                      layout="BHTD"):
    """Differentiable fused-chunk Based attention (O(T) memory); see ``naive_parallel_based`` for the math.

    q: [B, H, T, Dk], k: [B, Hkv, T, Dk], v: [B, Hkv, T, Dv] (or [B, T, H, D] with layout="BTHD");
    Dk from 1 to 32; float16, bfloat16 or float32; CUDA tensors (CPU under TRITON_INTERPRET=1, float16
    or float32 only: the interpreter's bfloat16 tl.dot is wrong, so bfloat16 raises there).
    """
    args = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout, dtypes=ACCEPTED_DTYPES)
    _check_supported(q, args)
    return BasedKernelFunction.apply(q, k, v, args, fused_chunk_forward, fused_chunk_backward)


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    return new_buffer(shape, dtype, device, poison=POISON_OUTPUTS)
