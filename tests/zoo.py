"""The zoo: Based attention written by hand in the many ways people write it, and near-misses.

Every entry is an ``Entry(name, make, expected, axes, twin)``:

- ``make(dtype, seed, t=T) -> (module, inputs)`` builds a small ``nn.Module`` and fresh random
  example inputs (q, k, v; or x for modules that project) of that dtype and length;
- ``expected`` is ``Accept(...)`` (the backend must rewrite it: the spec fields to check and
  the number of sites) or ``Refuse(category)`` (no site; ``category`` is the refusal
  category explain() must report, ``None`` for "not rewritten, category unspecified");
- ``axes`` names the recognition axes ("matmul:einsum", "mask:buffer", ...) an accepted
  entry exercises; ``test_patterns.py`` checks that every value in ``AXES`` is covered;
- ``twin``: for a near-miss, the accepted entry it differs from in one thing.

Sizes are tiny (T <= 16, Dk = 4) so that the whole catalogue compiles within the CI budget.

The Based function (../shared/DESIGN.md section 1): s = scale * q.k, f(s) = c0 + c1 s + c2 s^2,
o_i = sum_{j<=i} f(s_ij) v_j / (sum_{j<=i} f(s_ij) + eps). The split of a spec into scale and
coefficients is not unique: (scale, c1, c2) and (a * scale, c1 / a, c2 / a^2) are the same
function. Tests therefore compare the invariant ``Accept.effective`` = (c0, c1*scale,
c2*scale^2); ``Accept.scale`` is the natural reading of the source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

CATEGORIES = ("polynomial", "mask", "normaliser", "feature_map", "verify", "unsupported")

# Sizes of every entry: batch, query heads, key/value heads under GQA, length, Dk, Dv.
B, H, HKV, T, DK, DV = 2, 4, 2, 12, 4, 5
MAX_LEN = 32                                   # registered mask buffers are this long, sliced to T


# --------------------------------------------------------------------------- expectations


@dataclass(frozen=True)
class Accept:
    """The backend must rewrite ``count`` sites, each with this spec.

    ``layout``: the layout of q, k, v as the module receives them. ``strict_layout=False``
    when the module transposes [B, T, H, D] to [B, H, T, D] itself, so that either layout
    is a correct reading (the op then runs on the transposed or the original tensors).
    """

    layout: str = "BHTD"
    scale: float = 1.0
    c0: float = 1.0
    c1: float = 1.0
    c2: float = 0.5
    causal: bool = True
    normalize: bool = True
    eps: float = 1e-6
    group: int = 1
    count: int = 1
    strict_layout: bool = True

    @property
    def effective(self) -> tuple[float, float, float]:
        """(c0, c1 * scale, c2 * scale^2): the coefficients of f in the raw q.k."""
        return (self.c0, self.c1 * self.scale, self.c2 * self.scale ** 2)


@dataclass(frozen=True)
class Refuse:
    """No site; explain() reports a refusal of this category (None: any or none)."""

    category: str | None = None

    def __post_init__(self):
        if self.category is not None and self.category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES} or None, got {self.category!r}")


@dataclass(frozen=True)
class Entry:
    name: str
    make: Callable[..., tuple[nn.Module, tuple[torch.Tensor, ...]]]
    expected: Accept | Refuse
    axes: tuple[str, ...] = ()
    twin: str | None = None
    inputs: str = "qkv"                         # "qkv" (attention inputs) or "x" (module projects)
    # the q, k, v the spec applies to, from the example inputs (None: the inputs themselves);
    # for k/v heads tiled with .repeat, the spec's group is 1 over the tiled tensors
    reference_inputs: Callable | None = None

    @property
    def accepted(self) -> bool:
        return isinstance(self.expected, Accept)


def random_qkv(dtype, seed, *, layout="BHTD", kv_heads=H, t=T, dk=DK, dv=DV):
    """Fresh random q [B, H, T, Dk], k [B, Hkv, T, Dk], v [B, Hkv, T, Dv] (or [B, T, H, D])."""
    g = torch.Generator().manual_seed(seed)

    def one(heads, d):
        x = torch.randn(B, heads, t, d, generator=g, dtype=torch.float64)
        if layout == "BTHD":
            x = x.transpose(1, 2).contiguous()
        return x.to(dtype)

    return one(H, dk), one(kv_heads, dk), one(kv_heads, dv)


# --------------------------------------------------------------------------- the polynomial family
#
# One module, ``Handwritten``, spells the scores / scale / polynomial / mask / normaliser /
# layout / GQA each in one of several ways chosen by a ``Recipe``. The choices are Python
# constants, so Dynamo traces exactly the chosen spelling and nothing else.


@dataclass(frozen=True)
class Recipe:
    matmul: str = "@"              # @ matmul einsum einsum_letters mT permute bmm
    scale: str = "s/sqrt"          # none q*number q/number k/sqrt k*pow s*number s/sqrt s*pow q_and_k
    poly: str = "taylor"           # taylor reordered s*s/2 pow square unit other minus
    mask: str = "tril_bool"        # tril_bool triu_bool tril_float where_arange tril_scores buffer
                                   # masked_fill_ none
    norm: str = "keepdim"          # keepdim index reciprocal one_over weights none
    eps: float = 1e-6              # 0 writes no "+ eps" at all
    layout: str = "BHTD"           # BHTD, BTHD (transposed to BHTD inside the module)
    gqa: str | None = None         # None, repeat_interleave, expand; repeat_tiled, expand_tiled (head h
                                   # uses kv head h % Hkv: Based attention over the tiled k, v, group 1)
    # defects: each turns the recipe into a near-miss that differs in one thing
    cubic: bool = False            # add s^3 / 6 in the poly's own spelling
    shift: int = 0                 # mask diagonal offset: -1 drops the diagonal, +1 leaks one future key
    window: int | None = None      # band mask: keep only the last `window` keys
    anti: bool = False             # anti-causal mask (keep j >= i)
    mask_before_poly: bool = False  # mask the scores, then apply the polynomial
    norm_defect: str | None = None  # unmasked (row sums before the mask), other_poly, wrong_dim
    exp: bool = False              # exp(s) instead of the polynomial (softmax without the max)


SCALES = {                          # spelling -> the scale it applies to q.k (Dk = DK)
    "none": 1.0, "q*number": 0.5, "q/number": 1 / 3, "k/sqrt": DK ** -0.5, "k*pow": DK ** -0.5,
    "s*number": 0.3, "s/sqrt": DK ** -0.5, "s*pow": DK ** -0.5, "q_and_k": DK ** -0.5,
}
POLYS = {                           # spelling -> (c0, c1, c2)
    "taylor": (1.0, 1.0, 0.5), "reordered": (1.0, 1.0, 0.5), "s*s/2": (1.0, 1.0, 0.5),
    "pow": (1.0, 1.0, 0.5), "square": (1.0, 1.0, 0.5), "unit": (1.0, 1.0, 1.0),
    "other": (2.0, 0.5, 0.25), "minus": (1.0, -1.0, 0.5),
}
MASKS = ("tril_bool", "triu_bool", "tril_float", "where_arange", "tril_scores", "buffer", "masked_fill_",
         "none")
NORMS = ("keepdim", "index", "reciprocal", "one_over", "weights", "none")


def recipe_spec(r: Recipe) -> Accept:
    """The spec a recipe without defects computes."""
    c0, c1, c2 = POLYS[r.poly]
    group = H // HKV if r.gqa in ("repeat_interleave", "expand") else 1
    return Accept(layout=r.layout, scale=SCALES[r.scale], c0=c0, c1=c1, c2=c2, causal=r.mask != "none",
                  normalize=r.norm != "none", eps=r.eps if r.norm != "none" else 1e-6, group=group,
                  strict_layout=r.layout == "BHTD")


def _band_keep(t, shift, window, anti, device):
    """The bool keep-mask [T, T] a defect asks for, spelled with tril/triu of ones."""
    ones = torch.ones(t, t, dtype=torch.bool, device=device)
    if anti:
        return torch.triu(ones)
    keep = torch.tril(ones, diagonal=shift)
    if window is not None:
        keep = keep & ~torch.tril(ones, diagonal=-window)
    return keep


class Handwritten(nn.Module):
    """Quadratic-form Based attention, spelled as ``recipe`` says. forward(q, k, v) -> o."""

    def __init__(self, recipe: Recipe, dk: int = DK):
        super().__init__()
        self.r = recipe
        self.dk = dk
        if recipe.mask == "buffer":
            r = recipe
            if r.anti:
                buf = torch.triu(torch.ones(MAX_LEN, MAX_LEN))
            else:
                buf = torch.tril(torch.ones(MAX_LEN, MAX_LEN), diagonal=r.shift)
                if r.window is not None:
                    buf = buf - torch.tril(torch.ones(MAX_LEN, MAX_LEN), diagonal=-r.window)
            self.register_buffer("tril", buf)

    # -- pieces, each a few lines the way a person would write them
    def scale_inputs(self, q, k):
        r, d = self.r, self.dk
        if r.scale == "q*number":
            q = q * 0.5
        elif r.scale == "q/number":
            q = q / 3.0
        elif r.scale == "k/sqrt":
            k = k / math.sqrt(d)
        elif r.scale == "k*pow":
            k = k * d ** -0.5
        elif r.scale == "q_and_k":
            q = q * d ** -0.25
            k = k * d ** -0.25
        return q, k

    def scale_scores(self, s):
        r, d = self.r, self.dk
        if r.scale == "s*number":
            s = s * 0.3
        elif r.scale == "s/sqrt":
            s = s / math.sqrt(d)
        elif r.scale == "s*pow":
            s = s * d ** -0.5
        return s

    def scores(self, q, k):                                   # [B, H, T, Dk] x2 -> [B, H, T, T]
        m = self.r.matmul
        if m == "@":
            return q @ k.transpose(-2, -1)
        if m == "matmul":
            return torch.matmul(q, k.transpose(-2, -1))
        if m == "einsum":
            return torch.einsum("bhid,bhjd->bhij", q, k)
        if m == "einsum_letters":
            return torch.einsum("nztf,nzsf->nzts", q, k)
        if m == "mT":
            return q @ k.mT
        if m == "permute":
            return q @ k.permute(0, 1, 3, 2)
        if m == "bmm":                                        # [B*H, T, Dk] x2 -> [B*H, T, T]
            return torch.bmm(q, k.transpose(1, 2))
        raise ValueError(m)

    def values(self, w, v):                                   # [B, H, T, T] x [B, H, T, Dv]
        m = self.r.matmul
        if m == "matmul":
            return torch.matmul(w, v)
        if m == "einsum":
            return torch.einsum("bhij,bhjd->bhid", w, v)
        if m == "einsum_letters":
            return torch.einsum("nzts,nzsv->nztv", w, v)
        if m == "bmm":
            return torch.bmm(w, v)
        return w @ v

    def polynomial(self, s):
        r = self.r
        if r.exp:
            return torch.exp(s)
        p = r.poly
        if p == "taylor":
            w = 1 + s + 0.5 * s ** 2
            return w + s ** 3 / 6 if r.cubic else w
        if p == "reordered":
            w = 0.5 * s ** 2 + s + 1
            return s ** 3 / 6 + w if r.cubic else w
        if p == "s*s/2":
            w = 1 + s + s * s / 2
            return w + s * s * s / 6 if r.cubic else w
        if p == "pow":
            w = 1 + s + 0.5 * s.pow(2)
            return w + s.pow(3) / 6 if r.cubic else w
        if p == "square":
            w = 1 + s + torch.square(s) / 2
            return w + torch.square(s) * s / 6 if r.cubic else w
        if p == "unit":
            w = 1 + s + s ** 2
            return w + s ** 3 if r.cubic else w
        if p == "other":
            w = 2.0 + 0.5 * s + 0.25 * s * s
            return w + 0.1 * s * s * s if r.cubic else w
        if p == "minus":
            w = 1 - s + 0.5 * s ** 2
            return w - s ** 3 / 6 if r.cubic else w
        raise ValueError(p)

    def mask(self, w):                                        # [..., T, T] -> [..., T, T]
        r = self.r
        t = w.shape[-1]
        defect = r.shift != 0 or r.window is not None or r.anti
        if r.mask == "none":
            return w
        if r.mask == "tril_bool":
            if defect:
                keep = _band_keep(t, r.shift, r.window, r.anti, w.device)
            else:
                keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=w.device))
            return w.masked_fill(~keep, 0.0)
        if r.mask == "masked_fill_":
            keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=w.device), diagonal=r.shift)
            w.masked_fill_(~keep, 0.0)
            return w
        if r.mask == "triu_bool":
            if r.anti:
                drop = torch.tril(torch.ones(t, t, dtype=torch.bool, device=w.device), diagonal=-1)
            else:
                drop = torch.triu(torch.ones(t, t, dtype=torch.bool, device=w.device), diagonal=1 + r.shift)
            return w.masked_fill(drop, 0.0)
        if r.mask == "tril_float":
            if r.window is not None:
                band = torch.tril(torch.ones(t, t, dtype=w.dtype, device=w.device)) \
                    - torch.tril(torch.ones(t, t, dtype=w.dtype, device=w.device), diagonal=-r.window)
                return w * band
            return w * torch.tril(torch.ones(t, t, dtype=w.dtype, device=w.device), diagonal=r.shift)
        if r.mask == "where_arange":
            idx = torch.arange(t, device=w.device)
            if r.anti:
                keep = idx[:, None] <= idx[None, :]
            elif r.shift == -1:
                keep = idx[:, None] > idx[None, :]
            elif r.window is not None:
                keep = (idx[:, None] >= idx[None, :]) & (idx[:, None] - idx[None, :] < r.window)
            else:
                keep = idx[:, None] >= idx[None, :]
            return torch.where(keep, w, 0.0)
        if r.mask == "tril_scores":
            return torch.triu(w) if r.anti else torch.tril(w, diagonal=r.shift)
        if r.mask == "buffer":
            return w.masked_fill(self.tril[:t, :t] == 0, 0.0)
        raise ValueError(r.mask)

    def normalise(self, w, v, s, unmasked):
        r = self.r
        if r.norm == "none":
            return self.values(w, v)
        z_from = w
        if r.norm_defect == "unmasked":
            z_from = unmasked
        elif r.norm_defect == "other_poly":
            z_from = self.mask(1 + s)
        if r.norm_defect == "wrong_dim":
            z = z_from.sum(-2, keepdim=True).transpose(-2, -1)
        elif r.norm == "index":
            z = z_from.sum(-1)[..., None]
        else:
            z = z_from.sum(dim=-1, keepdim=True)
        if r.eps != 0:
            z = z + r.eps
        if r.norm == "weights":
            return self.values(w / z, v)
        n = self.values(w, v)
        if r.norm == "reciprocal":
            return n * torch.reciprocal(z)
        if r.norm == "one_over":
            return n * (1 / z)
        return n / z

    def forward(self, q, k, v):
        r = self.r
        if r.layout == "BTHD":                                # [B, T, H, D] -> [B, H, T, D]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if r.gqa == "repeat_interleave":
            group = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        elif r.gqa == "expand":
            b, hkv, t, dk = k.shape
            group = q.shape[1] // hkv
            k = k[:, :, None].expand(b, hkv, group, t, dk).reshape(b, hkv * group, t, dk)
            v = v[:, :, None].expand(b, hkv, group, t, v.shape[-1]).reshape(b, hkv * group, t, v.shape[-1])
        elif r.gqa == "repeat_tiled":
            group = q.shape[1] // k.shape[1]
            k = k.repeat(1, group, 1, 1)
            v = v.repeat(1, group, 1, 1)
        elif r.gqa == "expand_tiled":
            b, hkv, t, dk = k.shape
            group = q.shape[1] // hkv
            k = k[:, None].expand(b, group, hkv, t, dk).reshape(b, group * hkv, t, dk)
            v = v[:, None].expand(b, group, hkv, t, v.shape[-1]).reshape(b, group * hkv, t, v.shape[-1])
        b, h, t, _ = q.shape
        if r.matmul == "bmm":                                 # heads folded into the batch
            q = q.reshape(b * h, t, q.shape[-1])
            k = k.reshape(b * h, t, k.shape[-1])
            v = v.reshape(b * h, t, v.shape[-1])
        q, k = self.scale_inputs(q, k)
        s = self.scale_scores(self.scores(q, k))
        if r.mask_before_poly:
            w = self.polynomial(self.mask(s))
            unmasked = w
        else:
            w = self.polynomial(s)
            unmasked = w
            w = self.mask(w)
        o = self.normalise(w, v, s, unmasked)
        if r.matmul == "bmm":
            o = o.reshape(b, h, t, o.shape[-1])
        if r.layout == "BTHD":
            o = o.transpose(1, 2)
        return o


def handwritten(recipe: Recipe):
    def make(dtype=torch.float64, seed=0, t=T):
        kv = HKV if recipe.gqa else H
        return Handwritten(recipe).to(dtype), random_qkv(dtype, seed, layout=recipe.layout, kv_heads=kv, t=t)
    return make


# --------------------------------------------------------------------------- the feature-map family


def taylor_map(x, style: str):
    """phi(x) = [1, x / d^1/4, flatten(x (x) x) / (sqrt(2) sqrt(d))] and variants: [..., d] -> [..., F].

    style: "based" (ones column as x[..., :1] ** 0), "ones" (torch.ones column), "unscaled"
    ([1, x, x (x) x]: f = 1 + s + s^2), "no_sqrt2" (no 1/sqrt(2): c2 = 1), "no_ones" (no ones
    column: c0 = 0), "triu" (the compressed map: the diagonal x_a^2 and the upper triangle
    sqrt(2) x_a x_b through ``triu_indices``, d(d+1)/2 quadratic features, the function of "based");
    defects: "triu_no_sqrt2" (the compressed map without the sqrt(2): not a function of q.k),
    "square" (elementwise x^2 instead of the outer product), "cubic"
    (adds the third-order term x (x) x (x) x / (sqrt(6) d^3/4)), "elu" (elu(x) + 1, another
    linear attention).
    """
    d = x.shape[-1]
    rrd, rd, r2 = math.sqrt(math.sqrt(d)), math.sqrt(d), math.sqrt(2)
    if style == "elu":
        return F.elu(x) + 1
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2)
    if style == "based":
        return torch.cat([x[..., :1] ** 0, x / rrd, outer / (r2 * rd)], dim=-1)
    if style == "ones":
        ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
        return torch.cat([ones, x / rrd, outer / (r2 * rd)], dim=-1)
    if style == "unscaled":
        return torch.cat([x[..., :1] ** 0, x, outer], dim=-1)
    if style == "no_sqrt2":
        return torch.cat([x[..., :1] ** 0, x / rrd, outer / rd], dim=-1)
    if style == "no_ones":
        return torch.cat([x / rrd, outer / (r2 * rd)], dim=-1)
    if style in ("triu", "triu_no_sqrt2"):
        iu, ju = torch.triu_indices(d, d, offset=1, device=x.device)
        off = x[..., iu] * x[..., ju] * (r2 if style == "triu" else 1.0)
        return torch.cat([x[..., :1] ** 0, x / rrd, torch.cat([x * x, off], dim=-1) / (r2 * rd)], dim=-1)
    if style == "square":
        return torch.cat([x[..., :1] ** 0, x / rrd, x ** 2 / (r2 * rd)], dim=-1)
    if style == "cubic":
        third = (outer.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2)
        return torch.cat([x[..., :1] ** 0, x / rrd, outer / (r2 * rd), third / (math.sqrt(6) * rd * rrd)], dim=-1)
    raise ValueError(style)


MAP_SPECS = {                       # style -> (scale, c0, c1, c2) with Dk = DK
    "based": (DK ** -0.5, 1.0, 1.0, 0.5), "ones": (DK ** -0.5, 1.0, 1.0, 0.5), "triu": (DK ** -0.5, 1.0, 1.0, 0.5),
    "unscaled": (1.0, 1.0, 1.0, 1.0), "no_sqrt2": (DK ** -0.5, 1.0, 1.0, 1.0),
    "no_ones": (DK ** -0.5, 0.0, 1.0, 0.5),
}


class FeatureMapQuadratic(nn.Module):
    """phi(Q) phi(K)^T, masked (causal), times V, over row sums. forward(q, k, v) -> o."""

    def __init__(self, style="based", causal=True, normalize=True, eps=1e-6, norm_defect=None, shift=0,
                 norm="rows"):
        super().__init__()
        self.style, self.causal, self.normalize, self.eps = style, causal, normalize, eps
        self.norm_defect, self.shift, self.norm = norm_defect, shift, norm

    def forward(self, q, k, v):
        q, k = taylor_map(q, self.style), taylor_map(k, self.style)     # [B, H, T, F]
        a = q @ k.transpose(-2, -1)                                     # [B, H, T, T]
        raw = a
        if self.causal:
            t = q.shape[-2]
            mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device), diagonal=self.shift)
            a = a.masked_fill(~mask, 0.0)
        if not self.normalize:
            return a @ v
        if self.norm == "features":     # the normaliser on the features (norm_defect "shifted": sums j < i)
            if self.causal:
                ks = k.cumsum(2) - k if self.norm_defect == "shifted" else k.cumsum(2)
                z = 1 / (torch.einsum("bhtf,bhtf->bht", q, ks) + self.eps)
                return (a @ v) * z[..., None]
            if self.norm_defect == "running":                           # running sums: another function
                return (a @ v) / ((q * k.cumsum(2)).sum(-1, keepdim=True) + self.eps)
            return (a @ v) / (q @ k.sum(2, keepdim=True).transpose(-2, -1) + self.eps)
        z = (raw if self.norm_defect == "unmasked" else a).sum(dim=-1, keepdim=True)
        return (a @ v) / (z + self.eps)


class LinearCumsum(nn.Module):
    """The O(T) linear form over the feature map, as Based's reference code writes it.

    shape "based":  q[..., None, :] * (k[..., None, :] * v[..., None]).cumsum(2), summed over -1
    shape "outer":  q[..., :, None] * (k[..., :, None] * v[..., None, :]).cumsum(2), summed over -2
    with (q * k.cumsum(2)).sum(-1) as normaliser; causal=False uses sums over time instead.
    defects: norm_defect "total" (normaliser sums over all time, numerator is causal),
    exclusive=True (the running sums leave out the current token: a shifted mask).
    """

    def __init__(self, style="based", shape="based", causal=True, normalize=True, eps=1e-6, norm_defect=None,
                 exclusive=False):
        super().__init__()
        self.style, self.shape, self.causal, self.normalize, self.eps = style, shape, causal, normalize, eps
        self.norm_defect, self.exclusive = norm_defect, exclusive

    def forward(self, q, k, v):
        q, k = taylor_map(q, self.style), taylor_map(k, self.style)     # [B, H, T, F]
        if self.shape == "based":
            q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)  # [B,H,T,1,F] [B,H,T,1,F] [B,H,T,Dv,1]
            kv = k * v                                                  # [B, H, T, Dv, F]
            if self.causal:
                kv_state = kv.cumsum(dim=2)
                if self.exclusive:
                    kv_state = kv_state - kv
            else:
                kv_state = kv.sum(dim=2, keepdim=True)
            num = (q * kv_state).sum(dim=-1)                            # [B, H, T, Dv]
            if not self.normalize:
                return num
            if self.causal and self.norm_defect != "total":
                k_state = k.cumsum(dim=2)
                if self.exclusive:
                    k_state = k_state - k
            else:
                k_state = k.sum(dim=2, keepdim=True)
            den = (q * k_state).sum(dim=-1)                             # [B, H, T, 1]
            return num / (den + self.eps)
        kv = (k[..., :, None] * v[..., None, :])                        # [B, H, T, F, Dv]
        kv_state = kv.cumsum(2) if self.causal else kv.sum(2, keepdim=True)
        num = (q[..., :, None] * kv_state).sum(-2)                      # [B, H, T, Dv]
        if not self.normalize:
            return num
        k_state = k.cumsum(2) if self.causal and self.norm_defect != "total" else k.sum(2, keepdim=True)
        den = (q * k_state).sum(-1, keepdim=True)                       # [B, H, T, 1]
        return num / (den + self.eps)


def qkv_module(cls, *args, layout="BHTD", kv_heads=H, **kwargs):
    def make(dtype=torch.float64, seed=0, t=T):
        return cls(*args, **kwargs).to(dtype), random_qkv(dtype, seed, layout=layout, kv_heads=kv_heads, t=t)
    return make


# --------------------------------------------------------------------------- other hand-written forms


class EinsumTimeFirst(nn.Module):
    """[B, T, H, D] in and out, no transposes: einsum straight from the time-first layout."""

    def __init__(self, eps=1e-6, cubic=False):
        super().__init__()
        self.eps, self.cubic = eps, cubic

    def forward(self, q, k, v):                                         # [B, T, H, Dk/Dv]
        s = torch.einsum("bihd,bjhd->bhij", q, k) * q.shape[-1] ** -0.5  # [B, H, T, T]
        a = 1 + s + 0.5 * s ** 2
        if self.cubic:
            a = a + s ** 3 / 6
        t = s.shape[-1]
        a = a.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=s.device)), 0.0)
        o = torch.einsum("bhij,bjhd->bihd", a, v)                       # [B, T, H, Dv]
        z = a.sum(-1).transpose(1, 2)[..., None]                        # [B, T, H, 1]
        return o / (z + self.eps)


class ProjectedAttention(nn.Module):
    """A whole attention layer: x [B, T, C] -> projections -> Based attention -> output projection.

    nanoGPT style: q, k, v come out of one fused linear, viewed [B, T, H, D] and transposed;
    the causal mask is a registered tril buffer sliced to T (``buffer_shift`` != 0: a near-miss).
    """

    def __init__(self, d_model=16, heads=H, dk=DK, dv=DV, buffer_shift=0, kv_heads=None):
        super().__init__()
        self.heads, self.dk, self.dv = heads, dk, dv
        self.kv_heads = heads if kv_heads is None else kv_heads
        self.qkv = nn.Linear(d_model, heads * dk + self.kv_heads * (dk + dv))
        self.out = nn.Linear(heads * dv, d_model)
        self.register_buffer("bias", torch.tril(torch.ones(MAX_LEN, MAX_LEN), diagonal=buffer_shift)
                             .view(1, 1, MAX_LEN, MAX_LEN))

    def forward(self, x):                                               # [B, T, C]
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.heads * self.dk, self.kv_heads * self.dk, self.kv_heads * self.dv], -1)
        q = q.view(b, t, self.heads, self.dk).transpose(1, 2)           # [B, H, T, Dk]
        k = k.view(b, t, self.kv_heads, self.dk).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.dv).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.dk))   # [B, H, T, T]
        att = 1 + att + 0.5 * att ** 2
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, 0.0)
        y = att @ v / (att.sum(-1, keepdim=True) + 1e-6)                # [B, H, T, Dv]
        y = y.transpose(1, 2).contiguous().view(b, t, self.heads * self.dv)
        return self.out(y)


def projected(**kwargs):
    def make(dtype=torch.float64, seed=0, t=T):
        torch.manual_seed(seed)
        m = ProjectedAttention(**kwargs).to(dtype)
        x = torch.randn(B, t, 16, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        return m, (x.to(dtype),)
    return make


class TwoLayers(nn.Module):
    """Two Based attentions in one graph (two sites): a polynomial one feeding a feature-map one
    (the first's output is the second's v), both with the default spec; ``cubic``: both with
    a third-order term."""

    def __init__(self, cubic=False):
        super().__init__()
        self.first = Handwritten(Recipe(cubic=cubic))
        self.second = FeatureMapQuadratic("cubic" if cubic else "based")

    def forward(self, q, k, v):
        o = self.first(q, k, v)                                         # [B, H, T, Dv]
        return self.second(q, k, o)


class SoftmaxAttention(nn.Module):
    """Causal softmax attention (a different function): spelled by hand, or through SDPA."""

    def __init__(self, sdpa=False):
        super().__init__()
        self.sdpa = sdpa

    def forward(self, q, k, v):
        if self.sdpa:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device)), float("-inf"))
        return torch.softmax(s, dim=-1) @ v


class OneChange(nn.Module):
    """Based attention written plainly (the twin ``poly_taylor``'s function: s = q.k / sqrt(Dk),
    tril mask, row-sum normaliser) with one thing changed, named by ``change``: each computes
    another function, so the pass must refuse it.

    mask: "fill_one" (masked entries set to 1, not 0), "where_one" (torch.where(keep, a, 1)),
    "half_past" (a tril mask with 0.5 below the diagonal), "head_mask" (head 1's mask transposed,
    written with ``mask[1] = ...``: an in-place write the pass must see), "tril_last_axes" (tril
    over the head and query axes), "weights_written" (``a[..., 1, 0] = 5`` after the mask);
    normaliser: "scaled_z" (2 * row sums), "clamp_z" (clamp(min=3) instead of + eps),
    "eps_after_reciprocal" (1 / z + 0.01), "normalised_twice", "times_z" (weights times the row
    sums); polynomial: "no_square" (1 + s), "power_1_5" (|s|^1.5 for s^2).
    """

    CHANGES = ("fill_one", "where_one", "half_past", "head_mask", "tril_last_axes", "weights_written", "scaled_z",
               "clamp_z", "eps_after_reciprocal", "normalised_twice", "times_z", "no_square", "power_1_5")

    def __init__(self, change: str):
        super().__init__()
        assert change in self.CHANGES, change
        self.change = change

    def forward(self, q, k, v):
        c, t = self.change, q.shape[-2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if c == "no_square":
            a = 1 + s
        elif c == "power_1_5":
            a = 1 + s + 0.5 * s.abs() ** 1.5
        else:
            a = 1 + s + 0.5 * s ** 2
        if c == "fill_one":
            a = a.masked_fill(~keep, 1.0)
        elif c == "where_one":
            a = torch.where(keep, a, 1.0)
        elif c == "half_past":
            ones = torch.ones(t, t, dtype=a.dtype, device=a.device)
            a = a * (torch.tril(ones) - 0.5 * torch.tril(ones, diagonal=-1))
        elif c == "head_mask":
            per_head = keep.expand(a.shape[1], t, t).clone()
            per_head[1] = keep.T
            a = a.masked_fill(~per_head, 0.0)
        elif c == "tril_last_axes":
            a = torch.tril(a.transpose(1, 3)).transpose(1, 3)
        else:
            a = a.masked_fill(~keep, 0.0)
        if c == "weights_written":
            a[..., 1, 0] = 5.0
        z = a.sum(-1, keepdim=True)
        if c == "scaled_z":
            return (a @ v) / (2 * z + 1e-6)
        if c == "clamp_z":
            return (a @ v) / z.clamp(min=3.0)
        if c == "eps_after_reciprocal":
            return (a @ v) * (1 / z + 0.01)
        if c == "normalised_twice":
            return ((a / (z + 1e-6)) @ v) / (z + 1e-6)
        if c == "times_z":
            return (a * (z + 1e-6)) @ v
        return (a @ v) / (z + 1e-6)


# --------------------------------------------------------------------------- the catalogue


def tile_kv(q, k, v):
    """k, v with their heads tiled as .repeat does (head h uses kv head h % Hkv)."""
    group = q.shape[1] // k.shape[1]
    return q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)


def _accept_recipe(name, recipe, axes, **overrides):
    tiled = recipe.gqa in ("repeat_tiled", "expand_tiled")
    return Entry(name, handwritten(recipe), replace(recipe_spec(recipe), **overrides), tuple(axes),
                 reference_inputs=tile_kv if tiled else None)


def _refuse_recipe(name, recipe, category, twin):
    return Entry(name, handwritten(recipe), Refuse(category), (), twin)


def _polynomial_family() -> list[Entry]:
    """Accepted recipes, each paired with a near-miss that changes one thing."""
    R = Recipe
    # (name, recipe, axes, near-miss name, defect changes, refusal category)
    pairs = [
        # matmul spellings
        ("matmul_at", R(matmul="@"), ["matmul:@", "matmul:transpose"], "cubic", dict(cubic=True), "polynomial"),
        ("matmul_torch_matmul", R(matmul="matmul", mask="tril_float"), ["matmul:matmul"],
         "shifted", dict(shift=-1), "mask"),
        ("matmul_einsum", R(matmul="einsum", mask="where_arange"), ["matmul:einsum"],
         "band", dict(window=3), "mask"),
        ("matmul_einsum_letters", R(matmul="einsum_letters", norm="index"), ["matmul:einsum"],
         "unmasked_norm", dict(norm_defect="unmasked"), "normaliser"),
        ("matmul_bmm_folded", R(matmul="bmm", scale="s*pow"), ["matmul:bmm"],
         "cubic", dict(cubic=True), "polynomial"),
        ("matmul_mT", R(matmul="mT", mask="triu_bool"), ["matmul:mT", "mask:triu_bool"],
         "shifted", dict(shift=1), "mask"),
        ("matmul_permute", R(matmul="permute", mask="tril_scores"), ["matmul:permute", "mask:tril_scores"],
         "anticausal", dict(anti=True), "mask"),
        # scale spellings
        ("scale_none", R(scale="none", poly="unit"), ["scale:none", "poly:unit"],
         "cubic", dict(cubic=True), "polynomial"),
        ("scale_q_mul_number", R(scale="q*number"), ["scale:q", "scale:multiply", "scale:number"],
         "mask_before_poly", dict(mask_before_poly=True), "mask"),
        ("scale_q_div_number", R(scale="q/number", mask="masked_fill_"), ["scale:q", "scale:divide",
                                                                          "mask:masked_fill_"],
         "shifted", dict(shift=-1), "mask"),
        ("scale_k_div_sqrt", R(scale="k/sqrt"), ["scale:k", "scale:divide", "scale:sqrt"],
         "other_poly_norm", dict(norm_defect="other_poly"), "normaliser"),
        ("scale_k_mul_pow", R(scale="k*pow", poly="pow"), ["scale:k", "scale:multiply", "scale:pow",
                                                           "poly:pow"],
         "cubic", dict(cubic=True), "polynomial"),
        ("scale_scores_mul_number", R(scale="s*number"), ["scale:scores", "scale:multiply", "scale:number"],
         "band", dict(window=4), "mask"),
        ("scale_scores_div_sqrt", R(scale="s/sqrt"), ["scale:scores", "scale:divide", "scale:sqrt"],
         "anticausal", dict(anti=True), "mask"),
        ("scale_scores_mul_pow", R(scale="s*pow", mask="buffer"), ["scale:scores", "scale:pow", "mask:buffer"],
         "shifted", dict(shift=-1), "mask"),
        ("scale_split_q_and_k", R(scale="q_and_k", matmul="einsum"), ["scale:q", "scale:k", "scale:pow"],
         "cubic", dict(cubic=True), "polynomial"),
        # polynomial spellings
        ("poly_taylor", R(poly="taylor"), ["poly:taylor"], "exp", dict(exp=True), "unsupported"),
        ("poly_reordered", R(poly="reordered"), ["poly:reordered"], "cubic", dict(cubic=True), "polynomial"),
        ("poly_s_times_s_over_2", R(poly="s*s/2"), ["poly:s*s", "poly:/2"], "cubic", dict(cubic=True),
         "polynomial"),
        ("poly_square", R(poly="square", norm="reciprocal"), ["poly:square", "poly:/2", "norm:reciprocal"],
         "cubic", dict(cubic=True), "polynomial"),
        ("poly_other_coefficients", R(poly="other"), ["poly:other"], "cubic", dict(cubic=True), "polynomial"),
        ("poly_minus", R(poly="minus", scale="s*number"), ["poly:other"], "mask_before_poly",
         dict(mask_before_poly=True), "mask"),
        # masks
        ("mask_tril_bool", R(mask="tril_bool"), ["mask:tril_bool"], "shifted", dict(shift=1), "mask"),
        ("mask_tril_float", R(mask="tril_float", norm="one_over"), ["mask:tril_float", "norm:one_over"],
         "band", dict(window=2), "mask"),
        ("mask_where_arange", R(mask="where_arange", scale="k/sqrt"), ["mask:where_arange"],
         "anticausal", dict(anti=True), "mask"),
        ("mask_buffer", R(mask="buffer"), ["mask:buffer"], "band", dict(window=5), "mask"),
        ("mask_none", R(mask="none"), ["mask:none"], "other_poly_norm", dict(norm_defect="other_poly"),
         "normaliser"),
        ("mask_triu_bool", R(mask="triu_bool", scale="none"), ["mask:triu_bool"],
         "shifted", dict(shift=-1), "mask"),
        # normalisers
        ("norm_keepdim", R(norm="keepdim"), ["norm:keepdim"], "wrong_dim", dict(norm_defect="wrong_dim"),
         "normaliser"),
        ("norm_index", R(norm="index", eps=1e-12), ["norm:index", "eps:1e-12"], "unmasked_norm",
         dict(norm_defect="unmasked"), "normaliser"),
        ("norm_reciprocal", R(norm="reciprocal", eps=1e-5), ["norm:reciprocal", "eps:other"], "other_poly_norm",
         dict(norm_defect="other_poly"), "normaliser"),
        ("norm_one_over", R(norm="one_over"), ["norm:one_over"], "unmasked_norm", dict(norm_defect="unmasked"),
         "normaliser"),
        ("norm_weights_first", R(norm="weights"), ["norm:weights"], "unmasked_norm",
         dict(norm_defect="unmasked"), "normaliser"),
        ("norm_no_eps", R(norm="keepdim", eps=0), ["norm:keepdim", "eps:0"], "other_poly_norm",
         dict(norm_defect="other_poly"), "normaliser"),
        ("norm_none", R(norm="none"), ["norm:none"], "cubic", dict(cubic=True), "polynomial"),
        # layouts and GQA
        ("layout_bthd_transposed", R(layout="BTHD"), ["layout:BTHD"], "cubic", dict(cubic=True), "polynomial"),
        ("gqa_repeat_interleave", R(gqa="repeat_interleave"), ["gqa:repeat_interleave"], "shifted",
         dict(shift=-1), "mask"),
        ("gqa_expand_reshape", R(gqa="expand", matmul="einsum"), ["gqa:expand"], "cubic", dict(cubic=True),
         "polynomial"),
        # k/v heads tiled (h uses kv head h % Hkv), not grouped: Based attention over the tiled tensors
        ("gqa_repeat_tiled", R(gqa="repeat_tiled"), ["gqa:tiled"], "cubic", dict(cubic=True), "polynomial"),
        ("gqa_expand_tiled", R(gqa="expand_tiled"), ["gqa:tiled"], "shifted", dict(shift=-1), "mask"),
        # combinations
        ("combo_bthd_gqa_einsum_reciprocal", R(layout="BTHD", gqa="repeat_interleave", matmul="einsum",
                                               norm="reciprocal", poly="square", scale="k/sqrt"),
         ["layout:BTHD", "gqa:repeat_interleave"], "band", dict(window=3), "mask"),
        ("combo_bmm_where_pow_index", R(matmul="bmm", mask="where_arange", poly="pow", norm="index",
                                        scale="q*number", eps=1e-12), ["matmul:bmm"],
         "shifted", dict(shift=-1), "mask"),
        ("combo_mT_buffer_unit_none", R(matmul="mT", mask="buffer", poly="unit", norm="none", scale="s*pow"),
         ["norm:none"], "anticausal", dict(anti=True), "mask"),
        ("combo_noncausal_expand_weights", R(mask="none", gqa="expand", norm="weights", poly="reordered",
                                             scale="q_and_k"), ["mask:none", "gqa:expand"],
         "cubic", dict(cubic=True), "polynomial"),
        ("combo_tril_scores_matmul_one_over", R(mask="tril_scores", matmul="matmul", norm="one_over",
                                                poly="s*s/2", scale="q/number"), ["mask:tril_scores"],
         "unmasked_norm", dict(norm_defect="unmasked"), "normaliser"),
        ("combo_masked_fill_inplace_bthd", R(mask="masked_fill_", layout="BTHD", poly="other", scale="s*number",
                                             norm="reciprocal", eps=1e-12), ["mask:masked_fill_"],
         "cubic", dict(cubic=True), "polynomial"),
    ]
    entries = []
    for name, recipe, axes, miss, changes, category in pairs:
        entries.append(_accept_recipe(name, recipe, axes))
        entries.append(_refuse_recipe(f"{name}__{miss}", replace(recipe, **changes), category, name))
    return entries


def _feature_map_family() -> list[Entry]:
    def fm_accept(style, **kw):
        scale, c0, c1, c2 = MAP_SPECS[style]
        return Accept(scale=scale, c0=c0, c1=c1, c2=c2, **kw)

    E = Entry
    return [
        # quadratic over an explicit Taylor map
        E("featmap_quadratic_based", qkv_module(FeatureMapQuadratic, "based"), fm_accept("based"),
          ("form:feature_map_quadratic", "map:pow0_ones")),
        E("featmap_quadratic_based__square", qkv_module(FeatureMapQuadratic, "square"), Refuse("feature_map"),
          twin="featmap_quadratic_based"),
        E("featmap_quadratic_torch_ones", qkv_module(FeatureMapQuadratic, "ones", eps=1e-12),
          fm_accept("ones", eps=1e-12), ("form:feature_map_quadratic", "map:torch_ones")),
        E("featmap_quadratic_torch_ones__cubic", qkv_module(FeatureMapQuadratic, "cubic", eps=1e-12),
          Refuse("polynomial"), twin="featmap_quadratic_torch_ones"),
        E("featmap_quadratic_unscaled", qkv_module(FeatureMapQuadratic, "unscaled"), fm_accept("unscaled"),
          ("form:feature_map_quadratic", "map:other_constants")),
        E("featmap_quadratic_unscaled__unmasked_norm",
          qkv_module(FeatureMapQuadratic, "unscaled", norm_defect="unmasked"), Refuse("normaliser"),
          twin="featmap_quadratic_unscaled"),
        E("featmap_quadratic_no_sqrt2_noncausal", qkv_module(FeatureMapQuadratic, "no_sqrt2", causal=False),
          fm_accept("no_sqrt2", causal=False), ("form:feature_map_quadratic", "map:other_constants")),
        E("featmap_quadratic_no_sqrt2_noncausal__square",
          qkv_module(FeatureMapQuadratic, "square", causal=False), Refuse("feature_map"),
          twin="featmap_quadratic_no_sqrt2_noncausal"),
        E("featmap_quadratic_no_ones_unnormalised", qkv_module(FeatureMapQuadratic, "no_ones", normalize=False),
          fm_accept("no_ones", normalize=False), ("form:feature_map_quadratic", "map:other_constants")),
        E("featmap_quadratic_no_ones_unnormalised__shifted",
          qkv_module(FeatureMapQuadratic, "no_ones", normalize=False, shift=-1), Refuse("mask"),
          twin="featmap_quadratic_no_ones_unnormalised"),
        E("featmap_quadratic_feature_norm", qkv_module(FeatureMapQuadratic, "based", norm="features"),
          fm_accept("based"), ("form:feature_map_quadratic", "norm:cumsum_features", "norm:one_over")),
        E("featmap_quadratic_feature_norm__shifted",
          qkv_module(FeatureMapQuadratic, "based", norm="features", norm_defect="shifted"), Refuse("normaliser"),
          twin="featmap_quadratic_feature_norm"),
        E("featmap_quadratic_feature_norm_noncausal",
          qkv_module(FeatureMapQuadratic, "no_sqrt2", causal=False, norm="features"),
          fm_accept("no_sqrt2", causal=False), ("form:feature_map_quadratic", "mask:none")),
        E("featmap_quadratic_feature_norm_noncausal__running",
          qkv_module(FeatureMapQuadratic, "no_sqrt2", causal=False, norm="features", norm_defect="running"),
          Refuse("normaliser"), twin="featmap_quadratic_feature_norm_noncausal"),
        E("featmap_quadratic_triu", qkv_module(FeatureMapQuadratic, "triu"), fm_accept("triu"),
          ("form:feature_map_quadratic", "map:compressed_triu")),
        E("featmap_quadratic_triu__no_sqrt2", qkv_module(FeatureMapQuadratic, "triu_no_sqrt2"),
          Refuse("feature_map"), twin="featmap_quadratic_triu"),
        # the linear cumsum form
        E("linear_cumsum_based", qkv_module(LinearCumsum, "based"), fm_accept("based"),
          ("form:linear_cumsum", "norm:cumsum_features", "map:pow0_ones")),
        E("linear_cumsum_based__total_norm", qkv_module(LinearCumsum, "based", norm_defect="total"),
          Refuse("normaliser"), twin="linear_cumsum_based"),
        E("linear_cumsum_based__elu", qkv_module(LinearCumsum, "elu"), Refuse(None), twin="linear_cumsum_based"),
        E("linear_cumsum_outer_shape", qkv_module(LinearCumsum, "ones", shape="outer", eps=1e-12),
          fm_accept("ones", eps=1e-12), ("form:linear_cumsum", "norm:cumsum_features", "map:torch_ones")),
        E("linear_cumsum_outer_shape__square", qkv_module(LinearCumsum, "square", shape="outer", eps=1e-12),
          Refuse("feature_map"), twin="linear_cumsum_outer_shape"),
        E("linear_cumsum_exclusive_twin", qkv_module(LinearCumsum, "no_sqrt2"), fm_accept("no_sqrt2"),
          ("form:linear_cumsum",)),
        E("linear_cumsum_exclusive_twin__exclusive", qkv_module(LinearCumsum, "no_sqrt2", exclusive=True),
          Refuse("mask"), twin="linear_cumsum_exclusive_twin"),
        E("linear_cumsum_cubic_twin", qkv_module(LinearCumsum, "unscaled"), fm_accept("unscaled"),
          ("form:linear_cumsum", "map:other_constants")),
        E("linear_cumsum_cubic_twin__cubic", qkv_module(LinearCumsum, "cubic"), Refuse("polynomial"),
          twin="linear_cumsum_cubic_twin"),
        E("linear_sum_noncausal", qkv_module(LinearCumsum, "based", causal=False), fm_accept("based", causal=False),
          ("form:linear_cumsum", "mask:none")),
        E("linear_sum_noncausal__square", qkv_module(LinearCumsum, "square", causal=False), Refuse("feature_map"),
          twin="linear_sum_noncausal"),
        E("linear_cumsum_triu", qkv_module(LinearCumsum, "triu", shape="outer"), fm_accept("triu"),
          ("form:linear_cumsum", "map:compressed_triu")),
        E("linear_cumsum_triu__no_sqrt2", qkv_module(LinearCumsum, "triu_no_sqrt2", shape="outer"),
          Refuse("feature_map"), twin="linear_cumsum_triu"),
        E("linear_cumsum_unnormalised", qkv_module(LinearCumsum, "based", shape="outer", normalize=False),
          fm_accept("based", normalize=False), ("form:linear_cumsum", "norm:none")),
        E("linear_cumsum_unnormalised__cubic", qkv_module(LinearCumsum, "cubic", shape="outer", normalize=False),
          Refuse("polynomial"), twin="linear_cumsum_unnormalised"),
    ]


def _other_family() -> list[Entry]:
    E = Entry
    return [
        E("einsum_time_first", qkv_module(EinsumTimeFirst, layout="BTHD"),
          Accept(layout="BTHD", scale=DK ** -0.5), ("layout:BTHD", "matmul:einsum")),
        E("einsum_time_first__cubic", qkv_module(EinsumTimeFirst, cubic=True, layout="BTHD"),
          Refuse("polynomial"), twin="einsum_time_first"),
        E("projected_layer_buffer", projected(), Accept(scale=DK ** -0.5, strict_layout=False),
          ("mask:buffer", "input:projected"), inputs="x"),
        E("projected_layer_buffer__shifted", projected(buffer_shift=1), Refuse("mask"),
          twin="projected_layer_buffer", inputs="x"),
        E("projected_layer_gqa", projected(kv_heads=HKV),
          Accept(scale=DK ** -0.5, group=H // HKV, strict_layout=False),
          ("gqa:repeat_interleave", "input:projected"), inputs="x"),
        E("projected_layer_gqa__shifted", projected(kv_heads=HKV, buffer_shift=-1), Refuse("mask"),
          twin="projected_layer_gqa", inputs="x"),
        E("two_sites", qkv_module(TwoLayers), Accept(scale=DK ** -0.5, count=2), ("count:2",)),
        E("two_sites__cubic", qkv_module(TwoLayers, cubic=True), Refuse("polynomial"), twin="two_sites"),
        E("softmax_by_hand", qkv_module(SoftmaxAttention), Refuse(None), twin="poly_taylor"),
        E("softmax_sdpa", qkv_module(SoftmaxAttention, sdpa=True), Refuse(None), twin="poly_taylor"),
        *(E(f"poly_taylor__{change}", qkv_module(OneChange, change), Refuse(category), twin="poly_taylor")
          for change, category in ONE_CHANGE_CATEGORIES.items()),
    ]


# OneChange near-misses and the refusal category explain() reports for each.
ONE_CHANGE_CATEGORIES = {
    "fill_one": "mask", "where_one": "mask", "half_past": "mask", "head_mask": "mask",
    "tril_last_axes": "unsupported", "weights_written": None, "scaled_z": "normaliser", "clamp_z": "normaliser",
    "eps_after_reciprocal": "normaliser", "normalised_twice": "normaliser", "times_z": "normaliser",
    "no_square": "polynomial", "power_1_5": None,
}


ZOO: list[Entry] = _polynomial_family() + _feature_map_family() + _other_family()
ACCEPTED = [e for e in ZOO if e.accepted]
REFUSED = [e for e in ZOO if not e.accepted]
BY_NAME = {e.name: e for e in ZOO}

# Every axis value of issue 5 "What it must recognise"; test_patterns checks each is covered.
AXES = (
    "matmul:@", "matmul:matmul", "matmul:einsum", "matmul:bmm", "matmul:transpose", "matmul:mT", "matmul:permute",
    "scale:q", "scale:k", "scale:scores", "scale:multiply", "scale:divide", "scale:number", "scale:sqrt",
    "scale:pow", "scale:none",
    "poly:taylor", "poly:reordered", "poly:s*s", "poly:pow", "poly:square", "poly:/2", "poly:unit", "poly:other",
    "form:feature_map_quadratic", "form:linear_cumsum", "map:pow0_ones", "map:torch_ones", "map:other_constants",
    "map:compressed_triu",
    "mask:tril_bool", "mask:triu_bool", "mask:tril_float", "mask:where_arange", "mask:tril_scores",
    "mask:buffer", "mask:none", "mask:masked_fill_",
    "norm:keepdim", "norm:index", "norm:reciprocal", "norm:one_over", "norm:weights", "norm:cumsum_features",
    "norm:none", "eps:1e-12", "eps:0", "eps:other",
    "layout:BTHD", "gqa:repeat_interleave", "gqa:expand", "gqa:tiled", "input:projected", "count:2",
)

# Every refusal class of issue 5 "What it must refuse", with the near-misses that exercise it.
REFUSAL_CLASSES = {
    "third-order term": lambda e: "cubic" in e.name,
    "windowed mask": lambda e: "band" in e.name,
    "shifted mask": lambda e: "shifted" in e.name or "exclusive" in e.name,
    "anti-causal mask": lambda e: "anticausal" in e.name,
    "mask before the polynomial": lambda e: "mask_before_poly" in e.name,
    "elementwise-square feature map": lambda e: "square" in e.name and e.name.endswith("__square"),
    "normaliser over different weights": lambda e: "_norm" in e.name.split("__")[-1] or "wrong_dim" in e.name,
    "softmax attention": lambda e: e.name.startswith("softmax") or e.name.endswith("__exp"),
    "elu+1 linear attention": lambda e: e.name.endswith("__elu"),
}


# --------------------------------------------------------------------------- in-place spellings (inplace)
#
# The normaliser and the polynomial written with in-place ops. Dynamo's graph keeps them as
# in-place nodes on the numerator / the weights; the pass must replace the value each node had
# when it ran and erase only what no surviving code reads (issue 13, classes 1 and 2).


class InPlaceNormaliser(nn.Module):
    """Based attention whose normaliser divides the output in place.

    spelling: "itruediv" (``o /= z``), "div_" (``o.div_(z)``, then ``o`` is returned),
    "imul_reciprocal" (``o *= torch.reciprocal(z)``), "linear_div_" (the cumsum feature-map form
    with ``o.div_(den)``). Near-miss defects: "scaled_z" (divides by 2 z + eps), "clamp_z"
    (z.clamp(min=3) instead of + eps), "eps_after_reciprocal" (reciprocal(z) + 0.01).
    """

    SPELLINGS = ("itruediv", "div_", "imul_reciprocal", "linear_div_")

    def __init__(self, spelling: str, defect: str | None = None):
        super().__init__()
        assert spelling in self.SPELLINGS and defect in (None, "scaled_z", "clamp_z", "eps_after_reciprocal")
        self.spelling, self.defect = spelling, defect

    def forward(self, q, k, v):
        if self.spelling == "linear_div_":
            qf, kf = taylor_map(q, "based"), taylor_map(k, "based")
            qf, kf, vv = qf.unsqueeze(-2), kf.unsqueeze(-2), v.unsqueeze(-1)
            o = (qf * (kf * vv).cumsum(2)).sum(-1)
            z = (qf * kf.cumsum(2)).sum(-1)
        else:
            t = q.shape[-2]
            s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
            a = (1 + s + 0.5 * s ** 2).masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool,
                                                                          device=q.device)), 0.0)
            o = a @ v
            z = a.sum(-1, keepdim=True)
        if self.defect == "clamp_z":
            z = z.clamp(min=3.0)
        elif self.defect == "scaled_z":
            z = 2 * z + 1e-6
        elif self.defect != "eps_after_reciprocal":
            z = z + 1e-6
        if self.spelling == "itruediv":
            o /= z
        elif self.spelling in ("div_", "linear_div_"):
            o.div_(z)
        elif self.defect == "eps_after_reciprocal":
            o *= torch.reciprocal(z) + 0.01
        else:
            o *= torch.reciprocal(z)
        return o


class InPlacePolynomial(nn.Module):
    """f(s) = 1 + s + s^2 / 2 built in place on the weights (``a = s * s; a.mul_(0.5); a.add_(s);
    a.add_(1.0)``), masked in place; near-miss: ``cubic`` adds s^3 / 6 in place."""

    def __init__(self, cubic: bool = False):
        super().__init__()
        self.cubic = cubic

    def forward(self, q, k, v):
        t = q.shape[-2]
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        a = s * s
        a.mul_(0.5)
        a.add_(s, alpha=1.0)
        a.add_(1.0)
        if self.cubic:
            a.add_(s * s * s / 6)
        a.masked_fill_(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device)), 0.0)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _inplace_family() -> list[Entry]:
    E = Entry
    based = Accept(scale=DK ** -0.5)
    entries = [
        E("inplace_itruediv", qkv_module(InPlaceNormaliser, "itruediv"), based, ("inplace:normaliser",)),
        E("inplace_itruediv__scaled_z", qkv_module(InPlaceNormaliser, "itruediv", "scaled_z"), Refuse("normaliser"),
          twin="inplace_itruediv"),
        E("inplace_div_", qkv_module(InPlaceNormaliser, "div_"), based, ("inplace:normaliser",)),
        E("inplace_div___clamp_z", qkv_module(InPlaceNormaliser, "div_", "clamp_z"), Refuse("normaliser"),
          twin="inplace_div_"),
        E("inplace_imul_reciprocal", qkv_module(InPlaceNormaliser, "imul_reciprocal"), based, ("inplace:normaliser",)),
        E("inplace_imul_reciprocal__eps_after_reciprocal",
          qkv_module(InPlaceNormaliser, "imul_reciprocal", "eps_after_reciprocal"), Refuse("normaliser"),
          twin="inplace_imul_reciprocal"),
        E("inplace_linear_div_", qkv_module(InPlaceNormaliser, "linear_div_"), based,
          ("inplace:normaliser", "form:linear_cumsum")),
        E("inplace_linear_div___scaled_z", qkv_module(InPlaceNormaliser, "linear_div_", "scaled_z"),
          Refuse("normaliser"), twin="inplace_linear_div_"),
        E("inplace_polynomial", qkv_module(InPlacePolynomial), based, ("inplace:polynomial", "mask:masked_fill_")),
        E("inplace_polynomial__cubic", qkv_module(InPlacePolynomial, cubic=True), Refuse("polynomial"),
          twin="inplace_polynomial"),
    ]
    return entries


ZOO += _inplace_family()
ACCEPTED = [e for e in ZOO if e.accepted]
REFUSED = [e for e in ZOO if not e.accepted]
BY_NAME = {e.name: e for e in ZOO}
AXES = AXES + ("inplace:normaliser", "inplace:polynomial")


# --------------------------------------------------------------------------- forms (issue 13, `forms`)
#
# Exact forms that were refused: each spelling is a class the pass canonicalises (scores of the
# swapped operands transposed back, polynomials read by evaluating them, constant fills whatever
# their spelling, identity dropout), each with a near-miss twin that changes one thing.


class Spelled(nn.Module):
    """The function of ``poly_taylor`` (s = q.k / sqrt(Dk), f = 1 + s + s^2 / 2, causal, row-sum
    normaliser) spelled one other way (``spelling``), or a near-miss of that spelling.

    Accepted: "kqT" ((k @ q.mT).mT), "addcmul" (torch.addcmul(1 + s, s, s, value=0.5)), "horner"
    (1 + s * (1 + 0.5 * s)), "chain" (s.pow(2).mul(0.5).add(s).add(1.0)), "lerp" (torch.lerp of two
    polynomials), "where_zeros_like" / "where_full_like" / "where_new_zeros" / "where_zero_times"
    (torch.where(keep, a, <a zero fill>)), "dropout_p0" (F.dropout(a, p=0.0)), "dropout_eval"
    (F.dropout(a, p=0.1, training=False)), "float_tril" (a * tril(ones(T, T))).
    Near-misses: "kqT_masked_first" (the mask applied before the transpose: anti-causal),
    "addcmul_cubic", "horner_cubic" (a third-order term), "chain_sigmoid" (sigmoid of the chain: not
    a polynomial), "lerp_cubic", "where_ones_like" / "where_full_like_one" / "where_new_ones" /
    "where_half_times" (masked entries are not 0), "dropout_p0_cubic", "dropout_eval_shifted",
    "float_tril_half" (0.5 above the diagonal).
    """

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling

    def forward(self, q, k, v):
        c, t = self.spelling, q.shape[-2]
        keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device),
                          diagonal=-1 if c == "dropout_eval_shifted" else 0)
        scale = 1 / math.sqrt(q.shape[-1])
        if c.startswith("kqT"):
            s = (k @ q.mT) * scale
            if c == "kqT_masked_first":
                a = (1 + s + 0.5 * s * s).masked_fill(~keep, 0.0).mT
                return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
            s = s.mT
        else:
            s = (q @ k.mT) * scale
        if c == "addcmul":
            a = torch.addcmul(1 + s, s, s, value=0.5)
        elif c == "addcmul_cubic":
            a = torch.addcmul(1 + s + 0.5 * s * s, s * s, s, value=1 / 6)
        elif c == "horner":
            a = 1 + s * (1 + 0.5 * s)
        elif c == "horner_cubic":
            a = 1 + s * (1 + s * (0.5 + s / 6))
        elif c == "chain":
            a = s.pow(2).mul(0.5).add(s).add(1.0)
        elif c == "chain_sigmoid":
            a = s.pow(2).mul(0.5).add(s).add(1.0).sigmoid()
        elif c == "lerp":
            a = torch.lerp(1 + s, 1 + s + s * s, 0.5)
        elif c == "lerp_cubic":
            a = torch.lerp(1 + s, 1 + s + s * s * s, 0.5)
        else:
            a = 1 + s + 0.5 * s ** 2
        if c in ("dropout_p0_cubic",):
            a = a + s ** 3 / 6
        if c.startswith("where_"):
            fill = {"where_zeros_like": lambda: torch.zeros_like(a), "where_ones_like": lambda: torch.ones_like(a),
                    "where_full_like": lambda: torch.full_like(a, 0), "where_full_like_one": lambda: torch.full_like(a, 1),
                    "where_new_zeros": lambda: a.new_zeros(a.shape), "where_new_ones": lambda: a.new_ones(a.shape),
                    "where_zero_times": lambda: 0 * a, "where_half_times": lambda: 0.5 * a}[c]()
            a = torch.where(keep, a, fill)
        elif c.startswith("float_tril"):
            ones = torch.ones(t, t, dtype=a.dtype, device=a.device)
            a = a * (torch.tril(ones) if c == "float_tril" else torch.tril(ones) + 0.5 * torch.triu(ones, 1))
        else:
            a = a.masked_fill(~keep, 0.0)
        if c.startswith("dropout_p0"):
            a = F.dropout(a, p=0.0)
        elif c.startswith("dropout_eval"):
            a = F.dropout(a, p=0.1, training=False)
        return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)


def _forms_family() -> list[Entry]:
    spec = Accept(scale=DK ** -0.5)
    pairs = [  # (accepted spelling, its axes, near-miss spelling, refusal category)
        ("kqT", ("matmul:swapped_transposed",), "kqT_masked_first", "mask"),
        ("addcmul", ("poly:addcmul",), "addcmul_cubic", "polynomial"),
        ("horner", ("poly:horner",), "horner_cubic", "polynomial"),
        ("chain", ("poly:method_chain",), "chain_sigmoid", "polynomial"),
        ("lerp", ("poly:evaluated",), "lerp_cubic", "polynomial"),
        ("where_zeros_like", ("fill:zeros_like",), "where_ones_like", "mask"),
        ("where_full_like", ("fill:full_like",), "where_full_like_one", "mask"),
        ("where_new_zeros", ("fill:new_zeros",), "where_new_ones", "mask"),
        ("where_zero_times", ("fill:zero_times",), "where_half_times", "mask"),
        ("dropout_p0", ("dropout:p0",), "dropout_p0_cubic", "polynomial"),
        ("dropout_eval", ("dropout:eval",), "dropout_eval_shifted", "mask"),
        ("float_tril", ("mask:float_tril_mul",), "float_tril_half", "mask"),
    ]
    entries = []
    for accepted, axes, miss, category in pairs:
        entries.append(Entry(f"spelled_{accepted}", qkv_module(Spelled, accepted), spec, axes))
        entries.append(Entry(f"spelled_{accepted}__{miss}", qkv_module(Spelled, miss), Refuse(category),
                             twin=f"spelled_{accepted}"))
    return entries


_FORMS = _forms_family()
ZOO += _FORMS
ACCEPTED += [e for e in _FORMS if e.accepted]
REFUSED += [e for e in _FORMS if not e.accepted]
BY_NAME.update({e.name: e for e in _FORMS})
AXES += tuple(dict.fromkeys(a for e in _FORMS for a in e.axes))
