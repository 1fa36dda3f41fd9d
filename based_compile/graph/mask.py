"""Masks: a keep-pattern [T, T] (True where the weight survives), evaluated at compile time.

``keep_from_constant`` turns whatever the user multiplied by / filled with (bool or 0/1 float,
[T, T] or broadcastable to it, the same for every batch and head) into the pattern;
``classify`` names it: "causal" (tril), or a reason the mask is not causal (anti-causal,
shifted, windowed, other), which the matcher reports as a "mask" refusal.
"""
from __future__ import annotations

import functools

import torch


class MaskError(Exception):
    """The constant is not a single 0/1 pattern over the [T, T] scores."""


def keep_from_constant(value: torch.Tensor, weights_shape: tuple, axes: tuple[int, int], *,
                       invert: bool = False) -> torch.Tensor:
    """A bool or 0/1 tensor broadcast against weights of ``weights_shape`` -> bool [T, T] (True = keep).

    ``axes``: where the query and key axes sit in the weights. The pattern must be the same for
    every index of the other axes (batch, heads).
    """
    if not isinstance(value, torch.Tensor):
        raise MaskError(f"mask is a {type(value).__name__}, not a tensor")
    value = value.cpu()                              # patterns are classified on the CPU
    rank = len(weights_shape)
    ai, aj = axes
    if value.dtype == torch.bool and value.dim() == 2 and (ai, aj) == (rank - 2, rank - 1) \
            and tuple(value.shape) == (weights_shape[ai], weights_shape[aj]):
        return ~value if invert else value          # the common case: a [T, T] boolean pattern
    if value.dim() > rank:
        raise MaskError(f"mask of shape {tuple(value.shape)} has more axes than the weights {weights_shape}")
    value = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
    for d in range(rank):
        if value.shape[d] not in (1, weights_shape[d]):
            raise MaskError(f"mask of shape {tuple(value.shape)} does not broadcast to the weights {weights_shape}")
    if value.dtype != torch.bool:
        if not bool(((value == 0) | (value == 1)).all()):
            raise MaskError("multiplies the weights by a matrix that is not 0/1")
        value = value != 0
    others = [d for d in range(rank) if d not in (ai, aj)]
    value = value.permute(others + [ai, aj])
    flat = value.reshape(-1, value.shape[-2], value.shape[-1])
    if not bool((flat == flat[:1]).all()):
        raise MaskError("mask differs between batch entries or heads")
    keep = torch.broadcast_to(flat[0], (weights_shape[ai], weights_shape[aj])).clone()
    return ~keep if invert else keep


@functools.lru_cache(maxsize=16)
def _tril(t: int) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()


def classify(keep: torch.Tensor) -> tuple[str, str]:
    """("causal", "") or ("refuse", why) for a bool [T, T] keep-pattern."""
    t = keep.shape[-1]
    ones = torch.ones(t, t, dtype=torch.bool)
    if torch.equal(keep, _tril(t)):
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
