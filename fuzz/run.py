"""Run fuzz cases: generate, compile and compare (``check.py``), classify, summarise.

A case's verdict (``Outcome.verdict``):

- ``wrong``: the compiled model's output or a gradient differs from eager by more than the
  tolerance (a silently wrong result; the worst error says where);
- ``crash``: the compiled call raised where eager ran;
- ``native_crash``: the process died (a segfault, an abort of the allocator) or ``timeout``:
  it ran past the time limit; both are seen only when cases run in a worker process
  (``worker.py``);
- ``invalid``: eager itself raised (a bug of the generator, reported so it gets fixed);
- ``ok``: agreement at every length.

A failure is checked again with the inner compiler alone (``check(plain=True)``, no based pass):
when it fails there too, ``upstream`` is set: a bug of torch, reported but not counted as ours.

For ``ok`` cases the fuzzer also records whether ``based::attention`` ran at every length
(``rewritten``), at some (``partial``) or at none (``refused``), and, for exact programs that were
not rewritten everywhere, why: the refusals the pass logged while compiling (the ``based_compile``
logger), or, when it logged none, ``based_compile.explain()`` at the first length.
"""
from __future__ import annotations

import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field

import based_compile
from based_compile.graph import feature_normaliser, verify

from . import check
from .attribute import attribute as culprits_of
from .program import Program, generate, load

TOLERANCE = 1e-9


FAILURES = ("wrong", "crash", "native_crash", "timeout")


@dataclass
class Outcome:
    program: Program
    verdict: str                    # ok, wrong, crash, native_crash, timeout, invalid
    detail: str = ""                # the error, or the worst difference
    rewritten: str = "none"         # all, partial, none: where based::attention ran
    based_calls: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)     # refusals and pass warnings logged
    seconds: float = 0.0
    upstream: bool = False          # fails the same way without the based pass
    culprits: list[str] = field(default_factory=list)    # attribute.py: the axes that alone refuse

    @property
    def failed(self) -> bool:
        """A failure of based_compile: a silently wrong result or a crash the inner compiler
        alone does not have."""
        return self.verdict in FAILURES and not self.upstream

    def line(self) -> str:
        p = self.program
        upstream = " [UPSTREAM: fails without the based pass too]" if self.upstream else ""
        return (f"case {p.case}: {self.verdict.upper()}{upstream} form={p.form} mutation={p.mutation} "
                f"inner={p.inner} dynamic={p.dynamic} grad={p.grad} lengths={p.lengths} "
                f"based::attention={self.based_calls} {self.detail}")

    def to_json(self) -> dict:
        return {"case": self.program.case, "verdict": self.verdict, "detail": self.detail,
                "rewritten": self.rewritten, "based_calls": {str(t): n for t, n in self.based_calls.items()},
                "reasons": self.reasons, "seconds": self.seconds, "upstream": self.upstream,
                "culprits": self.culprits}

    @classmethod
    def from_json(cls, data: dict) -> "Outcome":
        return cls(generate(data["case"]), data["verdict"], data["detail"], data["rewritten"],
                   {int(t): n for t, n in data["based_calls"].items()}, data["reasons"], data["seconds"],
                   data["upstream"], data["culprits"])


class _Records(logging.Handler):
    """Collects the based_compile logger's messages while a case compiles."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a message that fails to format is not the fuzzer's concern
            pass


STRUCTURE_ONLY = "FUZZ_STRUCTURE_ONLY"         # environment: "1" in the process that runs the cases


def structure_only() -> None:
    """The graph pass's structural reading alone, as at real sizes: the numerical probe and the
    normaliser's index tensors are off (they run only up to 4M entries, and the fuzzer's programs are
    tiny), so a structural check that would let a wrong program through shows up here."""
    verify.PROBE_MAX_ELEMENTS = 0
    feature_normaliser.INDEX_MAX_ELEMENTS = 0


def run_case(case: int, tol: float = TOLERANCE, attribute: bool = False) -> Outcome:
    """Run one case in this process; a failure is checked again without the pass (``upstream``);
    with ``attribute``, an exact program not rewritten everywhere gets its ``culprits``."""
    outcome = _run_case(case, tol)
    if outcome.verdict in FAILURES:
        outcome.upstream = run_plain(case, tol)
    if attribute and outcome.verdict == "ok" and outcome.program.exact and outcome.rewritten != "all":
        outcome.culprits = culprits_of(case)
    return outcome


def run_plain(case: int, tol: float = TOLERANCE) -> bool:
    """Whether the case fails with its inner compiler alone (no based pass)."""
    program = generate(case)
    ns = load(program)
    try:
        result = check.check(ns["Model"], ns["make_inputs"], program.lengths, program.inner,
                             program.dynamic, program.grad, tol, seed=case, plain=True)
    except Exception:  # noqa: BLE001 - eager failed: not an upstream failure of the compiled code
        return False
    return bool(result["crash"] or result["wrong"])


def _run_case(case: int, tol: float) -> Outcome:
    start = time.perf_counter()
    program = generate(case)
    ns = load(program)
    logger = logging.getLogger("based_compile")
    handler, old_level, old_propagate = _Records(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        try:
            result = check.check(ns["Model"], ns["make_inputs"], program.lengths, program.inner,
                                 program.dynamic, program.grad, tol, seed=case)
        except Exception as err:  # noqa: BLE001 - eager itself failed: a generator bug
            return Outcome(program, "invalid", f"{type(err).__name__}: {err}", seconds=time.perf_counter() - start)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
    reasons = [_reason(m) for m in handler.messages if "refused" in m or "failed" in m or "warning" in m.lower()]
    if result["crash"]:
        return Outcome(program, "crash", result["crash"], reasons=reasons, seconds=time.perf_counter() - start)
    calls = result["based_calls"]
    ran = [t for t, n in calls.items() if n > 0]
    rewritten = "all" if len(ran) == len(calls) else "partial" if ran else "none"
    worst, where = result["worst"]
    outcome = Outcome(program, "wrong" if result["wrong"] else "ok", f"worst error {worst:.3g} at {where}",
                      rewritten, calls, reasons)
    if program.exact and rewritten != "all" and not reasons:
        outcome.reasons = _explain_reasons(ns, program)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _reason(message: str) -> str:
    """A refusal message without its source location."""
    m = re.search(r"refused at .*? \((\w+)\): (.*)", message, re.S)
    if m:
        return f"{m.group(1)}: {m.group(2)}"
    return message


def _explain_reasons(ns: dict, program: Program) -> list[str]:
    model = ns["Model"]().double().eval()
    inputs = ns["make_inputs"](program.lengths[0], program.case)
    try:
        explanation = based_compile.explain(model, *inputs)
    except Exception as err:  # noqa: BLE001
        return [f"explain() raised {type(err).__name__}: {err}"]
    if not explanation.refusals:
        return [f"explain(): {len(explanation.sites)} site(s), 0 refusals (static shapes)"
                if explanation.sites else "explain(): 0 sites, 0 refusals"]
    return [f"{r.category}: {r.reason}" for r in explanation.refusals]


def reason_class(reason: str) -> str:
    """A refusal reason with node names and numbers blanked, for counting."""
    if reason.startswith("explain()"):
        return reason
    reason = re.sub(r"\[[^\]]*\]", "[..]", reason)
    reason = re.sub(r"'[^']*'", "'..'", reason)
    reason = re.sub(r"\b(\w+_)?\d+(\.\d+)?(e-?\d+)?\b", "N", reason)
    return reason[:160]


def summarise(outcomes: list[Outcome]) -> str:
    n = len(outcomes)
    by = Counter(o.verdict for o in outcomes)
    exact = [o for o in outcomes if o.program.exact and o.verdict == "ok"]
    refused = [o for o in exact if o.rewritten == "none"]
    partial = [o for o in exact if o.rewritten == "partial"]
    ours = Counter(o.verdict for o in outcomes if o.failed)
    lines = [f"fuzz summary: {n} cases, {ours['wrong']} silently wrong, {ours['crash']} crashes, "
             f"{ours['native_crash']} native crashes, {ours['timeout']} timeouts, "
             f"{by['invalid']} invalid (generator bugs), {by['ok']} ok"]
    if exact:
        lines.append(f"exact programs (no mutation, no detach) that compiled and agreed: {len(exact)}; refused at every length "
                     f"{len(refused)} ({100 * len(refused) / len(exact):.0f}%), at some lengths {len(partial)} "
                     f"({100 * len(partial) / len(exact):.0f}%)")
    mutated = [o for o in outcomes if o.program.mutation and o.verdict == "ok"]
    if mutated:
        lines.append(f"mutated programs that ran: {len(mutated)}; rewritten at some length "
                     f"{sum(o.rewritten != 'none' for o in mutated)} (exact results: a correct different-Based spec)")
    reasons = Counter()
    for o in refused + partial:
        for r in set(reason_class(x) for x in o.reasons) or {"(no reason logged)"}:
            reasons[r] += 1
    if reasons:
        lines.append("top refusal reasons of exact programs:")
        lines += [f"  {count:4d}  {reason}" for reason, count in reasons.most_common(12)]
    culprits = Counter(c for o in refused + partial for c in o.culprits)
    if culprits:
        lines.append("refusals of exact programs by culprit (the one axis whose plain spelling gets a site; "
                     "'compile': explain() finds a site at static shapes):")
        lines += [f"  {count:4d}  {c}" for c, count in culprits.most_common(15)]
    axes = Counter()
    for o in refused + partial:
        for axis, choice in o.program.choices.items():
            axes[f"{axis}={choice}"] += 1
    if axes:
        totals = Counter(f"{a}={c}" for o in exact for a, c in o.program.choices.items())
        rates = sorted(((axes[k] / totals[k], k) for k in axes if totals[k] >= 3), reverse=True)[:12]
        lines.append("axis choices most often refused (exact programs, refused/seen):")
        lines += [f"  {r:4.0%}  {k} ({axes[k]}/{totals[k]})" for r, k in rates]
    upstream = [o for o in outcomes if o.upstream]
    if upstream:
        lines.append(f"upstream (fail without the based pass too, not counted): {len(upstream)}")
        lines += ["  " + o.line() for o in upstream]
    failed = [o for o in outcomes if o.failed or o.verdict == "invalid"]
    if failed:
        lines.append("failures:")
        lines += ["  " + o.line() for o in failed]
    return "\n".join(lines)


def write_reproducer(outcome: Outcome, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"case_{outcome.program.case}_{outcome.verdict}.py")
    with open(path, "w") as f:
        f.write(f"# verdict on the fuzzer's run: {outcome.line()}\n")
        f.write(outcome.program.reproducer())
    return path
