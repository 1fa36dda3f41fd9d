"""The ``based`` torch.compile backend: canonicalise -> find candidates -> verify -> rewrite -> inner compiler.

``based_compile.backend(inner="inductor", rewrite=True, kernel="auto", verify=True)`` returns a
backend for ``torch.compile(model, backend=...)``; ``backend="based"`` (registered on import
and through the ``torch_dynamo_backends`` entry point ``based_backend``) is the default one.

- ``inner``: the compiler that gets the rewritten graph: "inductor" (default), "eager",
  "aot_eager", any registered backend name, or a backend callable ``(gm, example_inputs)``.
- ``rewrite``: False runs the inner compiler on Dynamo's graph untouched (the pass still logs).
- ``kernel``: "auto", "parallel" or "fused_chunk" (also "cpu_quadratic", "cpu_chunked"):
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
"""
from __future__ import annotations

import logging
import time

import torch
import torch.fx as fx

from .buffer_guard import BakedBuffer, guard_buffers
from .canonicalize import (attention_region, example_value, extract_region, hint, hint_shape, lower_to_aten,
                           writes_in_place)
from .evaluate import GraphEvaluator, LazyTensor
from .explain import Explanation, Refusal, Site, source_of
from .match import Matcher, find_matches
from .refusal import Refused
from .rewrite import rewrite_dynamo_sites
from .verify import settle

log = logging.getLogger("based_compile")

INNER_NAMES = ("inductor", "eager", "aot_eager")
# Seconds spent in the pass itself (lowering, matching, probing, rewriting), for benchmarks.
pass_seconds = 0.0


def _constant_placeholders(gm: fx.GraphModule, example_inputs) -> list[bool]:
    """Per placeholder: True when it is a registered buffer or a size (compile-time constant)."""
    flags = []
    for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
        if not isinstance(value, torch.Tensor):
            flags.append(True)
            continue
        flags.append("buffers" in _source_name(node) and not value.requires_grad)
    return flags


def _source_name(placeholder: fx.Node) -> str:
    """Where a Dynamo graph input comes from in the user's program (e.g. L['self']._buffers['tril'])."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is not None and grapharg.source is not None:
        name = grapharg.source.name               # a property in newer torch, a method in older
        return name() if callable(name) else name
    return placeholder.name


def _kernel_description(spec, q_node, k_node, v_node) -> str:
    try:
        from . import policy
        fakes = [example_value(n) for n in (q_node, k_node, v_node)]
        reals = [torch.empty((), dtype=f.dtype, device=f.device).expand(hint_shape(n))
                 for f, n in zip(fakes, (q_node, k_node, v_node))]
        training = torch.is_grad_enabled() and any(f.requires_grad for f in fakes)
        return policy.describe(spec, *reals, training)
    except Exception as err:                  # explain() must still report the site
        return f"auto (the policy could not decide at compile time: {type(err).__name__}: {err})"


def _unsupported_reason(site) -> str | None:
    from .ops import unsupported_reason

    values = [example_value(n) for n in (site.match.q, site.match.k, site.match.v)]
    if not all(isinstance(x, torch.Tensor) for x in values):
        return None
    return unsupported_reason(*values)


def run_pass(gm: fx.GraphModule, example_inputs, *, rewrite: bool, verify: bool,
             report: Explanation | None = None) -> tuple[fx.GraphModule, list[BakedBuffer]] | None:
    """Find, verify and (if ``rewrite``) rewrite Based attention in Dynamo's graph ``gm``.

    Returns ``gm`` rewritten in place with the graph inputs (registered buffers) whose values the
    rewrite relied on (``buffer_guard``), or None when nothing was rewritten.
    """
    global pass_seconds
    start = time.perf_counter()
    try:
        try:
            found = _find_sites(gm, example_inputs, verify=verify, rewrite=rewrite, report=report)
        except Exception as err:      # a bug of the pass must not stop the model from compiling
            log.warning("based_compile: the pass failed on this graph (%s: %s); it is compiled unchanged",
                        type(err).__name__, err, exc_info=log.isEnabledFor(logging.DEBUG))
            if report is not None:
                report.add_refusal(Refusal("<graph>", "unsupported",
                                           f"internal error of the pass: {type(err).__name__}: {err}"))
            return None
        if found is None:
            return None
        settled, to_dynamo, region, baked = found
        return rewrite_dynamo_sites(gm, settled, to_dynamo, region), baked
    finally:
        pass_seconds += time.perf_counter() - start


def _find_sites(gm: fx.GraphModule, example_inputs, *, verify: bool, rewrite: bool, report: Explanation | None):
    """Detection without side effects on ``gm``: (settled sites, ATen -> Dynamo node map, region) or None."""
    region = attention_region(gm)
    if not region:
        return None
    sub, inputs, outputs = extract_region(gm, region)
    aten_gm = lower_to_aten(sub)
    aten_inputs = [n for n in aten_gm.graph.nodes if n.op == "placeholder"]
    output_node = next(n for n in aten_gm.graph.nodes if n.op == "output")
    aten_outputs = output_node.args[0]
    output_node.args = ((),)      # every node was an output only to map it back: not a real user
    to_dynamo: dict[fx.Node, fx.Node] = dict(zip(aten_inputs, inputs))
    for dynamo_node, aten_node in zip(outputs, aten_outputs):
        if isinstance(aten_node, fx.Node):
            to_dynamo.setdefault(aten_node, dynamo_node)
    real, variable = _region_inputs(gm, example_inputs, inputs, aten_inputs)
    evaluator = GraphEvaluator(aten_gm, real, variable_placeholders=variable)
    matcher = Matcher(aten_gm, evaluator, variable)
    settled = []
    for result, node in find_matches(matcher):
        if isinstance(result, Refused):
            _refuse(result, report)
            continue
        try:
            site = settle(result, evaluator, probe=verify, available=to_dynamo.__contains__)
            reason = _unsupported_reason(site)
            if reason is not None:
                raise Refused("unsupported", f"{reason}: left to the inner compiler", result.output)
            missing = [n.name for n in (site.match.q, site.match.k, site.match.v, site.match.output)
                       if n not in to_dynamo]
            if missing:
                raise Refused("unsupported", f"the matched tensors {missing} are intermediate values of a "
                                             "decomposed operation, not values of the model's graph", result.output)
            written = _written_before_output(gm, site, to_dynamo)
            if written:
                raise Refused("unsupported", f"{written} writes in place into a tensor the site reads before "
                                             "its output: the operator would read the written values", result.output)
        except Refused as refusal:
            _refuse(refusal, report)
            continue
        settled.append(site)
        entry = Site(source_of(result.anchor), result.form, site.spec,
                     _kernel_description(site.spec, site.match.q, site.match.k, site.match.v))
        if report is not None:
            report.sites.append(entry)
        log.info("based_compile: %s Based attention at %s -> based::attention (%s)%s", result.form,
                 entry.source, site.spec, "" if rewrite else " [not rewritten: report only]")
    if not settled or not rewrite:
        return None
    return settled, to_dynamo, region, _baked_buffers(gm, settled, evaluator, variable, to_dynamo)


def _site_inputs(site) -> set:
    """The lowered placeholders the replaced part of a site reads (from its output back to, not
    through, q, k and v), with q, k and v."""
    m = site.match
    stop, seen, stack, found = {m.q, m.k, m.v}, set(), [m.output], {m.q, m.k, m.v}
    while stack:
        node = stack.pop()
        if node in seen or node in stop:
            continue
        seen.add(node)
        if node.op == "placeholder":
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def _storage_key(node: fx.Node):
    value = example_value(node) if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return value.untyped_storage()._cdata       # the example values (kept in the graph) keep it alive
    except Exception:  # noqa: BLE001 - a tensor without storage (a subclass): treated as unknown
        return _UNKNOWN_STORAGE


_UNKNOWN_STORAGE = "unknown"


def _written_before_output(gm: fx.GraphModule, site, to_dynamo: dict) -> str | None:
    """The source of an in-place write, before the site's output in Dynamo's graph, into memory the
    site reads (q, k, v or a buffer such as a mask, through any view of them), or None.

    The operator replaces the site at its output, so it reads q, k, v as they are there; the user's
    code read them earlier. A write in between (``v.mul_(2)`` after ``a @ v``, ``self.mask.fill_(1)``
    before the mask is used, or ``q *= 2`` read through as a scale) would change what is computed."""
    output = to_dynamo[site.match.output]
    read = {_storage_key(to_dynamo[n]) for n in _site_inputs(site) if n in to_dynamo} - {None}
    if not read:
        return None
    for node in gm.graph.nodes:
        if node is output:
            return None
        if writes_in_place(node) and node.args and isinstance(node.args[0], fx.Node):
            key = _storage_key(node.args[0])
            if key is not None and (key == _UNKNOWN_STORAGE or key in read or _UNKNOWN_STORAGE in read):
                return source_of(node)
    return None


def _baked_buffers(gm, settled, evaluator: GraphEvaluator, variable: set, to_dynamo: dict) -> list[BakedBuffer]:
    """The graph inputs whose values the rewritten sites took at compile time: tensors the replaced
    part of each site (from its output back to, not through, q, k and v) reads and that are not
    variables (registered buffers: a mask, a scale)."""
    index_of = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
    baked: dict[int, BakedBuffer] = {}
    for site in settled:
        m = site.match
        for node in _site_inputs(site) - {m.q, m.k, m.v}:
            dynamo = to_dynamo.get(node)
            if (node not in variable and isinstance(evaluator.inputs.get(node), torch.Tensor)
                    and dynamo is not None and dynamo in index_of):
                i = index_of[dynamo]
                baked.setdefault(i, BakedBuffer(i, _source_name(dynamo), f"read at compile time by the "
                                                f"site at {source_of(m.anchor)}: {site.spec}"))
    return list(baked.values())


def _region_inputs(gm, example_inputs, inputs, aten_inputs):
    """Real values for the region's inputs, and which of them are not compile-time constants.

    Dynamo placeholders take the real example inputs (buffers are constants); sizes their
    example values; activations computed outside the region random tensors of their shape
    (only the numerical probe reads them, and only through q, k, v or shapes if the site is Based).
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constant_flags = dict(zip(placeholders, _constant_placeholders(gm, example_inputs)))
    real_of = dict(zip(placeholders, example_inputs))
    real, variable = [], set()
    for index, (dynamo_node, aten_node) in enumerate(zip(inputs, aten_inputs)):
        if dynamo_node in real_of:
            real.append(real_of[dynamo_node])
            if not constant_flags[dynamo_node]:
                variable.add(aten_node)
            continue
        value = example_value(dynamo_node)
        if isinstance(value, torch.Tensor):
            shape = tuple(int(hint(s)) for s in value.shape)
            real.append(LazyTensor(shape, value.dtype, value.device, seed=index))
            variable.add(aten_node)
        else:
            real.append(hint(value) if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)) else value)
    return real, variable


def _refuse(refusal: Refused, report: Explanation | None) -> None:
    entry = Refusal(source_of(refusal.node), refusal.category, refusal.reason)
    log.debug("based_compile: refused at %s (%s): %s", entry.source, entry.category, entry.reason)
    if report is not None:
        report.add_refusal(entry)


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
    from torch._inductor import config, list_mode_options

    modes = list_mode_options()
    if mode is not None and mode not in modes:
        raise ValueError(f"mode must be one of {tuple(modes)}, got {mode!r}")
    patches = dict(modes[mode]) if mode else {}
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"options must be a dict of Inductor settings, got {type(options).__name__}")
    known = config.get_config_copy()
    for key, value in (options or {}).items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"options: {key!r} is not an Inductor setting (torch._inductor.list_options())")
        patches[name] = value
    return patches


def backend(*, inner="inductor", rewrite: bool = True, kernel: str = "auto", verify: bool = True):
    """A configured ``based`` backend for ``torch.compile(model, backend=based_compile.backend(...))``."""
    from . import config

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

    def based(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
        patches = _inductor_settings(inner, mode, options)
        compile_inner = (lambda g: inner_compile(g, example_inputs, config_patches=patches)) if patches else \
            (lambda g: inner_compile(g, example_inputs))
        result = run_pass(gm, example_inputs, rewrite=rewrite, verify=verify)
        if result is None:
            return compile_inner(gm)
        rewritten, baked = result
        compiled = compile_inner(rewritten)
        return guard_buffers(compiled, baked, example_inputs) if baked else compiled

    based.options = {"inner": inner, "rewrite": rewrite, "kernel": kernel, "verify": verify}
    return based


_default_backend = None


def based_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None, options: dict | None = None):
    """The entry-point target: ``torch.compile(model, backend="based")`` (Inductor inside; its ``mode``
    and ``options``, e.g. ``mode="reduce-overhead"`` for CUDA graphs, configure that Inductor)."""
    global _default_backend
    if _default_backend is None:
        _default_backend = backend()
    return _default_backend(gm, example_inputs, mode=mode, options=options)


def register() -> None:
    """Register ``based_backend`` under the name "based" (idempotent)."""
    from torch._dynamo.backends.registry import _BACKENDS, _COMPILER_FNS, register_backend

    if "based" in _COMPILER_FNS:
        return
    if _BACKENDS.get("based") is not None:
        return            # Dynamo found the entry point: looking "based" up loads based_backend itself
    register_backend(name="based")(based_backend)
