"""The chunked kernel's forward (kernels/prefix_chunked.py) against float64, launch by launch.

CPU runs go through Triton's interpreter with state chunks of 32 tokens and 16-token tiles, so
T = 45..77 spans several chunks with a partial last one; `target` forces segments (the scan and the
segment prefix in the output kernel), `bv` value blocks. Every buffer starts as NaN
(POISON_OUTPUTS). The gradients of the chunked kernel (this forward + chunked.py's backward) are
tested in test_chunked.py; `-m gpu` runs realistic shapes with the GPU's launches.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from compare import assert_rel_close
from conftest import make_inputs

from based_compile.kernels import naive_parallel_based, prefix_chunked
from based_compile.kernels.arguments import check_arguments

SMALL = prefix_chunked.PrefixConfig(c=32, bt=16, bs=16, bts=16, bv=64, target=1)
SIGNED = (0.3, -0.7, 0.25)
TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(prefix_chunked, "POISON_OUTPUTS", True)


def _check(b, h, t, dk, dv, cfg, *, kv_heads=None, layout="BHTD", causal=True, normalize=True,
           coeffs=(1.0, 1.0, 0.5), dtype=torch.float32, device="cpu", tol=None, scale=None):
    q, k, v = make_inputs(b, h, t, dk, dv, kv_heads=kv_heads, layout=layout, device=device)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kw = dict(coeffs=coeffs, causal=causal, normalize=normalize, layout=layout, scale=scale)
    args = check_arguments(q, k, v, **kw)
    o, z = prefix_chunked.prefix_forward(q, k, v, args, cfg)
    ref = naive_parallel_based(q.double(), k.double(), v.double(), **kw)
    what = f"T={t} Dk={dk} Dv={dv} {layout} kv_heads={kv_heads} causal={causal} normalize={normalize} {cfg}"
    assert o.dtype == dtype and o.shape == ref.shape and o.stride() == q.new_empty(ref.shape).stride()
    assert_rel_close(o, ref, TOL[dtype] if tol is None else tol, f"o ({what})")
    if normalize:
        ones = torch.ones_like(ref[..., :1])
        group = h // (kv_heads or h)
        kr = k.double().repeat_interleave(group, 2 if layout == "BTHD" else 1)
        z_ref = naive_parallel_based(q.double(), kr, ones, normalize=False, **{x: kw[x] for x in
                                     ("coeffs", "causal", "layout", "scale")})[..., 0]
        if layout == "BTHD":
            z_ref = z_ref.transpose(1, 2)
        assert z.dtype == torch.float32 and z.shape == (b, h, t)
        assert_rel_close(z, z_ref, TOL[dtype] if tol is None else tol, f"z ({what})")
    else:
        assert z is None


@pytest.mark.parametrize("t,dk,dv,kv_heads,layout,causal,normalize,changes", [
    (77, 16, 64, None, "BHTD", True, True, {}),
    (77, 16, 64, 1, "BTHD", True, True, dict(target=100)),                 # 3 segments: scan + prefix
    (50, 8, 24, 2, "BHTD", True, True, dict(bv=16, target=100)),          # 2 value blocks, GQA
    (45, 16, 40, None, "BTHD", False, True, dict(bv=16)),                 # non-causal: the total only
    (45, 16, 32, None, "BHTD", True, False, dict(target=100)),            # unnormalised, signed f
    (70, 32, 32, None, "BTHD", True, True, dict(target=100)),             # Dk = 32: 8 pair blocks
    (33, 5, 33, None, "BHTD", True, True, dict(zdot=False)),              # float32 normaliser sums
    (64, 16, 64, None, "BHTD", True, True, dict(c=64, bt=32, bts=32)),    # T a multiple of the chunk
    (1, 1, 3, None, "BHTD", True, True, {}),
    (77, 16, 64, 1, "BTHD", True, True, dict(pair_rows=128, target=100)),  # one state program: A and B
    (45, 16, 40, None, "BHTD", False, True, dict(pair_rows=128, bv=16)),
    (45, 12, 32, None, "BTHD", True, False, dict(pair_rows=128, state_bv=16)),
    (70, 32, 32, None, "BHTD", True, True, dict(pair_rows=128)),           # Dk = 32: 4 pair blocks + B
    # the state kernel's features formed as [keys, rows] (transposed in the dot: the launch before state_trans)
    (77, 16, 64, 1, "BTHD", True, True, dict(state_trans=False, target=100)),
    (45, 16, 40, None, "BHTD", False, True, dict(state_trans=False, bv=16)),
    (45, 12, 32, None, "BTHD", True, False, dict(state_trans=False, pair_rows=128, state_bv=16)),
    (33, 5, 33, None, "BHTD", True, True, dict(state_trans=False, zdot=False)),
    (70, 32, 32, None, "BHTD", True, True, dict(state_trans=False, pair_rows=128)),
])
def test_forward_matches_float64(t, dk, dv, kv_heads, layout, causal, normalize, changes):
    _check(1, 4 if kv_heads else 2, t, dk, dv, dataclasses.replace(SMALL, **changes), kv_heads=kv_heads,
           layout=layout, causal=causal, normalize=normalize, coeffs=(1.0, 1.0, 0.5) if normalize else SIGNED)


@pytest.mark.parametrize("mode,state_mode,state_trans", [(0, 0, False), (1, 1, False), (2, 2, False),
                                                      (2, -1, False), (0, 0, True), (1, 1, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_way_of_forming_the_pair_factors(mode, state_mode, state_trans, dtype):
    """Gathered loads, tl.gather and one-hot dots, in the state and the output kernels; the state kernel's
    features formed transposed (its mode then unused)."""
    cfg = dataclasses.replace(SMALL, mode=mode, state_mode=state_mode, target=100, state_bv=32,
                              state_trans=state_trans)
    _check(1, 2, 61, 16, 64, cfg, kv_heads=1, dtype=dtype, layout="BTHD")


@pytest.mark.parametrize("causal", [True, False])
def test_large_eps_scale_and_coefficients(causal):
    """eps = 0.5, scale = 0.37 and a polynomial without real roots (the normaliser stays away from 0)."""
    q, k, v = make_inputs(1, 2, 40, 16, 24, dtype=torch.float32)
    args = check_arguments(q, k, v, scale=0.37, coeffs=(0.5, 1.0, 0.75), causal=causal, eps=0.5)
    o, _ = prefix_chunked.prefix_forward(q, k, v, args, SMALL)
    ref = naive_parallel_based(q.double(), k.double(), v.double(), scale=0.37, coeffs=(0.5, 1.0, 0.75),
                               causal=causal, eps=0.5)
    assert_rel_close(o, ref, 2e-5, "o")


@pytest.mark.parametrize("changes,match", [
    (dict(c=48), "power of two"), (dict(bt=8), "power of two"), (dict(c=32, bt=64), "whole query tiles"),
    (dict(bts=64), "state steps"), (dict(bs=32, bt=16), "whole key tiles"), (dict(state_bv=24), "state_bv"),
    (dict(pair_rows=32), "pair_rows"), (dict(mode=3), "mode"),
])
def test_bad_launches_raise(changes, match):
    q, k, v = make_inputs(1, 2, 40, 16, 24, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        prefix_chunked.prefix_forward(q, k, v, check_arguments(q, k, v), dataclasses.replace(SMALL, **changes))


# Red-team findings (2026-11-30): launches the host accepted but the kernels could not handle (silently
# wrong or unwritten), and float16 states that overflowed where the parallel kernel is exact.
@pytest.mark.parametrize("cfg,t", [
    (dict(c=32, bt=16, bs=32, bts=16, bv=16), 32),     # bs > bt: keys after the tile went in unmasked
    (dict(c=16, bt=16, bs=16, bts=32, bv=16), 48),     # bts > c: chunk slots never written
    (dict(c=64, bt=32, bs=64), 150),                   # the defaults with bt changed alone
])
def test_launches_the_kernels_cannot_run_are_refused(cfg, t):
    q, k, v = make_inputs(1, 1, t, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="PrefixConfig"):
        prefix_chunked.prefix_forward(q, k, v, check_arguments(q, k, v), dataclasses.replace(SMALL, target=1, **cfg))


@pytest.mark.parametrize("what,qs,ks,vshift,scale", [
    ("constant row: c0 sum_j v_j ~ 96000 > 65504", 1.0, 1.0, 1000.0, None),
    ("normaliser and pair rows: sum_j c2 k_a^2 > 65504", 1e-3, 50.0, 0.0, 1.0),
])
@pytest.mark.parametrize("zdot", [True, False])
def test_float16_states_do_not_overflow(what, qs, ks, vshift, scale, zdot):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 100, 16, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (q * qs).half(), (k * ks).half(), (v + vshift).half()
    args = check_arguments(q, k, v, scale=scale)
    o, z = prefix_chunked.prefix_forward(q, k, v, args, dataclasses.replace(SMALL, bv=16, zdot=zdot))
    assert torch.isfinite(z).all() and torch.isfinite(o).all(), what
    assert_rel_close(o, naive_parallel_based(q.double(), k.double(), v.double(), scale=scale), 6e-3, what)


def test_a_kv_cache_is_refused():
    q, k, v = make_inputs(1, 2, 40, 16, 24, dtype=torch.float32)
    args = check_arguments(q[:, :, -8:], k, v, shorter_queries=True)
    with pytest.raises(ValueError, match="as many queries as keys"):
        prefix_chunked.prefix_forward(q[:, :, -8:], k, v, args, SMALL)


def test_segments_follow_the_program_target():
    q, k, v = make_inputs(2, 4, 4096, 16, 64, kv_heads=2, dtype=torch.float32)
    args = check_arguments(q, k, v)
    cfg = prefix_chunked.PrefixConfig(c=256, target=256)
    # 16 chunks; 3 feature blocks x 1 value block x 4 kv heads = 12 programs a segment: 16 segments of 1
    assert prefix_chunked._segments(args, cfg, 3, 1) == 1
    assert prefix_chunked._segments(args, dataclasses.replace(cfg, target=24), 3, 1) == 8
    assert prefix_chunked._segments(args, dataclasses.replace(cfg, target=1), 3, 1) == 16


def test_state_bytes_are_linear_in_t():
    cfg = prefix_chunked.PrefixConfig(c=256, target=1)

    def count(t, **kw):
        return prefix_chunked.state_bytes(check_arguments(*make_inputs(1, 2, t, 16, 64, dtype=torch.float32), **kw),
                                          cfg)
    assert count(4096) == 2 * 16 * 161 * (64 * 2 + 4) and count(8192) == 2 * count(4096)
    assert prefix_chunked.state_dtype(torch.float16) == torch.float32                   # float16: float32 slots
    assert prefix_chunked.state_dtype(torch.bfloat16) == torch.bfloat16
    assert count(8192, causal=False) == 2 * (161 * (64 * 2 + 4) + 2 * 161 * 65 * 4)    # one slot and the total


GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("t,dk,dv,dtype,layout,kv_heads,causal,changes", [
    (8192, 16, 64, torch.bfloat16, "BHTD", None, True, {}),
    (8191, 16, 64, torch.bfloat16, "BTHD", None, False, {}),                     # non-causal: no zdot
    (4097, 16, 128, torch.bfloat16, "BTHD", 2, True, {}),
    (4096, 16, 64, torch.float16, "BTHD", None, True, dict(target=4096)),        # segments
    (2047, 16, 64, torch.float32, "BHTD", None, True, {}),
    (2048, 32, 64, torch.bfloat16, "BHTD", 2, True, dict(mode=1, state_mode=0, state_trans=False)),
    (3000, 16, 64, torch.bfloat16, "BHTD", None, True, dict(zdot=False, state_bv=32, c=128)),
    (8192, 16, 64, torch.bfloat16, "BTHD", 2, True, dict(state_trans=False)),
    (4097, 16, 128, torch.bfloat16, "BHTD", None, False, dict(state_trans=False)),
    (2047, 16, 64, torch.float32, "BHTD", None, True, dict(state_trans=False)),
    (4096, 16, 64, torch.float16, "BTHD", None, True, dict(state_trans=False, target=4096)),
    (2048, 32, 64, torch.bfloat16, "BHTD", 2, True, dict(pair_rows=128)),
])
def test_gpu_realistic_shapes(t, dk, dv, dtype, layout, kv_heads, causal, changes, no_tf32):
    cfg = dataclasses.replace(prefix_chunked.PrefixConfig(), **changes)
    _check(2, 4, t, dk, dv, cfg, kv_heads=kv_heads, layout=layout, causal=causal, dtype=dtype, device="cuda",
           tol=GPU_TOL[dtype])
