"""The symmetric second-order feature basis of Based attention's states (DESIGN.md section 2).

With r = q . k (unscaled) and f(s) = c0 + c1 s + c2 s^2 at s = scale * r,

    f(scale * r) = phi_q(q) . phi_k(k),
    phi_q(x) = [1, x_a, x_a x_b (a <= b)],
    phi_k(x) = [c0, c1 scale x_a, c2 scale^2 (2 - [a = b]) x_a x_b (a <= b)],

1 + Dk + Dk (Dk + 1) / 2 features (153 at Dk = 16) instead of the 1 + Dk + Dk^2 of the full
outer product: x (x) x is symmetric, so the pair (a, b) and (b, a) share one feature whose key
side carries the weight 2.

Triton tiles are powers of two, so the features are laid out in two blocks:
  block A: the first FA pairs (FA the largest power of two <= the number of pairs, at least 16);
  block B: the constant, the Dk linear features, the remaining pairs, padding up to a power of two.
At Dk = 16: FA = 128 pairs, block B = 1 + 16 + 8 = 25 features padded to 32; 160 in all.

Each feature p is described by two key indices (a_p, b_p): a_p = b_p = -1 for the constant,
b_p = -1 for a linear feature x_a, and a_p = b_p = -2 for padding (the feature is 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

CONSTANT = -1
PADDING = -2


@dataclass(frozen=True)
class SymmetricBasis:
    """The feature layout for one Dk: key index pairs (a, b) of the features in kernel order."""

    dk: int
    block_a: int               # FA: features in block A (pairs only)
    block_b: int               # FB: features in block B (constant, linear, remaining pairs, padding)
    a: tuple[int, ...]         # first key index of each feature (-1 constant, -2 padding)
    b: tuple[int, ...]         # second key index (-1 constant or linear, -2 padding)

    @property
    def size(self) -> int:
        """Features stored per state row, padding included (FA + FB)."""
        return self.block_a + self.block_b

    @property
    def rows(self) -> int:
        """Distinct features: 1 + Dk + Dk (Dk + 1) / 2."""
        return 1 + self.dk + self.dk * (self.dk + 1) // 2


def _pow2_at_least(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def _pow2_at_most(n: int) -> int:
    p = 16
    while p * 2 <= n:
        p *= 2
    return p


@lru_cache(maxsize=None)
def symmetric_basis(dk: int) -> SymmetricBasis:
    if dk < 1:
        raise ValueError(f"Dk must be >= 1, got {dk}")
    pairs = [(x, y) for x in range(dk) for y in range(x, dk)]
    fa = _pow2_at_most(len(pairs)) if len(pairs) >= 16 else 16
    block_a = pairs[:fa]
    block_b = [(CONSTANT, CONSTANT)] + [(x, CONSTANT) for x in range(dk)] + pairs[fa:]
    fb = _pow2_at_least(len(block_b))
    feats = block_a + [(PADDING, PADDING)] * (fa - len(block_a)) + block_b + [(PADDING, PADDING)] * (fb - len(block_b))
    return SymmetricBasis(dk, fa, fb, tuple(x for x, _ in feats), tuple(y for _, y in feats))


def key_weights(basis: SymmetricBasis, scale: float, coeffs) -> list[float]:
    """The key side's weight of each feature: c0, c1 scale, c2 scale^2 (2 - [a = b]), 0 for padding."""
    c0, c1, c2 = coeffs
    out = []
    for a, b in zip(basis.a, basis.b):
        if a == PADDING:
            out.append(0.0)
        elif a == CONSTANT:
            out.append(c0)
        elif b == CONSTANT:
            out.append(c1 * scale)
        else:
            out.append(c2 * scale * scale * (1.0 if a == b else 2.0))
    return out


_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def basis_table(dk: int, device: torch.device) -> torch.Tensor:
    """int32 [2, FA + FB] on device: row 0 the a indices, row 1 the b indices (cached per device)."""
    key = (dk, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        basis = symmetric_basis(dk)
        table = torch.tensor([basis.a, basis.b], dtype=torch.int32, device=device)
        _TABLES[key] = table
    return table


def expand(x: torch.Tensor, basis: SymmetricBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dk] -> (x_a, x_b) [..., FA + FB]: the two factors of every feature (1 for the
    constant's and a linear feature's missing factors, 0 for padding)."""
    ones, zeros = torch.ones_like(x[..., :1]), torch.zeros_like(x[..., :1])
    ext = torch.cat([x, ones, zeros], dim=-1)           # index dk: 1, index dk + 1: 0

    def column(i: int) -> int:
        return {CONSTANT: basis.dk, PADDING: basis.dk + 1}.get(i, i)

    ia = torch.tensor([column(i) for i in basis.a], device=x.device)
    ib = torch.tensor([column(i) for i in basis.b], device=x.device)
    return ext[..., ia], ext[..., ib]


def query_features(q: torch.Tensor, basis: SymmetricBasis) -> torch.Tensor:
    """phi_q(q) [..., FA + FB] (differentiable)."""
    xa, xb = expand(q, basis)
    return xa * xb


def key_features(k: torch.Tensor, basis: SymmetricBasis, scale: float, coeffs) -> torch.Tensor:
    """phi_k(k) [..., FA + FB] (differentiable): phi_q(q) . phi_k(k) = f(scale * q . k)."""
    xa, xb = expand(k, basis)
    w = torch.tensor(key_weights(basis, scale, coeffs), dtype=k.dtype, device=k.device)
    return xa * xb * w
