"""Polynomials in the raw dot product q.k, as coefficient tuples (index = power).

The matcher reads every T x T weight tensor as ``keep * P(q.k)``; P is one of these.
"""
from __future__ import annotations

import math

Poly = tuple  # (p0, p1, p2, ...): P(x) = sum_n p_n x^n


def trim(p: Poly) -> Poly:
    p = list(p)
    while len(p) > 1 and p[-1] == 0.0:
        p.pop()
    return tuple(p)


def add(a: Poly, b: Poly) -> Poly:
    n = max(len(a), len(b))
    return trim(tuple((a[i] if i < len(a) else 0.0) + (b[i] if i < len(b) else 0.0) for i in range(n)))


def scale(a: Poly, c: float) -> Poly:
    return trim(tuple(x * c for x in a))


def mul(a: Poly, b: Poly) -> Poly:
    out = [0.0] * (len(a) + len(b) - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            out[i + j] += x * y
    return trim(tuple(out))


def power(a: Poly, n: int) -> Poly:
    out: Poly = (1.0,)
    for _ in range(n):
        out = mul(out, a)
    return out


def degree(a: Poly) -> int:
    a = trim(a)
    return len(a) - 1 if a != (0.0,) else -1


def coefficient(a: Poly, n: int) -> float:
    return a[n] if n < len(a) else 0.0


def is_monomial(a: Poly, n: int) -> bool:
    return degree(a) == n and all(x == 0.0 for x in a[:n])


def close(a: Poly, b: Poly, rel: float = 1e-9) -> bool:
    n = max(len(a), len(b))
    return all(math.isclose(coefficient(a, i), coefficient(b, i), rel_tol=rel, abs_tol=1e-300) for i in range(n))


def minimum(a: Poly) -> float | None:
    """The least value of P over the real line, for degree <= 2; None when P is unbounded below or of
    higher degree (not worked out). Based's 1 + x + x^2/2 has minimum 1/2 (at x = -1)."""
    a = trim(a)
    d = degree(a)
    if d <= 0:
        return coefficient(a, 0)
    if d == 1 or d > 2 or a[2] < 0.0:
        return None
    return a[0] - a[1] * a[1] / (4.0 * a[2])


def describe(a: Poly) -> str:
    terms = [f"{c:.6g}*x^{i}" if i else f"{c:.6g}" for i, c in enumerate(a) if c != 0.0]
    return " + ".join(terms) if terms else "0"


# Probe points for reading an elementwise function of x as a polynomial by evaluating it: exact in
# binary floating point, spread on both sides of 0 (MAX_FIT_DEGREE + 1 to fit, the rest to check).
FIT_POINTS = (0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -1.5, 1.5, 3.0, -0.75)
MAX_FIT_DEGREE = 6


def fit(fn) -> Poly | None:
    """The polynomial P (degree <= MAX_FIT_DEGREE) with P(x) = fn(x) at every FIT_POINTS x, or None.

    ``fn`` maps a float to a float. P is the interpolating polynomial through the first
    MAX_FIT_DEGREE + 1 points, checked at the others (relative 1e-9): a function that is not a
    polynomial of that degree (exp, a sigmoid, |x|) disagrees there. Coefficients below 1e-12 of
    the largest are rounding noise of the solve and set to 0.
    """
    n = MAX_FIT_DEGREE + 1
    try:
        values = [float(fn(x)) for x in FIT_POINTS]
    except (ArithmeticError, ValueError):
        return None
    if not all(math.isfinite(v) for v in values):
        return None
    xs = FIT_POINTS[:n]
    coeffs = _solve([[x ** i for i in range(n)] for x in xs], values[:n])
    largest = max((abs(c) for c in coeffs), default=0.0)
    coeffs = [0.0 if abs(c) <= 1e-12 * largest else c for c in coeffs]
    scale = max(abs(v) for v in values) or 1.0
    for x, v in zip(FIT_POINTS[n:], values[n:]):
        p = sum(c * x ** i for i, c in enumerate(coeffs))
        if abs(p - v) > 1e-9 * scale:
            return None
    return trim(tuple(coeffs))


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting (a small, well-conditioned Vandermonde system)."""
    n = len(b)
    m = [row[:] + [rhs] for row, rhs in zip(a, b)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, n):
            f = m[r][col] / m[col][col]
            for c in range(col, n + 1):
                m[r][c] -= f * m[col][c]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (m[r][n] - sum(m[r][c] * out[c] for c in range(r + 1, n))) / m[r][r]
    return out
