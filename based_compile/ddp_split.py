"""Dynamo's DDP graph splitting and the pass: the pass sees the whole graph, DDP splits the rewritten one.

Under ``DistributedDataParallel``, Dynamo's ``DDPOptimizer`` (``torch._dynamo.config.optimize_ddp``,
on by default) does not hand the backend the model's graph. It cuts the graph where DDP's
gradient buckets end (counting parameter bytes backwards from the output: a first bucket of
1 MB, then ``bucket_cap_mb``, 25 MB by default) and calls the backend once per piece, with
fake example inputs. A cut can fall inside an attention region: when a bucket fills at a
block's v projection, q and k are computed in one piece and v and the attention in the next;
neither piece then holds a whole site the pass can rewrite (issue 17: at the default bucket
size no block of a 12-layer GPT-2-size model was rewritten on GPUs). Pieces' fake inputs also
hide the values of registered buffers (a mask) the pass reads.

``install()`` (done on import) wraps ``DDPOptimizer.compile_fn``, which Dynamo calls with the
whole graph and its real example inputs. When the backend the optimizer splits for carries a
``presplit`` hook (``mark_presplit``: the based backends and ``explain()``'s), the hook gets the whole
graph first: it runs the pass there, rewrites the sites, then calls ``split`` (the original
``compile_fn``: DDP's bucketing, then the backend once per piece). The rewritten site is one
``based::attention`` node without parameters, so a later cut can only separate it from some of
its inputs (q, k or v then arrive in its piece as graph inputs). The pieces are compiled by the
inner compiler without a second pass (``in_split()``): a piece alone can disagree with the whole
graph (an in-place write in another piece). Backends without a hook get the original
``compile_fn`` untouched; the hook is found through wrappers that keep ``functools.wraps``'s
attributes, through Dynamo's and torch.compile's own wrappers.
"""
from __future__ import annotations

import contextvars
import functools
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

try:
    from torch._dynamo.backends.distributed import DDPOptimizer
except ImportError:           # torch built without distributed: nothing splits graphs
    DDPOptimizer = None

log = logging.getLogger("based_compile")

_HOOK = "_based_presplit"
# Where wrappers keep the backend they wrap: Dynamo's debug wrapper, torch.compile's, functools.wraps.
_WRAPPED = ("_torchdynamo_orig_backend", "compiler_fn", "__wrapped__")
_in_split = contextvars.ContextVar("based_compile_ddp_split", default=False)


def in_split() -> bool:
    """True while DDP's optimizer compiles the pieces of a graph a presplit hook already saw whole."""
    return _in_split.get()


def unhooked_piece() -> bool:
    """True while DDP's optimizer compiles a piece of a graph whose backend had no presplit hook."""
    context = torch._guards.TracingContext.try_get()
    return not in_split() and getattr(context, "ddp_optimizer_ctx", None) is not None


def mark_presplit(backend_fn, presplit) -> None:
    """Give ``backend_fn`` a presplit hook ``presplit(gm, example_inputs, split) -> compiled``;
    ``split(gm) -> (compiled, Pieces)`` runs DDP's bucketing and compiles each piece."""
    setattr(backend_fn, _HOOK, presplit)


def presplit_hook(backend_fn):
    """The presplit hook of a backend, looking through Dynamo's and functools' wrappers, or None."""
    seen = set()
    while backend_fn is not None and id(backend_fn) not in seen:
        seen.add(id(backend_fn))
        hook = getattr(backend_fn, _HOOK, None)
        if hook is not None:
            return hook
        backend_fn = next((getattr(backend_fn, a) for a in _WRAPPED if getattr(backend_fn, a, None) is not None), None)
    return None


@dataclass
class Pieces:
    """How DDP's optimizer cut one graph: ``count`` pieces, each node's piece (0-based, forward order)."""

    count: int
    piece_of: dict[str, int]      # Dynamo node name -> piece index
    bucket_cap_mb: float

    @staticmethod
    def of(optimizer) -> "Pieces":
        buckets = getattr(optimizer, "buckets", None) or []
        piece_of = {node.name: i for i, bucket in enumerate(buckets) for node in bucket.nodes}
        return Pieces(max(len(buckets), 1), piece_of, getattr(optimizer, "bucket_bytes_cap", 0) / 2 ** 20)

    def where(self, nodes: dict[str, str]) -> str:
        """Where a site lies: its piece, or the pieces a cut spreads it over (``nodes``: role -> node name)."""
        pieces = {role: self.piece_of.get(name) for role, name in nodes.items()}
        known = sorted({p for p in pieces.values() if p is not None})
        if not known:
            return f"in a piece of {self.count}"
        if len(known) == 1:
            return f"piece {known[0] + 1} of {self.count}"
        spread = ", ".join(f"{role} in piece {p + 1}" for role, p in pieces.items() if p is not None)
        return (f"pieces {known[0] + 1}-{known[-1] + 1} of {self.count}: DDP's split cuts this site ({spread}); "
                "backend='based' rewrites it on the whole graph before the split")


def describe_split(pieces: Pieces, sites: list, first_index: int) -> list[str]:
    """One line per piece: which of ``sites`` (numbered from ``first_index``) lie in it or are cut there."""
    lines = [f"DDP's graph splitting (bucket cap {pieces.bucket_cap_mb:g} MB) cut the graph into "
             f"{pieces.count} piece(s); the pass ran on the whole graph before the split"]
    for p in range(pieces.count):
        held, cut = [], []
        for i, site in enumerate(sites, first_index):
            where = {pieces.piece_of.get(name) for name in site.nodes.values()} - {None}
            if where == {p}:
                held.append(f"site {i}")
            elif p in where:
                cut.append(f"site {i} (cut)")
        lines.append(f"  piece {p + 1}: " + (", ".join(held + cut) if held or cut else "no Based site"))
    return lines


def install() -> None:
    """Wrap ``DDPOptimizer.compile_fn`` to call presplit hooks (idempotent; no-op without distributed)."""
    if DDPOptimizer is None or getattr(DDPOptimizer.compile_fn, _HOOK + "_installed", False):
        return
    original = DDPOptimizer.compile_fn

    @functools.wraps(original)
    def compile_fn(self, gm: fx.GraphModule, example_inputs, **compiler_configs):
        hook = presplit_hook(getattr(self, "backend_compile_fn", None))
        if hook is None:
            return original(self, gm, example_inputs, **compiler_configs)

        def split(graph: fx.GraphModule):
            token = _in_split.set(True)
            try:
                compiled = original(self, graph, example_inputs, **compiler_configs)
            finally:
                _in_split.reset(token)
            pieces = Pieces.of(self)
            log.debug("based_compile: DDP's graph splitting cut the graph into %d piece(s) after the pass",
                      pieces.count)
            return compiled, pieces

        return hook(gm, example_inputs, split)

    setattr(compile_fn, _HOOK + "_installed", True)
    DDPOptimizer.compile_fn = compile_fn
