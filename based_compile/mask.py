"""Masks: a keep-pattern [T, T] (True where the weight survives), evaluated at compile time.

``keep_from_constant`` turns whatever the user multiplied by / filled with (bool or 0/1 float,
[T, T] or broadcastable to it, the same for every batch and head) into the pattern;
``classify`` names it: "causal" (tril), or a reason the mask is not causal (anti-causal,
shifted, windowed, other), which the matcher reports as a "mask" refusal.
"""
from __future__ import annotations

import torch


class MaskError(Exception):
    """The constant is not a single 0/1 pattern over the [T, T] scores."""


def keep_from_constant(value: torch.Tensor, t: int, *, invert: bool = False) -> torch.Tensor:
    """[..., T|1, T|1] bool or 0/1 tensor -> bool [T, T] (True = keep), identical across leading dims."""
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"mask is a {type(value).__name__}, not a tensor")
    if value.dim() < 2:
        value = value.reshape((1,) * (2 - value.dim()) + tuple(value.shape))
    if value.dtype != torch.bool:
        if not bool(((value == 0) | (value == 1)).all()):
            raise MaskError("multiplies the weights by a matrix that is not 0/1")
        value = value != 0
    try:
        full = torch.broadcast_to(value, tuple(value.shape[:-2]) + (t, t))
    except RuntimeError as err:
        raise MaskError(f"mask of shape {tuple(value.shape)} does not broadcast to [{t}, {t}]") from err
    flat = full.reshape(-1, t, t)
    if not bool((flat == flat[:1]).all()):
        raise MaskError("mask differs between batch entries or heads")
    keep = flat[0].clone()
    return ~keep if invert else keep


def classify(keep: torch.Tensor) -> tuple[str, str]:
    """("causal", "") or ("refuse", why) for a bool [T, T] keep-pattern."""
    t = keep.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool)
    if torch.equal(keep, torch.tril(ones)):
        return "causal", ""
    if keep.all():
        return "none", ""
    for d in range(-t + 1, t):
        if d != 0 and torch.equal(keep, torch.tril(ones, d)):
            return "refuse", f"shifted causal mask (tril diagonal={d}), not diagonal=0"
    if torch.equal(keep, torch.triu(ones)) or any(torch.equal(keep, torch.triu(ones, d)) for d in range(-t + 1, t)):
        return "refuse", "anti-causal mask (keeps j >= i)"
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    if bool((keep <= (j <= i)).all()) and keep.diagonal().all():
        return "refuse", "windowed (banded) causal mask: drops keys far in the past"
    return "refuse", "mask is not the causal (lower-triangular) pattern"


def is_triangular_family(pattern: torch.Tensor) -> bool:
    """True when a square [N, N] 0/1 pattern (e.g. a registered buffer) is a tril/triu shape or its complement."""
    n = pattern.shape[-1]
    ones = torch.ones(n, n, dtype=torch.bool)
    family = [torch.tril(ones), torch.triu(ones, 1), torch.triu(ones), torch.tril(ones, -1)]
    return any(torch.equal(pattern, f) for f in family)
