"""Argument checking shared by every Based attention entry point.

All public functions (the float64-grade references in ``naive.py`` and the Triton
kernels) take the same arguments; this module validates them once and returns a
small record of the resolved values, so that a wrong shape, dtype or device is a
``ValueError``/``TypeError`` naming the argument, never a crash inside a kernel.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

LAYOUTS = ("BHTD", "BTHD")
DEFAULT_COEFFS = (1.0, 1.0, 0.5)
FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class BasedArguments:
    """Resolved arguments of one Based attention call (sizes in logical BHTD terms)."""

    batch: int
    heads: int
    kv_heads: int
    length: int
    dk: int
    dv: int
    layout: str
    scale: float
    coeffs: tuple[float, float, float]
    causal: bool
    normalize: bool
    eps: float
    key_length: int | None = None  # Tk when the keys outnumber the queries (a KV cache), else None

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def tk(self) -> int:
        """The number of keys (and values): ``length`` unless the queries are a block at the end."""
        return self.length if self.key_length is None else self.key_length

    @property
    def offset(self) -> int:
        """Tk - Tq: causal query i sees keys j <= i + offset (the mask is aligned to the end)."""
        return self.tk - self.length


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATING_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ([B, H, T, D] or [B, T, H, D]), got shape {tuple(x.shape)}")


def _bhtd(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    b, a1, a2, d = x.shape
    return (b, a1, a2, d) if layout == "BHTD" else (b, a2, a1, d)


def check_arguments(q, k, v, scale=None, coeffs=DEFAULT_COEFFS, causal=True, normalize=True,
                    eps=1e-6, layout="BHTD", dtypes=None, shorter_queries=False) -> BasedArguments:
    """Validate the common arguments and return them resolved.

    ``dtypes``: the floating dtypes the caller supports (``None``: all of ``FLOATING_DTYPES``).
    ``shorter_queries``: accept Tq <= Tk (a block of queries at the end of the keys, e.g. decoding
    against a KV cache; causal query i sees keys j <= i + Tk - Tq); otherwise Tq == Tk.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if dtypes is not None and q.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"q, k, v dtype must be one of ({names}), got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    b, h, t, dk = _bhtd(q, layout)
    bk, hk, tk, dkk = _bhtd(k, layout)
    bv, hv, tv, dv = _bhtd(v, layout)
    if not (b == bk == bv):
        raise ValueError(f"q, k and v must share the batch size, got q={b}, k={bk}, v={bv}")
    if shorter_queries:
        if tk != tv:
            raise ValueError(f"k and v must share the sequence length, got k={tk}, v={tv}")
        if t > tk:
            raise ValueError(f"q must not have more positions than k and v (Tq <= Tk), got q={t}, k={tk}")
    elif not (t == tk == tv):
        raise ValueError(f"q, k and v must share the sequence length, got q={t}, k={tk}, v={tv}")
    if t < 1:
        raise ValueError(f"sequence length must be >= 1, got {t}")
    if dkk != dk:
        raise ValueError(f"q and k must share the feature dim Dk, got q={dk}, k={dkk}")
    if dk < 1 or dv < 1:
        raise ValueError(f"feature dims must be >= 1, got Dk={dk}, Dv={dv}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got k={hk}, v={hv}")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"the heads of q ({h}) must be a multiple of the heads of k and v ({hk})")
    if scale is None:
        scale = dk ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python number or None, got {scale!r}")
    try:
        if isinstance(coeffs, (str, bytes, Mapping)):       # iterable, but not three numbers
            raise TypeError
        coeffs = tuple(float(c) for c in coeffs)
    except (TypeError, ValueError):
        raise TypeError(f"coeffs must be a sequence of three numbers (c0, c1, c2), got {coeffs!r}") from None
    if len(coeffs) != 3 or not all(math.isfinite(c) for c in coeffs):
        raise ValueError(f"coeffs must be three finite numbers (c0, c1, c2), got {coeffs!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return BasedArguments(b, h, hk, t, dk, dv, layout, float(scale), coeffs, causal, normalize, float(eps),
                          tk if tk != t else None)


def _environment_reader():
    """``os.environ.get`` for the per-call paths. ``os.environ.get`` goes through the Mapping
    methods and encodes the name and decodes the value (about 1.5 us a read on a slow host, several
    reads a call); on POSIX CPython ``os.environ`` keeps its contents in a dict of encoded names and
    values (``_data``, which assignments to ``os.environ`` update), read here in one lookup. The same
    values as ``os.environ.get``; elsewhere ``os.environ.get`` itself."""
    data, encode, decode = (getattr(os.environ, attr, None) for attr in ("_data", "encodekey", "decodevalue"))
    if os.name != "posix" or not isinstance(data, dict) or encode is None or decode is None:
        return os.environ.get
    names: dict = {}
    values: dict = {}

    def read(name: str, default=None):
        key = names.get(name)
        if key is None:
            key = names[name] = encode(name)
        raw = data.get(key)
        if raw is None:
            return default
        value = values.get(raw)
        if value is None:
            if len(values) >= 64:
                values.clear()
            value = values[raw] = decode(raw)
        return value
    return read


environ_get = _environment_reader()


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return environ_get("TRITON_INTERPRET", "0") not in ("", "0")


def check_kernel_device(q: torch.Tensor, *, dots: bool = True) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the Triton interpreter.

    Under the interpreter, a kernel with ``tl.dot`` (``dots``: all but the recurrent step's) refuses
    bfloat16: the interpreter's ``tl.dot`` on bfloat16 operands returns wrong values (outputs near
    zero), so the kernels would return garbage instead of Based attention. CUDA tensors are not
    affected."""
    if q.is_cuda:
        return
    if q.device.type == "cpu" and triton_interpreting():
        if dots and q.dtype == torch.bfloat16:
            raise TypeError(
                "q, k, v are bfloat16 CPU tensors under TRITON_INTERPRET=1: Triton's interpreter computes "
                "tl.dot on bfloat16 operands wrongly, so the Triton kernels refuse bfloat16 there. Use float32 "
                "or float16 under the interpreter, CUDA tensors, or the PyTorch forms on the CPU "
                "(based_compile.kernels.naive_*, or based_attention with config.kernel 'auto')."
            )
        return
    raise ValueError(
        f"q, k, v are on {q.device}; the Triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1). Use based_compile.kernels.naive_* on the CPU."
    )
