"""Device diagnosis: where does fused_chunk (bf16, T=300) stop? Each stage is timed, with a
traceback of every thread dumped if one takes over 60 s (a Triton compile or a kernel that hangs)."""
import faulthandler
import sys
import time

import torch

from based_compile.kernels import fused_chunk_based

faulthandler.dump_traceback_later(60, exit=True, file=sys.stdout)


def stage(name, fn):
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)
    faulthandler.cancel_dump_traceback_later()
    faulthandler.dump_traceback_later(60, exit=True, file=sys.stdout)
    return out


for layout, hk, coeffs, normalize, dtype in (("BHTD", 4, (1.0, 1.0, 0.5), True, torch.bfloat16),
                                             ("BTHD", 2, (0.3, -0.7, 0.25), False, torch.bfloat16),
                                             ("BTHD", 2, (0.3, -0.7, 0.25), False, torch.float32)):
    shape = (lambda h, d: (2, h, 300, d)) if layout == "BHTD" else (lambda h, d: (2, 300, h, d))
    q = torch.randn(*shape(4, 16), device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(*shape(hk, 16), device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(*shape(hk, 64), device="cuda", dtype=dtype, requires_grad=True)
    tag = f"{layout} hk={hk} normalize={normalize} {dtype}"
    o = stage(f"{tag} forward", lambda: fused_chunk_based(q, k, v, 0.25, coeffs, True, normalize, 1e-6, layout))
    stage(f"{tag} backward, contiguous do", lambda: torch.autograd.grad(o, (q, k, v), torch.randn_like(o),
                                                                        retain_graph=True))
    do = torch.randn(o.shape[0], o.shape[2], o.shape[1], o.shape[3], device="cuda", dtype=dtype).transpose(1, 2)
    stage(f"{tag} backward, transposed do", lambda: torch.autograd.grad(o, (q, k, v), do))
print("all stages finished")
