"""based_compile: a torch.compile backend for hand-written Based linear attention."""
from . import config, kernels
from .ops import based_attention
from .spec import BasedSpec

__all__ = ["kernels", "config", "based_attention", "BasedSpec"]
