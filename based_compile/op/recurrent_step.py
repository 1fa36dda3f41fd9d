"""``based::recurrent_step``: one decoding step of Based attention in its recurrent form.

    kv' = kv_state + phi(k)^T v          the state the caller keeps, in its own shape and dtype
    k'  = k_state + phi(k)
    o   = phi(q) kv' / (phi(q) . k' + eps)      (normalize; else o = phi(q) kv')

Rows: k is [..., Dk], v [..., Dv] with the same leading dimensions, R rows in all (B * H for one
token of a [B, H, 1, D] or [B, 1, H, D] tensor); kv_state holds R * F * Dv elements read as
[R, F, Dv] and k_state R * F read as [R, F], in row-major order of their own shapes (the user's
layout: [B, H, F, Dv] and [B, H, 1, F] for the rows (b, h)). q is [..., Dk] with G * R rows
(grouped-query attention: G query heads per state), query row i reading state row i // G, which
is how [B, H, 1, D] queries with H = G * Hkv heads group on [B, Hkv, ...] states when the user
repeats the states with ``repeat_interleave(G, dim=1)`` / ``expand`` or reshapes q to
[B, Hkv, G, ...] (G = 1: one state per query row). o has q's shape with Dv features; the new
states have the shapes and dtypes of the old ones. ``k_state`` may be None for an unnormalised
step (``normalize=False``; the readout has no denominator): the third result is then phi(k)
([..., F] in k's leading shape, kv_state's dtype), the key state a zero state would have become.

The feature map phi is the user's own, described by ``pieces`` and factors (derived from the
graph by ``graph/feature_map.py``): phi(x) = cat over pieces of factor * piece(x), a piece being
"const:W" (W ones), "linear" (x) or "outer" (flatten(x (x) x), index a * Dk + b). q and k have one
factor per piece each (``q_factors``, ``k_factors``).

Implementation: on CUDA a Triton kernel of ``kernels/recurrent_step.py`` (phi computed on the fly,
each state read once and written once, one program per row and block of Dv columns;
``step_variant`` picks which, ``config.step_kernel`` forces one) for float16, bfloat16 and float32
with at most 4 pieces, Dk <= 128, Dv <= 256; otherwise, and on the CPU, the PyTorch form below.
Both compute in float32 (float64 for float64 inputs) and round the states once to their dtype;
the readout reads the states as stored.
Not differentiable (decoding): called under grad mode with inputs that require grad it raises.
Inside ``based_compile.context_parallel`` it raises (a step is not sequence parallel).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import recurrent_step as step_kernel
from ..kernels.step_arguments import check_step_arguments, feature_width, piece_width
from . import config, context_parallel, inference_only
from .cpu_path import compute_dtype

PIECE_KINDS = ("const", "linear", "outer")

_LIBRARY = torch.library.Library("based", "FRAGMENT")
_LIBRARY.define("recurrent_step(Tensor q, Tensor k, Tensor v, Tensor kv_state, Tensor? k_state, str[] pieces, "
                "float[] q_factors, float[] k_factors, bool normalize, float eps) -> (Tensor, Tensor, Tensor)",
                tags=(torch.Tag.pt2_compliant_tag,))


def feature_map(x: Tensor, pieces, factors) -> Tensor:
    """phi(x): [..., Dk] -> [..., F] as described by ``pieces`` and ``factors``."""
    parts = []
    for piece, factor in zip(pieces, factors):
        if piece == "linear":
            parts.append(x * factor)
        elif piece == "outer":
            parts.append((x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) * factor)
        else:
            parts.append(x.new_full((*x.shape[:-1], piece_width(piece, x.shape[-1])), float(factor)))
    return torch.cat(parts, dim=-1)


def recurrent_step_reference(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps):
    """The step in PyTorch (the CPU and, for now, CUDA implementation): (o, kv', k')."""
    rows, dk, dv, f, group = check_step_arguments(q, k, v, kv_state, k_state, pieces, q_factors, k_factors,
                                                  normalize, eps)
    ks_dtype = kv_state.dtype if k_state is None else k_state.dtype
    dtype = compute_dtype(torch.promote_types(torch.promote_types(q.dtype, kv_state.dtype), ks_dtype))
    phi_q = feature_map(q.reshape(rows, group, dk).to(dtype), pieces, q_factors)   # [R, G, F]
    phi_k = feature_map(k.reshape(rows, dk).to(dtype), pieces, k_factors)          # [R, F]
    vr = v.reshape(rows, dv).to(dtype)
    kv = kv_state.reshape(rows, f, dv).to(dtype) + phi_k.unsqueeze(-1) * vr.unsqueeze(-2)   # [R, F, Dv]
    ks = phi_k if k_state is None else k_state.reshape(rows, f).to(dtype) + phi_k          # [R, F]
    kv_out, ks_out = kv.to(kv_state.dtype), ks.to(ks_dtype)
    # The readout reads the states as stored (rounded to their dtype), as the user's code does.
    o = phi_q @ kv_out.to(dtype)                                                            # [R, G, Dv]
    if normalize:
        o = o / ((phi_q * ks_out.to(dtype).unsqueeze(-2)).sum(-1, keepdim=True) + eps)
    o = o.reshape(*q.shape[:-1], dv).to(q.dtype)
    ks_shape = (*k.shape[:-1], f) if k_state is None else k_state.shape
    return o, kv_out.reshape(kv_state.shape), ks_out.reshape(ks_shape)


def _not_context_parallel() -> None:
    if context_parallel.active():
        raise RuntimeError("based::recurrent_step under based_compile.context_parallel: a decoding step carries "
                           "the states of the tokens before it in the caller's tensors, which context parallelism "
                           "does not shard or exchange; decode outside the context_parallel block")


def _step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps):
    _not_context_parallel()
    o, kv, ks = recurrent_step_reference(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)
    return o.contiguous(), kv.contiguous(), ks.contiguous()


def step_variant() -> str:
    """The step kernel ("flat" or "tiled"): ``config.step_kernel`` when forced, else "flat", which
    issues all of a program's loads at once where "tiled" waits for memory once per tile of
    features (six times at Dk = 16). Not by shape unless a measurement shows "tiled" ahead at
    some shape (``benchmarks/generate.py --step-only`` times both)."""
    forced = config.forced_step_kernel()
    return "flat" if forced == "auto" else forced


def _step_cuda(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps):
    why_not_kernel = _checked_cuda_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)
    _not_context_parallel()
    if why_not_kernel is not None:
        return _step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)
    return step_kernel.recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps,
                                      variant=step_variant())


def _checked_cuda_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps):
    """check_step_arguments, then why the kernel cannot take the step (None: it can).

    Remembered per (shapes, dtypes, devices, pieces, factors, normalize, eps), of which both are
    functions: a decoding loop calls the step once per layer and token with the same ones, and the
    checks cost more host time than the kernel's launch. A call whose arguments are not all
    tensors of the kinds the key reads is checked in full (and raises)."""
    try:
        ks = (None, None, None) if k_state is None else (k_state.shape, k_state.dtype, k_state.device)
        key = (q.shape, k.shape, v.shape, kv_state.shape, *ks, q.dtype, k.dtype, v.dtype, kv_state.dtype, q.device,
               k.device, v.device, kv_state.device, tuple(pieces), tuple(q_factors), tuple(k_factors), normalize,
               type(normalize), eps)                                # 1 == True, but only a bool is accepted
        why = _CHECKED.get(key, _MISSING)
    except (AttributeError, TypeError):         # not tensors, or unhashable lists: the full check raises
        key, why = None, _MISSING
    if why is _MISSING:
        check_step_arguments(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)
        why = step_kernel.supported(q, k, v, kv_state, k_state, pieces)
        if key is not None:
            if len(_CHECKED) >= 256:
                _CHECKED.clear()
            _CHECKED[key] = why
    return why


_CHECKED: dict = {}
_MISSING = object()


def describe_step(q, k, v, kv_state, k_state, pieces) -> str:
    """Which implementation runs a step on tensors like these (fake ones will do), for explain()."""
    if any(not isinstance(x, Tensor) for x in (q, k, v, kv_state)):
        return "based::recurrent_step (Triton step kernel on CUDA, PyTorch elsewhere)"
    if q.device.type != "cuda":
        return f"PyTorch implementation of based::recurrent_step on {q.device.type}"
    why = step_kernel.supported(q, k, v, kv_state, k_state, pieces)
    return "Triton recurrent step kernel" if why is None else f"PyTorch implementation of based::recurrent_step ({why})"


def _step_fake(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps):
    f = check_step_arguments(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps)[3]
    ks = kv_state.new_empty((*k.shape[:-1], f)) if k_state is None else k_state.new_empty(k_state.shape)
    return q.new_empty((*q.shape[:-1], v.shape[-1])), kv_state.new_empty(kv_state.shape), ks


_STEP = inference_only.register(_LIBRARY, "recurrent_step", cpu=_step, cuda=_step_cuda, fake=_step_fake,
                                what="a decoding step")


@dataclass(frozen=True)
class StepSpec:
    """What defines one rewritten recurrent step (explain() shows it as a site's spec)."""

    pieces: tuple
    q_factors: tuple
    k_factors: tuple
    normalize: bool = True
    eps: float = 1e-6

    def __str__(self) -> str:
        maps = ", ".join(f"{p} * {fq:.4g}" + ("" if fq == fk else f" (k: {fk:.4g})")
                         for p, fq, fk in zip(self.pieces, self.q_factors, self.k_factors))
        norm = f"normalised (eps={self.eps:g})" if self.normalize else "unnormalised"
        return f"recurrent step, phi = cat[{maps}], {norm}, states in the user's layout"


def based_recurrent_step(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize=True, eps=1e-6):
    """One recurrent Based step through ``based::recurrent_step``: returns (o, kv_state', k_state')."""
    return _STEP(q, k, v, kv_state, k_state, list(pieces), [float(f) for f in q_factors],
                 [float(f) for f in k_factors], bool(normalize), float(eps))
