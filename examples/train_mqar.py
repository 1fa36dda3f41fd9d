"""Train the naive Based LM on multi-query associative recall, compiled with backend="based".

    python examples/train_mqar.py                 # compiled with backend="based" (GPU if there is one)
    python examples/train_mqar.py --eager         # the same training without compiling
    python examples/train_mqar.py --compare       # both, from the same seed, loss curves side by side

The model (examples/naive_based_lm.py) is plain PyTorch; only the torch.compile line differs
between the runs. The data (examples/mqar_data.py) is generated in code: key-value pairs, then
queries asking for the value of an earlier key; the loss counts only the answers. Defaults
depend on the device: a GPU run (seq 256, 32 pairs, d_model 128) takes a few minutes, a CPU
run is a small version of the same task.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mqar_data import IGNORE, mqar_batch, recall_accuracy  # noqa: E402
from naive_based_lm import ATTENTION_FORMS, BasedLM, count_parameters  # noqa: E402

# Defaults per device (a command-line value wins)
PRESETS = {
    "cuda": dict(seq_len=256, num_kv_pairs=32, vocab_size=2048, d_model=256, n_layers=2, n_heads=4,
                 steps=3000, batch=64, lr=3e-3),
    "cpu": dict(seq_len=64, num_kv_pairs=8, vocab_size=128, d_model=64, n_layers=2, n_heads=2, steps=800,
                batch=32, lr=1e-2),
}


class ProgressBar:
    """A one-line progress bar on stderr (a plain log line every ``every`` steps when not a tty)."""

    def __init__(self, total: int, label: str, every: int = 50, width: int = 28):
        self.total, self.label, self.every, self.width = total, label, every, width
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, **values) -> None:
        done = step + 1
        if not self.tty and done % self.every != 0 and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        fill = int(self.width * done / self.total)
        bar = "#" * fill + "." * (self.width - fill)
        stats = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        line = f"{self.label} [{bar}] {done}/{self.total} {stats} {rate:.1f} it/s"
        if self.tty:
            sys.stderr.write("\r" + line)
            if done == self.total:
                sys.stderr.write("\n")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(args, device) -> BasedLM:
    torch.manual_seed(args.seed)
    return BasedLM(args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                   feature_dim=args.feature_dim, mlp_ratio=2.0, max_len=args.seq_len,
                   attention_form=args.attention_form).to(device)


def evaluate(model, args, device, batches: int = 4) -> float:
    g = torch.Generator().manual_seed(args.seed + 1_000_003)  # held-out sequences
    accs = []
    model.eval()
    with torch.no_grad():
        for _ in range(batches):
            x, y = mqar_batch(args.batch, args.seq_len, args.vocab_size, args.num_kv_pairs, g, device)
            accs.append(recall_accuracy(model(x), y))
    model.train()
    return sum(accs) / len(accs)


def train(args, mode: str, device) -> dict:
    """One training run; ``mode`` is "eager" or "based". Returns the loss curve and accuracies."""
    model = build_model(args, device)
    step_fn = model if mode == "eager" else torch.compile(model, backend="based")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.98))
    data = torch.Generator().manual_seed(args.seed)            # same batches in every mode
    warmup = max(1, args.steps // 20)
    bar = ProgressBar(args.steps, f"{mode:>5}", every=max(1, args.steps // 20))
    losses, accs = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, warmup)
        x, y = mqar_batch(args.batch, args.seq_len, args.vocab_size, args.num_kv_pairs, data, device)
        logits = step_fn(x)                                    # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        accs.append(recall_accuracy(logits.detach(), y))
        bar.update(step, loss=losses[-1], acc=accs[-1])
    seconds = time.perf_counter() - start
    return dict(mode=mode, losses=losses, train_acc=accs, seconds=seconds,
                eval_acc=evaluate(step_fn, args, device), params=count_parameters(model))


def print_curves(runs: list[dict], points: int = 12) -> None:
    steps = len(runs[0]["losses"])
    every = max(1, steps // points)
    head = f"{'step':>6} " + " ".join(f"{r['mode'] + ' loss':>12}" for r in runs)
    if len(runs) == 2:
        head += f" {'|diff|':>10}"
    print(head)
    for i in list(range(0, steps, every)) + ([steps - 1] if (steps - 1) % every else []):
        row = f"{i:>6} " + " ".join(f"{r['losses'][i]:>12.4f}" for r in runs)
        if len(runs) == 2:
            row += f" {abs(runs[0]['losses'][i] - runs[1]['losses'][i]):>10.2e}"
        print(row)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--num-kv-pairs", type=int, dest="num_kv_pairs")
    p.add_argument("--vocab-size", type=int, dest="vocab_size")
    p.add_argument("--d-model", type=int, dest="d_model")
    p.add_argument("--layers", type=int, dest="n_layers")
    p.add_argument("--heads", type=int, dest="n_heads")
    p.add_argument("--feature-dim", type=int, default=16, dest="feature_dim")
    p.add_argument("--attention-form", default="feature_map", choices=ATTENTION_FORMS, dest="attention_form")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", action="store_true", help="train without compiling")
    mode.add_argument("--compare", action="store_true", help="train eagerly and with backend='based'")
    args = p.parse_args(argv)
    preset = PRESETS["cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    modes = ["eager", "based"] if args.compare else ["eager"] if args.eager else ["based"]
    if "based" in modes:
        import based_compile  # noqa: F401  registers backend="based"
    queries = (args.seq_len + 1 - 2 * args.num_kv_pairs) // 2
    print(f"MQAR: seq_len {args.seq_len}, {args.num_kv_pairs} key-value pairs, {queries} queries, "
          f"vocab {args.vocab_size}; model d_model {args.d_model}, {args.n_layers} layers, "
          f"{args.n_heads} heads, feature dim {args.feature_dim} ({args.attention_form}); "
          f"{args.steps} steps of batch {args.batch} on {device}")
    runs = [train(args, mode, device) for mode in modes]
    print()
    print_curves(runs)
    print()
    for r in runs:
        print(f"{r['mode']:>5}: {r['params'] / 1e6:.2f}M params, {r['seconds']:.1f} s "
              f"({len(r['losses']) / r['seconds']:.1f} steps/s incl. compile), final loss "
              f"{r['losses'][-1]:.4f}, held-out recall accuracy {r['eval_acc']:.3f}")
    return runs


if __name__ == "__main__":
    main()
