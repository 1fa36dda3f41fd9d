"""Where the GPU time of one e2e training step goes, by kernel (device diagnosis, not a benchmark).

python scripts/profile_step.py --variants based,inductor [e2e.py model arguments...]
Prints, per variant, GPU ms per step by kernel class and the top kernels.
"""
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import e2e  # noqa: E402

CLASSES = (("attention", ("_parallel_", "_fused_chunk_", "based")),
           ("gemm", ("gemm", "nvjet", "cutlass", "sm90_", "xmma", "ampere_", "Kernel2")),
           ("conv", ("conv", "cudnn", "depthwise")),
           ("optimizer", ("multi_tensor", "adam", "Adam")),
           ("loss", ("log_softmax", "softmax", "SoftMax", "nll_loss", "cross_entropy")),
           ("triton (Inductor)", ("triton_",)),
           ("copy/cast", ("copy", "elementwise_kernel", "fill", "cat")))


def classify(name):
    for cls, marks in CLASSES:
        if any(m in name for m in marks):
            return cls
    return "other"


def main():
    argv = sys.argv[1:]
    variants = "based,inductor"
    if "--variants" in argv:
        i = argv.index("--variants")
        variants = argv[i + 1]
        del argv[i:i + 2]
    args = e2e.parse_args(argv + ["--lengths", "2048"])
    device = torch.device("cuda")
    if args.fix_cantsplit:
        import inductor_cantsplit
        inductor_cantsplit.patch()
    model = e2e.build_model(args, device)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    t = 2048
    batch = args.tokens // t
    for variant in variants.split(","):
        run = e2e.runner_for(model, state, variant, "train", device, torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        ids = torch.randint(0, args.vocab_size, (batch, t + 1), device=device)
        x, y = ids[:, :-1], ids[:, 1:]

        def step():
            logits = run(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        calls = 2
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                step()
            torch.cuda.synchronize()
        by_class = defaultdict(float)
        rows = []
        for ev in prof.key_averages():
            if ev.device_type != DeviceType.CUDA:
                continue
            us = getattr(ev, "self_device_time_total", None) or ev.self_cuda_time_total
            ms = us / calls / 1e3
            by_class[classify(ev.key)] += ms
            rows.append((ms, ev.count // calls, ev.key))
        total = sum(by_class.values())
        print(f"== {variant}: GPU {total:.1f} ms per step (B={batch}, T={t})")
        for cls, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
            print(f"   {cls:20s} {ms:7.2f} ms")
        for ms, n, key in sorted(rows, reverse=True)[:28]:
            print(f"   {ms:7.2f} ms  x{n:<4d} {classify(key)[:9]:9s} {key[:110]}")
        del opt
        model.zero_grad(set_to_none=True)
        e2e.free_memory(device)


if __name__ == "__main__":
    main()
