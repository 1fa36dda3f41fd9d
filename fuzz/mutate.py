"""One semantic mutation: a single change that makes a program not Based, or a different Based.

A mutated program must either be refused or rewritten with the spec of what it now computes:
the comparison with eager decides, whatever the pass does. ``MUTATIONS`` maps each mutation to
what it changes and the program forms it applies to; the axis generators (``axes.py``) write the
mutated spelling where ``src.mutation`` names their axis.
"""
from __future__ import annotations

from .source import Source

QUADRATIC, FM_QUADRATIC, FM_LINEAR = "quadratic", "fm_quadratic", "fm_linear"
ALL = (QUADRATIC, FM_QUADRATIC, FM_LINEAR)
WEIGHTS = (QUADRATIC, FM_QUADRATIC)        # forms with a T x T weight matrix

# name: (what it changes, forms, needs) with needs among "causal", "normalize", "gqa"
MUTATIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "coefficient": ("c2 scaled by 0.75 (a different Based)", (QUADRATIC,), ()),
    "no_square": ("the s^2 term dropped (1 + s)", (QUADRATIC,), ()),
    "third_order": ("+ 0.05 s^3 after the polynomial", (QUADRATIC,), ()),
    "abs_linear": ("|s| in the linear term", (QUADRATIC,), ()),
    "cast_roundtrip": ("scores rounded through float32 (s.float().to(q.dtype))", (QUADRATIC,), ()),
    "mask_before_poly": ("the causal mask zeroes s before the polynomial (masked weights become c0)",
                         (QUADRATIC,), ("causal",)),
    "window": ("sliding-window mask (width 2-4) instead of causal", WEIGHTS, ("causal",)),
    "shift_strict": ("strictly causal mask (tril diagonal=-1)", WEIGHTS, ("causal",)),
    "shift_up": ("mask shifted up (tril diagonal=1)", WEIGHTS, ("causal",)),
    "anti_causal": ("triu instead of tril", WEIGHTS, ("causal",)),
    "per_head": ("odd heads strictly causal, even heads causal", WEIGHTS, ("causal",)),
    "fill_nonzero": ("masked weights set to 1e-3 instead of 0", WEIGHTS, ("causal",)),
    "buffer_late_window": ("registered mask buffer: causal for the first 6 rows, a window of 6 below",
                           WEIGHTS, ("causal",)),
    "decay": ("weights times 0.9^(i-j) (a decay)", WEIGHTS, ("causal",)),
    "eps_after": ("eps added after the division", ALL, ("normalize",)),
    "den_clamp": ("normaliser clamped to >= 1.5", ALL, ("normalize",)),
    "den_wrong_axis": ("normaliser sums the columns (sum(-2)) instead of the rows", WEIGHTS, ("normalize",)),
    "gqa_tiled": ("k, v heads tiled with .repeat (head h reads kv head h % Hkv)", ALL, ("gqa",)),
    "fm_elementwise_square": ("feature map uses x * x instead of the outer product", (FM_QUADRATIC, FM_LINEAR), ()),
    "fm_triu_no_sqrt2": ("compressed feature map without the sqrt(2) on the off-diagonal terms",
                         (FM_QUADRATIC, FM_LINEAR), ()),
    "fm_no_ones": ("feature map without its ones column (c0 = 0)", (FM_QUADRATIC, FM_LINEAR), ()),
    "cumsum_exclusive": ("exclusive cumsum of the states (strictly causal)", (FM_LINEAR,), ("causal",)),
    "den_noncausal": ("numerator causal (cumsum), normaliser over all keys (sum)", (FM_LINEAR,),
                      ("causal", "normalize")),
}


def choose(src: Source, form: str) -> str | None:
    """One mutation applicable to this program, or None (about half the time)."""
    have = {"causal": src.causal, "normalize": src.normalize, "gqa": src.hkv < src.h}
    names = [n for n, (_, forms, needs) in MUTATIONS.items() if form in forms and all(have[x] for x in needs)]
    mutated = src.pick("mutated", [False, True]) and names
    return src.pick("mutation", names) if mutated else None
