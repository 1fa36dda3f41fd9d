"""Long-context prefill with the naive Based LM: backend="based" against Inductor and softmax SDPA.

    python examples/long_context.py                       # GPU: T = 1k .. 64k; CPU: a small sweep
    python examples/long_context.py --lengths 4096,65536 --layers 2

The model is examples/naive_based_lm.py, whose Based mixers form the T x T attention matrix
(the way hand-written Based code does). Per sequence length, one prefill (forward, no grad):
  eager     the naive code as written                  O(T^2) memory per head
  inductor  torch.compile(model) on the same code      fuses, but still O(T^2)
  based     torch.compile(model, backend="based")     O(T) memory; the policy picks the kernel
                                                        (the chunked kernel at long T, printed per T)
  sdpa      the same model with softmax attention through F.scaled_dot_product_attention
            (FlashAttention on the GPU): the usual Transformer baseline, a different function
Reports median time, tokens/s and peak memory per entry; an entry that runs out of memory
says so (and is skipped at longer lengths), any other failure is printed and the sweep goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import format_bytes, median_time, peak_memory  # noqa: E402
from naive_based_lm import BasedLM  # noqa: E402

VARIANTS = ("eager", "inductor", "based", "sdpa")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def make_runner(model, variant: str):
    """A callable ids -> logits for one variant (compiled ones are fresh, static-shape compilations)."""
    torch._dynamo.reset()
    model.set_attention_impl("sdpa" if variant == "sdpa" else None)
    if variant == "inductor":
        return torch.compile(model, dynamic=False)
    if variant == "based":
        return torch.compile(model, backend="based", dynamic=False)
    return model


def based_kernel_choice(args, t: int, dtype) -> str:
    from based_compile.op import policy

    device = torch.device(args.device).type
    return str(policy.decide_for(device, False, t, 16, args.d_model // args.heads, args.batch * args.heads, dtype))


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--lengths", default="1024,4096,16384,32768,65536" if cuda else "256,1024,2048",
                   help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=768 if cuda else 128, dest="d_model")
    p.add_argument("--layers", type=int, default=4 if cuda else 2)
    p.add_argument("--heads", type=int, default=12 if cuda else 2)
    p.add_argument("--vocab-size", type=int, default=4096, dest="vocab_size")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.lengths = [int(t) for t in args.lengths.split(",")]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants must be a subset of {VARIANTS}, got {sorted(unknown)}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import based_compile  # noqa: F401  registers backend="based"

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = BasedLM(args.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    feature_dim=16, mlp_ratio=4.0, max_len=max(args.lengths)).to(device, dtype).eval()
    print(f"naive Based LM: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, feature dim 16, "
          f"vocab {args.vocab_size}, {args.dtype} on {device}; prefill of batch {args.batch}\n")

    results, out_of_memory = [], set()
    checked = False
    for t in args.lengths:
        ids = torch.randint(0, args.vocab_size, (args.batch, t), device=device)
        kernel = based_kernel_choice(args, t, dtype) if "based" in args.variants else None
        if kernel is not None:
            print(f"T={t}: based kernel: {kernel}")
        for variant in args.variants:
            entry = dict(variant=variant, seq_len=t, batch=args.batch)
            if variant == "based":
                entry["kernel"] = kernel
            if variant in out_of_memory:
                entry.update(status="OOM", note="ran out of memory at a shorter length")
                results.append(entry)
                print(f"  {variant:>9}: skipped (OOM at a shorter length)", flush=True)
                continue
            try:
                run = make_runner(model, variant)
                with torch.no_grad():
                    seconds = median_time(lambda: run(ids), device, warmup=1, reps=args.reps)
                    memory = peak_memory(lambda: run(ids), device)
                    if variant == "based" and not checked:             # once, at the shortest length
                        out, ref = run(ids).double(), model(ids).double()  # model: the eager naive code
                        entry["rel_error_vs_eager"] = ((out - ref).norm() / ref.norm()).item()
                        checked = True
                entry.update(status="ok", ms=seconds * 1e3, tokens_per_s=args.batch * t / seconds,
                             peak_bytes=memory)
                extra = f", rel. error vs eager {entry['rel_error_vs_eager']:.1e}" if "rel_error_vs_eager" in entry else ""
                print(f"  {variant:>9}: {seconds * 1e3:10.2f} ms  {entry['tokens_per_s']:12.0f} tok/s  "
                      f"peak {format_bytes(memory)}{extra}", flush=True)
            except Exception as error:  # noqa: BLE001 - every entry reports, the sweep goes on
                oom = is_out_of_memory(error)
                if oom:
                    out_of_memory.add(variant)
                entry.update(status="OOM" if oom else "error", error=f"{type(error).__name__}: {error}"[:500])
                print(f"  {variant:>9}: {'OOM' if oom else 'FAILED'}: {type(error).__name__}: "
                      f"{str(error).splitlines()[0][:200] if str(error) else ''}", flush=True)
            finally:
                model.set_attention_impl(None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(entry)
        print()

    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=vars(args), results=results), f, indent=2)
        print(f"wrote {args.json}")
    return results


def print_table(results: list[dict], args) -> None:
    variants = [v for v in VARIANTS if v in args.variants]
    print(f"{'T':>7} " + "".join(f"{v + ' ms':>12}{v + ' peak':>14}" for v in variants))
    for t in args.lengths:
        row = f"{t:>7} "
        for v in variants:
            e = next((r for r in results if r["seq_len"] == t and r["variant"] == v), None)
            if e is None or e["status"] != "ok":
                status = "-" if e is None else e["status"]
                row += f"{status:>12}{status:>14}"
            else:
                row += f"{e['ms']:>12.2f}{format_bytes(e['peak_bytes']):>14}"
        print(row)


if __name__ == "__main__":
    main()
