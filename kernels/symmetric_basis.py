"""The symmetric second-order feature basis of Based attention's states (DESIGN.md section 2).

With r = q . k and s = scale * r, f(s) = c0 + c1 s + c2 s^2 = phi_q(q) . phi_k(k) where, for n = Dk,

    phi_q(x) = [1,  x_a,  x_a^2,  x_a x_{(a + d) mod n} for d = 1 .. n // 2]           (a = 0 .. n-1)
    phi_k(x) = [c0, c1 scale x_a, c2 scale^2 x_a^2, w_d c2 scale^2 x_a x_{(a + d) mod n}]

with w_d = 2, except w_{n/2} = 1 for even n (offset n/2 reaches every pair twice). x (x) x is
symmetric, so each unordered pair {a, b} is one feature (or two of half weight), not two:
1 + 2n + n (n // 2) features, 161 at Dk = 16 (153 distinct: 1 + 16 + 136) instead of the
1 + 16 + 256 of the full outer product. The rolled pairs (a, a + d) make every block a dense
tile in the Triton kernel: block A = [n // 2, n] products of x with its rolled copies, block
B = [n, 2] (x_a, x_a^2), and the constant.

The Triton kernel works over the padded feature dim BK (a power of two >= Dk, zeros beyond Dk), so
there n = BK; for Dk = BK the two coincide.
"""
from __future__ import annotations

import torch


def feature_count(n: int) -> int:
    """Features of phi for n key dims (the constant, n linear, n squares, n (n // 2) rolled pairs)."""
    return 1 + 2 * n + n * (n // 2)


def distinct_feature_count(n: int) -> int:
    """1 + n + n (n + 1) / 2: the symmetric basis' distinct monomials."""
    return 1 + n + n * (n + 1) // 2


def _blocks(x: torch.Tensor) -> list[torch.Tensor]:
    n = x.shape[-1]
    return [torch.ones_like(x[..., :1]), x, x * x] + [x * torch.roll(x, -d, dims=-1) for d in range(1, n // 2 + 1)]


def query_features(q: torch.Tensor) -> torch.Tensor:
    """phi_q(q) [..., feature_count(Dk)] (differentiable)."""
    return torch.cat(_blocks(q), dim=-1)


def key_weights(n: int, scale: float, coeffs, dtype=torch.float64, device=None) -> torch.Tensor:
    """The key side's weight of each feature, in query_features' order."""
    c0, c1, c2 = coeffs
    c1, c2 = c1 * scale, c2 * scale * scale
    w = [c0] + [c1] * n + [c2] * n
    for d in range(1, n // 2 + 1):
        w += [c2 if 2 * d == n else 2.0 * c2] * n
    return torch.tensor(w, dtype=dtype, device=device)


def key_features(k: torch.Tensor, scale: float, coeffs) -> torch.Tensor:
    """phi_k(k) [..., feature_count(Dk)] (differentiable): phi_q(q) . phi_k(k) = f(scale * q . k)."""
    return query_features(k) * key_weights(k.shape[-1], scale, coeffs, k.dtype, k.device)
