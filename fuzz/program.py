"""A composed program as Python source text: ``generate(case)`` -> ``Program``.

The case number seeds every choice, so ``generate(n)`` is the same program on every machine and
run. The text defines ``Model`` (an ``nn.Module`` whose forward is the attention), ``make_inputs(T,
seed)`` and the settings of the comparison (``LENGTHS``, ``INNER``, ``DYNAMIC``, ``GRAD``); with
``check.py`` appended it is a standalone reproducer (``reproducer()``).
"""
from __future__ import annotations

import inspect
import linecache
from dataclasses import dataclass

from . import axes, check, mutate
from .mutate import FM_LINEAR, FM_QUADRATIC, QUADRATIC
from .source import Source

HEADER = """import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
"""


@dataclass
class Program:
    case: int
    form: str
    mutation: str | None
    choices: dict
    text: str                   # the module: Model, make_inputs, LENGTHS, INNER, DYNAMIC, GRAD
    lengths: tuple
    inner: str
    dynamic: bool | None
    grad: bool
    spec: str                   # the Based function of the unmutated program, in words

    @property
    def exact(self) -> bool:
        """Unmutated Based attention, with gradients of the Based function (no detached normaliser)."""
        return self.mutation is None and self.choices.get("detach") != "True"

    def reproducer(self) -> str:
        """A standalone script: the program, the comparison, and a main that prints the verdict."""
        harness = inspect.getsource(check).replace("from __future__ import annotations\n", "")
        return (f"# based_compile fuzz case {self.case}: python this_file.py\n"
                f"# form={self.form} mutation={self.mutation} spec: {self.spec}\n"
                f"# choices: {self.choices}\n" + self.text + "\n\n# ---- the comparison (fuzz/check.py)\n"
                + harness + MAIN)


MAIN = '''

if __name__ == "__main__":
    result = check(Model, make_inputs, LENGTHS, INNER, DYNAMIC, GRAD)
    if result["crash"]:
        print(result.get("traceback", ""))
        print("CRASH:", result["crash"])
    else:
        for t, errors in result["errors"].items():
            print(f"T={t}: based::attention calls {result['based_calls'][t]}, errors",
                  {k: f"{v:.2e}" for k, v in errors.items()})
        print("WRONG" if result["wrong"] else "ok", "worst:", result["worst"])
    if result["crash"] or result["wrong"]:
        plain = check(Model, make_inputs, LENGTHS, INNER, DYNAMIC, GRAD, plain=True)
        print(f"the same with backend={INNER!r} alone (no based pass):",
              "CRASH " + plain["crash"] if plain["crash"] else "WRONG" if plain["wrong"] else "ok")
'''


def _indent(lines, n):
    return "".join(" " * n + line + "\n" for line in lines)


# Choices forced for every case of this process (``python -m fuzz --force inner=eager``).
FORCED: dict = {}


def generate(case: int, force: dict | None = None) -> Program:
    """The program of this case number; ``force`` (axis -> choice, on top of ``FORCED``) overrides
    single choices and leaves the others as they were (each axis draws from its own random stream)."""
    src = Source(case=case, force={**FORCED, **(force or {})})
    form = src.pick("form", {QUADRATIC: 6, FM_QUADRATIC: 2, FM_LINEAR: 3})
    src.h = src.pick("heads", [1, 2, 2, 4])
    src.hkv = src.pick("kv_heads", [d for d in (1, 2, 4) if src.h % d == 0 and d <= src.h] + [src.h, src.h])
    src.dk = src.pick("dk", [2, 3] if form != QUADRATIC else [2, 3, 4])
    src.b, src.dv = src.pick("batch", [1, 2]), src.pick("dv", [2, 3, 5])
    src.causal = src.pick("causal", {True: 4, False: 1})
    src.normalize = src.pick("normalize", {True: 6, False: 1})
    axes.eps(src)
    src.mutation = mutate.choose(src, form)
    if form == QUADRATIC:
        lay = axes.layout(src)
    else:
        lay = src.pick("layout", {"bhtd": 4, "bthd_transpose": 2, "bthd_permute": 1})
        if lay == "bthd_transpose":
            src.prologue.append("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
            src.epilogue.append("o = o.transpose(1, 2)")
        elif lay == "bthd_permute":
            src.prologue.append("q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))")
            src.epilogue.append("o = o.permute(0, 2, 1, 3)")
    bthd = lay == "einsum_bthd"
    axes.heads(src, 2 if bthd else 1)
    length = src.pick("length", ["q.shape[-2]", "q.size(2)", "k.shape[2]"]) if not bthd else "q.shape[1]"
    src.core.append(f"T = {length}")
    checkpointed = src.pick("checkpoint", {"none": 12, "core": 1, "phi": 1 if form != QUADRATIC else 0})

    if form == QUADRATIC:
        _quadratic(src, bthd)
    else:
        axes.feature_map(src)
        after = axes.scale(src, on_scores=False)
        assert after == ""
        if checkpointed == "phi":
            src.core.append("qf = checkpoint(phi, q, use_reentrant=False)")
            src.core.append("kf = checkpoint(phi, k, use_reentrant=False)")
        else:
            src.core.append("qf, kf = phi(q), phi(k)")
        if form == FM_QUADRATIC:
            _fm_quadratic(src)
        else:
            _fm_linear(src)

    residual = src.pick("residual", {"none": 10, "iadd": 1, "add": 1})
    if residual != "none":
        src.extra_inputs.append("x")
        src.epilogue.append("o += x" if residual == "iadd" else "o = o + x")

    # two short lengths first: the recompile with a symbolic length happens where a window or a
    # shifted mask still looks causal (issue 13 class 3)
    lengths = src.pick("lengths", [(3, 8, 12), (2, 5, 9), (5, 8, 12), (4, 9), (3, 7, 10), (2, 3, 8), (2, 4, 9)])
    inner = src.pick("inner", {"eager": 2, "aot_eager": 2, "inductor": 1})
    dynamic = src.pick("dynamic", {None: 3, True: 1})
    grad = src.pick("grad", {True: 3, False: 1})
    text = _text(src, lay, checkpointed, lengths, inner, dynamic, grad)
    spec = (f"scale={src.scale:.6g} c=({src.c0:g}, {src.c1:g}, {src.c2:g}) causal={src.causal} "
            f"normalize={src.normalize} eps={src.eps:g} layout={lay} H={src.h} Hkv={src.hkv}")
    return Program(case, form, src.mutation, dict(src.choices), text, lengths, inner, dynamic, grad, spec)


def _quadratic(src: Source, bthd: bool) -> None:
    axes.coefficients(src)
    after = axes.scale(src, on_scores=True)
    src.core.append(f"s = {axes.scores(src, 'q', 'k', bthd=bthd)}")
    if after:
        src.core.append(after)
    if src.mutated("cast_roundtrip"):
        src.core.append("s = s.float().to(q.dtype)")
    lines: list[str] = []
    if src.mutated("mask_before_poly"):
        lines.append("s = s.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), 0.0)")
        src.choices["mask"] = "before_poly"
        axes.polynomial(src, lines)
        axes.dropout(src, lines)
    else:
        axes.polynomial(src, lines)
        if src.pick("mask_after_dropout", [False, True]):
            axes.dropout(src, lines)
            axes.mask(src, lines)
        else:
            axes.mask(src, lines)
            axes.dropout(src, lines)
    src.core.extend(lines)
    src.core.append(f"o = {axes.numerator(src, 'a', bthd=bthd)}")
    axes.apply_normaliser(src, src.core, lambda: axes.row_sums(src, "a", bthd=bthd))


def _fm_quadratic(src: Source) -> None:
    src.core.append(f"a = {axes.scores(src, 'qf', 'kf')}")
    lines: list[str] = []
    axes.dropout(src, lines)
    axes.mask(src, lines)
    src.core.extend(lines)
    src.core.append(f"o = {axes.numerator(src, 'a')}")
    axes.apply_normaliser(src, src.core, lambda: _fm_quadratic_den(src))


def _fm_quadratic_den(src: Source) -> str:
    """The row sums of the weights, or the same written on the features (phi(q) . cumsum(phi(k)),
    phi(q) @ sum(phi(k))): the mask mutations then change the numerator only."""
    if src.mutated("den_wrong_axis"):
        return axes.row_sums(src, "a")
    choice = src.pick("fm_quadratic_den", {"row_sums": 3, "features_mul_sum": 1, "features_einsum": 1})
    if choice == "row_sums":
        return axes.row_sums(src, "a")
    ksum = "kf.cumsum(2)" if src.causal else "kf.sum(2, keepdim=True)"
    if choice == "features_mul_sum":
        return f"(qf * {ksum}).sum(-1, keepdim=True)"
    if src.causal:
        return f"torch.einsum('bhtf,bhtf->bht', qf, {ksum})[..., None]"
    return "qf @ kf.sum(2).unsqueeze(-1)"


def _fm_linear(src: Source) -> None:
    core = src.core
    if src.causal:
        ksum = "kf.cumsum(2) - kf" if src.mutated("cumsum_exclusive") else "kf.cumsum(2)"
        choice = src.pick("fm_linear_numerator", {"einsum_states": 1, "broadcast_vlast": 2, "broadcast_flast": 2})
        states_shift = " - kf.unsqueeze(-1) * v.unsqueeze(-2)" if src.mutated("cumsum_exclusive") else ""
        if choice == "einsum_states":
            core.append(f"kv = torch.einsum('bhtf,bhtd->bhtfd', kf, v).cumsum(2){states_shift}")
            core.append("o = torch.einsum('bhtf,bhtfd->bhtd', qf, kv)")
        elif choice == "broadcast_flast":
            shift = " - kf.unsqueeze(-2) * v.unsqueeze(-1)" if src.mutated("cumsum_exclusive") else ""
            core.append(f"o = (qf.unsqueeze(-2) * ((kf.unsqueeze(-2) * v.unsqueeze(-1)).cumsum(2){shift})).sum(-1)")
        else:
            core.append(f"kv = (kf.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(dim=2){states_shift}")
            core.append("o = (qf.unsqueeze(-1) * kv).sum(-2)")
        if src.mutated("den_noncausal"):
            ksum = "kf.sum(2, keepdim=True)"
        den = src.pick("fm_linear_den", {"mul_sum": 3, "einsum_quadform": 1})
        den_expr = (f"(qf * ({ksum})).sum(-1, keepdim=True)" if den == "mul_sum"
                    else f"torch.einsum('bhtf,bhtf->bht', qf, {ksum})[..., None]")
        if src.mutated("den_noncausal") and den == "einsum_quadform":
            den_expr = f"torch.einsum('bhtf,bhsf->bht', qf, {ksum})[..., None]"
    else:
        choice = src.pick("fm_linear_numerator", ["einsum_state", "matmul_state"])
        if choice == "einsum_state":
            core.append("kv = torch.einsum('bhtf,bhtd->bhfd', kf, v)")
            core.append("o = qf @ kv")
        else:
            core.append("o = qf @ (kf.transpose(-2, -1) @ v)")
        den = src.pick("fm_linear_den", ["mul_sum", "matmul"])
        den_expr = ("(qf * kf.sum(2, keepdim=True)).sum(-1, keepdim=True)" if den == "mul_sum"
                    else "qf @ kf.sum(2).unsqueeze(-1)")
    axes.apply_normaliser(src, core, den_expr)


def _text(src: Source, lay: str, checkpointed: str, lengths, inner, dynamic, grad) -> str:
    out = [HEADER, f"B, H, HKV, DK, DV = {src.b}, {src.h}, {src.hkv}, {src.dk}, {src.dv}",
           f"LENGTHS = {lengths!r}", f"INNER = {inner!r}", f"DYNAMIC = {dynamic!r}", f"GRAD = {grad!r}", ""]
    for helper in src.helpers:
        out += ["", helper]
    args = ", ".join(["q", "k", "v"] + src.extra_inputs)
    cls = ["", "class Model(nn.Module):", "    def __init__(self):", "        super().__init__()"]
    cls += [" " * 8 + line for line in src.init]
    cls += ["", f"    def forward(self, {args}):"]
    body = list(src.prologue)
    if checkpointed == "core":
        body.append("o = checkpoint(self.attend, q, k, v, use_reentrant=False)")
    else:
        body += src.core
    body += src.epilogue
    body.append("return o")
    cls += [" " * 8 + line for line in body]
    if checkpointed == "core":
        cls += ["", "    def attend(self, q, k, v):"] + [" " * 8 + line for line in src.core + ["return o"]]
    out += cls
    qshape = "(B, T, {h}, {d})" if lay != "bhtd" else "(B, {h}, T, {d})"
    out += ["", "", "def make_inputs(T, seed):",
            "    g = torch.Generator().manual_seed(seed)",
            "    def randn(*shape):",
            "        return torch.randn(*shape, generator=g, dtype=torch.float64)",
            f"    q = randn{qshape.format(h='H', d='DK')}",
            f"    k = randn{qshape.format(h='HKV', d='DK')}",
            f"    v = randn{qshape.format(h='HKV', d='DV')}"]
    if src.extra_inputs:
        out.append(f"    x = randn{qshape.format(h='H', d='DV')}")
    out.append(f"    return {', '.join(['q', 'k', 'v'] + src.extra_inputs)}")
    return "\n".join(out) + "\n"


def load(program: Program) -> dict:
    """Execute the program's text as a module of its own (registered with linecache, so that
    stack traces and explain() show its lines); its namespace."""
    filename = f"<fuzz case {program.case}>"
    linecache.cache[filename] = (len(program.text), None, program.text.splitlines(True), filename)
    namespace = {"__name__": f"fuzz_case_{program.case}"}
    exec(compile(program.text, filename, "exec"), namespace)      # noqa: S102 - our own generated program
    return namespace
