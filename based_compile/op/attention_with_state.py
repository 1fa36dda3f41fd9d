"""``based::attention_with_state``: Based attention over a prefill that also returns the final states,
optionally continued from the states of earlier tokens.

    o         = based::attention(q, k, v, spec), plus phi_q(q) kv0 (and phi_q(q) . k0 in the normaliser)
    kv_state  = kv0 + sum_t phi(k_t)^T v_t        [B, Hkv, F, Dv]
    k_state   = k0 + sum_t phi(k_t)               [B, Hkv, F]

phi is the user's Taylor feature map, described as in ``recurrent_step.py`` (``pieces``: "const:W",
"linear", "outer"; ``k_factors``: one factor per piece), so the states are the ones the user's
code stores (feature order and scaling), per key/value head; the graph pass lays them out as the
user's tensors (repeated over a GQA group, transposed, reshaped, cast). They are what the
recurrent step (``based::recurrent_step``) takes next: the prefill -> decode hand-off. ``kv0`` and
``k0`` (optional, in the same features and layout) are the states of an earlier part: a chunked
prefill, or a conversation continued from saved states; the queries see them as earlier keys.

Implementation: the forward computes raw moments sum_t [1, k_t, k_t (x) k_t]^T [v_t, 1]
[B, Hkv, 1 + Dk + Dk^2, Dv + 1] and converts them to the user's features at the end (a few
kilobytes per head); the initial states convert the other way (``initial_moments``: the query
side of the pairing, c0, c1 scale, c2 scale^2, over the key side's factors). CUDA: the fused-chunk
Triton kernel starts from the initial moments and writes the final ones from its registers after
its last chunk (``kernels/fused_chunk.py``, ``fused_chunk_forward_with_state``); no [T, F, Dv]
tensor and no second pass over k and v. CPU (and CUDA where the kernel does not apply, Dk > 32):
``based::attention`` unnormalised over [v, 1] plus [c0, c1 q~, c2 q~ (x) q~] times the initial
moments, and one [T, 1 + Dk + Dk^2] x [T, Dv + 1] product per head for the moments: O(T) memory.
States are returned in float32 (float64 for float64 inputs); the rewrite casts them to the user's
dtype.

Differentiable in q, k, v, kv0 and k0, through the output and both returned states
(``based::attention_with_state_backward``): where the fused-chunk kernel runs (CUDA), the forward
again for o and z, then the kernel's backward with the gradient in the final states as the
reverse states of later queries and ``query_moments`` for the initial states; elsewhere the CPU
form above recomputed under autograd and differentiated. O(T) memory. No double backward. Inside ``based_compile.context_parallel`` it raises
(not sequence parallel).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import config, context_parallel, cpu_path, policy
from .custom_op import based_attention, register_autocast
from .dispatch import direct_backend
from ..kernels import fused_chunk as fused_chunk_kernel
from ..kernels.arguments import BasedArguments, check_arguments, triton_interpreting
from ..kernels.first_order import first_order, wants_graph
from ..kernels.launch import MAX_GRID_ROWS
from .recurrent_step import feature_width, piece_width
from .spec import BasedSpec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LIBRARY = torch.library.Library("based", "FRAGMENT")
_PARAMS = ("str layout, float scale, float c0, float c1, float c2, bool causal, bool normalize, float eps, "
           "str[] pieces, float[] k_factors")
_LIBRARY.define(f"attention_with_state(Tensor q, Tensor k, Tensor v, {_PARAMS}, Tensor? kv0=None, "
                "Tensor? k0=None) -> (Tensor, Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))
_LIBRARY.define(f"attention_with_state_backward(Tensor do, Tensor dkv, Tensor dks, Tensor q, Tensor k, Tensor v, "
                f"{_PARAMS}, Tensor? kv0=None, Tensor? k0=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                tags=(torch.Tag.pt2_compliant_tag,))


def _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0=None,
           k0=None) -> BasedArguments:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"based::attention_with_state: {name} must be a torch.Tensor, got {type(x).__name__}")
    dtypes = KERNEL_DTYPES if q.device.type == "cuda" else CPU_DTYPES
    args = check_arguments(q, k, v, scale, (c0, c1, c2), causal, normalize, eps, layout, dtypes=dtypes)
    if not isinstance(pieces, (list, tuple)) or not pieces:
        raise ValueError(f"based::attention_with_state: pieces must be a non-empty list, got {pieces!r}")
    for piece in pieces:
        piece_width(piece, args.dk)           # raises naming a bad piece
    if not isinstance(k_factors, (list, tuple)) or len(k_factors) != len(pieces):
        raise ValueError(f"based::attention_with_state: k_factors must have one factor per piece ({len(pieces)}), "
                         f"got {k_factors!r}")
    if kv0 is None and k0 is None:
        return args
    kinds = [p if not p.startswith("const:") else "const" for p in pieces]
    if len(set(kinds)) != len(kinds) or any(f == 0 for f in k_factors):
        raise ValueError("based::attention_with_state: initial states need a feature map with at most one piece of "
                         f"each kind and nonzero factors (the query side is read from the coefficients), got pieces "
                         f"{list(pieces)!r}, k_factors {list(k_factors)!r}")
    f = feature_width(pieces, args.dk)
    for name, x, shape in (("kv0", kv0, (args.batch, args.kv_heads, f, args.dv)),
                           ("k0", k0, (args.batch, args.kv_heads, f))):
        if x is None:
            continue
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"based::attention_with_state: {name} must be a floating torch.Tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if tuple(x.shape) != shape or x.device != q.device:
            raise ValueError(f"based::attention_with_state: {name} must be a {list(shape)} tensor on {q.device} "
                             f"(per key/value head, in the features of pieces), got {list(x.shape)} on {x.device}")
    return args


def moments(k: Tensor, v: Tensor, args: BasedArguments) -> Tensor:
    """sum_t [1, k_t, flatten(k_t (x) k_t)]^T [v_t, 1] per (b, kv head) in the compute dtype:
    [B, Hkv, 1 + Dk + Dk^2, Dv + 1] (the layout of ``fused_chunk_forward_with_state``'s states)."""
    dtype = cpu_path.compute_dtype(k.dtype)
    if args.layout == "BTHD":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.to(dtype), v.to(dtype)
    features = torch.cat([torch.ones_like(k[..., :1]), k, (k.unsqueeze(-1) * k.unsqueeze(-2)).flatten(-2)], -1)
    return features.transpose(-2, -1) @ torch.cat([v, torch.ones_like(v[..., :1])], -1)


def features_of_moments(m: Tensor, pieces, k_factors, dk: int) -> tuple[Tensor, Tensor]:
    """(kv_state [B, Hkv, F, Dv], k_state [B, Hkv, F]) in the user's features from moments."""
    rows = []
    for piece, factor in zip(pieces, k_factors):
        if piece == "linear":
            rows.append(m[..., 1:1 + dk, :] * factor)
        elif piece == "outer":
            rows.append(m[..., 1 + dk:, :] * factor)
        else:
            rows.append((m[..., :1, :] * factor).expand(*m.shape[:-2], piece_width(piece, dk), m.shape[-1]))
    out = torch.cat(rows, dim=-2)
    return out[..., :-1].contiguous(), out[..., -1].contiguous()


def initial_moments(kv0: Tensor | None, k0: Tensor | None, pieces, k_factors, args: BasedArguments,
                    dtype: torch.dtype) -> Tensor:
    """The moments [B, Hkv, 1 + Dk + Dk^2, Dv + 1] that the kernel's readout c0 S0 + c1 q~ S1 +
    c2 (q~ (x) q~) S2 turns into phi_q(q) [kv0, k0] for the user's states in their features: the
    pairing gives each piece's query factor as the coefficient over the key factor, so a piece's
    rows are the state's rows over the key factor (a constant piece of width W: their sum over W)."""
    dk, dv = args.dk, args.dv
    lead = (args.batch, args.kv_heads)
    ref = kv0 if kv0 is not None else k0
    kv = kv0.to(dtype) if kv0 is not None else ref.new_zeros((*lead, ref.shape[2], dv), dtype=dtype)
    ks = k0.to(dtype) if k0 is not None else ref.new_zeros((*lead, ref.shape[2]), dtype=dtype)
    x = torch.cat([kv, ks.unsqueeze(-1)], dim=-1)                                  # [B, Hkv, F, Dv + 1]
    blocks = {"const": x.new_zeros((*lead, 1, dv + 1)), "linear": x.new_zeros((*lead, dk, dv + 1)),
              "outer": x.new_zeros((*lead, dk * dk, dv + 1))}
    at = 0
    for piece, factor in zip(pieces, k_factors):
        width = piece_width(piece, dk)
        rows = x[..., at:at + width, :]
        at += width
        if piece.startswith("const:"):
            blocks["const"] = rows.sum(-2, keepdim=True) / (factor * width)
        else:
            blocks[piece] = rows / factor
    return symmetric(torch.cat([blocks["const"], blocks["linear"], blocks["outer"]], dim=-2), dk)


def symmetric(m: Tensor, dk: int) -> Tensor:
    """Moments [.., 1 + Dk + Dk^2, C] with the second-order block made symmetric in (a, b): the same
    readout (q (x) q is symmetric), and the form the kernels' backward assumes (d/dq of
    (q (x) q) . S2 taken as 2 S2 q)."""
    head, outer = m[..., :1 + dk, :], m[..., 1 + dk:, :]
    outer = outer.unflatten(-2, (dk, dk))
    return torch.cat([head, (0.5 * (outer + outer.transpose(-3, -2))).flatten(-3, -2)], dim=-2)


def _uses_kernel(q: Tensor, args: BasedArguments) -> bool:
    """The fused-chunk kernel (the one with states) on CUDA within its limits (Dk, dtypes, B * H within
    the grid's ``MAX_GRID_ROWS``); on the CPU only when a Triton kernel is forced under the interpreter
    (config.py)."""
    if args.dk > fused_chunk_kernel.MAX_DK or q.dtype not in KERNEL_DTYPES:
        return False
    if q.device.type == "cuda" and args.batch * args.heads > MAX_GRID_ROWS:
        return False
    if q.device.type == "cuda":
        return True
    return triton_interpreting() and config.forced_kernel()[0] in policy.TRITON_KERNELS


def _bhtd(x: Tensor, args: BasedArguments) -> Tensor:
    return x.transpose(1, 2) if args.layout == "BTHD" else x


def composed_forward(q, k, v, args: BasedArguments, pieces, k_factors, kv0=None, k0=None, attend=None):
    """(o, kv_state, k_state) from differentiable pieces: ``based::attention`` unnormalised over
    [v, 1] (or ``attend(q, k, v1, spec)``), plus [c0, c1 q~, c2 q~ (x) q~] times the initial moments
    (q~ = scale q), divided; the states from the moments of k, v. The CPU implementation (under
    no_grad), what the backward differentiates, and (with the naive attention) the graph pass's
    float64 reference for a continued prefill."""
    dtype = cpu_path.compute_dtype(q.dtype)
    b, h, hk, g, t, dv = args.batch, args.heads, args.kv_heads, args.group, args.length, args.dv
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    spec = BasedSpec(layout=args.layout, scale=args.scale, c0=args.coeffs[0], c1=args.coeffs[1],
                     c2=args.coeffs[2], causal=args.causal, normalize=False, eps=args.eps)
    n = _bhtd((attend or based_attention)(q, k, v1, spec), args).to(dtype)       # [B, H, T, Dv + 1]
    if kv0 is not None or k0 is not None:
        m0 = initial_moments(kv0, k0, pieces, k_factors, args, dtype)
        c0, c1, c2 = args.coeffs
        qs = _bhtd(q, args).to(dtype) * args.scale
        fq = torch.cat([torch.full_like(qs[..., :1], c0), c1 * qs, c2 * (qs.unsqueeze(-1) * qs.unsqueeze(-2)).flatten(-2)],
                       dim=-1).reshape(b, hk, g, t, -1)
        n = n + (fq @ m0.unsqueeze(2)).reshape(b, h, t, dv + 1)
    o = n[..., :dv] / (n[..., dv:] + args.eps) if args.normalize else n[..., :dv]
    o = _bhtd(o, args).to(q.dtype)
    kv, ks = features_of_moments(moments(k, v, args), pieces, k_factors, args.dk)
    if kv0 is not None:
        kv = kv + kv0.to(dtype)
    if k0 is not None:
        ks = ks + k0.to(dtype)
    return o.contiguous(), kv, ks


def attention_with_state_forward(q, k, v, args: BasedArguments, pieces, k_factors, kv0=None, k0=None):
    """(o, kv_state, k_state) for checked arguments (the operator's implementation)."""
    dtype = cpu_path.compute_dtype(q.dtype)
    initial = kv0 is not None or k0 is not None
    if _uses_kernel(q, args):
        m0 = initial_moments(kv0, k0, pieces, k_factors, args, torch.float32) if initial else None
        o, _, m = fused_chunk_kernel.fused_chunk_forward_with_state(q, k, v, args, m0)
        kv, ks = features_of_moments(m.to(dtype), pieces, k_factors, args.dk)
        if initial:             # the part of the user's states the moments do not hold (e.g. kv0's rows of
            kv_m, ks_m = features_of_moments(m0.to(dtype), pieces, k_factors, args.dk)   # one constant piece)
            kv = kv + (kv0.to(dtype) - kv_m if kv0 is not None else -kv_m)
            ks = ks + (k0.to(dtype) - ks_m if k0 is not None else -ks_m)
        return o.contiguous(), kv, ks
    if initial:
        with torch.no_grad():
            return composed_forward(q, k, v, args, pieces, k_factors, kv0, k0)
    form = policy.choose_kernel(args, q, k, v, False)
    form = policy.CPU_FORM_OF.get(form, form).removeprefix("cpu_").removeprefix("pytorch_")
    o, _ = cpu_path.cpu_forward(q, k, v, args, form)
    kv, ks = features_of_moments(moments(k, v, args), pieces, k_factors, args.dk)
    return o.contiguous(), kv, ks


def _refuse_context_parallel(name: str) -> None:
    if context_parallel.active():
        raise RuntimeError(f"{name} under based_compile.context_parallel: a prefill that returns its final "
                           "states for decoding is not sequence parallel (its output and states would be this "
                           "rank's shard's alone); prefill outside the context_parallel block")


def _impl(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0=None, k0=None):
    _refuse_context_parallel("based::attention_with_state")
    args = _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0, k0)
    return attention_with_state_forward(q, k, v, args, pieces, k_factors, kv0, k0)


def _fake(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0=None, k0=None):
    args = _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0, k0)
    f = feature_width(pieces, args.dk)
    dtype = cpu_path.compute_dtype(q.dtype)
    o = q.new_empty((*q.shape[:-1], args.dv))
    return (o, q.new_empty((args.batch, args.kv_heads, f, args.dv), dtype=dtype),
            q.new_empty((args.batch, args.kv_heads, f), dtype=dtype))


def _backward_impl(do, dkv, dks, q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors,
                   kv0=None, k0=None):
    """(dq, dk, dv, dkv0, dk0) (an empty tensor for an absent initial state): ``composed_forward``
    recomputed under autograd and differentiated."""
    _refuse_context_parallel("based::attention_with_state_backward")
    args = _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0, k0)
    inputs = [x for x in (q, k, v, kv0, k0) if x is not None]
    # reached by redispatch below autograd: autograd is switched back on for the recomputation
    exclude = torch._C._dispatch_tls_local_exclude_set()
    above = torch.DispatchKeySet.from_raw_repr(exclude.raw_repr() & ~_BELOW_AUTOGRAD_BITS)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), above), torch.enable_grad():
        # (unnormalised, the kernel's backward leaves out the normaliser's state, which a returned k_state needs)
        if _uses_kernel(q, args) and args.normalize and all(c != 0 for c in args.coeffs):
            return _kernel_backward(do, dkv, dks, q, k, v, args, pieces, k_factors, kv0, k0)
        leaves = [x.detach().requires_grad_() for x in inputs]
        q_, k_, v_ = leaves[:3]
        rest = iter(leaves[3:])
        kv0_ = next(rest) if kv0 is not None else None
        k0_ = next(rest) if k0 is not None else None
        outs = composed_forward(q_, k_, v_, args, pieces, k_factors, kv0_, k0_)
        grads = torch.autograd.grad(outs, leaves, (do, dkv.to(outs[1].dtype), dks.to(outs[2].dtype)),
                                    allow_unused=True)
    # in each input's dtype and strides (what the fake implementation promises)
    grads = [torch.zeros_like(x) if gx is None else torch.empty_like(x).copy_(gx) for x, gx in zip(inputs, grads)]
    dq, dk, dv = grads[:3]
    rest = iter(grads[3:])
    dkv0 = next(rest) if kv0 is not None else q.new_empty(0)
    dk0 = next(rest) if k0 is not None else q.new_empty(0)
    return dq, dk, dv, dkv0, dk0


def _kernel_backward(do, dkv, dks, q, k, v, args: BasedArguments, pieces, k_factors, kv0, k0):
    """The backward through the fused-chunk kernels (``_backward_impl``'s CUDA path; under autograd):
    the forward from the initial moments M0 again for o and z, then ``fused_chunk_backward_with_state``
    with the gradient in the final moments as the later queries' reverse states (G / (c0 | c1 | c2)
    on the three row blocks, shared over a query group), and the gradient in M0 from this call's
    ``query_moments``. The moments <-> features maps are linear and tiny: differentiated by autograd."""
    f32 = torch.float32
    initial = kv0 is not None or k0 is not None
    if initial:
        starts = [x.detach().to(f32).requires_grad_() if x is not None else None for x in (kv0, k0)]
        m0 = initial_moments(*starts, pieces, k_factors, args, f32)
    else:
        starts, m0 = [None, None], None
    o, z = fused_chunk_kernel.fused_chunk_forward_with_state(q, k, v, args, None if m0 is None else m0.detach(),
                                                            final=False)
    # the gradient in the final moments, from the returned states (features_of_moments is linear)
    rows = fused_chunk_kernel.moment_rows(args.dk)
    m = torch.zeros((args.batch, args.kv_heads, rows, args.dv + 1), dtype=f32, device=q.device, requires_grad=True)
    g_final, = torch.autograd.grad(features_of_moments(m, pieces, k_factors, args.dk), m,
                                   (dkv.to(f32), dks.to(f32)))
    c0, c1, c2 = args.coeffs
    coef = torch.cat([g_final.new_full((1,), c0), g_final.new_full((args.dk,), c1),
                      g_final.new_full((args.dk * args.dk,), c2)])[:, None]
    later = symmetric(g_final / (coef * args.group), args.dk).repeat_interleave(args.group, dim=1)   # per query head
    dq, dk, dv = fused_chunk_kernel.fused_chunk_backward_with_state(
        q, k, v, o, z, do, args, None if m0 is None else m0.detach(), later)
    dkv0 = dk0 = q.new_empty(0)
    if initial:
        reverse = fused_chunk_kernel.query_moments(q, o, z, do, args)                      # [B, H, M, Dv + 1]
        d_m0 = (reverse * coef).view(args.batch, args.kv_heads, args.group, rows, -1).sum(2)
        leaves = [x for x in starts if x is not None]
        grads = iter(torch.autograd.grad(m0, leaves, d_m0))
        if kv0 is not None:              # through the returned state too: kv_state = kv0 + ...
            dkv0 = (next(grads) + dkv.to(f32)).to(kv0.dtype)
        if k0 is not None:
            dk0 = (next(grads) + dks.to(f32)).to(k0.dtype)
    return dq, dk, dv, dkv0, dk0


def _backward_fake(do, dkv, dks, q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors,
                   kv0=None, k0=None):
    _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors, kv0, k0)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(kv0) if kv0 is not None else q.new_empty(0),
            torch.empty_like(k0) if k0 is not None else q.new_empty(0))


def _below_autograd_bits() -> int:
    """The dispatch keys ``_AutoDispatchBelowAutograd`` excludes (as raw bits)."""
    base = torch._C._dispatch_tls_local_exclude_set().raw_repr()
    with torch._C._AutoDispatchBelowAutograd():
        return torch._C._dispatch_tls_local_exclude_set().raw_repr() & ~base


_BELOW_AUTOGRAD_BITS = _below_autograd_bits()
_OP = torch.ops.based.attention_with_state.default
_BACKWARD = torch.ops.based.attention_with_state_backward.default
_IMPLS = {"CPU": _impl, "CUDA": _impl}


class _WithStateAutograd(torch.autograd.Function):
    """The autograd formula of ``based::attention_with_state``: forward below autograd, backward
    through ``based::attention_with_state_backward`` (opaque to tracing, like the forward)."""

    @staticmethod
    def forward(ctx, keyset, q, k, v, kv0, k0, params):
        with torch._C._AutoDispatchBelowAutograd():
            out = _OP.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, *params, kv0, k0)
        ctx.save_for_backward(q, k, v, kv0, k0)
        ctx.params = params
        return out

    @staticmethod
    def backward(ctx, do, dkv, dks):
        q, k, v, kv0, k0 = ctx.saved_tensors
        dq, dk, dv, dkv0, dk0 = _BACKWARD(do, dkv, dks, q, k, v, *ctx.params, kv0, k0)
        return None, dq, dk, dv, dkv0 if kv0 is not None else None, dk0 if k0 is not None else None, None


def _autograd(keyset, q, k, v, *rest):
    params, (kv0, k0) = rest[:10], (tuple(rest[10:]) + (None, None))[:2]
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in (q, k, v, kv0, k0)):
        return _WithStateAutograd.apply(keyset, q, k, v, kv0, k0, params)
    backend = direct_backend(keyset)
    if backend is not None:            # plain CPU / CUDA tensors: no second trip through the dispatcher
        return _IMPLS[backend](q, k, v, *params, kv0, k0)
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, *params, kv0, k0)


def _redispatch_backward(keyset, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return _BACKWARD.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _backward_autograd(keyset, *args):
    if wants_graph(*args):      # create_graph=True: first-order gradients, which refuse a second backward
        return first_order("based::attention_with_state_backward", functools.partial(_redispatch_backward, keyset),
                           *args)
    return _redispatch_backward(keyset, *args)


for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("attention_with_state", _impl, _key)
    _LIBRARY.impl("attention_with_state_backward", _backward_impl, _key)
_LIBRARY.impl("attention_with_state", _autograd, "Autograd", with_keyset=True)
_LIBRARY.impl("attention_with_state_backward", _backward_autograd, "Autograd", with_keyset=True)
torch.library.register_fake("based::attention_with_state", _fake, lib=_LIBRARY)
torch.library.register_fake("based::attention_with_state_backward", _backward_fake, lib=_LIBRARY)
for _device_type in ("cpu", "cuda"):        # cast as based::attention is (its fake returns what its inputs make)
    register_autocast(_LIBRARY, "attention_with_state", _device_type)


def based_attention_with_state(q: Tensor, k: Tensor, v: Tensor, spec: BasedSpec, pieces, k_factors,
                               kv0: Tensor | None = None, k0: Tensor | None = None):
    """(o, kv_state, k_state) through ``based::attention_with_state``: o as ``based_attention`` returns
    it, the states kv0 + sum_t phi(k_t)^T v_t [B, Hkv, F, Dv] and k0 + sum_t phi(k_t) [B, Hkv, F] with
    phi the feature map described by ``pieces`` and ``k_factors`` (see ``recurrent_step.py``); the
    optional initial states ``kv0``, ``k0`` (same shapes) are earlier tokens' states, which every query
    sees (they enter o as phi_q(q) kv0 and phi_q(q) . k0). Differentiable in q, k, v, kv0, k0."""
    if not isinstance(spec, BasedSpec):
        raise TypeError(f"spec must be a based_compile.spec.BasedSpec, got {type(spec).__name__}")
    if not isinstance(pieces, (list, tuple)) or not all(isinstance(p, str) for p in pieces):   # not a str
        raise TypeError(f"pieces must be a list of feature-map pieces ('const:W', 'linear', 'outer'), e.g. "
                        f"['const:1', 'linear', 'outer'], got {pieces!r}")
    if not isinstance(k_factors, (list, tuple)):
        raise TypeError(f"k_factors must be a list of numbers, one per piece of pieces, got {k_factors!r}")
    return _OP(q, k, v, *spec.op_arguments, list(pieces), [float(f) for f in k_factors], kv0, k0)
