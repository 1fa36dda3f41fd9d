"""The PyTorch implementation of the ``based`` operator on the CPU (../shared/DESIGN.md section 1-2).

Two forms of the same function, both computing in float32 (float64 for float64 inputs):

- ``quadratic``: the T x T form, s = scale * Q K^T, A = f(s) masked, O = A V. Fastest for short T.
- ``chunked``: chunks of ``CHUNK_SIZE`` tokens; states over earlier chunks
  (S0 = sum v', S1 = sum k v'^T, S2 = sum (k (x) k)_sym v'^T, with V' = [V, 1] so that the
  normaliser comes for free) built for all chunks at once and prefix-summed over chunks.
  Memory O(T): the largest tensors are [T/C, Dk(Dk+1)/2, Dv+1] (states) and
  [T, Dk(Dk+1)/2] (query features) and [T, C] (the in-chunk scores); nothing is T x T.

Both return ``(o, z)``: o in q's dtype and layout (contiguous), z = sum_j f(s_ij) (without eps)
as [B, H, T] in the compute dtype when ``normalize`` (o_i = n_i / (z_i + eps)), else None.
Grouped-query attention: query head h uses key/value head h // group (k, v are broadcast,
never repeated in memory).

Queries at the end of the keys (Tq < Tk, decoding or chunked prefill against a KV cache;
``args.offset`` = Tk - Tq): causal query i sees keys j <= i + offset. The quadratic form masks
the [Tq, Tk] scores with ``tril(offset)``; the chunked form pads the queries at the front with
``offset`` zero rows (whose outputs are dropped, and whose gradients are zero) and runs the
Tq == Tk form.

These are plain PyTorch and device-agnostic: CUDA tensors run them too where the Triton kernels
do not apply (Tq != Tk; policy.py names that choice "pytorch_quadratic" / "pytorch_chunked").

Backward: analytic, per form, from the forward's o and z (dn = do / (z + eps),
dz = -(do . o) / (z + eps), the column of dN' that V' = [V, 1] turns into the normaliser's
gradient). ``quadratic_backward`` forms T x T matrices; ``chunked_backward`` uses prefix states
over key chunks for dq and suffix states over query chunks for dk, dv: O(T) memory, the largest
tensors [T, Dk * (Dv + 1)] and [T/C, Dk^2, Dv + 1]. (Autograd through a recomputed forward is not
an option here: the operator's implementation runs below the autograd dispatch key.)
"""
from __future__ import annotations

import torch

from dataclasses import replace

from ..kernels.arguments import BasedArguments

FORMS = ("quadratic", "chunked")

# Tokens per chunk of the chunked form. Measured with benchmarks/cpu_crossover.py (numbers in its
# docstring): 64 and 128 are within the noise of each other; 64 keeps the in-chunk [T, C] scores small.
CHUNK_SIZE = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float16, bfloat16 and float32 compute (and return z) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(q, k, v, args: BasedArguments):
    """BHTD views in the compute dtype: q [B, Hkv, G, T, Dk] scaled, k [B, Hkv, 1, T, Dk], v [B, Hkv, 1, T, Dv]."""
    dtype = compute_dtype(q.dtype)
    if args.layout == "BTHD":
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    b, hk, g, t = args.batch, args.kv_heads, args.group, args.length
    q = (q.to(dtype) * args.scale).reshape(b, hk, g, t, args.dk)
    k = k.to(dtype).unsqueeze(2)
    v = v.to(dtype).unsqueeze(2)
    return q, k, v


def _finish(n, args: BasedArguments, out_dtype):
    """n: [B, Hkv, G, T, Dv(+1)] -> (o in the input layout and dtype, z [B, H, T] or None)."""
    b, h, t = args.batch, args.heads, args.length
    n = n.reshape(b, h, t, n.shape[-1])
    z = None
    if args.normalize:
        z = n[..., -1]                                            # [B, H, T]
        n = n[..., :-1] / (z.unsqueeze(-1) + args.eps)
    if args.layout == "BTHD":
        n = n.transpose(1, 2)
    return n.to(out_dtype).contiguous(), None if z is None else z.contiguous()


def _with_ones(v, normalize: bool):
    # V' = [V, 1]: the last column of A V' is the normaliser z.
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if normalize else v


def quadratic_forward(q, k, v, args: BasedArguments):
    """The T x T form. Returns (o, z)."""
    c0, c1, c2 = args.coeffs
    qg, kg, vg = _grouped(q, k, v, args)
    vg = _with_ones(vg, args.normalize)
    s = qg @ kg.transpose(-2, -1)                                 # [B, Hkv, G, Tq, Tk]
    a = c0 + s * (c1 + c2 * s)
    if args.causal:
        a = a.tril(args.offset)
    return _finish(a @ vg, args, q.dtype)


def _sym_features(x, weighted: bool):
    """[..., D] -> [..., D(D+1)/2]: x_a x_b for a <= b, the off-diagonal ones doubled when ``weighted``.

    (x (x) x) . (y (x) y) = sum_{a<=b} (2 - [a=b]) x_a x_b y_a y_b: the symmetric half of S2.
    """
    d = x.shape[-1]
    ia, ib = torch.triu_indices(d, d, device=x.device)
    f = x[..., ia] * x[..., ib]
    if weighted:
        w = torch.where(ia == ib, 1.0, 2.0).to(dtype=x.dtype)
        f = f * w
    return f


def _time_dim(args: BasedArguments) -> int:
    return 2 if args.layout == "BHTD" else 1


def _pad_front(x, n: int, dim: int, value: float = 0.0):
    """``n`` rows of ``value`` in front of ``x`` along ``dim``."""
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x.new_full(shape, value), x], dim=dim)


def _as_square(args: BasedArguments) -> BasedArguments:
    return replace(args, length=args.tk, key_length=None)


def chunked_forward(q, k, v, args: BasedArguments, chunk_size: int = CHUNK_SIZE):
    """The chunked O(T)-memory form. Returns (o, z)."""
    if args.offset:
        # Queries at the end of the keys: pad them at the front to Tk, drop the padded outputs
        # (non-causal too: the backward below needs one length).
        dim, n = _time_dim(args), args.offset
        o, z = chunked_forward(_pad_front(q, n, dim), k, v, _as_square(args), chunk_size)
        return o.narrow(dim, n, args.length).contiguous(), None if z is None else z[..., n:].contiguous()
    c0, c1, c2 = args.coeffs
    qg, kg, vg = _grouped(q, k, v, args)
    vg = _with_ones(vg, args.normalize)
    if not args.causal:
        s0 = vg.sum(-2, keepdim=True)                             # [B, Hkv, 1, 1, Dv']
        s1 = kg.transpose(-2, -1) @ vg                            # [B, Hkv, 1, Dk, Dv']
        s2 = _sym_features(kg, False).transpose(-2, -1) @ vg      # [B, Hkv, 1, F, Dv']
        n = c0 * s0 + c1 * (qg @ s1) + c2 * (_sym_features(qg, True) @ s2)
        return _finish(n, args, q.dtype)
    t, c = args.length, chunk_size
    nc = -(-t // c)
    pad = nc * c - t
    if pad:
        # Padding at the end is invisible to causal attention: padded keys come after every real query.
        qg, kg, vg = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qg, kg, vg))
    qc = qg.unflatten(-2, (nc, c))                                # [B, Hkv, G, N, C, Dk]
    kc = kg.unflatten(-2, (nc, c))                                # [B, Hkv, 1, N, C, Dk]
    vc = vg.unflatten(-2, (nc, c))                                # [B, Hkv, 1, N, C, Dv']
    # State contributions of every chunk, then an exclusive prefix sum over chunks.
    a0 = vc.sum(-2, keepdim=True)                                 # [B, Hkv, 1, N, 1, Dv']
    a1 = kc.transpose(-2, -1) @ vc                                # [B, Hkv, 1, N, Dk, Dv']
    a2 = _sym_features(kc, False).transpose(-2, -1) @ vc          # [B, Hkv, 1, N, F, Dv']
    s0, s1, s2 = (x.cumsum(3) - x for x in (a0, a1, a2))
    inter = c0 * s0 + c1 * (qc @ s1) + c2 * (_sym_features(qc, True) @ s2)   # [B, Hkv, G, N, C, Dv']
    s = qc @ kc.transpose(-2, -1)                                 # [B, Hkv, G, N, C, C]
    intra = (c0 + s * (c1 + c2 * s)).tril() @ vc
    n = (inter + intra).flatten(3, 4)[..., :t, :]                 # [B, Hkv, G, T, Dv']
    return _finish(n, args, q.dtype)


def cpu_forward(q, k, v, args: BasedArguments, form: str):
    """(o, z) by the named form ("quadratic" or "chunked")."""
    if form == "quadratic":
        return quadratic_forward(q, k, v, args)
    if form == "chunked":
        return chunked_forward(q, k, v, args)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _out_grads(o, z, do, args: BasedArguments, dtype):
    """dN' [B, Hkv, G, T, Dv(+1)] in ``dtype``: dn = do / (z + eps) and, when normalising, the column
    dz = -(do . o) / (z + eps) that V' = [V, 1] turns into the normaliser's gradient."""
    if args.layout == "BTHD":
        o, do = o.transpose(1, 2), do.transpose(1, 2)
    do = do.to(dtype)
    if args.normalize:
        r = 1.0 / (z.to(dtype).unsqueeze(-1) + args.eps)         # [B, H, T, 1]
        dn = do * r
        dz = -(do * o.to(dtype)).sum(-1, keepdim=True) * r
        do = torch.cat([dn, dz], dim=-1)
    b, hk, g, t = args.batch, args.kv_heads, args.group, args.length
    return do.reshape(b, hk, g, t, do.shape[-1])


def _in_grads(dqg, dkg, dvg, q, k, v, args: BasedArguments):
    """Grouped gradients (dq of the scaled q) back to the shapes, layout and dtypes of q, k, v."""
    b, h, hk, t, tk = args.batch, args.heads, args.kv_heads, args.length, args.tk
    dq = (dqg * args.scale).reshape(b, h, t, args.dk)
    dk = dkg.reshape(b, hk, tk, args.dk)
    dv = dvg[..., :args.dv].reshape(b, hk, tk, args.dv)
    if args.layout == "BTHD":
        dq, dk, dv = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    return tuple(g.to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v)))


def quadratic_backward(q, k, v, o, z, do, args: BasedArguments):
    """Analytic backward of the T x T form: dA = dN' V'^T, dS = dA f'(s), dQ = dS K, dK = dS^T Q, dV' = A^T dN'."""
    c0, c1, c2 = args.coeffs
    qg, kg, vg = _grouped(q, k, v, args)
    vg = _with_ones(vg, args.normalize)
    dn = _out_grads(o, z, do, args, qg.dtype)                      # [B, Hkv, G, T, Dv']
    s = qg @ kg.transpose(-2, -1)                                 # [B, Hkv, G, Tq, Tk]
    a = c0 + s * (c1 + c2 * s)
    ds = (dn @ vg.transpose(-2, -1)) * (c1 + 2 * c2 * s)
    if args.causal:
        a, ds = a.tril(args.offset), ds.tril(args.offset)
    dqg = ds @ kg                                                 # [B, Hkv, G, T, Dk]
    dkg = (ds.transpose(-2, -1) @ qg).sum(2)                      # [B, Hkv, T, Dk]
    dvg = (a.transpose(-2, -1) @ dn).sum(2)                       # [B, Hkv, T, Dv']
    return _in_grads(dqg, dkg, dvg, q, k, v, args)


def _outer_full(x, y):
    # [..., Dx], [..., Dy] -> [..., Dx * Dy], x-major.
    return (x.unsqueeze(-1) * y.unsqueeze(-2)).flatten(-2)


def _suffix_exclusive(x, dim):
    # sum over the chunks after each chunk along ``dim``.
    return x.flip(dim).cumsum(dim).flip(dim) - x


def chunked_backward(q, k, v, o, z, do, args: BasedArguments, chunk_size: int = CHUNK_SIZE):
    """Analytic backward of the chunked form, O(T) memory.

    Per chunk: the in-chunk part as in ``quadratic_backward``; the part across chunks through
    states: prefix sums over earlier key chunks (S1 = sum k v'^T, S2 = sum (k (x) k) v'^T) for dq,
    suffix sums over later query chunks (R0 = sum dn', R1 = sum q dn'^T, R2 = sum (q (x) q) dn'^T)
    for dk and dv. Non-causal: one chunk of T tokens, states over everything, no in-chunk part.
    Queries at the end of the keys: padded at the front as in ``chunked_forward``; the padded
    rows get zero output gradients (and z = 1), so they add nothing to dk and dv.
    """
    if args.offset:
        dim, n = _time_dim(args), args.offset
        z = None if z is None else _pad_front(z, n, 2, 1.0)
        dq, dk, dv = chunked_backward(_pad_front(q, n, dim), k, v, _pad_front(o, n, dim), z,
                                      _pad_front(do, n, dim), _as_square(args), chunk_size)
        return dq.narrow(dim, n, args.length).contiguous(), dk, dv
    c0, c1, c2 = args.coeffs
    qg, kg, vg = _grouped(q, k, v, args)
    vg = _with_ones(vg, args.normalize)
    dn = _out_grads(o, z, do, args, qg.dtype)
    t, dk = args.length, args.dk
    c = chunk_size if args.causal else t
    nc = -(-t // c)
    pad = nc * c - t
    if pad:
        qg, kg, vg, dn = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (qg, kg, vg, dn))
    qc, kc, vc, dnc = (x.unflatten(-2, (nc, c)) for x in (qg, kg, vg, dn))   # [B, Hkv, G|1, N, C, D]
    dvp = vc.shape[-1]
    # Key-side states of every chunk [B, Hkv, 1, N, Dk(*Dk), Dv'], query-side [B, Hkv, 1, N, Dk(*Dk), Dv'].
    s1 = kc.transpose(-2, -1) @ vc
    s2 = _outer_full(kc, kc).transpose(-2, -1) @ vc
    r0 = dnc.sum((2, -2), keepdim=True)
    r1 = (qc.transpose(-2, -1) @ dnc).sum(2, keepdim=True)
    r2 = (_outer_full(qc, qc).transpose(-2, -1) @ dnc).sum(2, keepdim=True)
    if args.causal:
        s1, s2 = (x.cumsum(3) - x for x in (s1, s2))
        r0, r1, r2 = (_suffix_exclusive(x, 3) for x in (r0, r1, r2))
    # dq: c1 S1 dn' + 2 c2 sum_{b,e} q_b dn'_e S2[a, b, e]
    s2_for_dq = s2.unflatten(-2, (dk, dk)).permute(0, 1, 2, 3, 5, 6, 4).flatten(4, 5)   # [.., N, Dk*Dv', Dk]
    dqg = c1 * (dnc @ s1.transpose(-2, -1)) + 2 * c2 * (_outer_full(qc, dnc) @ s2_for_dq)
    # dv': c0 R0 + c1 k R1 + c2 (k (x) k) R2;  dk: c1 R1 v' + 2 c2 sum_{b,e} k_b v'_e R2[a, b, e]
    dvg = c0 * r0 + c1 * (kc @ r1) + c2 * (_outer_full(kc, kc) @ r2)
    r2_for_dk = r2.unflatten(-2, (dk, dk)).permute(0, 1, 2, 3, 5, 6, 4).flatten(4, 5)
    dkg = c1 * (vc @ r1.transpose(-2, -1)) + 2 * c2 * (_outer_full(kc, vc) @ r2_for_dk)
    if args.causal:
        s = qc @ kc.transpose(-2, -1)                             # [B, Hkv, G, N, C, C]
        a = (c0 + s * (c1 + c2 * s)).tril()
        ds = ((dnc @ vc.transpose(-2, -1)) * (c1 + 2 * c2 * s)).tril()
        dqg = dqg + ds @ kc
        dkg = dkg + (ds.transpose(-2, -1) @ qc).sum(2, keepdim=True)
        dvg = dvg + (a.transpose(-2, -1) @ dnc).sum(2, keepdim=True)
    dqg = dqg.flatten(3, 4)[..., :t, :]
    dkg = dkg.flatten(3, 4)[..., :t, :]
    dvg = dvg.flatten(3, 4)[..., :t, :].expand(-1, -1, 1, -1, dvp)
    return _in_grads(dqg, dkg, dvg, q, k, v, args)


def cpu_backward(q, k, v, o, z, do, args: BasedArguments, form: str):
    """(dq, dk, dv) for the output gradient ``do``; o and z are the forward's outputs."""
    if form == "quadratic":
        return quadratic_backward(q, k, v, o, z, do, args)
    if form == "chunked":
        return chunked_backward(q, k, v, o, z, do, args)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")
