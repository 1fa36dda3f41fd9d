"""The ``based`` torch.compile backend: canonicalise -> find candidates -> verify -> rewrite -> inner compiler.

``based_compile.backend(inner="inductor", rewrite=True, kernel="auto", verify=True)`` returns a
backend for ``torch.compile(model, backend=...)``; ``backend="based"`` (registered on import
and through the ``torch_dynamo_backends`` entry point ``based_backend``) is the default one.

- ``inner``: the compiler that gets the rewritten graph: "inductor" (default), "eager",
  "aot_eager", any registered backend name, or a backend callable ``(gm, example_inputs)``.
- ``rewrite``: False runs the inner compiler on Dynamo's graph untouched (the pass still logs).
- ``kernel``: "auto", "parallel", "fused_chunk" or "chunked" (also "cpu_quadratic", "cpu_chunked"):
  forwarded to ``based_compile.config.kernel``, which the operator reads at run time; a
  forced kernel is a process-wide setting.
- ``verify``: run the numerical probe on each matched site (default True).

``torch.compile(model, backend=..., mode=..., options=...)``: torch.compile passes ``mode`` and
``options`` to the backend, which applies them to Inductor as ``backend="inductor"`` would
(``mode="reduce-overhead"``: CUDA graphs; ``"max-autotune"``; ``options``: Inductor settings); with
another inner compiler they raise ValueError.

The pass lowers only the neighbourhoods of possible sites to ATen (``canonicalize``), matches
there, and replaces each site's output in Dynamo's own graph; the inner compiler gets Dynamo's
graph (unchanged when nothing matched). When a rewrite relied on the values of registered
buffers (a mask, a scale), the compiled callable is wrapped by ``buffer_guard``, which refuses to
run it once those values change.

Under ``DistributedDataParallel``, Dynamo's DDP optimizer (``torch._dynamo.config.optimize_ddp``)
cuts each graph at DDP's gradient-bucket boundaries and calls the backend once per piece; a cut
can fall inside an attention region (q and k in one piece, v and the attention in the next),
and the pieces' example inputs are fake. ``ddp_split`` wraps the optimizer's ``compile_fn`` so
that a based backend gets the whole graph with its real example inputs first (``presplit``):
the pass rewrites the sites there, DDP then splits the rewritten graph (a ``based::attention``
node has no parameters; the cut can only fall between it and its inputs), and each piece goes
to the inner compiler without a second pass. The rewrite thus holds at any ``bucket_cap_mb``.
"""
from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

from .logs import one_handler as _one_log_handler
from .buffer_guard import guard_buffers
from .ddp_split import in_split, mark_presplit, presplit_hook, unhooked_piece
from .graph.driver import Rewritten, reject_sites, restore, run_pass
from .graph.report import Explanation, Refusal
from .op import config, context_parallel

log = logging.getLogger("based_compile")

INNER_NAMES = ("inductor", "eager", "aot_eager")


def _inner_compiler(inner):
    if callable(inner):
        return inner
    if not isinstance(inner, str):
        raise TypeError(f"inner must be a backend name ({', '.join(INNER_NAMES)}, ...) or a callable, got {inner!r}")
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx
        return lambda gm, example_inputs, config_patches=None: compile_fx(gm, example_inputs,
                                                                         config_patches=config_patches)
    if inner == "eager":
        return lambda gm, example_inputs: gm.forward
    try:
        return torch._dynamo.lookup_backend(inner)
    except Exception as err:
        raise ValueError(f"inner must be one of {INNER_NAMES}, a registered backend name, or a callable; "
                         f"got {inner!r}") from err


def _inductor_settings(inner, mode: str | None, options: dict | None) -> dict:
    """Inductor config patches for ``torch.compile(..., mode=..., options=...)``, which torch.compile
    hands a named backend as keyword arguments; they apply to the inner compiler (Inductor only)."""
    if (not mode or mode == "default") and not options:
        return {}
    if inner != "inductor":
        raise ValueError(f"torch.compile's mode and options configure Inductor; this based backend's inner "
                         f"compiler is {inner!r} (mode={mode!r}, options={options!r})")
    from torch._inductor import config as inductor_config, list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"mode must be one of {tuple(modes)}, got {mode!r}")
    patches = dict(modes[mode]) if mode else {}
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of Inductor settings, got {type(options).__name__}")
    known = inductor_config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"options: {key!r} is not an Inductor setting (torch._inductor.list_options())")
        patches[name] = value
    return patches


def _refuse_context_parallel(compiled, report: Explanation):
    """``compiled`` for a graph that holds attention the pass refused: under
    ``based_compile.context_parallel`` that attention would run within the shard alone (a different
    function), so calling it there raises instead of computing something else."""
    first = report.refusals[0]

    def run(*args):
        if context_parallel.active():
            raise RuntimeError(
                f"based_compile.context_parallel: this compiled graph holds attention that was not rewritten "
                f"({len(report.refusals)} refusal(s); the first at {first.source}: {first.category}: {first.reason}); "
                "under context parallelism it would attend within this rank's shard only. Run it outside "
                "context_parallel, or make it a form the backend rewrites (based_compile.explain says why not).")
        return compiled(*args)
    return run


def _checkpointed_sites_outside_context_parallel(compiled):
    """``compiled`` for a graph with sites rewritten inside a ``torch.utils.checkpoint`` body: under
    ``based_compile.context_parallel`` (untested there: the recomputation would exchange states
    again inside the compiled graph's own checkpoint) it raises instead of running."""

    def run(*args):
        if context_parallel.active():
            raise RuntimeError(
                "based_compile.context_parallel: this compiled graph holds attention rewritten inside a "
                "torch.utils.checkpoint call in the compiled code, which context parallelism does not support "
                "yet; checkpoint around the compiled block instead (see the README).")
        return compiled(*args)
    return run


# Exceptions an inner compiler raises to make Dynamo restart or skip, which must reach Dynamo.
_RESTARTS = (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame, torch._dynamo.exc.ResetRequired)


def _compile_unrewritten(gm: fx.GraphModule, result: Rewritten, compile_inner, err: Exception):
    """The inner compiler rejected the rewritten graph: compile Dynamo's graph as it was, warn, and
    record the sites so that explain() refuses them with the reason (and later graphs leave them)."""
    why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    reason = (f"the inner compiler rejected the rewritten graph ({why}); the graph was compiled "
              "unrewritten")
    log.warning("based_compile: %s at %s", reason, ", ".join(result.sources),
                exc_info=log.isEnabledFor(logging.DEBUG))
    reject_sites(result.sources, reason)
    restore(result)
    return compile_inner(gm), reason


def backend(*, inner="inductor", rewrite: bool = True, kernel: str = "auto", verify: bool = True):
    """A configured ``based`` backend for ``torch.compile(model, backend=based_compile.backend(...))``."""
    if not isinstance(rewrite, bool):
        raise TypeError(f"rewrite must be a bool, got {rewrite!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {verify!r}")
    if kernel not in config.KERNEL_CHOICES:
        raise ValueError(f"kernel must be one of {config.KERNEL_CHOICES}, got {kernel!r}")
    inner_compile = _inner_compiler(inner)
    if kernel != "auto":
        config.kernel = kernel
        log.info("based_compile: kernel forced to %r for this process (based_compile.config.kernel)", kernel)

    warned = []

    def rewritten(gm: fx.GraphModule, example_inputs, compile_rest):
        """The pass on ``gm``, then ``compile_rest(graph)``; guarded when the rewrite read buffers, and
        against context parallelism when attention was refused."""
        _one_log_handler()
        report = Explanation()
        result = run_pass(gm, example_inputs, rewrite=rewrite, verify=verify, report=report)
        if result is None:
            compiled = compile_rest(gm)
        else:
            try:
                compiled = compile_rest(result.gm)
            except _RESTARTS:         # Dynamo's own control flow (restart the analysis), not a failure
                raise
            except Exception as err:  # the last line of defence: the model compiles, unrewritten
                compiled, reason = _compile_unrewritten(gm, result, compile_rest, err)
                for source in result.sources:
                    report.add_refusal(Refusal(source, "unsupported", reason))
            else:
                compiled = guard_buffers(compiled, result.baked, example_inputs) if result.baked else compiled
                if result.bodies:
                    compiled = _checkpointed_sites_outside_context_parallel(compiled)
        return _refuse_context_parallel(compiled, report) if report.refusals else compiled

    def based(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
        patches = _inductor_settings(inner, mode, options)
        compile_inner = (lambda g: inner_compile(g, example_inputs, config_patches=patches)) if patches else \
            (lambda g: inner_compile(g, example_inputs))
        if in_split():        # a piece of a graph the pass already rewrote whole (ddp_split)
            return compile_inner(gm)
        if unhooked_piece() and not warned:
            warned.append(True)         # once per backend
            log.warning("based_compile: DDP's graph splitting hands the based backend a piece of a graph it "
                        "did not see whole (a wrapper around the backend hides it: wrap with functools.wraps); "
                        "sites its cuts spread over two pieces are not rewritten")
        return rewritten(gm, example_inputs, compile_inner)

    def presplit(gm: fx.GraphModule, example_inputs, split):
        """Under DDP's graph splitting: the pass on the whole graph, then DDP's split of the rewritten one."""
        return rewritten(gm, example_inputs, lambda g: split(g)[0])

    based.options = {"inner": inner, "rewrite": rewrite, "kernel": kernel, "verify": verify}
    mark_presplit(based, presplit)
    return based


_default_backend = None


def _default():
    global _default_backend
    if _default_backend is None:
        _default_backend = backend()
    return _default_backend


def based_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """The entry-point target: ``torch.compile(model, backend="based")`` (Inductor inside; its ``mode``
    and ``options``, e.g. ``mode="reduce-overhead"`` for CUDA graphs, configure that Inductor)."""
    return _default()(gm, example_inputs, mode=mode, options=options)


mark_presplit(based_backend, lambda gm, example_inputs, split:
              presplit_hook(_default())(gm, example_inputs, split))


def register() -> None:
    """Register ``based_backend`` under the name "based" (idempotent)."""
    if "based" in _COMPILER_FNS:
        return
    if _BACKENDS.get("based") is not None:
        return            # Dynamo found the entry point: looking "based" up loads based_backend itself
    register_backend(name="based")(based_backend)
