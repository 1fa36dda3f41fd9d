"""The Triton recurrent step kernels (kernels/recurrent_step.py, "flat" and "tiled") against the
float64 reference.

Every output and state buffer starts as NaN (POISON_OUTPUTS): an element the kernel forgets to write
fails. CPU runs go through Triton's interpreter at small shapes; `-m gpu` runs the decode shapes
(H = 16, Dk = 16, Dv = 64) in bfloat16 too, and through the operator on CUDA. Tests without a
variant run the default ("flat").
"""
from __future__ import annotations

import math

import pytest
import torch

from based_compile import config
from based_compile.kernels import recurrent_step as step_kernel
from based_compile.kernels.naive import naive_recurrent_step
from based_compile.op.recurrent_step import based_recurrent_step, feature_map, step_variant
from compare import assert_rel_close, rel_error

TAYLOR = ("const:1", "linear", "outer")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# In float16/bfloat16 the output may also be as far from float64 as the same step computed in that
# dtype by PyTorch (what the user's eager code gets), with a margin: the new states are rounded to
# their dtype before the readout, as the user's code rounds them.
EAGER_MARGIN = 1.25
PREFIX = 8          # tokens summed into the states a step starts from


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setattr(step_kernel, "POISON_OUTPUTS", True)


def _factors(dk):
    return (1.0, dk ** -0.25, 1 / (math.sqrt(2) * math.sqrt(dk)))


def _prefix_states(rows, dk, dv, pieces, factors, g, prefix=PREFIX):
    """The states a step meets: kv = sum_t phi(k_t) v_t^T and ks = sum_t phi(k_t) over ``prefix`` random
    tokens ([rows, F, Dv], [rows, F], float64). phi(q) . ks = sum_t f(q . k_t) is then a sum of positive
    terms, as in any real decode; states of random sign would put some rows' normaliser near 0, where
    any rounding is a large relative error (what the GPU's 1024-row shapes hit)."""
    k = torch.randn(rows, prefix, dk, generator=g, dtype=torch.float64)
    v = torch.randn(rows, prefix, dv, generator=g, dtype=torch.float64)
    phi = feature_map(k, pieces, factors)                                        # [rows, prefix, F]
    return phi.mT @ v, phi.sum(1)


def _inputs(lead, dk, dv, pieces, factors, *, dtype, state_dtype=None, device="cpu", kv_shape=None, ks_shape=None,
            seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = math.prod(lead)
    q, k = (torch.randn(*lead, dk, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(*lead, dv, generator=g, dtype=torch.float64)
    kv, ks = _prefix_states(rows, dk, dv, pieces, factors, g)
    f = kv.shape[1]
    kv = kv.reshape(kv_shape or (rows, f, dv))
    ks = ks.reshape(ks_shape or (rows, f))
    sd = state_dtype or dtype
    cast = [x.to(dtype) for x in (q, k, v)] + [kv.to(sd), ks.to(sd)]
    return [x.to(device) for x in cast]


def _check(lead, dk, dv, *, pieces=TAYLOR, factors=None, dtype=torch.float32, state_dtype=None, normalize=True,
           device="cpu", kv_shape=None, ks_shape=None, strided=False, op=False, seed=0, variant="flat",
           block_v=None):
    factors = factors or _factors(dk)
    qf = factors
    kf = tuple(x * 1.25 for x in factors)          # q and k factors differ
    q, k, v, kv, ks = _inputs(lead, dk, dv, pieces, kf, dtype=dtype, state_dtype=state_dtype, device=device,
                              kv_shape=kv_shape, ks_shape=ks_shape, seed=seed)
    if strided:          # q, k, v as views with a size-1 axis moved ([B, 1, H, D] -> [B, H, 1, D])
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    kv0, ks0 = kv.clone(), ks.clone()
    ref = naive_recurrent_step(*(x.double() for x in (q, k, v, kv, ks)), pieces, qf, kf, normalize, 1e-3)
    if op:
        got = based_recurrent_step(q, k, v, kv, ks, pieces, qf, kf, normalize, 1e-3)
    else:
        got = step_kernel.recurrent_step(q, k, v, kv, ks, pieces, qf, kf, normalize, 1e-3, variant=variant,
                                         block_v=block_v)
    assert torch.equal(kv, kv0) and torch.equal(ks, ks0), "the old states must be left alone"
    what = f"lead={lead} Dk={dk} Dv={dv} {pieces} {dtype}/{state_dtype} normalize={normalize} {variant} bv={block_v}"
    eager = naive_recurrent_step(q, k, v, kv, ks, pieces, qf, kf, normalize, 1e-3)      # in the inputs' dtypes
    for name, x, r, like, e in zip(("o", "kv_state", "k_state"), got, ref, (q, kv, ks), eager):
        assert x.shape == r.shape and x.dtype == like.dtype, f"{name}: {x.shape} {x.dtype} ({what})"
        tol = max(TOL[dtype], TOL[like.dtype]) if name == "o" else TOL[like.dtype]
        if name == "o" and dtype in (torch.float16, torch.bfloat16):
            tol = max(tol, EAGER_MARGIN * rel_error(e, r))
        assert_rel_close(x, r, tol, f"{name} ({what})")
    return got


@pytest.mark.parametrize("variant", step_kernel.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_taylor_step(dtype, normalize, variant):
    _check((2, 3), 4, 5, dtype=dtype, normalize=normalize, variant=variant)


def test_user_layouts_odd_sizes_and_piece_orders():
    # states [B, H, F, Dv] and [B, H, 1, F]; Dk, Dv not powers of two; features in another order
    _check((2, 3), 3, 7, kv_shape=(2, 3, 13, 7), ks_shape=(2, 3, 1, 13))
    _check((1, 2), 5, 20, pieces=("outer", "const:1", "linear"), factors=(0.3, 1.5, -0.7))
    _check((2,), 4, 3, pieces=("linear", "const:3", "outer", "linear"), factors=(0.5, 1.0, 0.2, -1.0))
    _check((2, 1, 3), 4, 5, strided=True)


def test_mixed_dtypes_state_in_float32():
    _check((2, 2), 4, 6, dtype=torch.float16, state_dtype=torch.float32)


def test_chain_of_kernel_steps_is_based_attention():
    """Steps from zero states equal causal Based attention of all tokens so far (float32)."""
    from based_compile.kernels.naive import naive_parallel_based
    g = torch.Generator().manual_seed(3)
    b, h, t, dk, dv = 1, 2, 5, 4, 6
    q, k = (torch.randn(b, h, t, dk, generator=g) for _ in range(2))
    v = torch.randn(b, h, t, dv, generator=g)
    fac = _factors(dk)
    kv, ks = torch.zeros(b, h, 21, dv), torch.zeros(b, h, 1, 21)
    outs = []
    for i in range(t):
        o, kv, ks = step_kernel.recurrent_step(q[:, :, i], k[:, :, i], v[:, :, i], kv, ks, TAYLOR, fac, fac, True, 1e-6)
        outs.append(o)
    ref = naive_parallel_based(q.double(), k.double(), v.double(), scale=dk ** -0.5)
    assert_rel_close(torch.stack(outs, 2), ref, 1e-5, "outputs")


def test_kernel_limits():
    q = torch.randn(2, 4)
    v = torch.randn(2, 3)
    assert step_kernel.supported(q, q, v, torch.randn(2, 21, 3), torch.randn(2, 21), TAYLOR) is None
    assert "pieces" in step_kernel.supported(q, q, v, q, q, TAYLOR * 2)
    assert "float64" in step_kernel.supported(q, q, v.double(), q, q, TAYLOR)
    assert "Dk=129" in step_kernel.supported(torch.randn(2, 129), q, v, q, q, TAYLOR)
    with pytest.raises(ValueError, match="kernel"):
        step_kernel.recurrent_step(q.double(), q, torch.randn(2, 3), torch.randn(2, 21, 3), torch.randn(2, 21),
                                   TAYLOR, (1,) * 3, (1,) * 3)


def _check_grouped(b, hkv, group, dk, dv, *, dtype=torch.float32, normalize=True, with_k_state=True,
                   device="cpu", q_shape=None, op=False, seed=0, variant="flat", block_v=None):
    """Grouped-query step: q [B, Hkv * G, Dk] (or ``q_shape``), k, v and the states per kv head; the
    reference repeats each state for its G query heads (repeat_interleave), independently of the kernel.
    Without a key state (unnormalised step) the third result is phi(k)."""
    g = torch.Generator().manual_seed(seed)
    f = 1 + dk + dk * dk
    qf, kf = _factors(dk), tuple(x * 1.25 for x in _factors(dk))
    q = torch.randn(q_shape or (b, hkv * group, dk), generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, dv, generator=g, dtype=torch.float64)
    kv, ks = _prefix_states(b * hkv, dk, dv, TAYLOR, kf, g)
    kv = kv.reshape(b, hkv, f, dv)
    ks = ks.reshape(b, hkv, 1, f) if with_k_state else None
    q, k, v, kv = (x.to(device, dtype) for x in (q, k, v, kv))
    ks = ks.to(device, dtype) if ks is not None else None
    # the reference: per query head, its kv head's state (q head h reads kv head h // G)
    phi_k = feature_map(k.double(), TAYLOR, kf)                                  # [B, Hkv, F]
    kv_ref = kv.double() + phi_k.unsqueeze(-1) * v.double().unsqueeze(-2)
    ks_ref = phi_k.unsqueeze(-2) + (0 if ks is None else ks.double())            # [B, Hkv, 1, F]
    phi_q = feature_map(q.double().reshape(b, hkv * group, dk), TAYLOR, qf)      # [B, H, F]
    kv_q, ks_q = kv_ref.repeat_interleave(group, 1), ks_ref.repeat_interleave(group, 1)
    o_ref = (phi_q.unsqueeze(-2) @ kv_q).squeeze(-2)
    if normalize:
        o_ref = o_ref / ((phi_q.unsqueeze(-2) * ks_q).sum(-1) + 1e-3)
    o_ref = o_ref.reshape(*q.shape[:-1], dv)
    if not with_k_state:
        ks_ref = ks_ref.reshape(b, hkv, f)
    if op:
        got = based_recurrent_step(q, k, v, kv, ks, TAYLOR, qf, kf, normalize, 1e-3)
    else:
        got = step_kernel.recurrent_step(q, k, v, kv, ks, TAYLOR, qf, kf, normalize, 1e-3, variant=variant,
                                         block_v=block_v)
    naive = naive_recurrent_step(q.double(), k.double(), v.double(), kv.double(),
                                 None if ks is None else ks.double(), TAYLOR, qf, kf, normalize, 1e-3)
    for name, x, r, nv in zip(("o", "kv_state", "k_state"), got, (o_ref, kv_ref, ks_ref), naive):
        assert x.shape == r.shape, f"{name}: {x.shape} vs {r.shape}"
        assert_rel_close(x, r, TOL[dtype], f"{name} (G={group}, normalize={normalize})")
        assert_rel_close(nv, r, 1e-12, f"naive {name}")


@pytest.mark.parametrize("op", [False, True], ids=["kernel", "op"])
@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("normalize", [True, False])
def test_grouped_query_states_per_kv_head(op, group, normalize):
    _check_grouped(2, 2, group, 4, 5, normalize=normalize, op=op, dtype=torch.float64 if op else torch.float32)


@pytest.mark.parametrize("variant", step_kernel.VARIANTS)
def test_grouped_query_several_value_blocks(variant):
    """Few rows: Dv is split into blocks (several programs per query row, only the first query
    row's programs write the states, the first block the key state); a poisoned element fails."""
    _check_grouped(1, 1, 2, 3, 40, variant=variant)
    _check_grouped(1, 2, 2, 3, 33, normalize=False, with_k_state=False, variant=variant)
    _check_grouped(1, 2, 3, 4, 10, variant=variant, block_v=4)          # a partial last block of 2


def test_flat_tiles():
    """The "flat" kernel's feature tiles: one main tile of a power of two and a remainder tile."""
    assert step_kernel.flat_tiles(273, 16) == (256, 1, 32)         # Dk = 16: 5% padding, no loop
    assert step_kernel.flat_tiles(273, 8) == (256, 1, 32)
    assert step_kernel.flat_tiles(273, 64) == (64, 4, 32)          # over FLAT_TILE_ELEMENTS: a loop of 4
    assert step_kernel.flat_tiles(16, 8) == (16, 1, 0)             # no remainder
    assert step_kernel.flat_tiles(17, 8) == (16, 1, 1)
    assert step_kernel.flat_tiles(1, 4) == (1, 1, 0)
    f = 1 + 128 + 128 * 128
    ta, nt, tb = step_kernel.flat_tiles(f, 16)
    assert ta * 16 <= step_kernel.FLAT_TILE_ELEMENTS and nt * ta + tb >= f > nt * ta


def test_flat_block_v(monkeypatch):
    """Dv columns per program: 16, 32 from 4 rows per SM (132 on an H200), never wider than Dv."""
    monkeypatch.setattr(step_kernel, "_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert step_kernel.flat_block_v(16, 64, torch.bfloat16, cpu) == 16         # B = 1, H = 16
    assert step_kernel.flat_block_v(256, 64, torch.bfloat16, cpu) == 16        # B = 16
    assert step_kernel.flat_block_v(1024, 64, torch.bfloat16, cpu) == 32       # B = 64
    assert step_kernel.flat_block_v(1024, 64, torch.float32, cpu) == 32
    assert step_kernel.flat_block_v(2, 5, torch.float16, cpu) == 8
    assert step_kernel.flat_block_v(4096, 3, torch.float16, cpu) == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_flat_feature_tiles_and_value_blocks(dtype, monkeypatch):
    """Every tiling of the "flat" kernel: the Dk = 16 row (a main tile of 256 and a remainder of 32),
    several main tiles (a loop), no remainder, a remainder of one feature, partial Dv blocks; pieces
    in other orders and widths; the state layouts [B, H, F, Dv], [B, H, 1, F]; strided q, k, v."""
    _check((1, 2), 16, 6, dtype=dtype, kv_shape=(1, 2, 273, 6), ks_shape=(1, 2, 1, 273), block_v=4)
    _check((2,), 4, 5, pieces=("outer",), factors=(0.4,), dtype=dtype)                         # F = 16
    _check((2,), 4, 5, pieces=("outer", "const:1"), factors=(0.4, 2.0), dtype=dtype)           # F = 17
    _check((1, 3), 3, 10, pieces=("linear", "const:3", "outer", "linear"), factors=(0.5, 1.0, 0.2, -1.0),
           dtype=dtype, block_v=4)
    _check((2, 1, 3), 4, 5, strided=True, dtype=dtype)
    monkeypatch.setattr(step_kernel, "FLAT_TILE_ELEMENTS", 32)
    assert step_kernel.flat_tiles(21, 4) == (8, 2, 8)
    _check((2, 2), 4, 7, dtype=dtype, block_v=4)                    # F = 21: two main tiles of 8, then 5
    _check((2,), 4, 6, pieces=("outer", "linear"), factors=(0.3, 0.9), dtype=dtype, block_v=8)   # 5 x 4, none
    _check_grouped(1, 2, 3, 4, 6, dtype=dtype, block_v=4)
    _check_grouped(2, 1, 2, 4, 5, dtype=dtype, normalize=False, with_k_state=False, block_v=4)


def test_variants_write_the_same_states():
    """"flat" and "tiled" compute the new states by the same float32 operations (the readouts sum in
    other orders): under the interpreter their states agree bit for bit."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    v = torch.randn(2, 3, 9, generator=g)
    kv, ks = torch.randn(2, 3, 21, 9, generator=g), torch.rand(2, 3, 1, 21, generator=g) + 1
    fac = _factors(4)
    flat = step_kernel.recurrent_step(q, k, v, kv, ks, TAYLOR, fac, fac, True, 1e-3, variant="flat")
    tiled = step_kernel.recurrent_step(q, k, v, kv, ks, TAYLOR, fac, fac, True, 1e-3, variant="tiled")
    assert torch.equal(flat[1], tiled[1]) and torch.equal(flat[2], tiled[2])
    assert_rel_close(flat[0], tiled[0], 1e-6, "o")


def test_variant_arguments_and_setting(monkeypatch):
    q, v = torch.randn(2, 4), torch.randn(2, 3)
    kv, ks = torch.randn(2, 21, 3), torch.randn(2, 21)
    with pytest.raises(ValueError, match="variant"):
        step_kernel.recurrent_step(q, q, v, kv, ks, TAYLOR, (1,) * 3, (1,) * 3, variant="fast")
    with pytest.raises(ValueError, match="block_v"):
        step_kernel.recurrent_step(q, q, v, kv, ks, TAYLOR, (1,) * 3, (1,) * 3, block_v=6)
    monkeypatch.delenv(config.STEP_KERNEL_ENV_VAR, raising=False)
    assert config.step_kernel == "auto" and step_variant() == "flat"
    monkeypatch.setenv(config.STEP_KERNEL_ENV_VAR, "tiled")
    assert step_variant() == "tiled"
    monkeypatch.setattr(config, "step_kernel", "flat")             # the Python setting wins
    assert step_variant() == "flat"
    monkeypatch.setattr(config, "step_kernel", "fast")
    with pytest.raises(ValueError, match="config.step_kernel"):
        step_variant()
    monkeypatch.setattr(config, "step_kernel", "auto")
    monkeypatch.setenv(config.STEP_KERNEL_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=config.STEP_KERNEL_ENV_VAR):
        step_variant()


@pytest.mark.parametrize("op", [False, True], ids=["kernel", "op"])
def test_unnormalised_without_key_state(op):
    _check_grouped(2, 3, 1, 4, 6, normalize=False, with_k_state=False, op=op)
    _check_grouped(1, 2, 2, 3, 5, normalize=False, with_k_state=False, op=op,
                   q_shape=(1, 2, 2, 3))                      # q as [B, Hkv, G, Dk]


def test_grouped_arguments():
    q, k, v = torch.randn(2, 6, 4), torch.randn(2, 4, 4), torch.randn(2, 4, 5)
    kv, ks = torch.randn(2, 4, 21, 5), torch.randn(2, 4, 21)
    with pytest.raises(ValueError, match="multiple G"):
        based_recurrent_step(q, k, v, kv, ks, TAYLOR, (1,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="k's leading dims"):
        based_recurrent_step(torch.randn(2, 8, 4), k, torch.randn(2, 8, 5), kv, ks, TAYLOR, (1,) * 3, (1,) * 3)
    with pytest.raises(ValueError, match="normalize=False"):
        based_recurrent_step(torch.randn(2, 8, 4), k, v, kv, None, TAYLOR, (1,) * 3, (1,) * 3)
    torch.library.opcheck(torch.ops.based.recurrent_step.default,
                          (torch.randn(2, 8, 4), k, v, kv, None, list(TAYLOR), [1.0] * 3, [1.0] * 3, False, 1e-6))
    torch.library.opcheck(torch.ops.based.recurrent_step.default,
                          (torch.randn(2, 8, 4), k, v, kv, ks, list(TAYLOR), [1.0] * 3, [1.0] * 3, True, 1e-6))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("variant", step_kernel.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b", [1, 16, 64])
def test_gpu_decode_shapes(dtype, b, variant):
    _check((b, 16), 16, 64, dtype=dtype, device="cuda", kv_shape=(b, 16, 273, 64), ks_shape=(b, 16, 1, 273),
           variant=variant)


@pytest.mark.gpu
@pytest.mark.parametrize("block_v", [4, 8, 16, 32, 64])
def test_gpu_flat_value_blocks(block_v):
    """The "flat" kernel at every Dv block the benchmark sweeps (32 and 64 loop over main tiles)."""
    _check((2, 16), 16, 64, dtype=torch.bfloat16, device="cuda", kv_shape=(2, 16, 273, 64),
           ks_shape=(2, 16, 1, 273), block_v=block_v)
    _check_grouped(2, 4, 4, 16, 64, dtype=torch.bfloat16, device="cuda", block_v=block_v)
    _check_grouped(2, 4, 1, 16, 64, dtype=torch.float32, device="cuda", normalize=False, with_k_state=False,
                   block_v=block_v)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["auto", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_through_the_operator(dtype, setting, monkeypatch):
    """based::recurrent_step on CUDA runs the kernel (values as the reference, states in the user's layout)."""
    monkeypatch.setattr(config, "step_kernel", setting)
    _check((2, 4), 16, 64, dtype=dtype, device="cuda", kv_shape=(2, 4, 273, 64), ks_shape=(2, 4, 1, 273), op=True)
    _check((3, 2), 8, 100, dtype=dtype, device="cuda", pieces=("outer", "linear", "const:1"),
           factors=(0.2, 0.5, 1.0), op=True, normalize=False)
    _check((2, 1, 4), 16, 64, dtype=dtype, device="cuda", strided=True, op=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", step_kernel.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_grouped_and_unnormalised(dtype, variant, monkeypatch):
    """GQA states per kv head (G = 4, the decode shapes) and an unnormalised step without a key state."""
    monkeypatch.setattr(config, "step_kernel", variant)
    _check_grouped(2, 4, 4, 16, 64, dtype=dtype, device="cuda", op=True)
    _check_grouped(16, 4, 4, 16, 64, dtype=dtype, device="cuda", variant=variant)
    _check_grouped(2, 4, 1, 16, 64, dtype=dtype, device="cuda", normalize=False, with_k_state=False, op=True)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", step_kernel.VARIANTS)
def test_gpu_large_dims_and_float64_fallback(variant):
    _check((2, 2), 128, 256, dtype=torch.bfloat16, device="cuda", factors=(1.0, 0.3, 0.05), variant=variant)
    _check((2, 2), 20, 64, dtype=torch.float32, device="cuda", variant=variant)    # F = 421: 256 + 256 (165)
    _check((2, 2), 4, 5, dtype=torch.float64, device="cuda", op=True)        # the PyTorch form


def _user_step(q, k, v, kv_state, k_state):        # the form people write, [B, H, 1, D], states [B, H, F, Dv]
    def phi(x):
        d = x.shape[-1]
        x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2) * math.sqrt(d))
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, x2], dim=-1)
    pq, pk = phi(q), phi(k)
    kv_state = kv_state + pk.transpose(-2, -1) @ v
    k_state = k_state + pk
    return (pq @ kv_state) / ((pq * k_state).sum(-1, keepdim=True) + 1e-6), kv_state, k_state


@pytest.mark.gpu
def test_gpu_compiled_step_under_cuda_graphs():
    """backend="based", mode="reduce-overhead": the rewritten step runs the kernel inside CUDA graphs;
    a chain of steps equals the float64 reference chain (outputs and the states carried across)."""
    import based_compile
    torch._dynamo.reset()
    b, h, dk, dv = 2, 16, 16, 64
    compiled = torch.compile(_user_step, backend="based", mode="reduce-overhead", fullgraph=True)
    g = torch.Generator().manual_seed(7)
    kv = torch.zeros(b, h, 273, dv, dtype=torch.float64)
    ks = torch.zeros(b, h, 1, 273, dtype=torch.float64)
    kv_c, ks_c = kv.to("cuda", torch.bfloat16), ks.to("cuda", torch.bfloat16)
    with torch.no_grad():
        for i in range(6):
            q, k = (torch.randn(b, h, 1, dk, generator=g, dtype=torch.float64) for _ in range(2))
            v = torch.randn(b, h, 1, dv, generator=g, dtype=torch.float64)
            o_ref, kv, ks = _user_step(q, k, v, kv, ks)
            torch.compiler.cudagraph_mark_step_begin()
            o, kv_c, ks_c = compiled(*(x.to("cuda", torch.bfloat16) for x in (q, k, v)), kv_c, ks_c)
            kv_c, ks_c = kv_c.clone(), ks_c.clone()      # outputs of a CUDA graph are overwritten by its next replay
            assert_rel_close(o, o_ref, 2e-2, f"o step {i}")
            assert_rel_close(kv_c, kv, 2e-2, f"kv_state step {i}")
            assert_rel_close(ks_c, ks, 2e-2, f"k_state step {i}")
        sites = based_compile.explain(_user_step, *(x.to("cuda", torch.bfloat16) for x in (q, k, v)), kv_c, ks_c).sites
    assert len(sites) == 1 and sites[0].kernel == "Triton recurrent step kernel", sites


@pytest.mark.gpu
def test_gpu_opcheck():
    """The operator's fake implementation, schema and dispatch agree with the CUDA kernel."""
    q, k = torch.randn(2, 4, 16, device="cuda"), torch.randn(2, 4, 16, device="cuda")
    v = torch.randn(2, 4, 64, device="cuda")
    kv, ks = torch.randn(2, 4, 273, 64, device="cuda"), torch.rand(2, 4, 1, 273, device="cuda") + 1
    torch.library.opcheck(torch.ops.based.recurrent_step.default,
                          (q, k, v, kv, ks, list(TAYLOR), list(_factors(16)), list(_factors(16)), True, 1e-6))
