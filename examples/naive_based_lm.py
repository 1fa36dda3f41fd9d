"""A small Based language model written naively, the way people write it by hand.

This file deliberately imports nothing from based_compile: it is the *user's* model,
the thing ``torch.compile(model, backend="based")`` has to understand unchanged.

Architecture (per block, pre-norm residual):
    x = x + ShortConv(RMSNorm(x))        causal depthwise convolution (token mixing over a few steps)
    x = x + BasedMixer(RMSNorm(x))       Based linear attention, Taylor feature map
    x = x + MLP(RMSNorm(x))              GELU MLP
and an embedding in front, a final RMSNorm and a tied LM head behind.

The Based mixer computes, per head with feature dim d (16) and s = q.k / sqrt(d),

    o_i = sum_{j<=i} f(s_ij) v_j / (sum_{j<=i} f(s_ij) + eps),   f(s) = 1 + s + s^2 / 2,

spelled one of three ways (``attention_form``), all the same function:
    "feature_map"   explicit Taylor map phi(x) = [1, x / d^1/4, (x (x) x) / (sqrt(2) sqrt(d))],
                    then phi(Q) phi(K)^T masked with a causal tril mask, times V, over row sums
    "polynomial"    the scores s = Q K^T / sqrt(d), then 1 + s + 0.5 * s**2, masked, times V
    "linear_cumsum" the feature map, then running sums over time (the O(T) "linear attention"
                    form: memory O(T * d^2 * Dv), no T x T matrix)

``attention_impl`` swaps the attention for something else while keeping every weight:
a callable ``impl(q, k, v) -> o`` with q, k: [B, H, T, d], v: [B, H, T, Dv], o: [B, H, T, Dv]
(causal, normalised Based attention with scale d^-1/2 and coefficients (1, 1, 1/2)), or
one of the names in ``ATTENTION_IMPLS``: "sdpa" (softmax attention through
``F.scaled_dot_product_attention``: a different function, for speed/memory comparisons),
"fla_parallel" / "fla_fused_chunk" (fla-core's hand-written Based kernels, if installed).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION_FORMS = ("feature_map", "polynomial", "linear_cumsum")
ATTENTION_IMPLS = ("sdpa", "fla_parallel", "fla_fused_chunk")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):                                      # [B, T, D]
        rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * rms * self.weight


class ShortConv(nn.Module):
    """Causal depthwise convolution over time (kernel ``size``): a cheap local token mixer."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(dim, dim, kernel_size=size, groups=dim, padding=size - 1)

    def forward(self, x):                                      # [B, T, D]
        t = x.shape[1]
        y = self.conv(x.transpose(1, 2))[..., :t]              # [B, D, T + size - 1] -> [B, D, T]
        return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class TaylorFeatureMap(nn.Module):
    """phi(x) = [1, x / d^1/4, flatten(x (x) x) / (sqrt(2) sqrt(d))], so that
    phi(q) . phi(k) = 1 + (q.k)/sqrt(d) + (q.k)^2 / (2 d)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = feature_dim
        self.rrd = math.sqrt(math.sqrt(feature_dim))           # d^1/4
        self.rd = math.sqrt(feature_dim)                       # sqrt(d)
        self.r2 = math.sqrt(2)

    def forward(self, x):                                      # [..., d] -> [..., 1 + d + d*d]
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / (self.r2 * self.rd)
        return torch.cat([torch.ones_like(x[..., :1]), x / self.rrd, x2], dim=-1)


def sdpa_softmax_attention(q, k, v):
    """Causal softmax attention with the Based mixer's q/k (scale d^-1/2), for comparisons.

    q, k: [B, H, T, d]; v: [B, H, T, Dv]. When d < Dv, q and k are zero-padded to Dv (the
    dot products do not change) so that the fused SDPA kernels, which want one head dim,
    apply.
    """
    d, dv = q.shape[-1], v.shape[-1]
    if d < dv:
        q = F.pad(q, (0, dv - d))
        k = F.pad(k, (0, dv - d))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d ** -0.5)


def fla_based_attention(kind: str, layout: str = "auto") -> Callable:
    """fla-core's Based kernel (``kind``: "parallel" or "fused_chunk") as an ``attention_impl``.

    ``layout``: the tensor layout fla expects, "BHTD" or "BTHD"; "auto" reads it from the
    installed version's signature (a ``head_first`` argument: BHTD through head_first=True;
    none: BTHD, fla's current convention). fla's layout conventions have moved between
    versions, so a benchmark should check the result against the naive form (as
    benchmarks/e2e.py does). Raises ImportError when fla-core is not installed.
    """
    if kind not in ("parallel", "fused_chunk"):
        raise ValueError(f"kind must be 'parallel' or 'fused_chunk', got {kind!r}")
    if layout not in ("auto", "BHTD", "BTHD"):
        raise ValueError(f"layout must be 'auto', 'BHTD' or 'BTHD', got {layout!r}")
    import fla.ops.based as fla_based                        # optional opponent, never a dependency

    fn = getattr(fla_based, f"{kind}_based")
    params = inspect.signature(fn).parameters
    if layout == "auto":
        layout = "BHTD" if "head_first" in params else "BTHD"
    kwargs = {}
    if "use_norm" in params:
        kwargs["use_norm"] = True
    if "head_first" in params:
        kwargs["head_first"] = layout == "BHTD"

    def impl(q, k, v):                                         # [B, H, T, d], [B, H, T, d], [B, H, T, Dv]
        scale = {"scale": q.shape[-1] ** -0.5} if "scale" in params else {}
        if layout == "BTHD":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = fn(q, k, v, **kwargs, **scale)
        o = o[0] if isinstance(o, (tuple, list)) else o
        return o.transpose(1, 2) if layout == "BTHD" else o

    impl.__name__ = f"fla_{kind}_based_{layout}"
    return impl


def resolve_attention_impl(attention_impl) -> Callable | None:
    """None (the model's own naive code), a callable, or a name from ATTENTION_IMPLS."""
    if attention_impl is None or callable(attention_impl):
        return attention_impl
    if attention_impl == "sdpa":
        return sdpa_softmax_attention
    if attention_impl == "fla_parallel":
        return fla_based_attention("parallel")
    if attention_impl == "fla_fused_chunk":
        return fla_based_attention("fused_chunk")
    raise ValueError(f"attention_impl must be None, a callable or one of {ATTENTION_IMPLS}, "
                     f"got {attention_impl!r}")


class BasedMixer(nn.Module):
    """Multi-head Based linear attention, written by hand."""

    def __init__(self, d_model: int, n_heads: int, feature_dim: int = 16, n_kv_heads: int | None = None,
                 attention_form: str = "feature_map", attention_impl=None, eps: float = 1e-6):
        super().__init__()
        if attention_form not in ATTENTION_FORMS:
            raise ValueError(f"attention_form must be one of {ATTENTION_FORMS}, got {attention_form!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.feature_dim = feature_dim
        self.head_dim = d_model // n_heads
        self.attention_form = attention_form
        self.attention_impl = resolve_attention_impl(attention_impl)
        self.eps = eps
        self.q_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.feature_map = TaylorFeatureMap(feature_dim)

    def forward(self, x):                                      # [B, T, D]
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.feature_dim).transpose(1, 2)      # [B, H, T, d]
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.feature_dim).transpose(1, 2)   # [B, Hkv, T, d]
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)     # [B, Hkv, T, Dv]
        if self.n_kv_heads != self.n_heads:
            group = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        if self.attention_impl is not None:
            y = self.attention_impl(q, k, v)
        elif self.attention_form == "feature_map":
            y = self.quadratic_feature_map(q, k, v)
        elif self.attention_form == "polynomial":
            y = self.quadratic_polynomial(q, k, v)
        else:
            y = self.linear_cumsum(q, k, v)
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)                  # [B, T, H * Dv]
        return self.o_proj(y)

    def quadratic_feature_map(self, q, k, v):
        q, k = self.feature_map(q), self.feature_map(k)        # [B, H, T, F], F = 1 + d + d^2
        t = q.shape[-2]
        a = q @ k.transpose(-2, -1)                            # [B, H, T, T]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        a = a.masked_fill(~causal, 0.0)
        return (a @ v) / (a.sum(dim=-1, keepdim=True) + self.eps)

    def quadratic_polynomial(self, q, k, v):
        t = q.shape[-2]
        s = (q @ k.transpose(-2, -1)) / math.sqrt(self.feature_dim)    # [B, H, T, T]
        a = 1 + s + 0.5 * s ** 2
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=q.device))
        a = a.masked_fill(~causal, 0.0)
        return (a @ v) / (a.sum(dim=-1, keepdim=True) + self.eps)

    def linear_cumsum(self, q, k, v):
        q, k = self.feature_map(q), self.feature_map(k)        # [B, H, T, F]
        q, k, v = q.unsqueeze(-2), k.unsqueeze(-2), v.unsqueeze(-1)    # [B,H,T,1,F], [B,H,T,1,F], [B,H,T,Dv,1]
        num = (q * (k * v).cumsum(dim=2)).sum(dim=-1)          # [B, H, T, Dv]
        den = (q * k.cumsum(dim=2)).sum(dim=-1)                # [B, H, T, 1]
        return num / (den + self.eps)


class BasedBlock(nn.Module):
    def __init__(self, d_model, n_heads, feature_dim, mlp_ratio, conv_size, n_kv_heads, attention_form,
                 attention_impl, eps):
        super().__init__()
        self.conv_norm = RMSNorm(d_model) if conv_size > 0 else None
        self.conv = ShortConv(d_model, conv_size) if conv_size > 0 else None
        self.attn_norm = RMSNorm(d_model)
        self.attn = BasedMixer(d_model, n_heads, feature_dim, n_kv_heads, attention_form, attention_impl, eps)
        self.mlp_norm = RMSNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio)

    def forward(self, x):                                      # [B, T, D]
        if self.conv is not None:
            x = x + self.conv(self.conv_norm(x))
        x = x + self.attn(self.attn_norm(x))
        x = x + self.mlp(self.mlp_norm(x))
        return x


class BasedLM(nn.Module):
    """A Based language model: ``forward(input_ids [B, T]) -> logits [B, T, vocab_size]``.

    ``feature_dim``: the q/k dim per head (16 in the published Based models); v and the
    output use ``d_model // n_heads`` per head. ``conv_size`` 0 drops the short convolution.
    ``n_kv_heads`` < ``n_heads`` shares k/v heads (grouped-query, ``repeat_interleave``).
    """

    def __init__(self, vocab_size: int, d_model: int = 256, n_layers: int = 4, n_heads: int = 4,
                 feature_dim: int = 16, mlp_ratio: float = 4.0, max_len: int = 2048, conv_size: int = 4,
                 n_kv_heads: int | None = None, attention_form: str = "feature_map", attention_impl=None,
                 eps: float = 1e-6):
        super().__init__()
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            BasedBlock(d_model, n_heads, feature_dim, mlp_ratio, conv_size, n_kv_heads, attention_form,
                       attention_impl, eps)
            for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        self.lm_head.weight = self.embed.weight                # tied

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def set_attention_impl(self, attention_impl) -> None:
        """Swap every mixer's attention (None: back to the naive code), keeping the weights."""
        impl = resolve_attention_impl(attention_impl)
        for block in self.blocks:
            block.attn.attention_impl = impl

    def forward(self, input_ids):                              # [B, T] int64
        t = input_ids.shape[1]
        if t > self.max_len:
            raise ValueError(f"input_ids has length {t}, more than max_len={self.max_len}")
        x = self.embed(input_ids)                              # [B, T, D]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))                      # [B, T, V]


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (the tied head counts once)."""
    return sum(p.numel() for p in model.parameters())
