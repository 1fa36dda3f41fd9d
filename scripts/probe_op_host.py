"""Host cost of the op's eager path, piece by piece (GPU; run as ``python scripts/probe_op_host.py``).

At B=1 H=1 T=64 (the GPU idle between launches, so a step's wall time is the host's), forward and
forward+backward of: the kernel's public function (direct), ``based_attention`` (op), the op's
eager entry past its argument checks (op_eager), its autograd.Function alone (op_apply) and the
kernels' own autograd.Function with checked arguments (kfn_apply). The variants alternate every
step (order reversed every other round), so the host's drift falls on all alike; medians and
lower quartiles of 1400 steps each (the first 100 dropped).
"""
import statistics, time, torch
from based_compile.op import custom_op as ops
from based_compile.op.custom_op import based_attention, _AttentionAutograd, _eager_attention
from based_compile.op.spec import BasedSpec
from based_compile.kernels import parallel_based
from based_compile.kernels.function import BasedKernelFunction
from based_compile.kernels.parallel import parallel_forward, parallel_backward, check_parallel_arguments

spec = BasedSpec(scale=0.25)
q, k = (torch.randn(1, 1, 64, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
v = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
do = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
params = (*spec.op_arguments, True)
args = check_parallel_arguments(q, k, v, 0.25)
variants = {
    "direct": lambda: parallel_based(q, k, v, scale=0.25),
    "op": lambda: based_attention(q, k, v, spec),
    "op_eager": lambda: _eager_attention(q, k, v, params),
    "op_apply": lambda: _AttentionAutograd.apply(None, q, k, v, params),
    "kfn_apply": lambda: BasedKernelFunction.apply(q, k, v, args, parallel_forward, parallel_backward),
}
for mode in ("fwd+bwd", "fwd"):
    times = {n: [] for n in variants}
    for r in range(1500):
        for n, f in (variants.items() if r % 2 else reversed(variants.items())):
            torch.cuda.synchronize()
            s = time.perf_counter()
            if mode == "fwd":
                with torch.no_grad():
                    f()
            else:
                torch.autograd.grad(f(), (q, k, v), do)
            torch.cuda.synchronize()
            times[n].append(time.perf_counter() - s)
    for n, t in times.items():
        t = t[100:]
        print(f"{mode:8s} {n:10s} median {statistics.median(t)*1e6:7.1f} us  p25 {statistics.quantiles(t, n=4)[0]*1e6:7.1f}")
