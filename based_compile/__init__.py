"""based_compile: a torch.compile backend for hand-written Based linear attention."""
from . import config, kernels
from .ops import based_attention
from .spec import BasedSpec

__all__ = ["kernels", "config", "based_attention", "BasedSpec"]
from .backend import backend, based_backend
from .buffer_guard import StaleBufferError
from .explain import Explanation, Refusal, Site, explain
from .backend import register as _register_backend

_register_backend()
__all__ += ["backend", "based_backend", "explain", "Explanation", "Site", "Refusal", "StaleBufferError"]
