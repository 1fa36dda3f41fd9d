"""based_compile: a torch.compile backend for hand-written Based linear attention.

Public API: ``backend`` / ``based_backend`` (``torch.compile(model, backend="based")``), ``explain``
(with ``Explanation``, ``Site``, ``Refusal``), ``config`` (the kernel setting), ``kernels``,
``based_attention`` and ``BasedSpec`` (the operator), ``StaleBufferError``.
"""
from . import versions

versions.check_installed()  # first: an unsupported torch is named here, not deep inside Dynamo later

import sys  # noqa: E402

from . import kernels, logs  # noqa: E402
from .backend import backend, based_backend
from .backend import register as _register_backend
from .buffer_guard import StaleBufferError
from .ddp_split import install as _install_ddp_split
from .explain import explain
from .graph.report import Explanation, Refusal, Site
from .op import config
from .op.context_parallel import context_parallel, sequence_halo, shard_causal_convs, shard_sequence
from .op.custom_op import based_attention
from .op.spec import BasedSpec

# ``import based_compile.config`` names the one settings module (it lives with the operator it configures).
sys.modules[__name__ + ".config"] = config
_register_backend()
_install_ddp_split()     # based backends see the whole graph before DDP's graph splitting (ddp_split)
logs.register()          # last: importing Dynamo above may set up torch's loggers again
__all__ = ["kernels", "config", "based_attention", "BasedSpec", "backend", "based_backend", "explain",
           "Explanation", "Site", "Refusal", "StaleBufferError", "context_parallel", "shard_sequence", "sequence_halo",
           "shard_causal_convs"]
