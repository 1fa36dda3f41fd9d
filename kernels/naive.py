"""Plain-PyTorch references for Based linear attention (../shared/DESIGN.md section 1).

Both functions compute, per head, with s_ij = scale * q_i . k_j and
f(s) = c0 + c1 s + c2 s^2:

    n_i = sum_{j <= i} f(s_ij) v_j,   z_i = sum_{j <= i} f(s_ij),   o_i = n_i / (z_i + eps)

(non-causal sums run over all j; ``normalize=False`` returns n_i). They compute in the
input dtype, so a float64 input gives the float64 reference every fast path is
tested against. Both are differentiable by autograd.

``naive_parallel_based`` is the quadratic form (a T x T matrix); ``naive_chunk_based``
the chunked state recurrence (states S0, S1, S2 over earlier chunks, DESIGN.md
section 2), O(T) memory in T. ``naive_chunkwise_based`` is the chunkwise-parallel algorithm of
the Triton chunked kernel in the symmetric feature basis (kernels/symmetric_basis.py): every
chunk's state contribution at once, an exclusive prefix sum over chunks, then per chunk
phi(q) S_{<c} plus the masked intra-chunk polynomial.
"""
from __future__ import annotations

import torch

from .arguments import DEFAULT_COEFFS, check_arguments
from .step_arguments import check_step_arguments
from .symmetric_basis import key_features, query_features


def _to_bhtd(q, k, v, layout):
    if layout == "BTHD":
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q, k, v


def _from_bhtd(o, layout):
    return o.transpose(1, 2) if layout == "BTHD" else o


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    # [B, Hkv, T, D] -> [B, Hkv * group, T, D]; query head h uses kv head h // group.
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def naive_parallel_based(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True,
                         eps=1e-6, layout="BHTD"):
    """Quadratic-form Based attention. q: [B, H, T, Dk], k: [B, Hkv, T, Dk], v: [B, Hkv, T, Dv].

    q may hold fewer positions than k and v (Tq <= Tk: queries at the end of the keys, as when
    decoding against a KV cache): causal query i then sees keys j <= i + Tk - Tq."""
    a = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout, shorter_queries=True)
    q, k, v = _to_bhtd(q, k, v, layout)
    k, v = _repeat_kv(k, a.group), _repeat_kv(v, a.group)
    c0, c1, c2 = a.coeffs
    s = (q @ k.transpose(-2, -1)) * a.scale                      # [B, H, Tq, Tk]
    w = c0 + c1 * s + c2 * s * s
    if causal:
        keep = torch.ones(a.length, a.tk, dtype=torch.bool, device=q.device).tril(a.offset)
        w = w.masked_fill(~keep, 0.0)
    o = w @ v                                                    # [B, H, T, Dv]
    if normalize:
        o = o / (w.sum(-1, keepdim=True) + a.eps)
    return _from_bhtd(o, layout)


def _outer(x: torch.Tensor) -> torch.Tensor:
    # [..., D] -> [..., D * D], the flattened x (x) x.
    return (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)


def naive_chunk_based(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True,
                      eps=1e-6, layout="BHTD", chunk_size=64):
    """Chunked-recurrence Based attention: O(T) memory in T, any T (the last chunk may be short)."""
    a = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q, k, v = _to_bhtd(q, k, v, layout)
    k, v = _repeat_kv(k, a.group), _repeat_kv(v, a.group)
    c0, c1, c2 = a.coeffs
    if normalize:                                                # V' = [V, 1]: z is the last column
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    q = q * a.scale                                              # fold the scale into q
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    s0 = q.new_zeros(b, h, 1, dv)                                # sum v_j
    s1 = q.new_zeros(b, h, dk, dv)                               # sum k_j v_j^T
    s2 = q.new_zeros(b, h, dk * dk, dv)                          # sum (k_j (x) k_j) v_j^T
    if not causal:
        s0 = v.sum(2, keepdim=True)
        s1 = k.transpose(-2, -1) @ v
        s2 = _outer(k).transpose(-2, -1) @ v
        o = c0 * s0 + c1 * (q @ s1) + c2 * (_outer(q) @ s2)
    else:
        outs = []
        for start in range(0, t, chunk_size):
            qc, kc, vc = (x[:, :, start:start + chunk_size] for x in (q, k, v))
            inter = c0 * s0 + c1 * (qc @ s1) + c2 * (_outer(qc) @ s2)
            sc = qc @ kc.transpose(-2, -1)
            w = (c0 + c1 * sc + c2 * sc * sc).tril()
            outs.append(inter + w @ vc)
            s0 = s0 + vc.sum(2, keepdim=True)
            s1 = s1 + kc.transpose(-2, -1) @ vc
            s2 = s2 + _outer(kc).transpose(-2, -1) @ vc
        o = torch.cat(outs, dim=2)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + a.eps)
    return _from_bhtd(o, layout)


def naive_chunkwise_based(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True,
                          eps=1e-6, layout="BHTD", chunk_size=16):
    """Chunkwise-parallel Based attention in the symmetric basis (the Triton chunked kernel's algorithm).

    Per chunk c, in parallel: dS_c = phi_k(K_c)^T [V_c, 1]  ([F, Dv + 1], F = 1 + 2 Dk + Dk (Dk // 2));
    S_{<c} = exclusive prefix sum of dS over chunks (non-causal: the total);
    out_c = phi_q(Q_c) S_{<c} + (causal) masked f(Q_c K_c^T) [V_c, 1]; normalised by the last column.
    """
    a = check_arguments(q, k, v, scale, coeffs, causal, normalize, eps, layout)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q, k, v = _to_bhtd(q, k, v, layout)
    k, v = _repeat_kv(k, a.group), _repeat_kv(v, a.group)
    v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)         # V' = [V, 1]: z is the last column
    pq, pk = query_features(q), key_features(k, a.scale, a.coeffs)     # [B, H, T, F]
    b, h, t, _ = q.shape
    n = -(-t // chunk_size)
    pad = n * chunk_size - t

    def chunks(x):                                                   # [B, H, T, D] -> [B, H, n, C, D]
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(b, h, n, chunk_size, x.shape[-1])

    pq, pk, vc = chunks(pq), chunks(pk), chunks(v)                  # padded keys: v' = 0, no contribution
    ds = pk.transpose(-2, -1) @ vc                                   # [B, H, n, F, Dv + 1]
    if causal:
        states = ds.cumsum(2) - ds                                   # S_{<c}
        w = (pq @ pk.transpose(-2, -1)).tril()                       # f(q_i . k_j), j <= i in the chunk
        o = pq @ states + w @ vc
    else:
        o = pq @ ds.sum(2, keepdim=True)
    o = o.reshape(b, h, n * chunk_size, o.shape[-1])[:, :, :t]           # explicit width: B may be 0
    o = o[..., :-1] / (o[..., -1:] + a.eps) if normalize else o[..., :-1]
    return _from_bhtd(o, layout)


def _step_features(x: torch.Tensor, pieces, factors) -> torch.Tensor:
    # phi(x) [..., F]: cat over pieces of factor * (W ones | x | flatten(x (x) x), index a * Dk + b).
    parts = []
    for piece, factor in zip(pieces, factors):
        if piece == "linear":
            parts.append(x * factor)
        elif piece == "outer":
            parts.append(_outer(x) * factor)
        elif piece.startswith("const:"):
            parts.append(torch.full((*x.shape[:-1], int(piece[6:])), float(factor), dtype=x.dtype, device=x.device))
        else:
            raise ValueError(f"pieces: each must be 'const:W', 'linear' or 'outer', got {piece!r}")
    return torch.cat(parts, dim=-1)


def naive_recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize=True, eps=1e-6):
    """One recurrent Based step, computed in q's dtype (float64 inputs: the float64 reference).

    k: [..., Dk], v: [..., Dv] (R rows); kv_state R * F * Dv elements read as [R, F, Dv], k_state
    R * F as [R, F] (or None, in an unnormalised step: a zero key state). q: [..., Dk] with G * R
    rows, query row i reading state row i // G (grouped-query attention; G = 1 one state per query
    row). Returns (o [q's leading dims, Dv], kv_state' and k_state' in the states' shapes; k_state'
    as [k's leading dims, F] when k_state is None): kv' = kv + phi(k)^T v, k' = k_state + phi(k),
    o = phi(q) kv' / (phi(q) . k' + eps) (or phi(q) kv'). The arguments are checked as
    ``based::recurrent_step`` checks them (``check_step_arguments``)."""
    rows, dk, dv, _, group = check_step_arguments(q, k, v, kv_state, k_state, pieces, q_factors, k_factors,
                                                  normalize, eps, who="naive_recurrent_step")
    dtype = q.dtype
    pq = _step_features(q.reshape(rows * group, dk), pieces, q_factors)
    pk = _step_features(k.reshape(rows, dk).to(dtype), pieces, k_factors)
    f = pq.shape[-1]
    kv = kv_state.reshape(rows, f, dv).to(dtype) + pk.unsqueeze(-1) * v.reshape(rows, 1, dv).to(dtype)
    ks = pk if k_state is None else k_state.reshape(rows, f).to(dtype) + pk
    kv_q, ks_q = kv.repeat_interleave(group, 0), ks.repeat_interleave(group, 0)     # each query row's state
    o = (pq.unsqueeze(-2) @ kv_q).squeeze(-2)
    if normalize:
        o = o / ((pq * ks_q).sum(-1, keepdim=True) + eps)
    ks_shape = (*k.shape[:-1], f) if k_state is None else k_state.shape
    return o.reshape(*q.shape[:-1], dv), kv.reshape(kv_state.shape), ks.reshape(ks_shape)
