"""``based::attention_with_state``: Based attention over a prefill that also returns the final states.

    o         = based::attention(q, k, v, spec)                  (causal or not, normalised or not)
    kv_state  = sum_t phi(k_t)^T v_t        [B, Hkv, F, Dv]
    k_state   = sum_t phi(k_t)              [B, Hkv, F]

phi is the user's Taylor feature map, described as in ``recurrent_step.py`` (``pieces``: "const:W",
"linear", "outer"; ``k_factors``: one factor per piece), so the states are the ones the user's
code stores (feature order and scaling), per key/value head; the graph pass lays them out as the
user's tensors (repeated over a GQA group, transposed, reshaped, cast). They are what the
recurrent step (``based::recurrent_step``) takes next: the prefill -> decode hand-off.

Implementation: the forward computes raw moments sum_t [1, k_t, k_t (x) k_t]^T [v_t, 1]
[B, Hkv, 1 + Dk + Dk^2, Dv + 1] and converts them to the user's features at the end (a few
kilobytes per head). CUDA: the fused-chunk Triton kernel writes the moments from its registers
after its last chunk (``kernels/fused_chunk.py``, ``fused_chunk_forward_with_state``); no
[T, F, Dv] tensor and no second pass over k and v. CPU (and CUDA where the kernel does not apply,
Dk > 32): the PyTorch forms of ``cpu_path.py`` for o, and one [T, 1 + Dk + Dk^2] x [T, Dv + 1]
product per head for the moments: O(T) memory. States are returned in float32 (float64 for
float64 inputs); the rewrite casts them to the user's dtype.

Not differentiable: called under grad mode with inputs that require grad it raises (the graph
pass rewrites a prefill with states only when nothing requires grad, and leaves the states of a
differentiable prefill to the inner compiler, with a refusal in explain()). Inside
``based_compile.context_parallel`` it raises (not sequence parallel).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import config, context_parallel, cpu_path, inference_only, policy
from ..kernels import fused_chunk as fused_chunk_kernel
from ..kernels.arguments import BasedArguments, check_arguments, triton_interpreting
from .recurrent_step import feature_width, piece_width
from .spec import BasedSpec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_LIBRARY = torch.library.Library("based", "FRAGMENT")
_LIBRARY.define("attention_with_state(Tensor q, Tensor k, Tensor v, str layout, float scale, float c0, float c1, "
                "float c2, bool causal, bool normalize, float eps, str[] pieces, float[] k_factors) "
                "-> (Tensor, Tensor, Tensor)", tags=(torch.Tag.pt2_compliant_tag,))


def _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors) -> BasedArguments:
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


def _uses_kernel(q: Tensor, args: BasedArguments) -> bool:
    """The fused-chunk kernel (the one with states) on CUDA within its limits; on the CPU only when a
    Triton kernel is forced under the interpreter (config.py)."""
    if args.dk > fused_chunk_kernel.MAX_DK or q.dtype not in KERNEL_DTYPES:
        return False
    if q.device.type == "cuda":
        return True
    return triton_interpreting() and config.forced_kernel()[0] in policy.TRITON_KERNELS


def attention_with_state_forward(q, k, v, args: BasedArguments, pieces, k_factors):
    """(o, kv_state, k_state) for checked arguments (the operator's implementation)."""
    if _uses_kernel(q, args):
        o, _, m = fused_chunk_kernel.fused_chunk_forward_with_state(q, k, v, args)
        m = m.to(cpu_path.compute_dtype(q.dtype))
    else:
        form = policy.choose_kernel(args, q, k, v, False)
        form = policy.CPU_FORM_OF.get(form, form).removeprefix("cpu_").removeprefix("pytorch_")
        o, _ = cpu_path.cpu_forward(q, k, v, args, form)
        m = moments(k, v, args)
    kv, ks = features_of_moments(m, pieces, k_factors, args.dk)
    return o.contiguous(), kv, ks


def _impl(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors):
    if context_parallel.active():
        raise RuntimeError("based::attention_with_state under based_compile.context_parallel: a prefill that returns "
                           "its final states for decoding is not sequence parallel (its output and states would be "
                           "this rank's shard's alone); prefill outside the context_parallel block")
    args = _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors)
    return attention_with_state_forward(q, k, v, args, pieces, k_factors)


def _fake(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors):
    args = _check(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, pieces, k_factors)
    f = feature_width(pieces, args.dk)
    dtype = cpu_path.compute_dtype(q.dtype)
    o = q.new_empty((*q.shape[:-1], args.dv))
    return (o, q.new_empty((args.batch, args.kv_heads, f, args.dv), dtype=dtype),
            q.new_empty((args.batch, args.kv_heads, f), dtype=dtype))


_OP = inference_only.register(_LIBRARY, "attention_with_state", cpu=_impl, cuda=_impl, fake=_fake,
                              what="a prefill for decoding")


def based_attention_with_state(q: Tensor, k: Tensor, v: Tensor, spec: BasedSpec, pieces, k_factors):
    """(o, kv_state, k_state) through ``based::attention_with_state``: o as ``based_attention`` returns
    it, the states sum_t phi(k_t)^T v_t [B, Hkv, F, Dv] and sum_t phi(k_t) [B, Hkv, F] with phi the
    feature map described by ``pieces`` and ``k_factors`` (see ``recurrent_step.py``)."""
    if not isinstance(spec, BasedSpec):
        raise TypeError(f"spec must be a based_compile.spec.BasedSpec, got {type(spec).__name__}")
    return _OP(q, k, v, *spec.op_arguments, list(pieces), [float(f) for f in k_factors])
