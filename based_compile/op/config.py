"""User settings of based_compile.

``kernel``: which implementation the ``based`` operator runs.

- ``"auto"`` (default): ``based_compile.policy`` picks by mode (training or inference) and shape.
- ``"parallel"``, ``"fused_chunk"``, ``"chunked"``: force that Triton kernel. CUDA tensors run it; CPU tensors run it
  under Triton's interpreter (``TRITON_INTERPRET=1``; float16 and float32 only: bfloat16 raises a TypeError,
  the interpreter's bfloat16 ``tl.dot`` being wrong), and otherwise run the PyTorch form of the same
  algorithm (parallel -> ``cpu_quadratic``, fused_chunk and chunked -> ``cpu_chunked``).
- ``"cpu_quadratic"``, ``"cpu_chunked"``: force a PyTorch form; CPU tensors only (a CUDA tensor raises).

Set it in Python (``based_compile.config.kernel = "fused_chunk"``) or with the environment variable
``BASED_COMPILE_KERNEL`` (same values). The Python setting wins when it is not ``"auto"``. Both are read
each time the operator runs (not when a model is compiled). An eager backward runs the kernel its
forward chose; in compiled code the backward operator reads the setting again when it runs, so change
it between steps, not between a forward and its backward. An invalid value raises ``ValueError``
naming the setting and the accepted values.

``step_kernel``: which Triton kernel ``based::recurrent_step`` (a decoding step) runs on CUDA.

- ``"auto"`` (default): ``"flat"``.
- ``"flat"``: all of a state row's features in one pass, every load before the first store.
- ``"tiled"``: the first step kernel, features tile by tile (kept to compare against).

Set it in Python (``based_compile.config.step_kernel = "tiled"``) or with the environment variable
``BASED_COMPILE_STEP_KERNEL``; read each time the operator runs, the Python setting winning when
it is not ``"auto"``. It does not change what the step computes, only how fast.
"""
from __future__ import annotations

from ..kernels.arguments import environ_get

KERNEL_CHOICES = ("auto", "parallel", "fused_chunk", "chunked", "cpu_quadratic", "cpu_chunked")
KERNEL_ENV_VAR = "BASED_COMPILE_KERNEL"

kernel = "auto"

STEP_KERNEL_CHOICES = ("auto", "flat", "tiled")
STEP_KERNEL_ENV_VAR = "BASED_COMPILE_STEP_KERNEL"

step_kernel = "auto"


def forced_kernel() -> tuple[str, str]:
    """(choice, where it came from): the kernel the user forced, or ("auto", "") when none is forced."""
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"based_compile.config.kernel must be one of {KERNEL_CHOICES}, got {kernel!r}")
    if kernel != "auto":
        return kernel, "based_compile.config.kernel"
    env = environ_get(KERNEL_ENV_VAR, "").strip()
    if env in ("", "auto"):
        return "auto", ""
    if env not in KERNEL_CHOICES:
        raise ValueError(f"environment variable {KERNEL_ENV_VAR} must be one of {KERNEL_CHOICES}, got {env!r}")
    return env, KERNEL_ENV_VAR


def forced_step_kernel() -> str:
    """The step kernel the user forced ("flat", "tiled"), or "auto"."""
    if step_kernel not in STEP_KERNEL_CHOICES:
        raise ValueError(f"based_compile.config.step_kernel must be one of {STEP_KERNEL_CHOICES}, got {step_kernel!r}")
    if step_kernel != "auto":
        return step_kernel
    env = environ_get(STEP_KERNEL_ENV_VAR, "").strip()
    if env not in STEP_KERNEL_CHOICES + ("",):
        raise ValueError(f"environment variable {STEP_KERNEL_ENV_VAR} must be one of {STEP_KERNEL_CHOICES}, "
                         f"got {env!r}")
    return env or "auto"
