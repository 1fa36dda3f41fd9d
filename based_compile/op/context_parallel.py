"""Context parallelism: one sequence split over ranks, exact, by passing Based's small state.

``with based_compile.context_parallel(mesh):`` every ``based::attention`` call (eager or in a
compiled model, forward and backward) treats its q, k, v as this rank's contiguous shard of a
longer sequence, the ranks holding the shards in rank order. Each rank computes

    N = N_local + phi_q(Q) P,        P = sum of the states of the ranks before it (causal)
                                         or of all other ranks (non-causal),

with V' = [V, 1] (its last column gives the normaliser z) and o = N[:Dv] / (N[Dv] + eps). What
crosses ranks are states in the symmetric basis: S = phi_k(K)^T V' per key/value head,
phi_k(k) = [1, k, k_a k_b for a <= b] (1 + Dk + Dk(Dk+1)/2 rows; phi_q carries the coefficients
and the weights 2 - [a = b]), [B, Hkv, F, Dv + 1] in float32 (float64 for float64 inputs), one
all-gather per layer forward; nothing of size T crosses ranks. The backward mirrors it with the
reverse states of the queries, R = phi_k(Q~)^T [dN, dz] per query head (q~ = scale q,
dn = do / (z + eps), dz = -(do . o) / (z + eps), 0 unnormalised): times phi_q's coefficients and
weights, the gradient in the prefix P; each rank's dK and dV take the R of the ranks after it
(causal) or of all others.

Two ways to compute a shard, chosen by the local kernel (``custom_op``):

- ``StateKernel`` (the fused chunk; also for the chunked kernel, which takes no states): the
  kernel starts from the prefix itself, forward (its initial states) and backward (the dq walk
  from the same states, the dk/dv walk from the later ranks' R). The shard costs what one device
  costs on that many tokens, plus the moments of K, V (twice: forward, and recomputed in the
  backward) and of Q, dN (once), each a sum over T in parallel. The kernel's states are moments
  in the full basis ([1, k, k (x) k], 1 + Dk + Dk^2 rows); they convert at the exchange.
- otherwise (the parallel kernel, the PyTorch forms of the CPU): N_local is the kernel run
  unnormalised on V' (Dv + 1 value columns), and the prefix is added in PyTorch, over slices of
  ``CHUNK`` tokens so that the [t, F] feature temporaries stay small at long shards.

Both exchange the same states in the same collectives, so ranks that chose different kernels
(shard lengths differ by one token) still agree.

Both recompute the local state in the backward (a few kilobytes per head), so the operator saves
nothing more than without context parallelism.

Not attention: layers that mix tokens along the sequence (the short causal convolutions of Based
models) need the last tokens of the previous shard; ``sequence_halo`` fetches them, and
``shard_causal_convs(model)`` hooks every causal ``nn.Conv1d`` of a model so that it does (other
convolutions raise). Token mixers left as they are compute something else under context
parallelism: apply the helpers to every such layer. ``shard_sequence`` cuts a full-sequence tensor into this rank's
shard (sizes differ by at most one token when T is not divisible by the world size).

Call the backward inside the ``with`` block: the operator reads the setting when it runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.arguments import BasedArguments
from .cpu_path import compute_dtype


@dataclass(frozen=True)
class _Group:
    group: object          # the process group of the sequence dimension
    rank: int
    world: int


_active: _Group | None = None

# Tokens per slice of the prefix computations (states, phi_q(Q) P and their gradients): their
# [t, F] temporaries (F = 153 features at Dk = 16, in float32) stay small at any shard length.
CHUNK = 16384


def _process_group(mesh, mesh_dim):
    if isinstance(mesh, dist.ProcessGroup):
        if mesh_dim is not None:
            raise ValueError("mesh_dim applies to a DeviceMesh, not to a ProcessGroup")
        return mesh
    get_group = getattr(mesh, "get_group", None)
    if get_group is None:
        raise TypeError(f"mesh must be a torch.distributed DeviceMesh or ProcessGroup, got {type(mesh).__name__}")
    if mesh_dim is None and mesh.ndim != 1:
        raise ValueError(f"mesh has {mesh.ndim} dimensions {mesh.mesh_dim_names}: name the sequence one with mesh_dim")
    return get_group(mesh_dim) if mesh_dim is not None else get_group()


@contextlib.contextmanager
def context_parallel(mesh, *, mesh_dim: str | int | None = None):
    """Run Based attention sequence-parallel over ``mesh`` (a 1-D DeviceMesh, a ProcessGroup, or the
    dimension ``mesh_dim`` of a larger mesh, e.g. ``mesh_dim="cp"`` of a (dp, cp) mesh for FSDP2 x
    context parallelism). Inside, each rank passes its own contiguous shard of the sequence."""
    global _active
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context_parallel needs torch.distributed initialised (init_process_group)")
    group = _process_group(mesh, mesh_dim)
    previous = _active
    _active = _Group(group, dist.get_rank(group), dist.get_world_size(group))
    try:
        yield
    finally:
        _active = previous


def active() -> bool:
    """True inside ``context_parallel`` on more than one rank."""
    return _active is not None and _active.world > 1


def shard_bounds(length: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous shard of ``length`` tokens (the first length % world ranks
    hold one token more)."""
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_sequence(x: Tensor, seq_dim: int) -> Tensor:
    """This rank's contiguous shard of the full-sequence tensor ``x`` along ``seq_dim`` (a view)."""
    group = _require_active("shard_sequence")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    start, end = shard_bounds(x.shape[seq_dim], group.rank, group.world)
    return x.narrow(seq_dim, start, end - start)


# The halo exchange is a custom operator (opaque to Inductor, like based::attention). Written as an
# autograd.Function with dist.all_gather, Dynamo traced it into functional collectives and the
# Inductor-compiled backward of the naive LM gave a wrong embedding gradient (0.64 off; aot_eager
# and eager were exact; the cause inside Inductor was not established). As an operator it is exact.
_LIBRARY = torch.library.Library("based", "FRAGMENT")
_LIBRARY.define("sequence_halo(Tensor x, int size, int seq_dim) -> Tensor")
_LIBRARY.define("sequence_halo_backward(Tensor grad, int size, int seq_dim) -> Tensor")


def _halo_forward(x, size, seq_dim):
    group = _require_active("sequence_halo")
    tail = x.narrow(seq_dim, x.shape[seq_dim] - size, size).contiguous()
    tails = _exchange(tail, group)
    before = tails[group.rank - 1] if group.rank > 0 else torch.zeros_like(tail)
    return torch.cat([before, x], dim=seq_dim)


def _halo_backward(grad, size, seq_dim):
    group = _require_active("sequence_halo")
    d_before = grad.narrow(seq_dim, 0, size).contiguous()
    dx = grad.narrow(seq_dim, size, grad.shape[seq_dim] - size).clone()
    gathered = _exchange(d_before, group)
    if group.rank + 1 < group.world:           # the next rank read my tail
        dx.narrow(seq_dim, dx.shape[seq_dim] - size, size).add_(gathered[group.rank + 1])
    return dx


def _halo_fake(x, size, seq_dim):
    shape = list(x.shape)
    shape[seq_dim] = shape[seq_dim] + size
    return x.new_empty(shape)


def _halo_backward_fake(grad, size, seq_dim):
    shape = list(grad.shape)
    shape[seq_dim] = shape[seq_dim] - size
    return grad.new_empty(shape)


for _name, _impl, _fake in (("sequence_halo", _halo_forward, _halo_fake),
                            ("sequence_halo_backward", _halo_backward, _halo_backward_fake)):
    _LIBRARY.impl(_name, _impl, "CPU")
    _LIBRARY.impl(_name, _impl, "CUDA")
    torch.library.register_fake(f"based::{_name}", _fake, lib=_LIBRARY)


def _halo_setup(ctx, inputs, output):
    ctx.size, ctx.seq_dim = inputs[1], inputs[2]


def _halo_grad(ctx, grad):
    return torch.ops.based.sequence_halo_backward(grad, ctx.size, ctx.seq_dim), None, None


torch.library.register_autograd("based::sequence_halo", _halo_grad, setup_context=_halo_setup, lib=_LIBRARY)


def sequence_halo(x: Tensor, size: int, seq_dim: int) -> Tensor:
    """``x`` with the last ``size`` tokens of the previous rank's shard prepended along ``seq_dim``
    (zeros on the first rank, as a causal convolution's left padding): a causal convolution of
    kernel size k over ``sequence_halo(x, k - 1, dim)`` without left padding gives this shard's
    outputs exactly as over the whole sequence. Differentiable; outside ``context_parallel`` it
    prepends zeros. Each shard must hold at least ``size`` tokens."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    seq_dim = seq_dim % x.dim()
    if size == 0:
        return x
    if x.shape[seq_dim] < size:
        raise ValueError(f"x holds {x.shape[seq_dim]} tokens along seq_dim={seq_dim}, fewer than the halo size {size}")
    if not active():
        pad = x.new_zeros(*x.shape[:seq_dim], size, *x.shape[seq_dim + 1:])
        return torch.cat([pad, x], dim=seq_dim)
    return torch.ops.based.sequence_halo(x, size, seq_dim)


class _HaloHooks:
    """Forward hooks that make one causal ``nn.Conv1d`` exact across shards (see ``shard_causal_convs``)."""

    def __init__(self, size: int):
        self.size = size

    def before(self, module, args):
        if not active():
            return None
        x, *rest = args
        return (sequence_halo(x, self.size, seq_dim=-1), *rest)

    def after(self, module, args, output):
        if not active():
            return None
        return output[..., self.size:]


def shard_causal_convs(model: torch.nn.Module) -> list:
    """Make the causal 1-d convolutions of ``model`` exact under ``context_parallel``, without
    touching the model's code: every ``nn.Conv1d`` written as a causal convolution (stride 1,
    padding = dilation * (kernel_size - 1), whose output the model cuts to the first T steps, the
    way Based models write their short convolutions) gets hooks that, inside ``context_parallel``,
    prepend the previous shard's last tokens to its input and drop as many leading outputs: the
    first T outputs are then the shard's outputs over the whole sequence. Outside the context the
    hooks do nothing. Returns the hook handles (``handle.remove()`` undoes it).

    A Conv1d that mixes tokens any other way (symmetric padding, stride) cannot be made exact
    this way: it raises ValueError naming it, rather than computing something else."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Conv1d) or module.kernel_size[0] == 1:
            continue
        k, d = module.kernel_size[0], module.dilation[0]
        padding = module.padding if isinstance(module.padding, str) else module.padding[0]
        if module.stride[0] != 1 or padding != d * (k - 1) or module.padding_mode != "zeros":
            raise ValueError(f"{name or 'model'}: Conv1d(kernel_size={k}, stride={module.stride[0]}, padding="
                             f"{module.padding}, dilation={d}) is not a causal convolution (padding = dilation * "
                             "(kernel_size - 1), stride 1): context parallelism cannot make it exact")
        hooks = _HaloHooks(d * (k - 1))
        handles.append(module.register_forward_pre_hook(hooks.before))
        handles.append(module.register_forward_hook(hooks.after))
    return handles


def _require_active(what: str) -> _Group:
    if _active is None:
        raise RuntimeError(f"{what} must be used inside `with based_compile.context_parallel(mesh):`, "
                           "and no such block is active")
    return _active


# ------------------------------------------------------------------------------ the operator's side

def _bhtd(x, args: BasedArguments, dtype):
    """[B, heads, T, D] in ``dtype`` from the layout."""
    if args.layout == "BTHD":
        x = x.transpose(1, 2)
    return x.to(dtype)


def _sym_index(d: int, device):
    ia, ib = torch.triu_indices(d, d, device=device)
    return ia, ib


def _phi_k(k: Tensor) -> Tensor:
    """[..., Dk] -> [..., 1 + Dk + Dk(Dk+1)/2]: [1, k, k_a k_b (a <= b)]."""
    ia, ib = _sym_index(k.shape[-1], k.device)
    return torch.cat([torch.ones_like(k[..., :1]), k, k[..., ia] * k[..., ib]], dim=-1)


def _phi_q(qs: Tensor, coeffs) -> Tensor:
    """[..., Dk] (q already scaled) -> features with phi_q(q) . phi_k(k) = c0 + c1 s + c2 s^2."""
    c0, c1, c2 = coeffs
    ia, ib = _sym_index(qs.shape[-1], qs.device)
    w = torch.where(ia == ib, 1.0, 2.0).to(qs.dtype)
    return torch.cat([torch.full_like(qs[..., :1], c0), c1 * qs, c2 * w * qs[..., ia] * qs[..., ib]], dim=-1)


def _phi_q_backward(qs: Tensor, g: Tensor, coeffs) -> Tensor:
    """d(phi_q(qs) . g)/d qs for g [..., F]."""
    _, c1, c2 = coeffs
    d = qs.shape[-1]
    ia, ib = _sym_index(d, qs.device)
    w = torch.where(ia == ib, 1.0, 2.0).to(qs.dtype)
    g2 = c2 * w * g[..., 1 + d:]
    out = c1 * g[..., 1:1 + d]
    out = out.index_add(-1, ia, g2 * qs[..., ib])
    return out.index_add(-1, ib, g2 * qs[..., ia])


def _phi_k_backward(k: Tensor, g: Tensor) -> Tensor:
    """d(phi_k(k) . g)/d k for g [..., F]."""
    d = k.shape[-1]
    ia, ib = _sym_index(d, k.device)
    g2 = g[..., 1 + d:]
    out = g[..., 1:1 + d].clone()
    out = out.index_add(-1, ia, g2 * k[..., ib])
    return out.index_add(-1, ib, g2 * k[..., ia])


@dataclass(frozen=True)
class StateKernel:
    """A local kernel that starts from the prefix states itself (states: float32 moments, see above).

    states(k, v, args) -> [B, Hkv, M, Dv + 1];  forward(q, k, v, args, initial) -> (o, z);
    query_states(q, o, z, do, args) -> [B, H, M, Dv + 1];
    backward(q, k, v, o, z, do, args, initial, later) -> (dq, dk, dv)
    (M = 1 + Dk + Dk^2; initial / later None when no rank contributes; z None when unnormalised)."""

    states: Callable
    forward: Callable
    query_states: Callable
    backward: Callable


def _with_ones(v: Tensor, args: BasedArguments) -> Tensor:
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) if args.normalize else v


def _sym_rows(dk: int, device) -> Tensor:
    """The moments' row of each symmetric-basis row: [1, k, k_a k_b (a <= b)] -> 1 + Dk + a Dk + b."""
    ia, ib = _sym_index(dk, device)
    return torch.cat([torch.arange(1 + dk, device=device), 1 + dk + ia * dk + ib])


def _full_rows(dk: int, device) -> Tensor:
    """The symmetric-basis row of each moments row (k_a k_b and k_b k_a share one)."""
    ia, ib = _sym_index(dk, device)
    pair = torch.empty((dk, dk), dtype=torch.long, device=device)
    index = torch.arange(ia.numel(), device=device)
    pair[ia, ib] = index
    pair[ib, ia] = index
    return torch.cat([torch.arange(1 + dk, device=device), 1 + dk + pair.flatten()])


def _to_moments(x: Tensor, args: BasedArguments) -> Tensor:
    """[..., F, Dv + 1] in the symmetric basis -> the fused chunk's moments [..., 1 + Dk + Dk^2, Dv + 1]."""
    return x.index_select(-2, _full_rows(args.dk, x.device))


def _from_moments(m: Tensor, args: BasedArguments, dtype) -> Tensor:
    """The fused chunk's moments [..., 1 + Dk + Dk^2, Dv + 1] -> the symmetric basis [..., F, Dv + 1]
    (k_a k_b and k_b k_a hold the same sum)."""
    return m.index_select(-2, _sym_rows(args.dk, m.device)).to(dtype)


def _with_zero_column(x: Tensor, args: BasedArguments) -> Tensor:
    """[..., Dv'] -> [..., Dv + 1]: unnormalised (Dv' = Dv), a zero normaliser column appended."""
    return torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1) if x.shape[-1] == args.dv else x


def _local_arguments(args: BasedArguments) -> BasedArguments:
    """The shard's own attention, unnormalised over V' = [V, 1]."""
    return replace(args, normalize=False, dv=args.dv + int(args.normalize))


def _slices(length: int) -> list[tuple[int, int]]:
    """[start, end) of the token slices the prefix computations run over (``CHUNK`` tokens each)."""
    return [(start, min(start + CHUNK, length)) for start in range(0, length, CHUNK)]


def _seq(x: Tensor, args: BasedArguments, start: int, end: int) -> Tensor:
    """Tokens [start, end) of a tensor in the operator's layout (a view)."""
    return x.narrow(2 if args.layout == "BHTD" else 1, start, end - start)


def _to_layout(x: Tensor, args: BasedArguments) -> Tensor:
    """[B, heads, t, D] back to the layout."""
    return x.transpose(1, 2) if args.layout == "BTHD" else x


def _features(dk: int) -> int:
    return 1 + dk + dk * (dk + 1) // 2


def _states(k, v1, args: BasedArguments, dtype) -> Tensor:
    """This shard's state phi_k(K)^T V' as [B, Hkv, F, Dv'], summed over token slices."""
    total = k.new_zeros((args.batch, args.kv_heads, _features(args.dk), v1.shape[-1]), dtype=dtype)
    for start, end in _slices(args.length):
        kb = _bhtd(_seq(k, args, start, end), args, dtype)
        vb = _bhtd(_seq(v1, args, start, end), args, dtype)
        total = total + _phi_k(kb).transpose(-2, -1) @ vb
    return total


def _prefix(k, v, args: BasedArguments, dtype, group: _Group) -> Tensor:
    """The earlier (causal) or other ranks' summed state in the symmetric basis, [B, Hkv, F, Dv']
    (Dv' = Dv + 1 when normalised; the exchange always holds the normaliser's column)."""
    state = _states(k, _with_ones(v, replace(args, normalize=True)), args, dtype)
    prefix = _before(_exchange(state, group), group.rank, args.causal)
    return prefix if args.normalize else prefix[..., :args.dv]


def _exchange(x: Tensor, group: _Group) -> list[Tensor]:
    parts = [torch.empty_like(x) for _ in range(group.world)]
    dist.all_gather(parts, x.contiguous(), group=group.group)
    return parts


def _sum(parts: list[Tensor], ranks) -> Tensor:
    total = torch.zeros_like(parts[0])
    for r in ranks:
        total = total + parts[r]
    return total


def _before(parts: list[Tensor], rank: int, causal: bool) -> Tensor:
    """Sum over the ranks before ``rank`` (causal) or over every other rank (non-causal)."""
    return _sum(parts, [r for r in range(len(parts)) if r < rank or (not causal and r != rank)])


def _after(parts: list[Tensor], rank: int, causal: bool) -> Tensor:
    """Sum over the ranks after ``rank`` (causal) or over every other rank (non-causal)."""
    return _sum(parts, [r for r in range(len(parts)) if r > rank or (not causal and r != rank)])


def _queries(q, args: BasedArguments, dtype, start: int, end: int) -> Tensor:
    """Scaled queries [start, end) grouped by kv head: [B, Hkv, G, t, Dk]."""
    qb = _bhtd(_seq(q, args, start, end), args, dtype) * args.scale
    return qb.reshape(args.batch, args.kv_heads, args.group, end - start, args.dk)


def _dn(o, do, z, args: BasedArguments, dtype, start: int, end: int) -> Tensor:
    """The gradient of N' = [N, z] for tokens [start, end): [B, H, t, Dv'] in ``dtype``."""
    ob, dob = _bhtd(_seq(o, args, start, end), args, dtype), _bhtd(_seq(do, args, start, end), args, dtype)
    if not args.normalize:
        return dob
    r = 1.0 / (z[:, :, start:end].to(dtype).unsqueeze(-1) + args.eps)
    return torch.cat([dob * r, -(dob * ob).sum(-1, keepdim=True) * r], dim=-1)


def _contributes(rank: int, world: int, causal: bool, before: bool) -> bool:
    """Whether any rank's state (``before``) or reverse state (after) reaches ``rank``."""
    if not causal:
        return world > 1
    return rank > 0 if before else rank < world - 1


def forward(q, k, v, args: BasedArguments, local) -> tuple[Tensor, Tensor | None]:
    """(o, z) of this shard. ``local``: a ``StateKernel``, or the local kernel's forward
    ``local_forward(q, k, v', local_args)`` run unnormalised on V' = [V, 1]."""
    group = _require_active("based::attention")
    if isinstance(local, StateKernel):
        return local.forward(q, k, v, args, _kernel_prefix(k, v, args, local, group))
    dtype = compute_dtype(q.dtype)
    b, h, hk, g = args.batch, args.heads, args.kv_heads, args.group
    v1 = _with_ones(v, args)
    n_local, _ = local(q, k, v1, _local_arguments(args))
    prefix = _prefix(k, v, args, dtype, group)                                            # [B, Hkv, F, Dv']
    shape = (b, h, args.length, args.dv) if args.layout == "BHTD" else (b, args.length, h, args.dv)
    o = q.new_empty(shape)
    z = q.new_empty((b, h, args.length), dtype=dtype) if args.normalize else None
    for start, end in _slices(args.length):
        n = _bhtd(_seq(n_local, args, start, end), args, dtype).reshape(b, hk, g, end - start, -1)
        n = n + _phi_q(_queries(q, args, dtype, start, end), args.coeffs) @ prefix.unsqueeze(2)
        n = n.reshape(b, h, end - start, -1)
        if args.normalize:
            z[:, :, start:end] = n[..., -1]
            n = n[..., :-1] / (n[..., -1:] + args.eps)
        _seq(o, args, start, end).copy_(_to_layout(n, args))
    return o, z


def backward(q, k, v, o, z, do, args: BasedArguments, local):
    """(dq, dk, dv) of this shard. ``local``: a ``StateKernel``, or the local kernel's backward
    ``local_backward(q, k, v', o, z, dN', local_args)`` (unnormalised: o stands in for the unused
    output, z is None)."""
    group = _require_active("based::attention_backward")
    if isinstance(local, StateKernel):
        return _state_kernel_backward(q, k, v, o, z if args.normalize else None, do, args, local, group)
    local_backward = local
    dtype = compute_dtype(q.dtype)
    b, h, hk, g = args.batch, args.heads, args.kv_heads, args.group
    v1 = _with_ones(v, args)
    # local part: the local kernel's backward on dN'
    dv1_size = v1.shape[-1]
    shape = (b, h, args.length, dv1_size) if args.layout == "BHTD" else (b, args.length, h, dv1_size)
    dn_layout = q.new_empty(shape)
    for start, end in _slices(args.length):
        _seq(dn_layout, args, start, end).copy_(_to_layout(_dn(o, do, z, args, dtype, start, end), args))
    dq, dk, dv1 = local_backward(q, k, v1, dn_layout, None, dn_layout, _local_arguments(args))
    del dn_layout
    dq, dk, dv1 = (x.to(dtype) for x in (dq, dk, dv1))
    # prefix part: N += phi_q(Q) P
    prefix = _prefix(k, v, args, dtype, group).unsqueeze(2)                       # [B, Hkv, 1, F, Dv']
    reverse = prefix.new_zeros((b, hk, g, _features(args.dk), dv1_size))        # R of this shard's queries
    for start, end in _slices(args.length):
        qg = _queries(q, args, dtype, start, end)                                 # [B, Hkv, G, t, Dk]
        dng = _dn(o, do, z, args, dtype, start, end).reshape(b, hk, g, end - start, -1)
        dqg = _phi_q_backward(qg, dng @ prefix.transpose(-2, -1), args.coeffs) * args.scale
        reverse += _phi_k(qg).transpose(-2, -1) @ dng                            # [1, q~, q~_a q~_b]^T dN'
        _seq(dq, args, start, end).add_(_to_layout(dqg.reshape(b, h, end - start, args.dk), args))
    reverse = _with_zero_column(reverse.reshape(b, h, *reverse.shape[3:]), args)
    later = _after(_exchange(reverse, group), group.rank, args.causal)           # [B, H, F, Dv + 1]
    # the gradient in this shard's state: the coefficients and weights of phi_q
    later = later * _phi_q(torch.ones(args.dk, dtype=dtype, device=later.device), args.coeffs)[:, None]
    d_state = later.reshape(b, hk, g, *later.shape[2:]).sum(2)[..., :dv1_size]   # [B, Hkv, F, Dv']
    # the state S = phi_k(K)^T V' of this shard
    for start, end in _slices(args.length):
        kb = _bhtd(_seq(k, args, start, end), args, dtype)
        vb = _bhtd(_seq(v1, args, start, end), args, dtype)
        _seq(dv1, args, start, end).add_(_to_layout(_phi_k(kb) @ d_state, args))
        _seq(dk, args, start, end).add_(_to_layout(_phi_k_backward(kb, vb @ d_state.transpose(-2, -1)), args))
    dv = dv1[..., :args.dv]
    return tuple(x.to(ref.dtype).contiguous() for x, ref in ((dq, q), (dk, k), (dv, v)))


def _state_kernel_backward(q, k, v, o, z, do, args: BasedArguments, local: StateKernel, group: _Group):
    """The backward of a ``StateKernel`` shard: an all-gather of this shard's state (recomputed),
    one of its queries' reverse states (in the order of the other path's backward, so that ranks on
    different paths meet in the same collectives), then the kernel's backward from both."""
    initial = _kernel_prefix(k, v, args, local, group)
    dtype = compute_dtype(q.dtype)
    reverse = _from_moments(local.query_states(q, o, z, do, args), args, dtype)   # [B, H, F, Dv + 1]
    later = _after(_exchange(reverse, group), group.rank, args.causal)
    if not _contributes(group.rank, group.world, args.causal, before=False):
        later = None
    return local.backward(q, k, v, o, z, do, args, initial, None if later is None else _to_moments(later, args))


def _kernel_prefix(k, v, args: BasedArguments, local: StateKernel, group: _Group) -> Tensor | None:
    """The earlier (causal) or other ranks' summed state as the fused chunk's moments, None when
    there is none (the first rank, causal)."""
    state = _from_moments(local.states(k, v, args), args, compute_dtype(k.dtype))         # [B, Hkv, F, Dv + 1]
    prefix = _before(_exchange(state, group), group.rank, args.causal)
    if not _contributes(group.rank, group.world, args.causal, before=True):
        return None
    return _to_moments(prefix, args)
