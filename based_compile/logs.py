"""The ``based_compile`` logger, registered with PyTorch's logging so ``TORCH_LOGS`` controls it.

``TORCH_LOGS="+based_compile"`` shows every decision of the pass (each site with its spec and
kernel choice at INFO, each refusal with its reason at DEBUG); ``TORCH_LOGS="based_compile"``
shows INFO and up. ``torch._logging.set_logs(modules={"based_compile": logging.DEBUG})`` does the
same from Python. Without either, the logger follows Python's logging configuration as usual.
"""
from __future__ import annotations

import logging
import os

import torch._logging._internal as torch_logging

NAME = "based_compile"
log = logging.getLogger(NAME)


def register() -> None:
    """Register the logger under the setting ``based_compile`` (idempotent).

    TORCH_LOGS is read when torch is imported, before this package can register its name; newer
    torch already accepts a module's name there, older torch ignores it: then it is applied again."""
    if not torch_logging.log_registry.is_log(NAME):
        torch_logging.register_log(NAME, NAME)
        if NAME in os.environ.get("TORCH_LOGS", ""):
            torch_logging._init_logs()
    one_handler()


def one_handler() -> None:
    """Keep one of torch's handlers on the logger (the backend calls this before each compile).

    torch 2.13, given this package's name in TORCH_LOGS, imports it while it sets up its logging
    and then sets the name up twice: two handlers printed every line twice."""
    ours = [h for h in log.handlers if h in getattr(torch_logging, "handlers", ())]
    for handler in ours[1:]:
        log.removeHandler(handler)
