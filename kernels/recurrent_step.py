"""Triton kernels of one recurrent Based step (decoding against carried states), batched over rows.

Per state row r (B * Hkv rows for one token), with the user's feature map phi described by pieces
("const:W", "linear", "outer") and one factor per piece for q and for k:

    kv' = kv + phi(k)^T v        [F, Dv]   the state the caller keeps, its layout and dtype
    ks' = ks + phi(k)            [F]
    o   = phi(q) kv' / (phi(q) . ks' + eps)       (normalize; else phi(q) kv')

for each of the G query rows r * G .. r * G + G - 1 that read state row r (grouped-query
attention; G = 1 without it). ks may be None (an unnormalised step): it is read as zeros.

F = sum of the pieces' widths (1 + Dk + Dk^2 for the Taylor map), in the user's feature order:
"outer" features are x_a x_b at index a * Dk + b. Semantics are those of the PyTorch reference
``naive_recurrent_step`` (kernels/naive.py): computed in float32, the new states rounded once to
their dtype, and the readout reads the states as stored (rounded), as the user's code does.

Both kernels:
- compute phi(q) and phi(k) on the fly from q and k (a few hundred bytes, cached): the F-wide
  features are never written to memory;
- read each state once and write it once (states that are not contiguous are copied first; the
  user's states as the code people write makes them are contiguous) (the step is memory-bound: 2 F Dv bytes in bf16 for
  each of reading and writing kv, 35 KB a row at Dk = 16, Dv = 64);
- run one program per (query row, block of BV Dv columns). A program owns its columns of the
  readout outright (phi(q) kv'[:, cols] sums over all features in one program), so nothing is
  combined across programs: one launch, no atomics, no scratch. Every program computes its row's
  phi and the normaliser phi(q) . ks' (ks is F values: cheap, read from L2 after the first); the
  program of the first Dv block writes ks'. Under GQA the G programs of one state row all compute
  its update (the reads after the first come from L2), and only the first query row's programs
  write kv' and ks'.

The two differ in how a program walks the features:
- ``"flat"`` (default): the whole row at once. Feature f's piece, factor and key indices (a, b)
  come from f by arithmetic (phi(x)_f = (x_a x_b) * factor, with x_a = 1 where the piece has no
  a, and so on), so the F features are one main tile of TA (a power of two) and one remainder tile
  of TB (273 = 256 + 32 at Dk = 16: 5% padding), and every load of the program (q, k, v, both
  tiles of kv and ks) is issued before its first store: one memory latency per program, not one
  per tile (the compiler cannot move a load above a store that may alias it, so the loads must
  come first in the code). Feature counts over ``FLAT_TILE_ELEMENTS / BV`` loop over main tiles.
- ``"tiled"`` (the first kernel): piece by piece in tiles of at most 64 features, each tile
  loaded, updated, stored and read out before the next (six dependent round trips to memory at
  Dk = 16), Dv in blocks of 16 or 64. Kept for comparison (``based_compile.config.step_kernel``).

Symmetry of x (x) x: the user's state holds both (a, b) and (b, a) entries (the features are
theirs, and an arbitrary state need not be symmetric), so both are read and written; the only thing
symmetry could save here is computing x_a x_b once instead of twice, which is free next to the
memory traffic. The kernels therefore do not use it.

Limits: at most ``MAX_PIECES`` pieces, Dk <= ``MAX_DK``, Dv <= ``MAX_DV``, dtypes float16, bfloat16,
float32 (``supported`` says why not); the operator runs its PyTorch form otherwise.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .arguments import check_kernel_device
from .launch import cdiv, new_buffer, next_power_of_2

POISON_OUTPUTS = False
MAX_PIECES = 4
MAX_DK = 128
MAX_DV = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KINDS = {"const": 1, "linear": 2, "outer": 3}
VARIANTS = ("flat", "tiled")
# "flat": kv elements (features x Dv columns) a program holds in registers at once: 4096 is 32 per
# thread of 4 warps, the main tile of 256 features (Dk = 16) at 16 columns.
FLAT_TILE_ELEMENTS = 4096
FLAT_MAX_BV = 32
FLAT_WIDE_ROWS_PER_SM = 4


def piece_kind_width(piece: str, dk: int) -> tuple[int, int]:
    """(kind code, width) of one piece: 1 const:W, 2 linear (Dk), 3 outer (Dk * Dk)."""
    if piece == "linear":
        return 2, dk
    if piece == "outer":
        return 3, dk * dk
    if isinstance(piece, str) and piece.startswith("const:") and piece[6:].isdigit() and int(piece[6:]) >= 1:
        return 1, int(piece[6:])
    raise ValueError(f"pieces: each must be 'const:W' (W >= 1), 'linear' or 'outer', got {piece!r}")


def supported(q, k, v, kv_state, k_state, pieces) -> str | None:
    """Why the kernel cannot take this step, or None."""
    dv = v.shape[-1]
    if k_state is None:
        k_state = kv_state
    if len(pieces) > MAX_PIECES:
        return f"{len(pieces)} feature-map pieces (the kernel takes at most {MAX_PIECES})"
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_state", kv_state), ("k_state", k_state)):
        if x.dtype not in DTYPES:
            return f"{name} is {x.dtype} (the kernel takes float16, bfloat16, float32)"
    if q.shape[-1] > MAX_DK:
        return f"Dk={q.shape[-1]} > {MAX_DK}"
    if dv > MAX_DV:
        return f"Dv={dv} > {MAX_DV}"
    return None


# ----------------------------------------------------------------------------- "tiled"

@triton.jit
def _piece(num, den, q_row, k_row, sq_d, sk_d, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx, dv_mask,
           fq, fk, write_kv, write_ks,
           KIND: tl.constexpr, W: tl.constexpr, OFF: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr,
           BA: tl.constexpr, BC: tl.constexpr, DV: tl.constexpr):
    """One piece of phi: update its kv / ks rows and add its part of the readout to num and den."""
    if KIND == 1:                                   # constant features: phi = factor
        for c0 in range(0, W, BC):
            c = c0 + tl.arange(0, BC)
            fmask = c < W
            pq = tl.where(fmask, fq, 0.0)
            pk = tl.where(fmask, fk, 0.0)
            num, den = _tile(num, den, pq, pk, OFF + c, fmask, v_row, kv_base, ks_base, kvo_base, kso_base,
                             dv_idx, dv_mask, write_kv, write_ks, DV)
    elif KIND == 2:                                 # linear features: phi = factor * x_a
        a = tl.arange(0, BK)
        fmask = a < DK
        xq = tl.load(q_row + a * sq_d, mask=fmask, other=0.0).to(tl.float32)
        xk = tl.load(k_row + a * sk_d, mask=fmask, other=0.0).to(tl.float32)
        num, den = _tile(num, den, xq * fq, xk * fk, OFF + a, fmask, v_row, kv_base, ks_base, kvo_base, kso_base,
                         dv_idx, dv_mask, write_kv, write_ks, DV)
    elif KIND == 3:                                 # outer features: phi = factor * x_a x_b at a * Dk + b
        r = tl.arange(0, BA * BK)
        for a0 in range(0, DK, BA):
            a = a0 + r // BK
            b = r % BK
            fmask = (a < DK) & (b < DK)
            qa = tl.load(q_row + a * sq_d, mask=fmask, other=0.0).to(tl.float32)
            qb = tl.load(q_row + b * sq_d, mask=fmask, other=0.0).to(tl.float32)
            ka = tl.load(k_row + a * sk_d, mask=fmask, other=0.0).to(tl.float32)
            kb = tl.load(k_row + b * sk_d, mask=fmask, other=0.0).to(tl.float32)
            num, den = _tile(num, den, qa * qb * fq, ka * kb * fk, OFF + a * DK + b, fmask, v_row, kv_base,
                             ks_base, kvo_base, kso_base, dv_idx, dv_mask, write_kv, write_ks, DV)
    return num, den


@triton.jit
def _tile(num, den, pq, pk, f, fmask, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx, dv_mask, write_kv,
          write_ks, DV: tl.constexpr):
    """Features f (with phi(q) = pq, phi(k) = pk): kv'[f, cols] and ks'[f] written, readout added."""
    m2 = fmask[:, None] & dv_mask[None, :]
    offs = f[:, None] * DV + dv_idx[None, :]
    kv = tl.load(kv_base + offs, mask=m2, other=0.0).to(tl.float32)
    ks = tl.load(ks_base + f, mask=fmask, other=0.0).to(tl.float32)
    return _flat_finish(num, den, f, fmask, m2, offs, pq, pk, kv, ks, v_row, kvo_base, kso_base, write_kv, write_ks)


@triton.jit
def _program_rows(q, k, v, kv, ks, kv_out, ks_out, sq_r, sk_r, sv_r, sv_d, group, F: tl.constexpr,
                  DV: tl.constexpr, BV: tl.constexpr):
    """Both kernels' program: query row pid 0 and Dv columns pid 1 * BV ..; its q, k rows, v's columns
    (float32), the state rows it reads and writes, and how many features of kv' and ks' it writes (the
    first query row of its group writes the states; ks' only the first Dv block)."""
    q_index = tl.program_id(0).to(tl.int64)
    row = q_index // group                            # the state row (and k, v row) this query row reads
    first = (q_index % group) == 0
    pid_v = tl.program_id(1)
    dv_idx = pid_v * BV + tl.arange(0, BV)
    dv_mask = dv_idx < DV
    write_kv = F * first.to(tl.int32)                 # kv' is written for f < this
    write_ks = F * (first & (pid_v == 0)).to(tl.int32)   # ks' by the first Dv block: f < this
    v_row = tl.load(v + row * sv_r + dv_idx * sv_d, mask=dv_mask, other=0.0).to(tl.float32)
    return (q + q_index * sq_r, k + row * sk_r, v_row, kv + row * (F * DV), kv_out + row * (F * DV),
            ks + row * F, ks_out + row * F, dv_idx, dv_mask, write_kv, write_ks)


@triton.jit
def _recurrent_step_kernel(q, k, v, kv, ks, o, kv_out, ks_out,
                           sq_r, sq_d, sk_r, sk_d, sv_r, sv_d, so_r, so_d, group,
                           fq0, fk0, fq1, fk1, fq2, fk2, fq3, fk3, eps,
                           K0: tl.constexpr, W0: tl.constexpr, O0: tl.constexpr,
                           K1: tl.constexpr, W1: tl.constexpr, O1: tl.constexpr,
                           K2: tl.constexpr, W2: tl.constexpr, O2: tl.constexpr,
                           K3: tl.constexpr, W3: tl.constexpr, O3: tl.constexpr,
                           F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                           BA: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr):
    (q_row, k_row, v_row, kv_base, kvo_base, ks_base, kso_base, dv_idx, dv_mask, write_kv,
     write_ks) = _program_rows(q, k, v, kv, ks, kv_out, ks_out, sq_r, sk_r, sv_r, sv_d, group, F, DV, BV)
    num = tl.zeros([BV], dtype=tl.float32)
    den = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)
    num, den = _piece(num, den, q_row, k_row, sq_d, sk_d, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx,
                      dv_mask, fq0, fk0, write_kv, write_ks, K0, W0, O0, DK, BK, BA, BC, DV)
    num, den = _piece(num, den, q_row, k_row, sq_d, sk_d, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx,
                      dv_mask, fq1, fk1, write_kv, write_ks, K1, W1, O1, DK, BK, BA, BC, DV)
    num, den = _piece(num, den, q_row, k_row, sq_d, sk_d, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx,
                      dv_mask, fq2, fk2, write_kv, write_ks, K2, W2, O2, DK, BK, BA, BC, DV)
    num, den = _piece(num, den, q_row, k_row, sq_d, sk_d, v_row, kv_base, ks_base, kvo_base, kso_base, dv_idx,
                      dv_mask, fq3, fk3, write_kv, write_ks, K3, W3, O3, DK, BK, BA, BC, DV)
    if NORMALIZE:
        num = num / (den + eps)
    tl.store(o + tl.program_id(0).to(tl.int64) * so_r + dv_idx * so_d, num.to(o.dtype.element_ty), mask=dv_mask)


# ----------------------------------------------------------------------------- "flat"

@triton.jit
def _slot(f, fac_q, fac_k, a, b, fq, fk, K: tl.constexpr, W: tl.constexpr, O: tl.constexpr, DK: tl.constexpr):
    """Features f that piece slot (kind K, width W, offset O) covers: their factors, and the key
    indices a (linear, outer) and b (outer: feature O + a * Dk + b is x_a x_b)."""
    if K != 0:
        inside = (f >= O) & (f < O + W)
        local = f - O
        fac_q = tl.where(inside, fq, fac_q)
        fac_k = tl.where(inside, fk, fac_k)
        if K == 2:
            a = tl.where(inside, local, a)
        elif K == 3:
            a = tl.where(inside, local // DK, a)
            b = tl.where(inside, local % DK, b)
    return fac_q, fac_k, a, b


@triton.jit
def _flat_load(f0, q_row, k_row, sq_d, sk_d, kv_base, ks_base, dv_idx, dv_mask,
               fq0, fk0, fq1, fk1, fq2, fk2, fq3, fk3,
               K0: tl.constexpr, W0: tl.constexpr, O0: tl.constexpr,
               K1: tl.constexpr, W1: tl.constexpr, O1: tl.constexpr,
               K2: tl.constexpr, W2: tl.constexpr, O2: tl.constexpr,
               K3: tl.constexpr, W3: tl.constexpr, O3: tl.constexpr,
               T: tl.constexpr, F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, HAS_KS: tl.constexpr):
    """Features f0 .. f0 + T - 1: phi(q), phi(k) (float32) and the kv, ks tiles as stored. Loads only."""
    f = f0 + tl.arange(0, T)
    fmask = f < F
    zero = tl.zeros([T], dtype=tl.float32)
    none = tl.full([T], -1, dtype=tl.int32)
    fac_q, fac_k, a, b = _slot(f, zero, zero, none, none, fq0, fk0, K0, W0, O0, DK)
    fac_q, fac_k, a, b = _slot(f, fac_q, fac_k, a, b, fq1, fk1, K1, W1, O1, DK)
    fac_q, fac_k, a, b = _slot(f, fac_q, fac_k, a, b, fq2, fk2, K2, W2, O2, DK)
    fac_q, fac_k, a, b = _slot(f, fac_q, fac_k, a, b, fq3, fk3, K3, W3, O3, DK)
    # phi(x)_f = (x_a x_b) * factor, x_a = 1 where f has no a (constant features), x_b = 1 where
    # it has no b (constant and linear): the reference's x_a * factor and (x_a x_b) * factor exactly.
    ma, mb = a >= 0, b >= 0
    a, b = tl.maximum(a, 0), tl.maximum(b, 0)
    qa = tl.load(q_row + a * sq_d, mask=ma, other=1.0).to(tl.float32)
    qb = tl.load(q_row + b * sq_d, mask=mb, other=1.0).to(tl.float32)
    ka = tl.load(k_row + a * sk_d, mask=ma, other=1.0).to(tl.float32)
    kb = tl.load(k_row + b * sk_d, mask=mb, other=1.0).to(tl.float32)
    m2 = fmask[:, None] & dv_mask[None, :]
    offs = f[:, None] * DV + dv_idx[None, :]
    kv = tl.load(kv_base + offs, mask=m2, other=0.0)
    if HAS_KS:
        ks = tl.load(ks_base + f, mask=fmask, other=0.0).to(tl.float32)
    else:
        ks = zero
    return f, fmask, m2, offs, (qa * qb) * fac_q, (ka * kb) * fac_k, kv, ks


@triton.jit
def _flat_finish(num, den, f, fmask, m2, offs, pq, pk, kv, ks, v_row, kvo_base, kso_base, write_kv, write_ks):
    """Stores kv'[f, cols] (and ks'[f]) and adds the features' part of the readout to num and den."""
    kv_new = (kv.to(tl.float32) + pk[:, None] * v_row[None, :]).to(kvo_base.dtype.element_ty)
    tl.store(kvo_base + offs, kv_new, mask=m2 & (f[:, None] < write_kv))
    num += tl.sum(pq[:, None] * kv_new.to(tl.float32), axis=0)
    ks_new = (ks + pk).to(kso_base.dtype.element_ty)
    tl.store(kso_base + f, ks_new, mask=fmask & (f < write_ks))
    den += tl.sum(pq * ks_new.to(tl.float32), axis=0)
    return num, den


@triton.jit
def _flat_step_kernel(q, k, v, kv, ks, o, kv_out, ks_out,
                      sq_r, sq_d, sk_r, sk_d, sv_r, sv_d, so_r, so_d, group,
                      fq0, fk0, fq1, fk1, fq2, fk2, fq3, fk3, eps,
                      K0: tl.constexpr, W0: tl.constexpr, O0: tl.constexpr,
                      K1: tl.constexpr, W1: tl.constexpr, O1: tl.constexpr,
                      K2: tl.constexpr, W2: tl.constexpr, O2: tl.constexpr,
                      K3: tl.constexpr, W3: tl.constexpr, O3: tl.constexpr,
                      F: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, TA: tl.constexpr, NT: tl.constexpr,
                      TB: tl.constexpr, BV: tl.constexpr, NORMALIZE: tl.constexpr, HAS_KS: tl.constexpr):
    """One program: query row pid 0, Dv columns pid 1 * BV ..; features in NT main tiles of TA and
    a remainder tile of TB (none when TB = 0). With NT = 1 every load precedes every store."""
    (q_row, k_row, v_row, kv_base, kvo_base, ks_base, kso_base, dv_idx, dv_mask, write_kv,
     write_ks) = _program_rows(q, k, v, kv, ks, kv_out, ks_out, sq_r, sk_r, sv_r, sv_d, group, F, DV, BV)
    num = tl.zeros([BV], dtype=tl.float32)
    den = tl.sum(tl.zeros([BV], dtype=tl.float32), axis=0)
    if NT == 1:
        fa, ma, m2a, oa, pqa, pka, kva, ksa = _flat_load(0, q_row, k_row, sq_d, sk_d, kv_base, ks_base, dv_idx,
                                                         dv_mask, fq0, fk0, fq1, fk1, fq2, fk2, fq3, fk3,
                                                         K0, W0, O0, K1, W1, O1, K2, W2, O2, K3, W3, O3,
                                                         TA, F, DK, DV, HAS_KS)
        if TB > 0:
            fb, mb, m2b, ob, pqb, pkb, kvb, ksb = _flat_load(TA, q_row, k_row, sq_d, sk_d, kv_base, ks_base,
                                                             dv_idx, dv_mask, fq0, fk0, fq1, fk1, fq2, fk2, fq3,
                                                             fk3, K0, W0, O0, K1, W1, O1, K2, W2, O2, K3, W3, O3,
                                                             TB, F, DK, DV, HAS_KS)
        num, den = _flat_finish(num, den, fa, ma, m2a, oa, pqa, pka, kva, ksa, v_row, kvo_base, kso_base,
                                write_kv, write_ks)
        if TB > 0:
            num, den = _flat_finish(num, den, fb, mb, m2b, ob, pqb, pkb, kvb, ksb, v_row, kvo_base, kso_base,
                                    write_kv, write_ks)
    else:
        for t in range(NT):
            fa, ma, m2a, oa, pqa, pka, kva, ksa = _flat_load(t * TA, q_row, k_row, sq_d, sk_d, kv_base, ks_base,
                                                             dv_idx, dv_mask, fq0, fk0, fq1, fk1, fq2, fk2, fq3,
                                                             fk3, K0, W0, O0, K1, W1, O1, K2, W2, O2, K3, W3, O3,
                                                             TA, F, DK, DV, HAS_KS)
            num, den = _flat_finish(num, den, fa, ma, m2a, oa, pqa, pka, kva, ksa, v_row, kvo_base, kso_base,
                                    write_kv, write_ks)
        if TB > 0:
            fb, mb, m2b, ob, pqb, pkb, kvb, ksb = _flat_load(NT * TA, q_row, k_row, sq_d, sk_d, kv_base, ks_base,
                                                             dv_idx, dv_mask, fq0, fk0, fq1, fk1, fq2, fk2, fq3,
                                                             fk3, K0, W0, O0, K1, W1, O1, K2, W2, O2, K3, W3, O3,
                                                             TB, F, DK, DV, HAS_KS)
            num, den = _flat_finish(num, den, fb, mb, m2b, ob, pqb, pkb, kvb, ksb, v_row, kvo_base, kso_base,
                                    write_kv, write_ks)
    if NORMALIZE:
        num = num / (den + eps)
    tl.store(o + tl.program_id(0).to(tl.int64) * so_r + dv_idx * so_d, num.to(o.dtype.element_ty), mask=dv_mask)


# ----------------------------------------------------------------------------- launch

@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _multiprocessors(device.index or 0) if device.type == "cuda" else 4


def _block_v(rows: int, dv: int, device: torch.device) -> int:
    """"tiled": Dv columns per program: all of them (up to 64) when the rows fill the GPU twice over, else 16."""
    bv = min(max(16, next_power_of_2(dv)), 64)
    if rows * cdiv(dv, bv) < 2 * _sms(device):
        bv = 16
    return bv


def flat_block_v(rows: int, dv: int, state_dtype: torch.dtype, device: torch.device) -> int:
    """"flat": Dv columns per program, a power of two, by the batch's rows (B * H): 16, or 32 from
    ``FLAT_WIDE_ROWS_PER_SM`` rows per SM, never wider than Dv. Measured on an H200 (H=16, Dk=16,
    Dv=64, bfloat16, benchmarks/generate.py --step-only): at B=1 16 columns 5.7 us (8: 6.2, 32: 9.0);
    B=16 16 and 32 tie (13.7, 13.3 us); B=64 32 columns 36.5 us against 51.6 at 16 (narrower blocks
    recompute phi and the normaliser in more programs). ``state_dtype`` is not read: float32 states
    were not measured."""
    del state_dtype
    bv = FLAT_MAX_BV if rows >= FLAT_WIDE_ROWS_PER_SM * _sms(device) else FLAT_MAX_BV // 2
    return min(next_power_of_2(dv), bv)


def flat_tiles(f: int, bv: int) -> tuple[int, int, int]:
    """"flat": (TA, NT, TB): NT main tiles of TA features (TA the largest power of two <= F that
    keeps TA * BV <= ``FLAT_TILE_ELEMENTS``) and a remainder tile of TB >= F - NT * TA (0: none)."""
    cap = 1 << max(0, (FLAT_TILE_ELEMENTS // bv).bit_length() - 1)
    ta = min(1 << (f.bit_length() - 1), cap)
    nt = f // ta
    rest = f - nt * ta
    return ta, nt, (next_power_of_2(rest) if rest else 0)


def recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize=True, eps=1e-6, *,
                   variant="flat", block_v=None):
    """One step by a Triton kernel: returns (o, kv_state', k_state') (new tensors, the old ones untouched).

    Arguments as ``based::recurrent_step`` (op/recurrent_step.py) takes them, checked there; here only
    what the kernel itself needs (``supported`` must be None). ``variant``: "flat" or "tiled" (the
    module's docstring); ``block_v``: Dv columns per program (a power of two; None: chosen by shape).
    """
    check_kernel_device(q, dots=False)         # no tl.dot: bfloat16 is exact under the interpreter too
    if variant not in VARIANTS:
        raise ValueError(f"recurrent_step kernel: variant must be one of {VARIANTS}, got {variant!r}")
    if block_v is not None and (not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"recurrent_step kernel: block_v must be a power of two >= 1 or None, got {block_v!r}")
    dk, dv = q.shape[-1], v.shape[-1]
    why = supported(q, k, v, kv_state, k_state, pieces)
    if why is not None:
        raise ValueError(f"recurrent_step kernel: {why}")
    kinds = [piece_kind_width(p, dk) for p in pieces]
    f = sum(w for _, w in kinds)
    rows = k.numel() // dk
    q_rows = q.numel() // dk
    group = q_rows // rows if rows else 1
    q2, k2, v2 = q.reshape(q_rows, dk), k.reshape(rows, dk), v.reshape(rows, dv)
    kv_in = kv_state.reshape(rows, f, dv).contiguous()
    if k_state is None:         # an unnormalised step without a key state: from zeros, k' = phi(k)
        ks_in = None
        ks_shape, ks_dtype = (*k.shape[:-1], f), kv_state.dtype
    else:
        ks_in = k_state.reshape(rows, f).contiguous()
        ks_shape, ks_dtype = k_state.shape, k_state.dtype
    poison = POISON_OUTPUTS
    o = new_buffer((q_rows, dv), q.dtype, q.device, poison=poison)
    kv_out = new_buffer(kv_state.shape, kv_state.dtype, q.device, poison=poison)
    ks_out = new_buffer(ks_shape, ks_dtype, q.device, poison=poison)
    consts, factors, off = [], [], 0
    for i in range(MAX_PIECES):
        if i < len(kinds):
            kind, width = kinds[i]
            factors += [float(q_factors[i]), float(k_factors[i])]
        else:
            kind, width = 0, 1
            factors += [0.0, 0.0]
        consts += [kind, width, off]
        off += width if kind else 0
    if not rows:
        return o.reshape(*q.shape[:-1], dv), kv_out, ks_out
    strides = (*q2.stride(), *k2.stride(), *v2.stride(), *o.stride(), group)
    if variant == "flat":
        bv = block_v or flat_block_v(q_rows, dv, kv_state.dtype, q.device)
        ta, nt, tb = flat_tiles(f, bv)
        _flat_step_kernel[(q_rows, cdiv(dv, bv))](
            q2, k2, v2, kv_in, kv_in if ks_in is None else ks_in, o, kv_out, ks_out, *strides,
            *factors, float(eps), *consts,
            F=f, DK=dk, DV=dv, TA=ta, NT=nt, TB=tb, BV=bv, NORMALIZE=bool(normalize), HAS_KS=ks_in is not None,
            num_warps=4,
        )
    else:
        if ks_in is None:
            ks_in = torch.zeros((rows, f), dtype=kv_state.dtype, device=q.device)
        bk = max(16, next_power_of_2(dk))
        bv = block_v or _block_v(q_rows, dv, q.device)
        const_width = max([w for kd, w in kinds if kd == 1], default=1)
        bc = min(max(16, next_power_of_2(const_width)), 64)
        _recurrent_step_kernel[(q_rows, cdiv(dv, bv))](
            q2, k2, v2, kv_in, ks_in, o, kv_out, ks_out, *strides,
            *factors, float(eps), *consts,
            F=f, DK=dk, DV=dv, BK=bk, BA=max(1, 64 // bk), BC=bc, BV=bv, NORMALIZE=bool(normalize),
            num_warps=4,
        )
    return o.reshape(*q.shape[:-1], dv), kv_out, ks_out
