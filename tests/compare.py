"""The float64 comparison every test uses: relative Frobenius error, NaN never passes."""
from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref||_F / ||ref||_F computed in float64 (inf if out has a NaN or inf)."""
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch: got {tuple(out.shape)}, expected {tuple(ref.shape)}")
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    err = (out - ref).norm().item()
    return err / denom if denom > 0 else err


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = rel_error(out, ref)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.1e}"


def poison_(x: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element a kernel forgot to write fails the comparison."""
    return x.fill_(float("nan"))


def float32_bar(eager, want, floor: float = 1e-5) -> float:
    """The relative-error bar of a float32 result against float64 on fresh random inputs: ``floor``,
    or 4x eager float32's own error on the same inputs where that is larger (inputs that leave a
    normaliser near its smallest value are ill-conditioned: eager float32 alone misses by 3e-5)."""
    want = want.double()
    return max(floor, 4 * ((eager.double() - want).norm() / want.norm().clamp_min(1e-300)).item())
