"""How much time the `based` graph pass adds to compiling a 12-layer naive Based LM.

Measures the pass's own time (lowering to ATen, matching, the numerical probe, the rewrite;
``based_compile.graph.driver.pass_seconds``) for each attention form of
``examples/naive_based_lm.py``, and, with ``--inner inductor``, the whole compile with and
without the pass for context. The budget (issue 5) is < 1 s for the pass on 12 layers.

    python benchmarks/compile_time.py                     # pass time, inner="eager" (fast)
    python benchmarks/compile_time.py --inner inductor    # also total compile times (slow on CPU)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import naive_based_lm  # noqa: E402

import importlib  # noqa: E402

import based_compile  # noqa: E402

backend_module = importlib.import_module("based_compile.graph.driver")   # where the pass keeps its clock


def make_model(form: str, layers: int, device: str):
    torch.manual_seed(0)
    return naive_based_lm.BasedLM(vocab_size=1024, d_model=256, n_layers=layers, n_heads=4, feature_dim=16,
                                  max_len=2048, attention_form=form).to(device)


def compile_once(model, tokens, backend, training: bool) -> float:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    if training:
        compiled(tokens).float().sum().backward()
    else:
        with torch.no_grad():
            compiled(tokens)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--inner", default="eager", choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--forms", default="polynomial,feature_map,linear_cumsum")
    parser.add_argument("--training", action="store_true", help="forward + backward (default: inference)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    print(f"# {args.layers} layers, B={args.batch}, T={args.length}, inner={args.inner}, "
          f"{'training' if args.training else 'inference'}, device={args.device}, torch {torch.__version__}")
    print(f"{'form':<16}{'sites':>6}{'pass s':>9}{'compile s':>11}{'no-pass s':>11}")
    for form in args.forms.split(","):
        model = make_model(form, args.layers, args.device)
        tokens = torch.randint(0, 1024, (args.batch, args.length), device=args.device)
        compile_once(model, tokens, based_compile.backend(inner=args.inner), args.training)   # warm caches
        backend_module.pass_seconds = 0.0
        ex = based_compile.explain(model, tokens)
        backend_module.pass_seconds = 0.0
        total = compile_once(model, tokens, based_compile.backend(inner=args.inner), args.training)
        pass_s = backend_module.pass_seconds
        baseline = compile_once(model, tokens, args.inner, args.training) if args.inner != "eager" else float("nan")
        print(f"{form:<16}{len(ex.sites):>6}{pass_s:>9.3f}{total:>11.2f}{baseline:>11.2f}")
    torch._dynamo.reset()


if __name__ == "__main__":
    main()
