"""Register caps of the prefix-state kernels (kernels/prefix_chunked._register_caps, launch.register_cap):
taken where the H200 measured them faster (bfloat16, Dk <= 16), nowhere else, and never under the
interpreter, which has no registers. Their results are the GPU tests' (`pytest -m gpu`): a cap changes
speed, not values."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from based_compile.kernels import prefix_chunked
from based_compile.kernels.arguments import check_arguments
from based_compile.kernels.launch import register_cap


def _args(dk, dv):
    q, k = (torch.empty(2, 16, 8, dk) for _ in range(2))
    return check_arguments(q, k, torch.empty(2, 16, 8, dv))


@pytest.fixture
def on_a_gpu(monkeypatch):
    """prefix_config as on a GPU (not interpreting)."""
    monkeypatch.setattr(prefix_chunked, "triton_interpreting", lambda: False)


@pytest.mark.parametrize("dk, dv, dtype, want", [
    (16, 64, torch.bfloat16, (128, 128, 168)),
    (16, 64, None, (128, 128, 168)),
    (8, 32, torch.bfloat16, (128, 128, 168)),
    (16, 128, torch.bfloat16, (128, 168, 0)),
    (16, 96, torch.bfloat16, (128, 168, 0)),
    (16, 256, torch.bfloat16, (0, 0, 0)),
    (32, 64, torch.bfloat16, (0, 0, 0)),       # every cap was slower at Dk = 32
    (16, 64, torch.float16, (0, 0, 0)),        # float32 slots: not measured
    (16, 64, torch.float32, (0, 0, 0)),
])
def test_caps_where_measured(on_a_gpu, dk, dv, dtype, want):
    cfg = prefix_chunked.prefix_config(_args(dk, dv), dtype)
    assert (cfg.maxnreg, cfg.dq_maxnreg, cfg.dkv_maxnreg) == want
    assert cfg.state_maxnreg == cfg.reverse_maxnreg == 0
    uncapped = dataclasses.replace(cfg, maxnreg=0, dq_maxnreg=0, dkv_maxnreg=0)
    # nothing else differs from the defaults (but the reverse-state kernel's transposed features, Dv <= 64 only)
    assert uncapped == prefix_chunked.PrefixConfig(bv=cfg.bv, reverse_trans=dv <= 64)


def test_register_cap(monkeypatch):
    from based_compile.kernels import launch
    monkeypatch.setattr(launch, "triton_interpreting", lambda: False)
    assert register_cap(0) == {}
    assert register_cap(128) == {"maxnreg": 128}
    with pytest.raises(ValueError, match="maxnreg must be 0"):
        register_cap(-1)
    monkeypatch.setattr(launch, "triton_interpreting", lambda: True)
    assert register_cap(128) == {}                 # the interpreter takes no maxnreg
