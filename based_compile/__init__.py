"""based_compile: a torch.compile backend for hand-written Based linear attention."""
from . import kernels

__all__ = ["kernels"]
