"""Quick start: a Based attention layer written by hand, compiled with backend="based".

    python examples/quickstart.py            # GPU if there is one, else CPU (under a minute on 2 cores)

The layer below is ordinary PyTorch, written the way the Based paper describes it: project
to queries and keys of a small feature dim, apply the second-order Taylor feature map, form
the causal T x T attention matrix, normalise by its row sums. Nothing in it knows about
based_compile. The script
  1. prints what ``based_compile.explain()`` finds in it,
  2. checks each entry's output and input gradient against a float32 eager reference,
  3. times eager, torch.compile (Inductor) and torch.compile(backend="based") side by side,
     forward and forward + backward, with the peak memory of each.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import format_bytes, median_time, peak_memory  # noqa: E402


class BasedAttention(nn.Module):
    """Causal Based linear attention, the naive way: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int = 256, n_heads: int = 4, feature_dim: int = 16):
        super().__init__()
        self.n_heads, self.feature_dim, self.head_dim = n_heads, feature_dim, d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def feature_map(self, x):
        # Taylor map: phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)
        d = self.feature_dim
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2) / (math.sqrt(2) * math.sqrt(d))
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.feature_dim).transpose(1, 2)   # [B, H, T, d]
        k = self.k_proj(x).view(b, t, self.n_heads, self.feature_dim).transpose(1, 2)   # [B, H, T, d]
        v = self.v_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)      # [B, H, T, Dv]
        q, k = self.feature_map(q), self.feature_map(k)                                 # [B, H, T, 273]
        a = q @ k.transpose(-2, -1)                                                     # [B, H, T, T]
        mask = torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device))
        a = a.masked_fill(~mask, 0.0)
        y = (a @ v) / (a.sum(dim=-1, keepdim=True) + 1e-6)                              # [B, H, T, Dv]
        return self.out_proj(y.transpose(1, 2).reshape(b, t, -1))


def rel_error(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--batch", type=int, default=8 if cuda else 1)
    p.add_argument("--seq-len", type=int, default=4096 if cuda else 1024, dest="seq_len")
    p.add_argument("--d-model", type=int, default=1024 if cuda else 256, dest="d_model")
    p.add_argument("--heads", type=int, default=16 if cuda else 4)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--reps", type=int, default=10 if cuda else 3)
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import based_compile  # registers backend="based" (also available without this import)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = BasedAttention(args.d_model, args.heads).to(device, dtype)
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, dtype=dtype)
    print(f"Based attention layer: B={args.batch}, T={args.seq_len}, d_model={args.d_model}, "
          f"{args.heads} heads, feature dim 16, {args.dtype} on {device}\n")

    print(based_compile.explain(layer, x), "\n")

    compiled = {
        "eager": layer,
        "inductor": torch.compile(layer),
        "based": torch.compile(layer, backend="based"),
    }

    # correctness: output and input gradient of each entry against a float32 copy of the eager layer;
    # in half precision, compiled entries may differ from it by a few times eager's own rounding error
    reference = copy.deepcopy(layer).float()
    xf = x.float().requires_grad_(True)
    ref = reference(xf)
    ref_grad, = torch.autograd.grad(ref.square().mean(), xf)
    errors = {}
    for name, fn in compiled.items():
        xg = x.clone().requires_grad_(True)
        out = fn(xg)
        grad, = torch.autograd.grad(out.float().square().mean(), xg)
        errors[name] = (rel_error(out, ref), rel_error(grad, ref_grad))
    tol = max(1e-4, 3 * max(errors["eager"]))
    ok = True
    for name, (err_o, err_g) in errors.items():
        good = err_o < tol and err_g < tol
        ok &= good
        print(f"{name:>8} vs float32 eager: output rel. error {err_o:.2e}, input-grad rel. error {err_g:.2e} "
              f"({'ok' if good else 'MISMATCH'})")
    print()

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x)
        return run

    def train_step(fn):
        xg = x.clone().requires_grad_(True)

        def run():
            fn(xg).float().square().mean().backward()
        return run

    passes = [("forward", forward)] + ([] if args.no_backward else [("fwd+bwd", train_step)])
    print(f"{'':>10}" + "".join(f"{label + ' time':>16}{label + ' peak':>16}" for label, _ in passes))
    for name, fn in compiled.items():
        row = f"{name:>10}"
        for _, make in passes:
            run = make(fn)
            try:
                seconds = median_time(run, device, warmup=1, reps=args.reps)
                memory = peak_memory(run, device)
                row += f"{seconds * 1e3:>13.2f} ms{format_bytes(memory):>16}"
            except torch.OutOfMemoryError:
                row += f"{'OOM':>16}{'OOM':>16}"
            layer.zero_grad(set_to_none=True)
        print(row, flush=True)
    print("\n(peak: tensor memory allocated during one call above what was live before it)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
