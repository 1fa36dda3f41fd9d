"""Why was an exact program refused? Change one axis at a time back to its plainest spelling.

``attribute(case)`` asks ``based_compile.explain`` (static shapes, at the case's first length)
about the program, then about the same program with one axis forced to ``PLAIN[axis]`` (each axis
draws from its own random stream, so the rest of the program stays as it was). The axes whose
plain spelling makes explain() find a site are the culprits. When the original program already
has a site under explain(), the refusal came from the compile itself (dynamic shapes, gradients,
the inner compiler): the culprit is named ``compile``.
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


def attribute(case: int) -> list[str]:
    """The axis choices (``axis=choice``) that alone make this program refused."""
    program = generate(case)
    sites = _sites(program)
    if isinstance(sites, str):
        return [sites]
    if sites:
        return ["compile"]
    culprits = []
    for axis, choice in program.choices.items():
        plain = PLAIN.get(axis)
        if plain is None or choice == (plain if isinstance(plain, str) else repr(plain)):
            continue
        variant = generate(case, force={axis: plain})
        sites = _sites(variant) if variant.text != program.text else 0
        if isinstance(sites, int) and sites > 0:
            culprits.append(f"{axis}={choice}")
    return culprits or ["(no single axis)"]
