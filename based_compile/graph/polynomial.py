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


def describe(a: Poly) -> str:
    terms = [f"{c:.6g}*x^{i}" if i else f"{c:.6g}" for i, c in enumerate(a) if c != 0.0]
    return " + ".join(terms) if terms else "0"
