"""Host time per call of the ``based`` operators: what a call costs the host around its kernels.

    python benchmarks/host_overhead.py                        # CUDA when there is one, else the CPU
    python benchmarks/host_overhead.py --device cpu --profile attention_backward
    python benchmarks/host_overhead.py --compare main         # the same cases on the code of git REF, alternating
    python benchmarks/host_overhead.py --out host.json

Each case calls one operator the way a caller does, on tiny inputs (B=1, H=2, T=64, Dk=16, Dv=64,
float32 on the CPU, bfloat16 on CUDA), CALLS times in a row; a round times the whole run
(followed by a synchronize on CUDA: the kernels are tiny, the GPU waits on the host) and reports
microseconds per call; the cases take turns, ROUNDS rounds each, and the median is printed.

Cases:
- ``attention``, ``attention_backward``, ``attention_inference``, ``decode`` (Tq=1 against Tk=T),
  ``decode_growing`` (Tq=1 against a cache one token longer at every call), ``recurrent_step``,
  ``attention_with_state``: ``torch.ops.based.<op>.default(...)`` under no_grad,
  as the Python wrapper that Inductor generates calls them (the dispatcher, the operator's
  Autograd kernel, its implementation);
- ``eager_fwd`` / ``eager_fwdbwd``: ``based_attention`` without grad / with ``torch.autograd.grad``;
- ``compiled_fwd`` / ``compiled_fwdbwd``: the same through ``torch.compile(backend="based")``
  (Dynamo's guards and AOTAutograd's wrappers included);
- ``parallel_forward`` / ``parallel_backward``: the parallel kernel's functions called directly
  (their launch code, buffers and Triton's launcher); ``bare_launch``: the forward kernel's
  launch alone with every argument computed beforehand (Triton's launcher: the least a launch costs).

On the CPU the compute is taken out so that what is left is the host's own work (dispatch,
argument checks, the plan and policy, the kernels' launch code and buffers): the Triton kernels
run under ``TRITON_INTERPRET=1`` with every launch replaced by a no-op, the PyTorch forms of
``cpu_path`` return preallocated tensors, ``based::recurrent_step`` runs its CUDA implementation
(checks, the kernel's launch code) and the kernel setting is ``parallel`` (``--kernel``) so that
the Triton launch code runs. Triton's own launcher (``JITFunction.run``) is not in these numbers:
only CUDA has it. On CUDA everything is real (kernel setting ``auto``).

``--compare REF`` extracts ``based_compile`` and ``kernels`` of git REF (or copies them from the
folder REF) into a temporary folder and runs this script on both trees in separate processes,
alternating (``--processes`` each), and prints old, new and new/old per case (medians over the
processes).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
B, H, T, DK, DV = 1, 2, 64, 16, 64
CASES = ("attention", "attention_backward", "attention_inference", "decode", "decode_growing", "recurrent_step",
         "attention_with_state", "eager_fwd", "eager_fwdbwd", "compiled_fwd", "compiled_fwdbwd",
         "parallel_forward", "parallel_backward", "bare_launch")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--calls", type=int, default=300, help="calls per round")
    p.add_argument("--rounds", type=int, default=15, help="rounds per case (cases take turns)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    p.add_argument("--kernel", default=None, help="based_compile.config.kernel (default: parallel on cpu, auto on cuda)")
    p.add_argument("--profile", default=None, metavar="CASE", help="print a cProfile of CASE's calls")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    p.add_argument("--compare", default=None, metavar="REF", help="also run the code of git REF, alternating")
    p.add_argument("--processes", type=int, default=3, help="with --compare: processes per tree")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)     # a --compare worker
    return p.parse_args(argv)


def _device(args) -> str:
    if args.device:
        return args.device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _no_compute() -> None:
    """CPU: keep the host's work, drop the compute (see the module docstring)."""
    import torch
    import triton
    from based_compile.kernels import chunked, decode, fused_chunk, parallel
    from based_compile.kernels import recurrent_step as step_kernel
    from based_compile.op import cpu_path
    from based_compile.op import recurrent_step as step_op

    class NoLaunch:
        def __getitem__(self, grid):
            return self

        def __call__(self, *args, **kwargs):
            return None

    jit_types = tuple(t for t in (getattr(triton.runtime, "JITFunction", None),
                                  getattr(getattr(triton.runtime, "interpreter", None), "InterpretedFunction", None))
                      if t is not None)
    for module in (parallel, fused_chunk, chunked, decode, step_kernel):
        for name, value in list(vars(module).items()):
            if isinstance(value, jit_types):
                setattr(module, name, NoLaunch())

    results = {}

    def forward(q, k, v, args, form):
        key = ("f", q.shape, v.shape[-1], args.normalize)
        if key not in results:
            o = q.new_zeros((*q.shape[:-1], v.shape[-1]))
            z = q.new_zeros((args.batch, args.heads, args.length), dtype=cpu_path.compute_dtype(q.dtype))
            results[key] = (o, z if args.normalize else None)
        return results[key]

    def backward(q, k, v, o, z, do, args, form):
        key = ("b", q.shape, k.shape, v.shape)
        if key not in results:
            results[key] = (torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        return results[key]

    cpu_path.cpu_forward, cpu_path.cpu_backward = forward, backward
    # The step's CPU kernel is its PyTorch form (compute); run the CUDA implementation instead.
    cuda_impl = getattr(step_op, "_step_cuda", None)
    if cuda_impl is not None:
        lib = torch.library.Library("based", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")        # "overriding a previously registered kernel": meant
            lib.impl("recurrent_step", cuda_impl, "CPU")
        _no_compute.keep = lib
        try:            # trees whose Autograd kernel calls the implementation itself
            from based_compile.op import inference_only
            inference_only.IMPLEMENTATIONS["recurrent_step"]["CPU"] = cuda_impl
        except (ImportError, AttributeError, KeyError):
            pass


def _cases(device: str, names):
    import torch
    from based_compile import based_attention
    from based_compile.op.spec import BasedSpec

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = BasedSpec(scale=DK ** -0.5)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

    q, k, v = rand(B, H, T, DK), rand(B, H, T, DK), rand(B, H, T, DV)
    params = (*spec.op_arguments, True)
    ops = torch.ops.based
    with torch.no_grad():
        o, z = ops.attention.default(q, k, v, *params)
    do = rand(*o.shape)
    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    q1, v1 = rand(B, H, 1, DK), rand(B, H, 1, DV)
    f = 1 + DK + DK * DK
    kv_state, k_state = rand(B, H, f, DV), rand(B, H, 1, f)
    pieces, factors = ["const:1", "linear", "outer"], [1.0, DK ** -0.5, 0.5 ** 0.5 / DK ** 0.5]

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    def compiled(fn):
        return torch.compile(fn, backend="based", fullgraph=True)

    made = {}
    for name in names:
        if name == "attention":
            made[name] = no_grad(lambda: ops.attention.default(q, k, v, *params))
        elif name == "attention_backward":
            made[name] = no_grad(lambda: ops.attention_backward.default(do, q, k, v, o, z, *params))
        elif name == "attention_inference":
            made[name] = no_grad(lambda: ops.attention.default(q, k, v, *spec.op_arguments, False))
        elif name == "decode":
            made[name] = no_grad(lambda: ops.attention.default(q1, k, v, *spec.op_arguments, False))
        elif name == "decode_growing":            # a KV cache one token longer at every call (1000 lengths)
            k_cache, v_cache, lengths = rand(B, H, T + 1000, DK), rand(B, H, T + 1000, DV), iter(())

            def grown():
                nonlocal lengths
                t = next(lengths, None)
                if t is None:
                    lengths = iter(range(T, T + 1000))
                    t = next(lengths)
                return ops.attention.default(q1, k_cache[:, :, :t], v_cache[:, :, :t], *spec.op_arguments, False)
            made[name] = no_grad(grown)
        elif name == "recurrent_step":
            made[name] = no_grad(lambda: ops.recurrent_step.default(q1, q1, v1, kv_state, k_state, pieces,
                                                                    factors, factors, True, 1e-6))
        elif name == "attention_with_state":
            made[name] = no_grad(lambda: ops.attention_with_state.default(q, k, v, *spec.op_arguments, pieces, factors))
        elif name == "eager_fwd":
            made[name] = no_grad(lambda: based_attention(q, k, v, spec))
        elif name == "eager_fwdbwd":
            made[name] = lambda: torch.autograd.grad(based_attention(qg, kg, vg, spec), (qg, kg, vg), do)
        elif name == "compiled_fwd":
            fn = compiled(lambda q, k, v: based_attention(q, k, v, spec))
            made[name] = no_grad(lambda: fn(q, k, v))
        elif name == "compiled_fwdbwd":
            fn2 = compiled(lambda q, k, v: based_attention(q, k, v, spec))
            made[name] = lambda: torch.autograd.grad(fn2(qg, kg, vg), (qg, kg, vg), do)
        elif name in ("parallel_forward", "parallel_backward", "bare_launch"):
            from based_compile.kernels import parallel
            from based_compile.kernels.arguments import check_arguments
            args = check_arguments(q, k, v, spec.scale)
            if name == "parallel_forward":
                made[name] = no_grad(lambda: parallel.parallel_forward(q, k, v, args))
            elif name == "parallel_backward":
                made[name] = no_grad(lambda: parallel.parallel_backward(q, k, v, o, z, do, args))
            else:
                made[name] = _bare_launch(parallel, q, k, v, o, z, args)
        else:
            raise SystemExit(f"--cases: unknown case {name!r}; choose from {CASES}")
    return made


def _bare_launch(parallel, q, k, v, o, z, args):
    """The parallel forward kernel's launch alone, every argument computed beforehand (Triton's own
    launcher: what is left when none of our code runs)."""
    cfg = parallel.launch_configs(args, q.dtype)["fwd"]
    bk, bv = max(16, 1 << (args.dk - 1).bit_length()), min(max(16, 1 << (args.dv - 1).bit_length()), 128)
    grid = (-(-args.length // cfg.block_t), -(-args.dv // bv), args.batch * args.heads)
    c0, c1, c2 = args.coeffs[0], args.coeffs[1] * args.scale, args.coeffs[2] * args.scale ** 2
    positional = (q, k, v, o, z, *q.stride(), *k.stride(), *v.stride(), *o.stride(), args.length, args.heads,
                  args.group, c0, c1, c2, args.eps)
    named = dict(DK=args.dk, DV=args.dv, BK=bk, BV=bv, BT=cfg.block_t, BS=cfg.block_s, CAUSAL=args.causal,
                 NORMALIZE=args.normalize, PRECISION="ieee" if q.dtype == parallel.torch.float32 else "tf32",
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    kernel = parallel._parallel_fwd_kernel[grid]
    return lambda: kernel(*positional, **named)


def measure(args) -> dict:
    device = _device(args)
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported: the kernels' launch code runs on CPU tensors
    import torch
    import based_compile
    import based_compile.op.custom_op  # noqa: F401  (registers the operators)
    import based_compile.op.recurrent_step  # noqa: F401
    import based_compile.op.attention_with_state  # noqa: F401

    torch.set_num_threads(args.threads)
    if device == "cpu":
        _no_compute()
    based_compile.config.kernel = args.kernel or ("parallel" if device == "cpu" else "auto")
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases, errors = {}, {}
    for name, fn in _cases(device, names).items():
        print(f"[{device}] warming {name}", file=sys.stderr, flush=True)
        try:
            for _ in range(3):
                fn()                                  # compile, plan, warm the caches
            cases[name] = fn
        except Exception as e:   # an old tree without the operator: reported, the others go on
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {name: [] for name in cases}
    for i in range(args.rounds):
        print(f"[{device}] round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, fn in cases.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    if args.profile:
        import cProfile
        import pstats
        fn = cases[args.profile]
        prof = cProfile.Profile()
        prof.runcall(lambda: [fn() for _ in range(args.calls * 3)])
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return {"device": device, "torch": torch.__version__, "kernel": based_compile.config.kernel,
            "calls": args.calls, "rounds": args.rounds, "shape": [B, H, T, DK, DV],
            "package": str(pathlib.Path(based_compile.__file__).parent),
            "us_per_call": {name: statistics.median(ts) for name, ts in times.items()},
            "us_per_call_min": {name: min(ts) for name, ts in times.items()}, "errors": errors}


def _tree_of(ref: str, folder: pathlib.Path) -> pathlib.Path:
    """based_compile (with kernels/ inside it, as installed) of git REF under folder; REF may also be
    a folder holding based_compile/ and kernels/ (a checkout, or ``git archive REF based_compile
    kernels`` unpacked: for a machine that has the working tree but not its git history)."""
    given = pathlib.Path(ref)
    folder.mkdir(parents=True)
    if given.is_dir():
        if not ((given / "based_compile").is_dir() and (given / "kernels").is_dir()):
            raise SystemExit(f"--compare {ref}: the folder must hold based_compile/ and kernels/")
        shutil.copytree(given / "based_compile", folder / "based_compile", ignore=shutil.ignore_patterns("kernels"))
        shutil.copytree(given / "kernels", folder / "based_compile" / "kernels")
        return folder
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "based_compile", "kernels"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--compare {ref}: neither a folder nor a git ref here ({archive.stderr.decode().strip()})")
    archive = archive.stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    (folder / "kernels").rename(folder / "based_compile" / "kernels")
    return folder


def compare(args) -> dict:
    worker = [sys.executable, str(pathlib.Path(__file__).resolve()), "--json-only", "--calls", str(args.calls),
              "--rounds", str(args.rounds), "--cases", args.cases, "--threads", str(args.threads)]
    for flag, value in (("--device", args.device), ("--kernel", args.kernel)):
        if value:
            worker += [flag, value]
    runs = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": _tree_of(args.compare, pathlib.Path(tmp, "old")), "new": _tree_of(str(ROOT), pathlib.Path(tmp, "new"))}
        path = os.environ.get("PYTHONPATH")
        envs = {name: dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree)] + ([path] if path else [])))
                for name, tree in trees.items()}
        for i in range(args.processes):
            for which in ("old", "new") if i % 2 == 0 else ("new", "old"):
                print(f"[{which} {i + 1}/{args.processes}] running", file=sys.stderr, flush=True)
                out = subprocess.run(worker, env=envs[which], capture_output=True, text=True, cwd=tmp)
                if out.returncode != 0:
                    raise SystemExit(f"the {which} tree's run failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = {}
    for name in runs["new"][0]["us_per_call"]:
        olds = [r["us_per_call"][name] for r in runs["old"] if name in r["us_per_call"]]
        news = [r["us_per_call"][name] for r in runs["new"]]
        table[name] = {"old": statistics.median(olds) if olds else None, "new": statistics.median(news)}
    return {"ref": args.compare, "device": runs["new"][0]["device"], "kernel": runs["new"][0]["kernel"],
            "packages": [runs["old"][0]["package"], runs["new"][0]["package"]], "cases": table,
            "errors_old": runs["old"][0]["errors"], "errors_new": runs["new"][0]["errors"], "runs": runs}


def main(argv=None) -> int:
    args = _parse(argv)
    if args.compare:
        res = compare(args)
        print(f"\nhost us per call, {res['device']}, kernel setting {res['kernel']}, "
              f"B={B} H={H} T={T} Dk={DK} Dv={DV} ({res['ref']} = old)")
        print("old from", res["packages"][0], "| new from", res["packages"][1])
        print(f"| case | old ({res['ref']}) | new | new/old |\n| --- | --- | --- | --- |")
        for name, row in res["cases"].items():
            old = "-" if row["old"] is None else f"{row['old']:.1f}"
            ratio = "" if row["old"] is None else f"{row['new'] / row['old']:.2f}"
            print(f"| {name} | {old} | {row['new']:.1f} | {ratio} |")
        for which in ("old", "new"):
            for name, err in res[f"errors_{which}"].items():
                print(f"{which}: {name} failed: {err}")
    else:
        res = measure(args)
        if args.json_only:
            print(json.dumps(res))
            return 0
        print(f"\nhost us per call, {res['device']}, kernel setting {res['kernel']}, "
              f"B={B} H={H} T={T} Dk={DK} Dv={DV}, torch {res['torch']}")
        print("| case | median us | min us |\n| --- | --- | --- |")
        for name, us in res["us_per_call"].items():
            print(f"| {name} | {us:.1f} | {res['us_per_call_min'][name]:.1f} |")
        for name, err in res["errors"].items():
            print(f"{name} failed: {err}")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
