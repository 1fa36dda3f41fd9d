"""Why was an exact program refused? Change one axis at a time back to its plainest spelling.

``attribute(case)`` asks ``based_compile.explain`` (static shapes, at the case's first length)
about the program; then, for each axis not spelled plainly, about the program with every other
axis forced to its plain spelling ``PLAIN[axis]`` (each axis draws from its own random stream, so
forcing one leaves the rest as it was). The axes that alone leave the program without a site are
the culprits. When the original program already has a site under explain(), the refusal came from
the compile itself (dynamic shapes, gradients, the inner compiler): the culprit is ``compile``.
"""
from __future__ import annotations

import based_compile

from .program import generate, load

# the plainest accepted spelling along each axis (README "What it recognises")
PLAIN = {
    "layout": "bhtd", "gqa": "repeat_interleave", "scale": "q_mul", "scores": "@T", "polynomial": "sum",
    "dropout": "none", "mask": "masked_fill_tril", "numerator": "@", "row_sums": "keepdim", "normaliser": "div",
    "residual": "none", "checkpoint": "none", "fm_ones": "torch_ones", "fm_lin": "div_pow", "fm_outer": "unsqueeze",
    "fm_order": "1,x,xx", "fm_linear_numerator": "broadcast_flast", "fm_linear_den": "mul_sum",
    "length": "q.shape[-2]", "mask_device": "", "eps": 1e-6, "coefficients": (1.0, 1.0, 0.5),
}


def _sites(program) -> int | str:
    ns = load(program)
    model = ns["Model"]().double().eval()
    inputs = ns["make_inputs"](program.lengths[0], program.case)
    try:
        return len(based_compile.explain(model, *inputs).sites)
    except Exception as err:  # noqa: BLE001
        return f"explain() raised {type(err).__name__}"


def _found(sites) -> bool:
    return isinstance(sites, int) and sites > 0


def attribute(case: int) -> list[str]:
    """The axis choices (``axis=choice``) each of which alone, with every other axis spelled
    plainly, leaves the program without a site."""
    program = generate(case)
    sites = _sites(program)
    if isinstance(sites, str):
        return [sites]
    if sites:
        return ["compile"]
    plain = {axis: PLAIN[axis] for axis, choice in program.choices.items()
             if axis in PLAIN and choice != (PLAIN[axis] if isinstance(PLAIN[axis], str) else repr(PLAIN[axis]))}
    if not _found(_sites(generate(case, force=plain))):
        return [f"(refused with every axis plain: form={program.form}, causal={program.choices.get('causal')}, "
                f"normalize={program.choices.get('normalize')})"]
    culprits = []
    for axis in plain:
        others = {a: p for a, p in plain.items() if a != axis}
        if not _found(_sites(generate(case, force=others))):
            culprits.append(f"{axis}={program.choices[axis]}")
    return culprits or ["(only in combination)"]
