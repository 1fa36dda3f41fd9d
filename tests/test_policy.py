"""Kernel policy: decisions by device, mode and shape; forcing through config and the environment."""
from __future__ import annotations

import pytest
import torch

from based_compile.op import config, cpu_path, policy
from based_compile.kernels import fused_chunk
from based_compile.op.custom_op import based_attention
from based_compile.op.policy import Crossover, decide_for
from based_compile.op.spec import BasedSpec
from conftest import make_inputs

BF16, F32 = torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def no_forcing(monkeypatch):
    """Every test starts from the default settings: config.kernel = "auto", no environment variable."""
    monkeypatch.setattr(config, "kernel", "auto")
    monkeypatch.delenv(config.KERNEL_ENV_VAR, raising=False)


# (device, training, T, Dk, Dv, B*H, dtype) -> kernel
CASES = [
    ("cpu", False, 16, 16, 64, 4, F32, "cpu_quadratic"),
    ("cpu", False, 32768, 16, 64, 4, F32, "cpu_chunked"),
    ("cpu", True, 16, 16, 64, 4, F32, "cpu_quadratic"),
    ("cpu", True, 32768, 16, 64, 4, F32, "cpu_chunked"),
    ("cpu", False, 32768, 128, 128, 1, torch.float64, "cpu_chunked"),
    ("cuda", False, 128, 16, 64, 256, BF16, "parallel"),
    ("cuda", False, 65536, 16, 64, 256, BF16, "chunked"),
    ("cuda", False, 65536, 16, 64, 1, F32, "chunked"),
    ("cuda", True, 1024, 16, 64, 256, BF16, "parallel"),
    ("cuda", True, 65536, 16, 64, 256, BF16, "chunked"),
    ("cuda", True, 65536, 16, 128, 256, BF16, "chunked"),
    ("cuda", True, 65536, 16, 128, 256, torch.float16, "fused_chunk"),   # float16 at Dv > 64: not measured
    ("cuda", True, 65536, 16, 256, 256, BF16, "fused_chunk"),
    ("cuda", True, 65536, 16, 64, 16, BF16, "chunked"),         # few heads: chunked from 16384
    ("cuda", True, 8192, 16, 64, 16, BF16, "parallel"),
    ("cuda", False, 2048, 16, 64, 256, BF16, "parallel"),       # measured crossovers (policy.py)
    ("cuda", False, 4096, 16, 64, 256, BF16, "chunked"),
    ("cuda", False, 8192, 16, 64, 256, BF16, "chunked"),
    ("cuda", False, 2048, 16, 128, 256, BF16, "chunked"),       # 0.553 ms, parallel 0.602 (fifteenth session)
    ("cuda", False, 2048, 16, 128, 256, torch.float16, "parallel"),
    ("cuda", False, 1024, 16, 128, 256, BF16, "parallel"),
    ("cuda", False, 4096, 16, 128, 256, BF16, "chunked"),      # Dv = 128 measured: chunked ahead of fused chunk
    ("cuda", False, 4096, 16, 256, 256, BF16, "fused_chunk"),
    ("cuda", False, 4096, 16, 128, 16, BF16, "parallel"),
    ("cuda", False, 8192, 16, 128, 16, BF16, "chunked"),
    ("cuda", True, 1024, 16, 128, 256, BF16, "parallel"),
    ("cuda", True, 2048, 16, 128, 256, BF16, "chunked"),      # chunked 1.68 ms, parallel 1.99 (thirteenth session)
    ("cuda", True, 2048, 16, 128, 256, torch.float16, "parallel"),
    ("cuda", True, 4096, 16, 128, 16, BF16, "parallel"),
    ("cuda", True, 8192, 16, 128, 16, BF16, "chunked"),
    ("cuda", False, 4096, 16, 64, 16, BF16, "parallel"),        # few heads: parallel ahead up to 4096
    ("cuda", False, 8192, 16, 64, 16, BF16, "chunked"),
    ("cuda", True, 2048, 16, 64, 256, BF16, "chunked"),         # 0.848 ms, parallel 0.975 (sixteenth session)
    ("cuda", True, 2048, 16, 64, 64, BF16, "parallel"),         # B*H = 64: parallel 0.293, chunked 0.907
    ("cuda", True, 2048, 16, 64, 256, F32, "parallel"),         # float32 not measured at 2048
    ("cuda", True, 1024, 16, 64, 256, BF16, "parallel"),
    ("cuda", True, 4096, 16, 64, 256, BF16, "chunked"),         # chunked ahead of both in training
    ("cuda", True, 4096, 16, 64, 256, F32, "chunked"),
    ("cuda", True, 4096, 16, 64, 256, torch.float16, "parallel"),   # float16: the segment-walking backward
    ("cuda", True, 8192, 16, 64, 256, torch.float16, "chunked"),
    ("cuda", True, 8192, 16, 64, 256, BF16, "chunked"),
    ("cuda", True, 16384, 16, 64, 256, BF16, "chunked"),
    ("cuda", False, 16384, 16, 64, 256, BF16, "chunked"),       # ... and in inference
    ("cuda", False, 16384, 16, 256, 256, BF16, "fused_chunk"),  # Dv > 128: not measured, fused chunk
    ("cuda", True, 4096, 32, 64, 256, BF16, "parallel"),        # Dk = 32: chunked from 8192 (B*H >= 64)
    ("cuda", True, 8192, 32, 64, 256, BF16, "chunked"),
    ("cuda", True, 8192, 32, 64, 256, torch.float16, "parallel"),
    ("cuda", True, 8192, 32, 64, 16, BF16, "parallel"),         # ... from 16384 below
    ("cuda", True, 16384, 32, 64, 16, BF16, "chunked"),
    ("cuda", False, 4096, 32, 64, 256, BF16, "parallel"),
    ("cuda", False, 8192, 32, 64, 256, BF16, "chunked"),
    ("cuda", False, 8192, 32, 64, 16, BF16, "parallel"),
    ("cuda", False, 16384, 32, 64, 16, BF16, "chunked"),
    ("cuda", False, 65536, 32, 128, 256, BF16, "parallel"),     # Dk = 32, Dv = 128: not measured; fused chunk slower at Dk=32
    ("cuda", False, 65536, 64, 64, 256, BF16, "parallel"),      # fused_chunk supports Dk <= 32
    ("cuda", True, 1 << 20, 128, 256, 256, BF16, "parallel"),
]


@pytest.mark.parametrize("device,training,t,dk,dv,bh,dtype,expected", CASES)
def test_decision_table(device, training, t, dk, dv, bh, dtype, expected):
    d = decide_for(device, training, t, dk, dv, bh, dtype)
    assert d.kernel == expected, d
    assert ("training" if training else "inference") in d.reason


@pytest.mark.parametrize("device,table", [("cuda", policy.CUDA_CROSSOVERS), ("cpu", policy.CPU_CROSSOVERS)])
def test_every_crossover_row_switches_at_its_t(device, table):
    short, long = ("parallel", "fused_chunk") if device == "cuda" else ("cpu_quadratic", "cpu_chunked")
    checked = 0
    for row in table:
        dk = row.max_dk if row.max_dk < 1 << 30 else 16
        dtype = row.dtypes[0] if row.dtypes else BF16
        # Sizes for which this row is the first that matches, so that the boundary is its own.
        dvs = [row.max_dv] if row.max_dv < 1 << 30 else [64, 128, 256]
        chunked_rows = policy.CUDA_CHUNKED if device == "cuda" else ()
        dv = next((dv for dv in dvs
                   if next(r for r in table if r.matches(row.training, dk, dv, row.min_bh, dtype)) is row
                   and not any(r.matches(row.training, dk, dv, row.min_bh, dtype) for r in chunked_rows)), None)
        if dv is None:
            continue
        assert decide_for(device, row.training, row.t - 1, dk, dv, row.min_bh, dtype).kernel == short
        d = decide_for(device, row.training, row.t, dk, dv, row.min_bh, dtype)
        assert d.kernel == long and f"T={row.t} >= {row.t}" in d.reason
        checked += 1
    assert checked == len(table), "a row that no call can reach"


def test_every_chunked_row_switches_at_its_t():
    checked = 0
    for row in policy.CUDA_CHUNKED:
        # a Dv and dtype for which this row is the first that matches, so that the boundary is its own
        dv, dtype = next(((dv, d) for dv in (64, row.max_dv) for d in (BF16, F32, torch.float16)
                          if (not row.dtypes or d in row.dtypes) and next(
                              r for r in policy.CUDA_CHUNKED if r.matches(row.training, row.max_dk, dv, row.min_bh, d))
                          is row), (None, None))
        if dtype is None:
            continue
        assert decide_for("cuda", row.training, row.t - 1, row.max_dk, dv, row.min_bh, dtype).kernel != "chunked"
        d = decide_for("cuda", row.training, row.t, row.max_dk, dv, row.min_bh, dtype)
        assert d.kernel == "chunked" and f"T={row.t} >= {row.t}" in d.reason
        checked += 1
    assert checked == len(policy.CUDA_CHUNKED), "a row that no call can reach"


def test_chunked_is_never_chosen_beyond_its_limits():
    from based_compile.kernels import chunked
    for t in (4096, 1 << 16, 1 << 22):
        for training in (False, True):
            for dtype in (BF16, F32, torch.float16):
                for dk, dv in ((chunked.MAX_DK + 1, 64), (64, 64), (128, 128), (16, chunked.MAX_DV + 1)):
                    assert decide_for("cuda", training, t, dk, dv, 256, dtype).kernel != "chunked"


def test_fused_chunk_limit_is_respected_at_every_length():
    for t in (1, 4096, 1 << 22):
        for training in (False, True):
            d = decide_for("cuda", training, t, fused_chunk.MAX_DK + 1, 64, 1024, BF16)
            assert d.kernel == "parallel" and "limit" in d.reason


def test_fewer_heads_never_switch_earlier():
    """fused_chunk parallelises over B*H only: with fewer heads it must not be chosen at a shorter T."""
    def crossover(bh, training):
        return next(t for t in (2 ** i for i in range(6, 24))
                    if decide_for("cuda", training, t, 16, 64, bh, BF16).kernel in ("fused_chunk", "chunked"))

    for training in (False, True):
        assert crossover(1, training) >= crossover(1024, training)
    # (training may switch earlier than inference: at B*H = 256, T = 2048 the chunked kernel's forward and
    # backward beat the parallel kernel's, 0.848 against 0.975 ms, its forward alone not, 0.271 against 0.252)
    assert crossover(1024, True) == 2048 and crossover(1024, False) == 4096


def test_crossover_row_matching():
    row = Crossover(training=False, t=100, max_dk=16, max_dv=64, min_bh=8, dtypes=(BF16,))
    assert row.matches(False, 16, 64, 8, BF16)
    assert not row.matches(True, 16, 64, 8, BF16)
    assert not row.matches(False, 17, 64, 8, BF16)
    assert not row.matches(False, 16, 65, 8, BF16)
    assert not row.matches(False, 16, 64, 7, BF16)
    assert not row.matches(False, 16, 64, 8, F32)


def test_describe_reads_sizes_through_the_layout():
    q, k, v = make_inputs(2, 3, 40, 8, 4, layout="BTHD", dtype=F32)       # [B, T, H, D]
    text = policy.describe(BasedSpec(layout="BTHD"), q, k, v, training=False)
    assert text == "cpu_quadratic: inference, T=40 < %d" % policy.CPU_CROSSOVERS[0].t
    cuda_row = policy.CUDA_CROSSOVERS[0]
    assert str(decide_for("cuda", False, 8192, 16, 256, 256, BF16)) == f"fused_chunk: inference, T=8192 >= {cuda_row.t}"


def test_is_training():
    q, k, v = make_inputs(1, 1, 4, 2, 2)
    assert not policy.is_training(q, k, v)
    k.requires_grad_(True)
    assert policy.is_training(q, k, v)
    with torch.no_grad():
        assert not policy.is_training(q, k, v)
    with torch.inference_mode():
        assert not policy.is_training(q, k, v)
    with pytest.raises(TypeError, match="training"):
        decide_for("cpu", 1, 4, 2, 2, 1, F32)


# ---------------------------------------------------------------------------------------------
# Forcing
# ---------------------------------------------------------------------------------------------
def test_force_by_config(monkeypatch):
    monkeypatch.setattr(config, "kernel", "fused_chunk")
    d = decide_for("cuda", True, 16, 16, 64, 1, BF16)
    assert d.kernel == "fused_chunk" and "based_compile.config.kernel" in d.reason
    monkeypatch.setattr(config, "kernel", "parallel")
    assert decide_for("cuda", False, 1 << 20, 16, 64, 1024, BF16).kernel == "parallel"


def test_force_by_environment(monkeypatch):
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "fused_chunk")
    d = decide_for("cuda", True, 16, 16, 64, 1, BF16)
    assert d.kernel == "fused_chunk" and config.KERNEL_ENV_VAR in d.reason
    monkeypatch.setattr(config, "kernel", "parallel")                       # the Python setting wins
    assert decide_for("cuda", True, 16, 16, 64, 1, BF16).kernel == "parallel"
    monkeypatch.setattr(config, "kernel", "auto")
    for auto in ("auto", ""):
        monkeypatch.setenv(config.KERNEL_ENV_VAR, auto)
        assert decide_for("cuda", False, 128, 16, 64, 1, BF16).kernel == "parallel"


def test_invalid_settings_raise(monkeypatch):
    monkeypatch.setattr(config, "kernel", "flash")
    with pytest.raises(ValueError, match=r"based_compile\.config\.kernel.*'flash'"):
        decide_for("cpu", False, 16, 16, 64, 1, F32)
    monkeypatch.setattr(config, "kernel", "auto")
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "Parallel")
    with pytest.raises(ValueError, match=f"{config.KERNEL_ENV_VAR}.*'Parallel'"):
        decide_for("cpu", False, 16, 16, 64, 1, F32)
    q, k, v = make_inputs(1, 1, 8, 4, 4)
    with pytest.raises(ValueError, match=config.KERNEL_ENV_VAR):                # through the operator
        based_attention(q, k, v, BasedSpec())


def test_cpu_kernels_cannot_be_forced_on_cuda(monkeypatch):
    monkeypatch.setattr(config, "kernel", "cpu_chunked")
    with pytest.raises(ValueError, match="CPU tensors only"):
        decide_for("cuda", False, 16, 16, 64, 1, BF16)
    with pytest.raises(ValueError, match="cpu or cuda"):
        decide_for("mps", False, 16, 16, 64, 1, F32)


def test_forced_triton_kernel_on_cpu(monkeypatch):
    monkeypatch.setattr(config, "kernel", "fused_chunk")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    d = decide_for("cpu", False, 16, 16, 64, 1, F32)
    assert d.kernel == "cpu_chunked" and "PyTorch form" in d.reason
    monkeypatch.setattr(config, "kernel", "parallel")
    assert decide_for("cpu", False, 1 << 20, 16, 64, 1, F32).kernel == "cpu_quadratic"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert decide_for("cpu", False, 16, 16, 64, 1, F32).kernel == "parallel"
    monkeypatch.setattr(config, "kernel", "chunked")
    assert decide_for("cpu", False, 16, 16, 64, 1, F32).kernel == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert decide_for("cpu", True, 16, 16, 64, 1, F32).kernel == "cpu_chunked"
    assert decide_for("cuda", False, 16, 16, 64, 1, BF16).kernel == "chunked"          # forced: any mode


def test_operator_follows_the_environment_and_the_mode(monkeypatch):
    seen = []
    decide = policy.decide_for
    monkeypatch.setattr(policy, "decide_for", lambda *a: seen.append(a[1]) or decide(*a))
    chunked = []
    forward, chunked_backward = cpu_path.chunked_forward, cpu_path.chunked_backward
    monkeypatch.setattr(cpu_path, "chunked_forward", lambda *a, **kw: chunked.append(1) or forward(*a, **kw))
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "cpu_chunked")
    q, k, v = make_inputs(1, 2, 10, 4, 4, requires_grad=True)
    o = based_attention(q, k, v, BasedSpec(scale=0.5))
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "cpu_quadratic")   # too late: the backward is the forward's kernel's
    backward = []
    monkeypatch.setattr(cpu_path, "chunked_backward", lambda *a, **kw: backward.append(1) or chunked_backward(*a, **kw))
    o.sum().backward()
    assert chunked == [1] and backward == [1] and seen == [True]              # decided once, in training mode
    monkeypatch.setenv(config.KERNEL_ENV_VAR, "cpu_chunked")
    with torch.no_grad():
        based_attention(q, k, v, BasedSpec(scale=0.5))
    assert chunked == [1, 1] and seen[-1] is False


# crossover tables whose (B, T) rows a later run measured again (after a kernel change): the later one counts
REMEASURED_BY = {"crossover": ("crossover_short",)}


@pytest.mark.parametrize("name", ["crossover", "crossover_short", "crossover_dk32_dv64", "crossover_dk16_dv128"])
def test_policy_picks_the_fastest_measured_kernel(name):
    """Every row of the H200 crossover measurements (benchmarks/results, the README's tables): the kernel the
    policy picks is the fastest measured there, or within 10% of it (run-to-run noise of short calls)."""
    import json
    import pathlib

    def load(n):
        return json.loads((pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"{n}.json")
                          .read_text())

    data = load(name)
    c = data["config"]
    later = set()
    for n in REMEASURED_BY.get(name, ()):
        newer = load(n)
        assert newer["config"] == c and newer["date"] > data["date"], (name, n)
        later |= {(r["B"], r["T"]) for r in newer["rows"]}
    for row in data["rows"]:
        if (row["B"], row["T"]) in later:
            continue
        for mode, training in (("fwd", False), ("fwdbwd", True)):
            times = {k: row[f"{k}_{mode}"] for k in ("parallel", "fused_chunk", "chunked") if f"{k}_{mode}" in row}
            pick = decide_for("cuda", training, row["T"], c["Dk"], c["Dv"], row["B"] * c["H"], BF16).kernel
            assert pick in times, (name, row, mode, pick)
            assert times[pick] <= 1.1 * min(times.values()), (name, row["B"], row["T"], mode, pick, times)


def test_cuda_over_the_grid_limit_takes_the_pytorch_forms(monkeypatch):
    """B*H > 65535 does not fit the Triton kernels' grid (a program per (batch, head) on axis 1 or 2):
    'auto' picks the PyTorch form of what it would have picked; a forced kernel stays (and raises)."""
    from based_compile.kernels.launch import MAX_GRID_ROWS
    assert MAX_GRID_ROWS == 65535
    for training, t, expected in ((False, 128, "parallel"), (True, 1 << 16, "chunked"), (False, 1 << 16, "chunked")):
        assert decide_for("cuda", training, t, 16, 64, MAX_GRID_ROWS, BF16).kernel == expected
        d = decide_for("cuda", training, t, 16, 64, MAX_GRID_ROWS + 1, BF16)
        assert d.kernel == policy.PYTORCH_FORM_OF[expected]
        assert f"B*H={MAX_GRID_ROWS + 1} > {MAX_GRID_ROWS}" in d.reason
    # queries against a KV cache: the decode kernel (B*H on axis 0) still; training the PyTorch form
    assert decide_for("cuda", False, 1, 16, 64, 1 << 20, BF16, tk=100).kernel == "decode"
    assert decide_for("cuda", True, 1, 16, 64, 1 << 20, BF16, tk=100).kernel == "pytorch_quadratic"
    monkeypatch.setattr(config, "kernel", "parallel")
    assert decide_for("cuda", False, 128, 16, 64, 1 << 20, BF16).kernel == "parallel"
