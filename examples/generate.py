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

The short convolution keeps its last ``conv_size - 1`` inputs in both modes.

    python examples/generate.py --prompt "Based attention" --new-tokens 64

prints, for eager and ``backend="based"`` in both modes, tokens/s and the greedy text (the model is
untrained: the text is noise; what matters is that every run produces the same tokens), and
checks that the four runs agree token for token.
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

MODES = ("kv_cache", "recurrent")


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

    # ------------------------------------------------------------------ the model

    def forward_with_cache(self, input_ids, caches, mode: str):
        """logits [B, T, V] of the new tokens and the new caches (one (conv, attention) pair per layer).
        ``caches``: None for a prefill, else what the previous call returned."""
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
    def generate(self, input_ids, new_tokens: int, mode: str = "kv_cache", step=None):
        """Greedy decoding: the prompt's forward, then one token at a time. ``step``: the function to
        call instead of ``forward_with_cache`` (e.g. its compiled version)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T] with T >= 1, got {tuple(input_ids.shape)}")
        if input_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt ({input_ids.shape[1]}) + new_tokens ({new_tokens}) > max_len ({self.max_len})")
        step = step or self.forward_with_cache
        logits, caches = step(input_ids, None, mode)
        out = []
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
    model.generate(prompt_ids, 2, mode, step)                                            # warm-up, compiles
    start = time.perf_counter()
    tokens = model.generate(prompt_ids, new_tokens, mode, step)
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
