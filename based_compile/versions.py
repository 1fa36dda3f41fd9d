"""The torch and Triton versions based_compile supports, and the import-time check against them.

The backend lives on PyTorch internals that change with every release (Dynamo's graphs, FX, fake
tensors, AOTAutograd, Inductor's entry points, torch.library). An older torch than the oldest tested
one is refused when ``based_compile`` is imported (which also happens first when Dynamo loads the
``based`` entry point), with a message naming the supported range and the version found, instead of
failing somewhere deep inside Dynamo. A newer torch or Triton than the newest tested is allowed, with
a warning. Keep these numbers, the bounds in pyproject.toml and the README's table in step.
"""
from __future__ import annotations

import re
import warnings
from importlib import metadata

import torch

# (major, minor). Tested: the GPU suite on torch 2.11 / Triton 3.6 (NVIDIA H100/H200); CI on CPU with
# torch 2.13 (newest Triton), torch 2.14 (its Triton 3.8), and the kernels under Triton 3.6 and the newest.
TORCH_MIN, TORCH_TESTED_MAX = (2, 11), (2, 14)
TRITON_MIN, TRITON_TESTED_MAX = (3, 6), (3, 9)
_RANGES = {"torch": (TORCH_MIN, TORCH_TESTED_MAX), "triton": (TRITON_MIN, TRITON_TESTED_MAX)}


def parse(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string ("2.13.0+cpu", "2.12.0a0+git1234" -> (2, 12)); None if unreadable."""
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else None


def _text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def supported_range(name: str) -> str:
    """e.g. "torch >= 2.11 (tested: 2.11 to 2.14)"."""
    low, high = _RANGES[name]
    return f"{name} >= {_text(low)} (tested: {_text(low)} to {_text(high)})"


def check(name: str, version: str | None) -> None:
    """Refuse (ImportError) a ``name`` ("torch" or "triton") older than supported; warn if newer than tested.

    ``version`` None (not installed) or unreadable is not judged."""
    low, high = _RANGES[name]
    found = parse(version) if version is not None else None
    if found is None:
        return
    if found < low:
        raise ImportError(f"based_compile supports {supported_range(name)}; found {name} {version}. "
                          f"Install a supported version: pip install '{name}>={_text(low)}'")
    if found > high:
        warnings.warn(f"based_compile is tested with {supported_range(name)}; found {name} {version}, "
                      "which is newer and untested", stacklevel=3)


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_installed() -> None:
    """Check the imported torch and the installed Triton (its version read from the package's
    metadata, without importing it)."""
    check("torch", torch.__version__)
    check("triton", _installed("triton"))
