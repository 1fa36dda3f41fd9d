"""Greedy generation with the naive Based LM, written the way people write it, compiled with backend="based".

The model of ``naive_based_lm.py`` grows a ``generate()`` with two ways to carry the past:

- ``mode="kv_cache"``: every layer keeps its keys and values; a forward over new tokens attends
  from them to the whole cache, with the causal mask aligned to the end
  (``ones(Tq, Tk).tril(Tk - Tq)``; for one new token it keeps everything). The pass rewrites it onto
  ``based::attention`` with Tq < Tk (one compilation for a growing cache: the length is dynamic).
- ``mode="recurrent"``: the prefill returns each layer's states (kv_state = sum phi(k)^T v,
  k_state = sum phi(k)), then one step per token updates them: kv_state + phi(k)^T v,
  k_state + phi(k), readout phi(q) kv_state / (phi(q) . k_state + eps). The pass rewrites the prefill
  onto ``based::attention_with_state`` (the output and both states in one pass, O(T) memory; on
  CUDA the fused-chunk kernel's final states) and the step onto ``based::recurrent_step``: constant
  work per token, whatever the context.

- ``mode="static"``: the recurrent mode as served under CUDA graphs. The states live in a
  ``StaticCache`` allocated once and marked as static addresses; the prefill's states are copied in,
  then ``forward_static`` updates them in place (``kv_state.add_(phi_k^T v)``, ``k_state.add_(phi_k)``,
  the convolution's window shifted by ``copy_``) and returns only the logits, so a step compiled with
  ``mode="reduce-overhead"`` replays one graph on the same addresses every token, with nothing to
  clone. The pass rewrites each layer's step onto ``based::recurrent_step`` and writes the new states
  back into the cache's tensors.

The short convolution keeps its last ``conv_size - 1`` inputs in every mode.

    python examples/generate.py --prompt "Based attention" --new-tokens 64

prints, for eager and ``backend="based"`` in every mode, tokens/s and the greedy text (the model is
untrained: the text is noise; what matters is that every run produces the same tokens), and
checks that the six runs agree token for token.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from naive_based_lm import BasedLM  # noqa: E402

MODES = ("kv_cache", "recurrent", "static")


class StaticCache:
    """Every layer's decode state in tensors allocated once and written in place, the way decode is
    served under CUDA graphs: a captured graph reads and writes the same addresses at every replay,
    so nothing is cloned between tokens and the step returns only the logits.

    Per layer: ``conv`` [B, conv_size - 1, D] (the short convolution's last inputs; None without
    one), ``kv_state`` [B, H, F, Dv] and ``k_state`` [B, H, 1, F] (F = 1 + d + d^2), in the layout of
    ``mode="recurrent"``'s states. Each tensor is marked as a static address for Dynamo
    (``torch._dynamo.mark_static_address``): CUDA graphs then use it in place instead of copying it
    into the graph's own input buffers, and its in-place writes are the graph's, not a reason to
    skip graphs."""

    def __init__(self, model: "GenerativeBasedLM", batch: int, device=None, dtype=None):
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        weight = model.embed.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        self.conv, self.kv_state, self.k_state = [], [], []
        for block in model.blocks:
            attn = block.attn
            f = 1 + attn.feature_dim + attn.feature_dim ** 2
            conv = None
            if block.conv is not None:
                conv = torch.zeros(batch, block.conv.conv.kernel_size[0] - 1, weight.shape[1],
                                   device=device, dtype=dtype)
            self.conv.append(conv)
            self.kv_state.append(torch.zeros(batch, attn.n_heads, f, attn.head_dim, device=device, dtype=dtype))
            self.k_state.append(torch.zeros(batch, attn.n_heads, 1, f, device=device, dtype=dtype))
        for t in self.tensors():
            torch._dynamo.mark_static_address(t)

    def tensors(self):
        return [t for group in (self.conv, self.kv_state, self.k_state) for t in group if t is not None]

    def load_(self, caches):
        """Copy the caches of ``forward_with_cache(..., mode="recurrent")`` (a prefill's) into this cache."""
        if len(caches) != len(self.kv_state):
            raise ValueError(f"caches has {len(caches)} layers, this cache {len(self.kv_state)}")
        for i, (conv, (kv_state, k_state)) in enumerate(caches):
            if (conv is None) != (self.conv[i] is None):
                raise ValueError(f"layer {i}: the conv cache is {'absent' if conv is None else 'present'} "
                                 f"but this cache {'has' if conv is None else 'has none'}")
            for mine, theirs in ((self.conv[i], conv), (self.kv_state[i], kv_state), (self.k_state[i], k_state)):
                if mine is None:
                    continue
                if mine.shape != theirs.shape:
                    raise ValueError(f"layer {i}: a state of shape {tuple(theirs.shape)} does not fit "
                                     f"{tuple(mine.shape)}")
                mine.copy_(theirs)
        return self


class GenerativeBasedLM(BasedLM):
    """BasedLM with a cache-carrying forward and ``generate()``."""

    # ------------------------------------------------------------------ pieces per block

    @staticmethod
    def _conv(block, x, conv_cache):
        """The short causal convolution over [past inputs, x]; returns (y, new cache)."""
        conv = block.conv.conv
        size = conv.kernel_size[0]
        h = block.conv_norm(x)                                               # [B, T, D]
        if conv_cache is None:
            conv_cache = h.new_zeros(h.shape[0], size - 1, h.shape[2])
        window = torch.cat([conv_cache, h], dim=1)                           # [B, size - 1 + T, D]
        y = F.conv1d(window.transpose(1, 2), conv.weight, conv.bias, groups=conv.groups)   # [B, D, T]
        return y.transpose(1, 2), window[:, window.shape[1] - (size - 1):]

    @staticmethod
    def _qkv(attn, x):
        b, t, _ = x.shape
        q = attn.q_proj(x).view(b, t, attn.n_heads, attn.feature_dim).transpose(1, 2)      # [B, H, T, d]
        k = attn.k_proj(x).view(b, t, attn.n_kv_heads, attn.feature_dim).transpose(1, 2)   # [B, Hkv, T, d]
        v = attn.v_proj(x).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)     # [B, Hkv, T, Dv]
        return q, k, v

    @staticmethod
    def _repeat(attn, k, v):
        if attn.n_kv_heads != attn.n_heads:
            group = attn.n_heads // attn.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return k, v

    @staticmethod
    def _out(attn, y):
        b, _, t, _ = y.shape
        return attn.o_proj(y.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))

    def _attend_kv_cache(self, attn, x, cache):
        """Attention of the new tokens against [cached, new] keys and values."""
        q, k, v = self._qkv(attn, x)
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        new_cache = (k, v)
        k, v = self._repeat(attn, k, v)
        tq, tk = q.shape[2], k.shape[2]
        s = (q @ k.transpose(-2, -1)) / attn.feature_dim ** 0.5                        # [B, H, Tq, Tk]
        a = 1 + s + 0.5 * s ** 2
        causal = torch.ones(tq, tk, dtype=torch.bool, device=x.device).tril(tk - tq)    # aligned to the end
        a = a.masked_fill(~causal, 0.0)
        y = (a @ v) / (a.sum(dim=-1, keepdim=True) + attn.eps)
        return self._out(attn, y), new_cache

    def _attend_recurrent(self, attn, x, state):
        """Prefill (state None): the quadratic form for the outputs, and the states it leaves;
        a step (one token): the recurrent update and readout."""
        q, k, v = self._qkv(attn, x)
        k, v = self._repeat(attn, k, v)
        phi_q, phi_k = attn.feature_map(q), attn.feature_map(k)                         # [B, H, T, F]
        if state is None:
            y = attn.quadratic_feature_map(q, k, v)
            kv_state = torch.einsum("bhtf,bhtd->bhfd", phi_k, v)                       # [B, H, F, Dv]
            k_state = phi_k.sum(dim=2, keepdim=True)                                   # [B, H, 1, F]
            return self._out(attn, y), (kv_state, k_state)
        kv_state, k_state = state
        kv_state = kv_state + phi_k.transpose(-2, -1) @ v
        k_state = k_state + phi_k
        num = phi_q @ kv_state                                                         # [B, H, 1, Dv]
        den = (phi_q * k_state).sum(dim=-1, keepdim=True)
        y = num / (den + attn.eps)
        return self._out(attn, y), (kv_state, k_state)

    def _conv_static(self, block, x, conv_cache):
        """The short convolution of one new input against the static cache; shifts it in place."""
        conv = block.conv.conv
        window = torch.cat([conv_cache, block.conv_norm(x)], dim=1)                   # [B, size, D]
        y = F.conv1d(window.transpose(1, 2), conv.weight, conv.bias, groups=conv.groups)   # [B, D, 1]
        conv_cache.copy_(window[:, 1:])
        return y.transpose(1, 2)

    def _attend_static(self, attn, x, kv_state, k_state):
        """One recurrent step with the states updated in place."""
        q, k, v = self._qkv(attn, x)
        k, v = self._repeat(attn, k, v)
        phi_q, phi_k = attn.feature_map(q), attn.feature_map(k)                         # [B, H, 1, F]
        kv_state.add_(phi_k.transpose(-2, -1) @ v)
        k_state.add_(phi_k)
        y = (phi_q @ kv_state) / ((phi_q * k_state).sum(dim=-1, keepdim=True) + attn.eps)
        return self._out(attn, y)

    # ------------------------------------------------------------------ the model

    def static_cache(self, batch: int, device=None, dtype=None) -> StaticCache:
        """The model's StaticCache for ``batch`` rows, allocated on first use and kept: the same tensors
        at every generation (a captured CUDA graph, and Dynamo's guard on their addresses, stay valid).
        Another batch, device or dtype allocates a new one. Its contents are whatever the last
        generation left: ``generate`` loads a prefill's states into it first."""
        weight = self.embed.weight
        key = (batch, torch.device(device) if device is not None else weight.device, dtype or weight.dtype)
        kept = getattr(self, "_static_cache", None)
        if kept is None or kept[0] != key:
            kept = (key, StaticCache(self, batch, key[1], key[2]))
            self._static_cache = kept
        return kept[1]

    def forward_static(self, input_ids, cache: StaticCache):
        """logits [B, 1, V] of one new token per row, every layer's states in ``cache`` updated in place
        (the short convolution's window shifted by ``copy_``, ``kv_state.add_(phi_k^T v)``,
        ``k_state.add_(phi_k)``)."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"input_ids must be [B, 1] (one token per row), got {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        for i, block in enumerate(self.blocks):
            if block.conv is not None:
                x = x + self._conv_static(block, x, cache.conv[i])
            x = x + self._attend_static(block.attn, block.attn_norm(x), cache.kv_state[i], cache.k_state[i])
            x = x + block.mlp(block.mlp_norm(x))
        return self.lm_head(self.norm(x))

    def forward_with_cache(self, input_ids, caches, mode: str):
        """logits [B, T, V] of the new tokens and the new caches (one (conv, attention) pair per layer).
        ``caches``: None for a prefill, else what the previous call returned. ``mode``: "kv_cache" or
        "recurrent" ("static" decodes through ``forward_static``)."""
        if mode not in ("kv_cache", "recurrent"):
            raise ValueError(f"mode must be 'kv_cache' or 'recurrent' (the static cache decodes through "
                             f"forward_static), got {mode!r}")
        x = self.embed(input_ids)
        new_caches = []
        for i, block in enumerate(self.blocks):
            conv_cache, attn_cache = (None, None) if caches is None else caches[i]
            if block.conv is not None:
                y, conv_cache = self._conv(block, x, conv_cache)
                x = x + y
            h = block.attn_norm(x)
            if mode == "kv_cache":
                y, attn_cache = self._attend_kv_cache(block.attn, h, attn_cache)
            else:
                y, attn_cache = self._attend_recurrent(block.attn, h, attn_cache)
            x = x + y
            x = x + block.mlp(block.mlp_norm(x))
            new_caches.append((conv_cache, attn_cache))
        return self.lm_head(self.norm(x)), new_caches

    @torch.no_grad()
    def generate(self, input_ids, new_tokens: int, mode: str = "kv_cache", step=None, static_step=None,
                 cache: StaticCache | None = None):
        """Greedy decoding: the prompt's forward, then one token at a time. ``step``: the function to
        call instead of ``forward_with_cache`` (e.g. its compiled version). ``mode="static"``: the
        prompt's forward is the recurrent mode's prefill (through ``step``), its states are copied
        into ``cache`` (default: ``static_cache(B)``), and each token is ``static_step`` (default
        ``forward_static``), which updates them in place."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + new_tokens ({new_tokens}) > max_len ({self.max_len})")
        if cache is not None and not isinstance(cache, StaticCache):
            raise TypeError(f"cache must be a StaticCache or None, got {type(cache).__name__}")
        step = step or self.forward_with_cache
        out = []
        if mode == "static":
            static_step = static_step or self.forward_static
            logits, caches = step(input_ids, None, "recurrent")
            cache = cache if cache is not None else self.static_cache(input_ids.shape[0], input_ids.device)
            cache.load_(caches)
            for _ in range(new_tokens):
                token = logits[:, -1].argmax(-1, keepdim=True)                           # [B, 1]
                out.append(token)
                logits = static_step(token, cache)
            return torch.cat(out, dim=1)
        logits, caches = step(input_ids, None, mode)
        for _ in range(new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)                               # [B, 1]
            out.append(token)
            logits, caches = step(token, caches, mode)
        return torch.cat(out, dim=1)


def text_of(tokens) -> str:
    return "".join(chr(t) if 32 <= t < 127 else "." for t in tokens.tolist())


def run(model, prompt_ids, new_tokens, mode, compiled: bool, backend="based"):
    """(tokens, tokens/s of the decode) with the model eager or compiled with ``backend``."""
    step = torch.compile(model.forward_with_cache, backend=backend) if compiled else None
    static_step = torch.compile(model.forward_static, backend=backend) if compiled and mode == "static" else None
    model.generate(prompt_ids, 2, mode, step, static_step)                               # warm-up, compiles
    start = time.perf_counter()
    tokens = model.generate(prompt_ids, new_tokens, mode, step, static_step)
    seconds = time.perf_counter() - start
    return tokens, tokens.numel() / seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="Based attention is")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--feature-dim", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import based_compile  # noqa: F401  (registers backend="based")

    torch.manual_seed(args.seed)
    model = GenerativeBasedLM(256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                              n_kv_heads=args.kv_heads, feature_dim=args.feature_dim,
                              max_len=len(args.prompt) + args.new_tokens + 8)
    model = model.to(getattr(torch, args.dtype)).eval()
    prompt = torch.tensor([list(args.prompt.encode("latin-1"))])
    results = {}
    for mode in MODES:
        for compiled in (False, True):
            tokens, rate = run(model, prompt, args.new_tokens, mode, compiled)
            name = f"{mode:9s} {'based' if compiled else 'eager'}"
            results[name] = tokens
            print(f"{name}: {rate:8.1f} tokens/s  {args.prompt!r} + {text_of(tokens[0])!r}")
    first = next(iter(results.values()))
    same = all(torch.equal(t, first) for t in results.values())
    print("all runs produce the same tokens" if same else "RUNS DISAGREE")
    return results, same


if __name__ == "__main__":
    sys.exit(0 if main()[1] else 1)
