"""``python -m fuzz``: run fuzz cases against backend="based" and summarise.

    python -m fuzz --seconds 600 --seed 0      # the long run
    python -m fuzz --cases 50 --seed 3         # a fixed number of cases
    python -m fuzz --case 12                   # one case, verbose (its program, then the verdict)
    python -m fuzz --case 12 --print           # print the case's standalone reproducer and exit
    python -m fuzz --seconds 600 --force inner=eager --force grad=True   # one choice for every case
    python -m fuzz --seconds 600 --structure-only   # the pass without its numerical probe (as at real sizes)

Case numbers are ``seed * 100000 + i``; every case is a pure function of its number. Each silent
wrong result or crash is printed as a standalone reproducer (and written to ``--repro-dir``).
The exit status is 1 when any case was silently wrong or crashed.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time

# Without a GPU the Triton kernels run under Triton's interpreter; it must be chosen before
# triton is imported (as tests/conftest.py does).
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

from .program import FORCED, generate  # noqa: E402
from .run import STRUCTURE_ONLY, run_case, structure_only, summarise, write_reproducer  # noqa: E402
from .worker import Worker, serve  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="run seed: case numbers seed*100000 + i")
    parser.add_argument("--cases", type=int, default=None, help="number of cases (default: until --seconds)")
    parser.add_argument("--seconds", type=float, default=None, help="time budget (default 60 without --cases)")
    parser.add_argument("--case", type=int, action="append", help="run only this case number (repeatable)")
    parser.add_argument("--print", action="store_true", help="with --case: print the reproducer and exit")
    parser.add_argument("--repro-dir", default=None, help="write a reproducer .py for every failure here")
    parser.add_argument("--tol", type=float, default=1e-9, help="relative error tolerance (float64)")
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    parser.add_argument("--in-process", action="store_true",
                        help="run cases in this process (faster to debug; a native crash ends the run)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case (worker process)")
    parser.add_argument("--attribute", action="store_true",
                        help="for each exact program not rewritten, find the axis that alone refuses it "
                             "(explain() on one-axis variants; slower)")
    parser.add_argument("--force", action="append", default=[], metavar="AXIS=CHOICE",
                        help="the same choice for every case, e.g. inner=eager, dynamic=True, form=fm_linear "
                             "(values read as Python literals where they parse)")
    parser.add_argument("--structure-only", action="store_true",
                        help="the graph pass without its numerical probe and index tensors, which run only up to "
                             "4M entries: what real sizes get")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.structure_only:
        os.environ[STRUCTURE_ONLY] = "1"            # the worker process inherits it
    if os.environ.get(STRUCTURE_ONLY) == "1":
        structure_only()
    for item in args.force:
        axis, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--force takes AXIS=CHOICE, got {item!r}")
        try:
            FORCED[axis] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            FORCED[axis] = value
    if args.worker:
        serve(args.tol, args.attribute)
        return 0
    if args.cases is not None and args.cases < 0:
        parser.error("--cases must be >= 0")
    if args.print:
        if not args.case:
            parser.error("--print needs --case")
        for case in args.case:
            print(generate(case).reproducer())
        return 0
    if args.case:
        cases = iter(args.case)
    else:
        limit = args.cases
        seconds = args.seconds if args.seconds is not None else (None if limit is not None else 60.0)
        cases = _numbers(args.seed, limit, seconds)
    outcomes = []
    worker = None if args.in_process else Worker(args.tol, args.timeout, args.attribute, args.force)
    try:
        for case in cases:
            outcome = run_case(case, args.tol, args.attribute) if worker is None else worker.run(case)
            outcomes.append(outcome)
            _show(outcome, args)
    finally:
        if worker is not None:
            worker.close()
    print()
    print(summarise(outcomes))
    return 1 if any(o.failed for o in outcomes) else 0


def _show(outcome, args) -> None:
    if outcome.failed or outcome.verdict == "invalid":
        print(f"\n===== {outcome.line()}", flush=True)
        print(outcome.program.reproducer(), flush=True)
        if args.repro_dir:
            print("written to", write_reproducer(outcome, args.repro_dir), flush=True)
    elif not args.quiet:
        print(f"{outcome.line()} rewritten={outcome.rewritten} ({outcome.seconds:.1f}s)"
              + (f" reasons={outcome.reasons}" if outcome.reasons and outcome.program.exact
                 and outcome.rewritten != "all" else "")
              + (f" culprits={outcome.culprits}" if outcome.culprits else ""), flush=True)


def _numbers(seed: int, limit, seconds):
    start = time.monotonic()
    i = 0
    while (limit is None or i < limit) and (seconds is None or time.monotonic() - start < seconds):
        yield seed * 100000 + i
        i += 1


if __name__ == "__main__":
    sys.exit(main())
