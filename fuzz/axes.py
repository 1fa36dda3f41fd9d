"""Generators along each axis of the README's "What it recognises" table.

Each generator appends source lines to a ``Source`` and records its choice in ``src.choices``.
Naming convention inside the generated code: ``q, k, v`` are [B, H, T, D] once the prologue has
run (except in the "einsum_bthd" layout, where they stay [B, T, H, D]); ``T`` is the length;
``s`` the scores, ``a`` the weights, ``o`` the output, ``den`` the normaliser; ``qf, kf`` the
features. Where a mutation (``mutate.py``) changes one axis, the generator of that axis writes
the mutated spelling instead: one change, and the rest of the program as it would be.
"""
from __future__ import annotations

import math

from .source import Source, num

# --------------------------------------------------------------------------- layout and heads


def layout(src: Source) -> str:
    """The layout of q, k, v as the model receives them, and how the core gets [B, H, T, D]."""
    choice = src.pick("layout", {"bhtd": 6, "bthd_transpose": 2, "bthd_permute": 1, "einsum_bthd": 1})
    if choice == "bthd_transpose":
        src.prologue.append("q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)")
        src.epilogue.append("o = o.transpose(1, 2)")
    elif choice == "bthd_permute":
        src.prologue.append("q, k, v = (x.permute(0, 2, 1, 3) for x in (q, k, v))")
        src.epilogue.append("o = o.permute(0, 2, 1, 3)")
    return choice


def heads(src: Source, head_dim: int) -> str:
    """GQA: k and v have fewer heads than q; make them match (head axis ``head_dim``)."""
    if src.hkv == src.h:
        src.choices["gqa"] = "none"
        return "none"
    g = src.h // src.hkv
    if src.mutated("gqa_tiled"):
        choice = src.pick("gqa", ["repeat_tiled"])
        reps = ", ".join(str(g) if i == head_dim else "1" for i in range(4))
        src.prologue.append(f"k, v = k.repeat({reps}), v.repeat({reps})")
        return choice
    choice = src.pick("gqa", ["repeat_interleave", "torch_repeat_interleave", "expand_reshape"])
    if choice == "repeat_interleave":
        src.prologue.append(f"k, v = k.repeat_interleave({g}, dim={head_dim}), v.repeat_interleave({g}, dim={head_dim})")
    elif choice == "torch_repeat_interleave":
        src.prologue.append(f"k = torch.repeat_interleave(k, {g}, dim={head_dim})")
        src.prologue.append(f"v = torch.repeat_interleave(v, {g}, {head_dim})")
    else:
        if head_dim == 1:
            src.prologue.append("b, hk, t, dk = k.shape")
            src.prologue.append(f"k = k[:, :, None].expand(b, hk, {g}, t, dk).reshape(b, hk * {g}, t, dk)")
            src.prologue.append(f"v = v[:, :, None].expand(b, hk, {g}, t, v.shape[-1]).reshape(b, hk * {g}, t, -1)")
        else:
            src.prologue.append("b, t, hk, dk = k.shape")
            src.prologue.append(f"k = k[:, :, :, None].expand(b, t, hk, {g}, dk).reshape(b, t, hk * {g}, dk)")
            src.prologue.append(f"v = v[:, :, :, None].expand(b, t, hk, {g}, v.shape[-1]).reshape(b, t, hk * {g}, -1)")
    return choice


# --------------------------------------------------------------------------- scale


SCALES = {"0.5": 0.5, "0.25": 0.25, "1/sqrt(d)": None, "0.3": 0.3}


def scale(src: Source, *, on_scores: bool) -> str:
    """Where the scale goes: on q, k, the scores, both, a Parameter or buffer, or none.

    Returns the line to put after the scores (or "" when the scale was put on q/k)."""
    places = {"none": 2, "q_mul": 3, "q_div": 1, "k_mul": 1, "k_div": 1, "both": 1, "param": 1, "buffer": 1}
    if on_scores:
        places.update({"s_mul": 3, "s_div": 2, "s_sqrt_d": 2, "s_pow_d": 1})
    place = src.pick("scale", places)
    which = src.stream("scale").choice(list(SCALES))
    value = SCALES[which] or 1 / math.sqrt(src.dk)
    if place in ("s_sqrt_d", "s_pow_d"):
        value = 1 / math.sqrt(src.dk)
    if place != "none":
        src.scale *= value          # the feature maps carry a scale of their own
    after = ""
    if place == "q_mul":
        src.core.append(f"q = q * {num(value)}")
    elif place == "q_div":
        src.core.append(f"q = q / {num(1 / value)}")
    elif place == "k_mul":
        src.core.append(f"k = {num(value)} * k")
    elif place == "k_div":
        src.core.append(f"k = k / {num(1 / value)}")
    elif place == "both":
        src.core.append(f"q, k = q * {num(math.sqrt(value))}, k * {num(math.sqrt(value))}")
    elif place in ("param", "buffer"):
        if place == "param":
            src.init.append(f"self.scale = nn.Parameter(torch.tensor({num(value)}))")
        else:
            src.buffer("scale", f"torch.tensor({num(value)})")
        if on_scores and src.stream("scale").random() < 0.7:
            after = "s = s * self.scale"
        else:
            src.core.append("q = q * self.scale")
    elif place == "s_mul":
        after = f"s = s * {num(value)}"
    elif place == "s_div":
        after = f"s = s / {num(1 / value)}"
    elif place == "s_sqrt_d":
        after = "s = s / math.sqrt(q.shape[-1])"
    elif place == "s_pow_d":
        after = "s = s * q.size(-1) ** -0.5"
    return after


# --------------------------------------------------------------------------- matmuls


def scores(src: Source, x: str, y: str, *, bthd: bool = False) -> str:
    """``s = x . y^T`` over the last axis, [B, H, T, T]."""
    if bthd:
        i, j = src.stream("scores").sample("ijmn", 2)
        src.choices["scores"] = "einsum_bthd"
        return f"torch.einsum('b{i}hd,b{j}hd->bh{i}{j}', {x}, {y})"
    choice = src.pick("scores", {"@T": 4, "matmul": 2, "mT": 2, "einsum": 2, "permute": 1, "bmm": 1, "kq_mT": 1})
    if choice == "@T":
        return f"{x} @ {y}.transpose(-2, -1)"
    if choice == "matmul":
        return f"torch.matmul({x}, {y}.transpose(2, 3))"
    if choice == "mT":
        return f"{x} @ {y}.mT"
    if choice == "einsum":
        i, j, d = src.stream("scores").sample("ijstcd", 3)
        return f"torch.einsum('bh{i}{d},bh{j}{d}->bh{i}{j}', {x}, {y})"
    if choice == "permute":
        return f"{x} @ {y}.permute(0, 1, 3, 2)"
    if choice == "bmm":
        return (f"torch.bmm({x}.reshape(-1, T, {x}.shape[-1]), {y}.reshape(-1, T, {y}.shape[-1]).transpose(1, 2))"
                f".view({x}.shape[0], {x}.shape[1], T, T)")
    return f"({y} @ {x}.mT).mT"


def numerator(src: Source, w: str, *, bthd: bool = False) -> str:
    """``w @ v``: [B, H, T, Dv] (or [B, T, H, Dv] in the einsum_bthd layout)."""
    if bthd:
        src.choices["numerator"] = "einsum_bthd"
        return f"torch.einsum('bhij,bjhd->bihd', {w}, v)"
    choice = src.pick("numerator", {"@": 5, "matmul": 2, "einsum": 2, "bmm": 1, "vT": 1})
    if choice == "@":
        return f"{w} @ v"
    if choice == "matmul":
        return f"torch.matmul({w}, v)"
    if choice == "einsum":
        i, j, d = src.stream("numerator").sample("ijstce", 3)
        return f"torch.einsum('bh{i}{j},bh{j}{d}->bh{i}{d}', {w}, v)"
    if choice == "bmm":
        return f"torch.bmm({w}.reshape(-1, T, T), v.reshape(-1, T, v.shape[-1])).view(v.shape[0], v.shape[1], T, -1)"
    return f"(v.mT @ {w}.mT).mT"


# --------------------------------------------------------------------------- polynomial


def _term(c: float, expr: str) -> str:
    return expr if c == 1.0 else f"{num(c)} * {expr}"


def coefficients(src: Source) -> None:
    src.c0, src.c1, src.c2 = src.pick("coefficients", {(1.0, 1.0, 0.5): 4, (1.0, 1.0, 1.0): 1, (2.0, 1.0, 0.25): 1,
                                                      (1.0, 0.5, 0.5): 1})
    if src.mutated("coefficient"):
        src.choices["coefficient_was"] = f"{src.c0}, {src.c1}, {src.c2}"
    if src.mutated("no_square"):
        src.c2 = 0.0


def polynomial(src: Source, lines: list[str]) -> str:
    """``a = c0 + c1 s + c2 s^2`` in one of its spellings (reads ``s``, writes ``a``)."""
    c0, c1, c2 = src.c0, src.c1, src.c2
    if src.mutated("coefficient"):
        c2 = c2 * 0.75           # a different Based function: not the one the spec of the original reads
    if src.mutated("no_square"):
        lines.append(f"a = {num(c0)} + {_term(c1, 's')}")
        src.choices["polynomial"] = "no_square"
        return "no_square"
    lin = "s.abs()" if src.mutated("abs_linear") else "s"
    choice = src.pick("polynomial", {"sum": 8, "horner": 1, "addcmul": 1, "chain": 1, "inplace": 1, "half": 1})
    if choice == "sum" or (choice == "half" and c2 != 0.5):
        sq = src.stream("polynomial").choice(["s ** 2", "s * s", "s.pow(2)", "torch.square(s)", "(s * s)"])
        terms = [num(c0), _term(c1, lin), _term(c2, sq)]
        src.stream("polynomial").shuffle(terms)
        lines.append(f"a = {' + '.join(terms)}")
    elif choice == "half":
        lines.append(f"a = {num(c0)} + {_term(c1, lin)} + s ** 2 / 2")
    elif choice == "horner":
        if lin != "s":
            lines.append(f"a = {num(c0)} + {_term(c1, lin)} + s * ({num(c2)} * s)")
        else:
            lines.append(f"a = {num(c0)} + s * ({num(c1)} + {num(c2)} * s)")
    elif choice == "addcmul":
        lines.append(f"a = torch.addcmul({num(c0)} + {_term(c1, lin)}, s, s, value={num(c2)})")
    elif choice == "chain":
        if src.stream("polynomial").random() < 0.5:
            lines.append(f"a = s.pow(2).mul({num(c2)}).add({lin}.mul({num(c1)})).add({num(c0)})")
        else:
            lines.append(f"a = s.square().mul({num(c2)}).add({lin}, alpha={num(c1)}).add({num(c0)})")
    else:
        lines.append("a = s * s")
        lines.append(f"a.mul_({num(c2)})")
        lines.append(f"a.add_({lin}, alpha={num(c1)})")
        lines.append(f"a.add_({num(c0)})")
    if src.mutated("third_order"):
        lines.append("a = a + 0.05 * s ** 3")
    return choice


def dropout(src: Source, lines: list[str]) -> str:
    choice = src.pick("dropout", {"none": 12, "p0": 1, "eval_module": 1, "eval_functional": 1})
    if choice == "p0":
        lines.append("a = F.dropout(a, p=0.0)")
    elif choice == "eval_module":
        src.init.append("self.drop = nn.Dropout(0.1)")
        lines.append("a = self.drop(a)")
    elif choice == "eval_functional":
        lines.append("a = F.dropout(a, p=0.1, training=self.training)")
    return choice


# --------------------------------------------------------------------------- causal mask

MASK_MUTATIONS = ("window", "shift_strict", "shift_up", "anti_causal", "per_head", "fill_nonzero",
                  "buffer_late_window", "decay")


def _keep_expression(src: Source, lines: list[str]) -> str:
    """A bool [T, T] (or [H, T, T]) keep matrix: causal, or the mutated one."""
    ones = "torch.ones(T, T, dtype=torch.bool)"
    if src.mutated("window"):
        w = src.pick("window", [2, 3, 4])
        lines.append(f"ones = {ones}")
        return f"torch.tril(ones) & ~torch.tril(ones, diagonal=-{w})"
    if src.mutated("shift_strict"):
        return f"torch.tril({ones}, diagonal=-1)"
    if src.mutated("shift_up"):
        return f"torch.tril({ones}, diagonal=1)"
    if src.mutated("anti_causal"):
        return f"torch.triu({ones})"
    if src.mutated("per_head"):
        lines.append(f"ones = {ones}")
        return f"torch.stack([torch.tril(ones, diagonal=-(i % 2)) for i in range({src.h})])"
    return f"torch.tril({ones})"


def mask(src: Source, lines: list[str], w: str = "a") -> str:
    """Zero the weights above the diagonal (``src.causal``), in one of the accepted spellings."""
    if not src.causal:
        src.choices["mask"] = "none"
        return "none"
    mutation = src.mutation if src.mutation in MASK_MUTATIONS else None
    if mutation in ("buffer_late_window",):
        # causal for the first rows, a window further down: equal to tril at short lengths only
        choice = src.pick("mask", ["buffer_late_window"])
        src.buffer("mask", "torch.tril(torch.ones(32, 32, dtype=torch.bool)) & "
                           "~(torch.arange(32)[:, None] - torch.arange(32)[None, :] >= 6)")
        lines.append(f"{w} = {w}.masked_fill(~self.mask[:T, :T], 0.0)")
        return choice
    if mutation == "decay":
        lines.append("i = torch.arange(T)")
        lines.append(f"{w} = {w} * (0.9 ** (i[:, None] - i[None, :]).clamp(min=0)).to({w}.dtype)")
        lines.append(f"{w} = {w}.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)), 0.0)")
        src.choices["mask"] = "decay"
        return "decay"
    if mutation is not None:
        keep = _keep_expression(src, lines)
        choice = src.pick("mask", {"masked_fill": 3, "mul_float": 1, "where_0": 1, "masked_fill_": 1})
        fill = "1e-3" if mutation == "fill_nonzero" else "0.0"
        if choice == "masked_fill" or mutation == "fill_nonzero":
            lines.append(f"{w} = {w}.masked_fill(~({keep}), {fill})")
        elif choice == "mul_float":
            lines.append(f"{w} = {w} * ({keep}).to({w}.dtype)")
        elif choice == "where_0":
            lines.append(f"{w} = torch.where({keep}, {w}, 0.0)")
        else:
            lines.append(f"{w}.masked_fill_(~({keep}), 0.0)")
        return choice
    choice = src.pick("mask", {"masked_fill_tril": 3, "masked_fill_triu": 2, "mul_tril_float": 2,
                               "where_arange_zeros_like": 2, "where_arange_0": 1, "tril_weights": 2,
                               "buffer_bool": 2, "buffer_float": 1, "masked_fill_inplace": 1})
    dev = src.pick("mask_device", ["", ", device=q.device"])
    if choice == "masked_fill_tril":
        lines.append(f"{w} = {w}.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool{dev})), 0.0)")
    elif choice == "masked_fill_triu":
        lines.append(f"{w} = {w}.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool{dev}), diagonal=1), 0)")
    elif choice == "mul_tril_float":
        lines.append(f"{w} = {w} * torch.tril(torch.ones(T, T, dtype={w}.dtype{dev}))")
    elif choice == "where_arange_zeros_like":
        lines.append(f"i = torch.arange(T{dev})")
        lines.append(f"{w} = torch.where(i[:, None] >= i[None, :], {w}, torch.zeros_like({w}))")
    elif choice == "where_arange_0":
        lines.append(f"i = torch.arange(T{dev})")
        lines.append(f"{w} = torch.where(i.unsqueeze(-1) < i.unsqueeze(0), 0.0, {w})")
    elif choice == "tril_weights":
        lines.append(f"{w} = torch.tril({w})")
    elif choice == "buffer_bool":
        src.buffer("mask", "torch.tril(torch.ones(32, 32, dtype=torch.bool))")
        lines.append(f"{w} = {w}.masked_fill(~self.mask[:T, :T], 0.0)")
    elif choice == "buffer_float":
        src.buffer("mask", "torch.tril(torch.ones(32, 32))")
        lines.append(f"{w} = {w} * self.mask[:T, :T]")
    else:
        lines.append(f"{w}.masked_fill_(~torch.tril(torch.ones(T, T, dtype=torch.bool{dev})), 0.0)")
    return choice


# --------------------------------------------------------------------------- normaliser


def eps(src: Source) -> None:
    src.eps = src.pick("eps", {1e-6: 2, 1e-5: 1, 1e-12: 1, 0.0: 1})


def apply_normaliser(src: Source, lines: list[str], den) -> str:
    """o = o / (den + eps) in one of its spellings; ``den`` is an expression [.., T, 1] (or a
    function that writes it, called only when the program normalises)."""
    if not src.normalize:
        src.choices["normaliser"] = "none"
        return "none"
    den = den() if callable(den) else den
    detach = src.pick("detach", {False: 9, True: 1})
    eps_text = "" if src.eps == 0.0 else f" + {num(src.eps)}"
    if src.mutated("eps_after"):
        eps_text = ""
    if src.mutated("den_clamp"):
        den = f"{den}.clamp(min=1.5)"
    lines.append(f"den = {den}{eps_text}")
    if detach:
        lines.append("den = den.detach()")
    choice = src.pick("normaliser", {"div": 5, "reciprocal": 2, "one_over": 1, "idiv": 1, "div_": 1, "imul_reciprocal": 1})
    if choice == "div":
        lines.append("o = o / den")
    elif choice == "reciprocal":
        lines.append("o = o * torch.reciprocal(den)")
    elif choice == "one_over":
        lines.append("o = o * (1 / den)")
    elif choice == "idiv":
        lines.append("o /= den")
    elif choice == "div_":
        lines.append("o.div_(den)")
    else:
        lines.append("o *= torch.reciprocal(den)")
    if src.mutated("eps_after"):
        lines.append(f"o = o + {num(src.eps or 1e-3)}")
    return choice


def row_sums(src: Source, w: str, *, bthd: bool = False) -> str:
    """The sums of the weights' rows, [.., T, 1] (or [B, T, H, 1] in the einsum_bthd layout)."""
    if src.mutated("den_wrong_axis"):
        src.choices["row_sums"] = "wrong_axis"
        body = f"{w}.sum(-2).unsqueeze(-1)"
    else:
        choice = src.pick("row_sums", ["keepdim", "none_index", "unsqueeze", "dim_kw"])
        body = {"keepdim": f"{w}.sum(-1, keepdim=True)", "none_index": f"{w}.sum(-1)[..., None]",
                "unsqueeze": f"{w}.sum(-1).unsqueeze(-1)", "dim_kw": f"{w}.sum(dim=-1, keepdim=True)"}[choice]
    if bthd:
        return f"{body}.transpose(1, 2)"
    return body


# --------------------------------------------------------------------------- feature maps


def feature_map(src: Source) -> str:
    """A module-level ``phi(x)`` with phi(q).phi(k) = c0 + c1 s + c2 s^2 (s = scale q.k).

    The canonical Based map: ones, x / d**0.25, the flattened outer product / (sqrt(2) sqrt(d)):
    scale 1/sqrt(d), coefficients (1, 1, 0.5); or the compressed map (diagonal, and the upper
    triangle weighted by sqrt(2)) with the same function."""
    d = src.dk
    src.scale = 1.0 / math.sqrt(d)
    src.c0, src.c1, src.c2 = 1.0, 1.0, 0.5
    ones = src.pick("fm_ones", ["torch_ones", "pow0", "ones_like"])
    lin = src.pick("fm_lin", ["div_pow", "mul_const"])
    quad = src.pick("fm_outer", {"unsqueeze": 3, "einsum": 2, "index_reshape": 2, "triu_compressed": 2})
    if src.mutated("fm_triu_no_sqrt2"):
        quad = src.choices["fm_outer"] = "triu_compressed"
    order = src.pick("fm_order", {"1,x,xx": 5, "xx,x,1": 1, "x,1,xx": 1})
    body = []
    ones_expr = {"torch_ones": "torch.ones(*x.shape[:-1], 1, dtype=x.dtype)", "pow0": "x[..., :1] ** 0",
                 "ones_like": "torch.ones_like(x[..., :1])"}[ones]
    if src.mutated("fm_no_ones"):
        src.c0 = 0.0
    lin_expr = f"x / {d} ** 0.25" if lin == "div_pow" else f"x * {num(d ** -0.25)}"
    if src.mutated("fm_elementwise_square"):
        body.append("x2 = x * x")
    elif quad == "unsqueeze":
        body.append("x2 = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(start_dim=-2)")
    elif quad == "einsum":
        body.append("x2 = torch.einsum('...i,...j->...ij', x, x).flatten(-2)")
    elif quad == "index_reshape":
        body.append("x2 = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], -1)")
    else:
        root2 = "1.0" if src.mutated("fm_triu_no_sqrt2") else "math.sqrt(2)"
        body.append("iu, ju = torch.triu_indices(x.shape[-1], x.shape[-1], offset=1)")
        body.append(f"x2 = torch.cat([x * x, {root2} * x[..., iu] * x[..., ju]], dim=-1)")
    quad_expr = src.stream("fm_outer").choice([f"x2 / (math.sqrt(2) * math.sqrt({d}))", f"x2 * {num(1 / math.sqrt(2 * d))}"])
    parts = {"1": ones_expr, "x": lin_expr, "xx": quad_expr}
    names = [p for p in order.split(",") if not (p == "1" and src.mutated("fm_no_ones"))]
    body.append(f"return torch.cat([{', '.join(parts[p] for p in names)}], dim=-1)")
    src.helpers.append("def phi(x):\n" + "".join(f"    {line}\n" for line in body))
    return quad
