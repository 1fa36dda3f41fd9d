"""Reproduce every measured table of the README on one GPU machine: ``python -m benchmarks``.

    python -m benchmarks                      # everything, into benchmarks/results/, then README tables
    python -m benchmarks --quick              # a few minutes: fewer lengths, layers and repetitions
    python -m benchmarks --only kernels,e2e   # a subset (kernels, e2e, generate, distributed, context_parallel)
    python -m benchmarks --out /tmp/bench     # elsewhere (the README is then left alone)

Each stage runs one benchmark script in its own process (progress is printed as it goes) and
writes ``OUT/NAME.json`` (and a plot where there is one). When OUT is benchmarks/results, the
README's tables are rewritten from those files afterwards (``benchmarks/tables.py``), so every
number in the README comes from a file made by this command. fla-core (the opponent in the
kernel and end-to-end tables) is optional: its entries are skipped when it is not importable.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Each stage: the script and its arguments for the full run and for --quick (OUT is appended).
STAGES = {
    "kernels": (["kernels.py"], ["--quick"]),
    "e2e": (["e2e.py", "--fix-inductor-cantsplit", "--tokens", "32768", "--reps", "5", "--min-batch", "8",
             "--lengths", "2048,8192", "--variants", "eager,inductor,based,fla,fla_inductor"], ["--quick"]),
    "generate": (["generate.py"], ["--quick"]),
    "distributed": (["distributed.py", "--world", "2"], ["--steps", "3"]),
    "context_parallel": (["context_parallel.py", "--world", "2", "--budget-s", "450"],
                         ["--steps", "3", "--curve-steps", "2", "--probe-max", "262144"]),
}


def _available(name: str) -> str | None:
    """Why a stage cannot run here, or None."""
    if not (HERE / STAGES[name][0][0]).exists():
        return f"benchmarks/{STAGES[name][0][0]} does not exist yet"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if name in ("distributed", "context_parallel") and torch.cuda.device_count() < 2:
        return "needs 2 GPUs"
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (minutes, not tens of minutes)")
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {tuple(STAGES)}")
    p.add_argument("--out", default=str(RESULTS), help="folder for the JSON files and plots")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"--only: unknown stage(s) {unknown}; choose from {tuple(STAGES)}")
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    failed = []
    for i, name in enumerate(stages, 1):
        why = _available(name)
        if why:
            print(f"[{i}/{len(stages)}] {name}: skipped ({why})", flush=True)
            continue
        script, quick = STAGES[name]
        cmd = [sys.executable, str(HERE / script[0])] + script[1:] + (quick if args.quick else []) + ["--out", str(out)]
        print(f"[{i}/{len(stages)}] {name}: {' '.join(cmd)}", flush=True)
        (out / f"{name}.json").unlink(missing_ok=True)      # a stage writes its file afresh (e2e.py merges)
        start = time.perf_counter()
        env["BENCH_COMMAND"] = f"python -m benchmarks --only {name}" + (" --quick" if args.quick else "")
        rc = subprocess.call(cmd, env=env, cwd=HERE.parent)
        print(f"[{i}/{len(stages)}] {name}: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(name)
    if out == RESULTS.resolve() and not args.quick:
        from benchmarks import tables

        tables.README.write_text(tables.write(tables.README.read_text()))
        print("README tables rewritten from benchmarks/results/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
