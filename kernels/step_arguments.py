"""The arguments of one recurrent Based step, checked once for every implementation of it: the
``based::recurrent_step`` operator (op/recurrent_step.py, whose docstring describes them), its
Triton kernels and the PyTorch reference ``naive_recurrent_step``.

``pieces`` describe the feature map phi: "const:W" (W ones, W >= 1), "linear" (x) or "outer"
(flatten(x (x) x)); ``piece_width`` and ``feature_width`` give their widths for a feature dim Dk.
"""
from __future__ import annotations

from torch import Tensor


def piece_width(piece: str, dk: int) -> int:
    if not isinstance(piece, str):
        raise TypeError(f"pieces: each must be a str, 'const:W' (W >= 1), 'linear' or 'outer', got {piece!r}")
    if piece == "linear":
        return dk
    if piece == "outer":
        return dk * dk
    if piece.startswith("const:") and piece[6:].isdigit() and int(piece[6:]) >= 1:
        return int(piece[6:])
    raise ValueError(f"pieces: each must be 'const:W' (W >= 1), 'linear' or 'outer', got {piece!r}")


def feature_width(pieces, dk: int) -> int:
    return sum(piece_width(p, dk) for p in pieces)


def check_step_arguments(q, k, v, kv_state, k_state, pieces, q_factors, k_factors, normalize, eps,
                         who: str = "based::recurrent_step"):
    """Validate; returns (rows R of the states, Dk, Dv, F, G query rows per state row). ``who``: the
    function named in the errors."""
    for name, x in (("q", q), ("k", k), ("v", v), ("kv_state", kv_state), ("k_state", k_state)):
        if x is None and name == "k_state":
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: {name} must have a floating dtype, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{who}: {name} is on {x.device}, q on {q.device}: one device")
    if q.dim() < 1 or k.dim() < 1 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{who}: q and k must be [..., Dk] with one Dk, got q={list(q.shape)}, "
                         f"k={list(k.shape)}")
    if v.dim() != k.dim() or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"{who}: v must be [..., Dv] with k's leading dims {list(k.shape[:-1])}, "
                         f"got {list(v.shape)}")
    if not isinstance(pieces, (list, tuple)) or not pieces:
        raise ValueError(f"{who}: pieces must be a non-empty list, got {pieces!r}")
    dk, dv = q.shape[-1], v.shape[-1]
    f = feature_width(pieces, dk)
    for name, factors in (("q_factors", q_factors), ("k_factors", k_factors)):
        if not isinstance(factors, (list, tuple)) or len(factors) != len(pieces):
            raise ValueError(f"{who}: {name} must have one factor per piece ({len(pieces)}), "
                             f"got {factors!r}")
    rows = k.numel() // dk if dk else 0
    q_rows = q.numel() // dk if dk else 0
    grouped = q_rows % rows == 0 if rows != 0 else q_rows == 0
    if not grouped:
        raise ValueError(f"{who}: q's rows ({q_rows}, q={list(q.shape)}) must be a multiple G of "
                         f"k's ({rows}, k={list(k.shape)}): G query rows read each state row")
    group = q_rows // rows if rows != 0 else 1
    if kv_state.numel() != rows * f * dv:
        raise ValueError(f"{who}: kv_state must hold rows * F * Dv = {rows} * {f} * {dv} elements, "
                         f"got shape {list(kv_state.shape)}")
    if k_state is None and normalize:
        raise ValueError(f"{who}: k_state is None, which only an unnormalised step "
                         "(normalize=False) may have")
    if k_state is not None and k_state.numel() != rows * f:
        raise ValueError(f"{who}: k_state must hold rows * F = {rows} * {f} elements, "
                         f"got shape {list(k_state.shape)}")
    if not isinstance(normalize, bool):
        raise TypeError(f"{who}: normalize must be a bool, got {normalize!r}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"{who}: eps must be a number >= 0, got {eps!r}")
    return rows, dk, dv, f, group
