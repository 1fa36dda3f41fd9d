"""The ``based`` custom operators: what the graph pass rewrites Based attention onto.

Public entry point: ``based_attention(q, k, v, spec) -> o``.

Operators (namespace ``based``, visible as ``based::attention`` in traces and compiled code):

- ``based::attention(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, training=False)
  -> (o, z)``: o in q's dtype and layout; z the normaliser sum_j f(s_ij) as [B, H, T]
  (float32, float64 for float64 inputs) when ``normalize``, else an empty float32 tensor. z is
  what the backward needs and is not differentiable. ``training`` only steers the kernel choice
  (policy.py); it is decided by ``based_attention`` from grad mode and requires_grad, because the
  operator's implementation runs below autograd and cannot see them.
- ``based::attention_backward(do, q, k, v, o, z, layout, scale, c0, c1, c2, causal, normalize, eps,
  training) -> (dq, dk, dv)``: the backward of ``based::attention``, so the backward is as opaque
  to Inductor as the forward. It runs the backward of the kernel the forward chose (the choice is a
  pure function of the same arguments, recomputed). Not differentiable itself (no double backward).

Registration is the low-level ``torch.library`` one (``Library.define`` + ``impl`` per dispatch key
+ ``register_fake``), with the autograd formula as the operator's Autograd kernel: the same
structure ``torch.library.custom_op`` + ``register_autograd`` build, at less than half their
per-call cost in eager mode (which matters at T <= 1024, where a kernel takes tens of microseconds).

Eager cost: ``based_attention`` on plain CPU/CUDA tensors (no autocast, dispatch mode, fake or
functional tensor, vmap, subclass; not under Dynamo) calls that autograd formula itself, and an
eager backward reuses the forward's checked arguments and kernel choice, which are remembered per
(shapes, dtypes, devices, spec, kernel setting). Everything else goes through the dispatcher, so
traces and compiled graphs always hold ``based::attention`` and ``based::attention_backward``; the
profiler shows both names in either case. A compiled graph's call (no grad mode, plain tensors)
meets the operator's Autograd kernel, which runs the implementation itself instead of redispatching
(``dispatch.direct_backend``); the implementation reuses the remembered plan, and the per-call
settings are read without ``os.environ``'s Mapping layers (``kernels.arguments.environ_get``).
``benchmarks/host_overhead.py`` measures the host time per call of every path.

Lengths: q may hold fewer positions than k and v (Tq <= Tk, queries at the end of a KV cache);
causal query i then sees keys j <= i + Tk - Tq (the mask aligned to the end), and o and z have Tq
positions. Dynamic Tk traces once (the fake implementation is symbolic in Tk).

Devices: CUDA runs the Triton kernels (``based_compile.kernels``: parallel / fused_chunk / chunked, float16,
bfloat16, float32; for Tq < Tk the decode kernel at inference with a few queries, else the PyTorch
forms, see policy.py); CPU runs ``based_compile.cpu_path`` (any floating dtype, float64 included), or
the Triton kernels under ``TRITON_INTERPRET=1`` when the user forces one (config.py; not bfloat16,
which the kernels refuse under the interpreter).

Autocast: inside ``torch.autocast(device, dtype)`` the operator casts q, k, v of their device to
its autocast dtype where autocast itself would (float16, bfloat16, float32; float64 stays
float64), then runs with autocast off (Based attention is matmul-like, and the naive PyTorch code
it replaces runs its matmuls in that dtype). The output has the dtype the inputs were cast to.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import config, context_parallel, cpu_path, policy
from .dispatch import direct_backend
from ..kernels import chunked as chunked_kernel
from ..kernels import decode as decode_kernel
from ..kernels import fused_chunk as fused_chunk_kernel
from ..kernels import parallel as parallel_kernel
from ..kernels.arguments import BasedArguments, check_arguments, environ_get
from ..kernels.first_order import first_order, wants_graph
from .spec import BasedSpec

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _arguments(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps) -> BasedArguments:
    """Checked arguments; CUDA tensors also within the Triton kernels' dtypes and feature dims
    (meta tensors, which have no kernel, are checked like CPU tensors)."""
    on_cuda = q.device.type == "cuda"
    dtypes = KERNEL_DTYPES if on_cuda else CPU_DTYPES
    args = check_arguments(q, k, v, scale, (c0, c1, c2), causal, normalize, eps, layout, dtypes=dtypes,
                           shorter_queries=True)
    if on_cuda:
        _check_kernel_limits(q, args)
    return args


def _check_kernel_limits(q, args: BasedArguments) -> None:
    """The Triton kernels' limits (the parallel kernel's: it runs whenever fused_chunk cannot)."""
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q, k, v dtype must be one of (float16, bfloat16, float32) for the Triton kernels, "
                        f"got {q.dtype}")
    if args.dk > parallel_kernel.MAX_DK:
        raise ValueError(f"q, k feature dim Dk must be in 1..{parallel_kernel.MAX_DK} on {q.device.type}, "
                         f"got {args.dk}")
    if args.dv > parallel_kernel.MAX_DV:
        raise ValueError(f"v feature dim Dv must be in 1..{parallel_kernel.MAX_DV} on {q.device.type}, "
                         f"got {args.dv}")


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor) -> str | None:
    """Why ``based::attention`` could not run on tensors like these (fake ones will do), or None.

    The graph pass asks before it rewrites, so that a site the operator would refuse (a CUDA
    feature dim over the kernels' limits, float64 on CUDA, another device) stays with the inner
    compiler instead of failing at run time. Sizes are read in the last dimension (Dk of q, Dv of v).
    """
    device = q.device.type
    if not (q.dtype == k.dtype == v.dtype):
        return f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if device == "cpu":
        return None if q.dtype in CPU_DTYPES else f"the CPU path takes {CPU_DTYPES}, not {q.dtype}"
    if device != "cuda":
        return f"based::attention runs on cpu and cuda tensors, these are on {device}"
    if q.dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take float16, bfloat16 and float32, not {q.dtype}"
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > parallel_kernel.MAX_DK:
        return f"Dk={dk} is over the Triton kernels' limit of {parallel_kernel.MAX_DK}"
    if dv > parallel_kernel.MAX_DV:
        return f"Dv={dv} is over the Triton kernels' limit of {parallel_kernel.MAX_DV}"
    return None


def _z_dtype(dtype: torch.dtype) -> torch.dtype:
    return cpu_path.compute_dtype(dtype)


def _no_z(q: Tensor) -> Tensor:
    # Stand-in for "no normaliser" (normalize=False): custom operators return tensors, not None.
    return q.new_empty((0,), dtype=torch.float32)


def _kernel_pair(kernel: str, training: bool = False):
    """(forward, backward) of a Triton kernel, following the kernel contract (``training``: the backward
    will run; the chunked kernel's forward then keeps its states for it)."""
    if kernel == "parallel":
        return parallel_kernel.parallel_forward, parallel_kernel.parallel_backward
    if kernel == "chunked":
        forward = chunked_kernel.chunked_training_forward if training else chunked_kernel.chunked_forward
        return forward, chunked_kernel.chunked_backward
    return fused_chunk_kernel.fused_chunk_forward, fused_chunk_kernel.fused_chunk_backward


_LIBRARY = torch.library.Library("based", "DEF")
_TAGS = (torch.Tag.pt2_compliant_tag,)
_SPEC_SCHEMA = "str layout, float scale, float c0, float c1, float c2, bool causal, bool normalize, float eps"
_LIBRARY.define(f"attention(Tensor q, Tensor k, Tensor v, {_SPEC_SCHEMA}, bool training=False) -> (Tensor, Tensor)",
                tags=_TAGS)
_LIBRARY.define(f"attention_backward(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor z, {_SPEC_SCHEMA}, "
                f"bool training) -> (Tensor, Tensor, Tensor)", tags=_TAGS)


def _plan(q, k, v, *params) -> tuple[BasedArguments, str, object, object]:
    """The checked arguments, the kernel (policy.py) and its forward and backward functions for one
    call; the backward reuses them.

    Remembered per (shapes, dtypes, devices, spec arguments, kernel setting): all are functions of
    these alone, and checking them again on every call of a training loop costs as much as a
    Triton launch. The key holds the settings as written (``config.kernel`` and the two environment
    variables); they are validated when a plan is made, so an invalid value raises every time.

    Queries against a longer KV cache (Tk > Tq, k and v of one length): one plan for every Tk, so
    that a cache growing by a token per step does not check and decide again per token and layer.
    That holds because nothing checked depends on Tk's value beyond Tk == Tv and Tq <= Tk (which
    the key's condition states), and the kernel choice for Tq < Tk does not depend on it either
    (policy.decide_for; tests/test_host_paths.py pins it); only the arguments' key_length is set
    to this call's Tk."""
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    layout = params[0] if params else None
    time_dim = 2 if layout == "BHTD" else 1 if layout == "BTHD" else None
    tk = None
    if time_dim is not None and len(q_shape) == 4 and len(k_shape) == 4 and len(v_shape) == 4:
        tk = k_shape[time_dim]
        if tk > q_shape[time_dim] and tk == v_shape[time_dim]:
            k_shape = k_shape[:time_dim] + k_shape[time_dim + 1:]      # Tk out of the key
            v_shape = v_shape[:time_dim] + v_shape[time_dim + 1:]
        else:
            tk = None
    key = (q_shape, k_shape, v_shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, params,
           config.kernel, environ_get(config.KERNEL_ENV_VAR), environ_get("TRITON_INTERPRET"))
    if tk is not None:
        key = (*key, _ANY_KEY_LENGTH)
    try:
        plan = _PLANS.get(key)
    except TypeError:                  # an unhashable setting (a list): making a plan raises naming it
        return _make_plan(q, k, v, *params)
    if plan is None:
        plan = _make_plan(q, k, v, *params)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan if tk is None else [plan, (tk, plan)]
        return plan
    if tk is None:
        return plan
    last_tk, last_plan = plan[1]       # the plan at the latest Tk (all layers of a decoding step share it)
    if last_tk == tk:
        return last_plan
    a, kernel, forward, backward = plan[0]
    last_plan = (BasedArguments(a.batch, a.heads, a.kv_heads, a.length, a.dk, a.dv, a.layout, a.scale, a.coeffs,
                                a.causal, a.normalize, a.eps, tk), kernel, forward, backward)
    plan[1] = (tk, last_plan)          # one assignment: a concurrent reader sees the old pair or the new one
    return last_plan


_PLANS: dict = {}
_MAX_PLANS = 256
_ANY_KEY_LENGTH = "Tk > Tq, any Tk"


def _make_plan(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, training):
    args = _arguments(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps)
    kernel = policy.choose_kernel(args, q, k, v, training)
    if kernel in policy.TRITON_KERNELS:
        _check_kernel_limits(q, args)
        forward, backward = _kernel_pair(kernel, training)
    elif kernel == "decode":        # forward only; a backward (grad through a decode call) is the PyTorch one
        forward, backward = decode_kernel.decode_forward, _cpu_pair("quadratic")[1]
    else:
        forward, backward = _cpu_pair(kernel.removeprefix("cpu_").removeprefix("pytorch_"))
    return args, kernel, forward, backward


def _cpu_pair(form: str):
    """(forward, backward) of a PyTorch CPU form, with the Triton kernels' signatures."""
    def forward(q, k, v, args):
        return cpu_path.cpu_forward(q, k, v, args, form)

    def backward(q, k, v, o, z, do, args):
        return cpu_path.cpu_backward(q, k, v, o, z, do, args, form)
    return forward, backward


def _shard_states(k, v, args):
    return fused_chunk_kernel.state_moments(k, v, args)


def _shard_forward(q, k, v, args, initial):
    return fused_chunk_kernel.fused_chunk_forward_with_state(q, k, v, args, initial, final=False)


def _shard_query_states(q, o, z, do, args):
    return fused_chunk_kernel.query_moments(q, o, z, do, args)


def _shard_backward(q, k, v, o, z, do, args, initial, later):
    return fused_chunk_kernel.fused_chunk_backward_with_state(q, k, v, o, z, do, args, initial, later)


# The fused chunk, started from the other ranks' states: a shard costs what one device costs on
# that many tokens (plus the moments), at the real Dv and normalised.
_FUSED_CHUNK_SHARD = context_parallel.StateKernel(_shard_states, _shard_forward, _shard_query_states,
                                                  _shard_backward)


def _local_pair(kernel: str):
    """(forward, backward) of the kernel for a shard's own attention under context parallelism.

    The fused chunk starts from the prefix states itself (``context_parallel.StateKernel``, both
    directions); so does a shard for which the policy chose the chunked kernel, which takes no
    states: the fused chunk's cost is within 1.5x of the chunked kernel's (policy.py's H200 numbers),
    while adding the prefix outside the kernel costs some 25 passes over [T, 153] float32 per layer.
    The other kernels run unnormalised with one more value column (V' = [V, 1]) and the prefix is
    added in PyTorch (CPU forms stay CPU forms)."""
    if kernel in ("fused_chunk", "chunked"):
        return _FUSED_CHUNK_SHARD, _FUSED_CHUNK_SHARD
    if kernel in policy.TRITON_KERNELS:
        return _kernel_pair(kernel)
    return _cpu_pair(kernel.removeprefix("cpu_").removeprefix("pytorch_"))


def _run_forward(q, k, v, args: BasedArguments, kernel: str, forward, backward) -> tuple[Tensor, Tensor]:
    if context_parallel.active():
        if args.offset:
            raise ValueError(f"based::attention under context parallelism takes q, k, v of one length (each rank's "
                             f"shard), got Tq={args.length} < Tk={args.tk} (a KV cache)")
        o, z = context_parallel.forward(q, k, v, args, _local_pair(kernel)[0])
    else:
        o, z = forward(q, k, v, args)
    if z is None:
        return o.contiguous(), _no_z(q)
    return o.contiguous(), z.contiguous()


def _run_backward(do, q, k, v, o, z, args: BasedArguments, kernel: str, forward, backward):
    if context_parallel.active():
        dq, dk, dv = context_parallel.backward(q, k, v, o, z, do, args, _local_pair(kernel)[1])
    else:
        dq, dk, dv = backward(q, k, v, o, z if args.normalize else None, do, args)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def _attention(q, k, v, *params):
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        _check_tensors(q=q, k=k, v=v)
    return _run_forward(q, k, v, *_plan(q, k, v, *_with_training(params)))


def _check_tensors(**tensors) -> None:
    # The dispatcher lets None through a Tensor argument of a Python-registered kernel.
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"based::attention: {name} must be a torch.Tensor, got {type(t).__name__}")


def _with_training(params: tuple) -> tuple:
    """The spec arguments with ``training`` (the dispatcher drops it when it equals its default)."""
    return params if len(params) == 9 else (*params, False)


def _attention_fake(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps, training=False):
    args = _arguments(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps)
    if layout == "BHTD":
        o = q.new_empty((args.batch, args.heads, args.length, args.dv))
    else:
        o = q.new_empty((args.batch, args.length, args.heads, args.dv))
    if not normalize:
        return o, _no_z(q)
    return o, q.new_empty((args.batch, args.heads, args.length), dtype=_z_dtype(q.dtype))


def _attention_backward(do, q, k, v, o, z, *params):
    if not (isinstance(do, Tensor) and isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and isinstance(o, Tensor) and isinstance(z, Tensor)):
        _check_tensors(do=do, q=q, k=k, v=v, o=o, z=z)
    plan = _plan(q, k, v, *params)
    _check_backward_tensors(do, q, o, z, plan[0])
    return _run_backward(do, q, k, v, o, z, *plan)


def _check_backward_tensors(do, q, o, z, args: BasedArguments) -> None:
    """do, o and z as based::attention returns them for q, k, v: the kernels index them by q's
    sizes, so another shape would read out of bounds rather than fail."""
    if args.layout == "BHTD":
        o_shape = (args.batch, args.heads, args.length, args.dv)
    else:
        o_shape = (args.batch, args.length, args.heads, args.dv)
    dtype, device = q.dtype, q.device
    for name, t in (("do", do), ("o", o)):
        if t.shape != o_shape or t.dtype != dtype or t.device != device:     # torch.Size == tuple
            raise ValueError(f"based::attention_backward: {name} must be {list(o_shape)} {q.dtype} on {q.device} "
                             f"(the output's), got {list(t.shape)} {t.dtype} on {t.device}")
    if args.normalize:
        z_shape, z_dtype = (args.batch, args.heads, args.length), _z_dtype(dtype)
        if z.shape != z_shape or z.dtype != z_dtype or z.device != device:
            raise ValueError(f"based::attention_backward: z must be {list(z_shape)} {z_dtype} on {q.device} "
                             f"(the normaliser based::attention returned), got {list(z.shape)} {z.dtype} "
                             f"on {z.device}")


def _attention_backward_fake(do, q, k, v, o, z, layout, scale, c0, c1, c2, causal, normalize, eps, training):
    args = _arguments(q, k, v, layout, scale, c0, c1, c2, causal, normalize, eps)
    _check_backward_tensors(do, q, o, z, args)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


for _name, _impl, _fake in (("attention", _attention, _attention_fake),
                            ("attention_backward", _attention_backward, _attention_backward_fake)):
    _LIBRARY.impl(_name, _impl, "CPU")
    _LIBRARY.impl(_name, _impl, "CUDA")
    torch.library.register_fake(f"based::{_name}", _fake, lib=_LIBRARY)

_ATTENTION = torch.ops.based.attention.default
_ATTENTION_BACKWARD = torch.ops.based.attention_backward.default


def _straight_to_backend(keyset) -> bool:
    """True when, below autograd, a call with this dispatch key set reaches the CPU or CUDA kernel
    directly: no tracing (Dynamo, AOTAutograd, export), fake tensors, functionalization or tensor
    subclass in between. Then the autograd kernel may run the implementation itself."""
    return direct_backend(keyset) is not None


_Key, _KeySet = torch._C.DispatchKey, torch._C.DispatchKeySet
_tls_include = torch._C._dispatch_tls_local_include_set
_tls_exclude = torch._C._dispatch_tls_local_exclude_set
_dispatch_keys = torch._C._dispatch_keys

# A call on plain CPU / CUDA tensors under autograd meets these keys and nothing else (BackendSelect
# and ADInplaceOrView have nothing to do for a functional operator). As raw bits: a key set holds a
# bit per backend (CPU, CUDA, ..., Meta) and a bit per functionality (Dense, Autograd, Python, ...).
_PLAIN_BITS = (_KeySet(_Key.CPU) | _KeySet(_Key.CUDA) | _KeySet(_Key.AutogradCPU) | _KeySet(_Key.AutogradCUDA)
               | _KeySet(_Key.ADInplaceOrView) | _KeySet(_Key.BackendSelect)).raw_repr()
_DENSE_BIT = _KeySet(_Key.CPU).raw_repr() & _KeySet(_Key.CUDA).raw_repr()
_FUNCTIONALITY_BITS = ~(_DENSE_BIT - 1)      # the backend bits sit below Dense


def _plain(*tensors) -> bool:
    """True when a call on these tensors goes through autograd alone to the CPU or CUDA kernel: no
    autocast, tracing, fake or meta tensors, dispatch modes, functionalization, vmap or tensor
    subclass. Read from the dispatch keys the call would meet (the tensors' and the thread's), as
    raw bits: this runs on every eager call, and the bit arithmetic costs about half of what the
    key-set objects' does (the thread's excluded functionalities, e.g. autocast while it is off, do
    not count)."""
    bits = _tls_include().raw_repr()
    for t in tensors:
        bits |= _dispatch_keys(t).raw_repr()
    bits &= ~(_tls_exclude().raw_repr() & _FUNCTIONALITY_BITS)
    return bits & ~_PLAIN_BITS == 0


class _AttentionAutograd(torch.autograd.Function):
    """The autograd formula of ``based::attention``, installed as the operator's Autograd kernel
    (below), the structure ``torch.library.register_autograd`` builds (which is not used: it
    re-reads the 12-argument schema once per argument, ~35 us a call).

    Traced (Dynamo, AOTAutograd, export, fake tensors, compiled autograd): forward redispatches to
    the operator's CPU/CUDA/fake implementation and backward calls ``based::attention_backward``,
    so compiled graphs hold the two operators and not this class. Eager on plain tensors: the same
    implementation is called without the second trip through the dispatcher, and the backward
    reuses the forward's checked arguments and kernel choice (a few tens of microseconds a step,
    which is what the kernels themselves take at T <= 1024)."""

    @staticmethod
    def forward(ctx, keyset, q, k, v, params):
        ctx.set_materialize_grads(False)     # no zeros for z's gradient, which is never used
        if keyset is None or _straight_to_backend(keyset):       # None: based_attention checked _plain
            ctx.plan = _plan(q, k, v, *params)
            o, z = _run_forward(q, k, v, *ctx.plan)
        else:
            ctx.plan = None
            with torch._C._AutoDispatchBelowAutograd():
                o, z = _ATTENTION.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, *params)
        ctx.save_for_backward(q, k, v, o, z)
        ctx.params = params
        if keyset is None:      # based_attention returns o alone: z need not be an output
            return o
        ctx.mark_non_differentiable(z)
        return o, z

    @staticmethod
    def backward(ctx, do, *_dz):
        if do is None:       # o took no part in what is differentiated
            return None, None, None, None, None
        q, k, v, o, z = ctx.saved_tensors
        if ctx.plan is not None and not torch.is_grad_enabled() and _plain(do):
            if torch._C._autograd._profiler_enabled():
                with torch.profiler.record_function("based::attention_backward"):
                    dq, dk, dv = _run_backward(do, q, k, v, o, z, *ctx.plan)
            else:
                dq, dk, dv = _run_backward(do, q, k, v, o, z, *ctx.plan)
        else:
            dq, dk, dv = _ATTENTION_BACKWARD(do, q, k, v, o, z, *ctx.params)   # the kernels read strides
        return None, dq, dk, dv, None


def _attention_autograd(keyset, q, k, v, *params):
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        _check_tensors(q=q, k=k, v=v)
    params = _with_training(params)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _AttentionAutograd.apply(keyset, q, k, v, params)
    if _straight_to_backend(keyset):       # a compiled forward's call: the implementation, checked above
        return _run_forward(q, k, v, *_plan(q, k, v, *params))
    with torch._C._AutoDispatchBelowAutograd():
        return _ATTENTION.redispatch(keyset & torch._C._after_autograd_keyset, q, k, v, *params)


def _redispatch_backward(keyset, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return _ATTENTION_BACKWARD.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _attention_backward_autograd(keyset, *args):
    if wants_graph(*args):      # create_graph=True: first-order gradients, which refuse a second backward
        return first_order("based::attention_backward", functools.partial(_redispatch_backward, keyset), *args)
    if _straight_to_backend(keyset):        # a compiled backward's call: no second trip through the dispatcher
        return _attention_backward(*args)
    return _redispatch_backward(keyset, *args)


_LIBRARY.impl("attention", _attention_autograd, "Autograd", with_keyset=True)
_LIBRARY.impl("attention_backward", _attention_backward_autograd, "Autograd", with_keyset=True)


def _autocast_eligible(x: Tensor, device_type: str) -> bool:
    """Whether autocast on ``device_type`` casts ``x`` for a lower-precision op (ATen's
    ``at::autocast::is_eligible``): a floating tensor on that device, float64 excepted (autocast
    leaves float64 alone, so a float64 matmul under autocast stays float64)."""
    return x.is_floating_point() and x.dtype != torch.float64 and x.device.type == device_type


def register_autocast(library, name: str, device_type: str) -> None:
    """Cast q, k, v (the first three arguments) of ``based::{name}`` to the current autocast dtype of ``device_type`` (not a
    fixed dtype, which is all ``torch.library.register_autocast`` offers) where autocast would
    (``_autocast_eligible``: float64 stays float64), then run with autocast off. The operators are
    matmul-like: their inputs are cast as a matmul's would be (a site that autocast leaves in float32 in
    eager is run with autocast off by the rewrite: ``graph.autocast_scope``)."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.based, name).default

    def cast_and_run(*args):
        target = torch.get_autocast_dtype(device_type)

        def cast(x):
            if isinstance(x, Tensor) and _autocast_eligible(x, device_type):
                return x.to(target)
            return x

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):   # q, k, v only (not states)
            return op(*(cast(a) if i < 3 else a for i, a in enumerate(args)))

    if op.has_kernel_for_dispatch_key(key):
        op.py_kernels.pop(key)
    op.py_impl(key)(cast_and_run)
    library.impl(name, lambda _keyset, *args: cast_and_run(*args), key_name, with_keyset=True)


for _device_type in ("cpu", "cuda"):
    register_autocast(_LIBRARY, "attention", _device_type)


def based_attention(q: Tensor, k: Tensor, v: Tensor, spec: BasedSpec) -> Tensor:
    """Based linear attention o = f(scale Q K^T) V (normalised per ``spec``) through ``based::attention``.

    q: [B, H, T, Dk] ("BHTD") or [B, T, H, Dk] ("BTHD"); k: like q with Hkv heads (H % Hkv == 0, query
    head h uses kv head h // (H / Hkv)) and Tk >= T positions (a KV cache: causal query i sees keys
    j <= i + Tk - T); v: like k with Dv features. Returns o like q with Dv features.
    Differentiable in q, k, v. Works eagerly and inside torch.compile (fullgraph, dynamic shapes).
    """
    if not isinstance(spec, BasedSpec):
        raise TypeError(f"spec must be a based_compile.spec.BasedSpec, got {type(spec).__name__}")
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    training = policy.is_training(q, k, v)
    params = (*spec.op_arguments, training)
    if not torch.compiler.is_compiling() and _plain(q, k, v):      # _plain: CPU or CUDA tensors only
        return _eager_attention(q, k, v, params)
    o, _ = _ATTENTION(q, k, v, *params)
    return o


def _eager_attention(q, k, v, params) -> Tensor:
    """What the dispatcher would run for ``based::attention`` on plain tensors (the Autograd kernel
    and the implementation), without the trip through it: on a slow host at T <= 1024 the trip
    costs as much as the GPU work. The profiler still sees a ``based::attention`` range."""
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function("based::attention"):
            return _eager_attention_unprofiled(q, k, v, params)
    return _eager_attention_unprofiled(q, k, v, params)


def _eager_attention_unprofiled(q, k, v, params) -> Tensor:
    if params[-1]:   # training
        return _AttentionAutograd.apply(None, q, k, v, params)
    return _attention(q, k, v, *params)[0]
