"""Pattern-match tests of the `based` backend, driven by the zoo (tests/zoo.py).

For every accepted entry: the pass finds the expected sites with the expected spec; the
compiled module matches eager in values and gradients (inputs and parameters); and the
`based` operator really runs in the compiled code (counted with the profiler).
For every near-miss: no site and the expected refusal category; compiled (a set of near-misses
covering every axis of their accepted twins, every refusal class and category): no `based`
operator at run time, and the compiled module still matches eager.
What explain() says of a module the test compiles anyway is read from the report the backend's
pass makes of that compile (``PassReports``: the same pass, rewrite and verify on, on the same
static trace), not from a second trace; explain() runs on every near-miss not compiled here.

The first group of tests checks the catalogue itself (no backend needed): each accepted
entry computes exactly the Based function its spec describes (against the float64
reference), each near-miss computes a different function from its twin, and the catalogue
covers every axis and every refusal class of issue 5.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch

import zoo
from based_calls import BasedOpCounter
from compare import assert_rel_close, rel_error
from pass_reports import PassReports
from based_compile.kernels import naive_parallel_based

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# A float32 run for a spread of forms (one per family and layout).
FLOAT32_NAMES = ("matmul_at", "matmul_bmm_folded", "mask_buffer", "layout_bthd_transposed", "gqa_expand_reshape",
                 "featmap_quadratic_based", "linear_cumsum_based", "einsum_time_first", "projected_layer_gqa")


def ids(entry):
    return entry.name


pytestmark = pytest.mark.usefixtures("fresh_dynamo")     # conftest.py: Dynamo reset around each test


def reference(spec: zoo.Accept, q, k, v):
    """The float64-grade Based reference with an Accept's spec."""
    return naive_parallel_based(q, k, v, scale=spec.scale, coeffs=(spec.c0, spec.c1, spec.c2), causal=spec.causal,
                                normalize=spec.normalize, eps=spec.eps, layout=spec.layout)


def entry_reference(entry: zoo.Entry, inputs):
    spec = entry.expected
    q, k, v = inputs if entry.reference_inputs is None else entry.reference_inputs(*inputs)
    o = reference(spec, q, k, v)
    for _ in range(spec.count - 1):                           # stacked sites: each output is the next v
        o = reference(spec, q, k, o)
    return o


def forward_backward(module, inputs, seed):
    """Output and gradients (inputs, then parameters) for a fixed random cotangent."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    params = [p for p in module.parameters() if p.requires_grad]
    out = module(*inputs)
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, inputs + params, cot)
    return out.detach(), grads


class CountingBackend:
    """The configured based backend, counting the graphs it compiles."""

    def __init__(self, **options):
        import based_compile

        self.backend = based_compile.backend(**options)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


def compile_with(entry, dtype, inner="aot_eager", seed=0, **options):
    module, inputs = entry.make(dtype, seed)
    backend = CountingBackend(inner=inner, **options)
    compiled = torch.compile(module, backend=backend)
    compiled.counting_backend = backend
    return module, compiled, inputs


def assert_matches_eager(module, compiled, inputs, tol, seed=1, reports=None):
    """Compiled (its first call, the compile, under ``reports`` when given) against eager."""
    if reports is not None:
        with reports:
            out_c, grads_c = forward_backward(compiled, inputs, seed)
    else:
        out_c, grads_c = forward_backward(compiled, inputs, seed)
    out_e, grads_e = forward_backward(module, inputs, seed)
    assert_rel_close(out_c, out_e, tol, "compiled output vs eager")
    names = [f"input {i}" for i in range(len(inputs))] + [f"parameter {n}" for n, p in module.named_parameters()
                                                            if p.requires_grad]
    for name, gc, ge in zip(names, grads_c, grads_e):
        assert_rel_close(gc, ge, tol, f"gradient of {name}, compiled vs eager")


def count_based_calls(compiled, inputs, backward=False):
    """Calls of torch.ops.based.* in one forward (and backward) of already-compiled code.

    Called the way ``forward_backward`` called it (inputs requiring grad), so that nothing
    recompiles; checked through the backend's graph count.
    """
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    graphs = compiled.counting_backend.graphs
    with BasedOpCounter() as counter:
        out = compiled(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
    assert compiled.counting_backend.graphs == graphs, "counting the op calls recompiled the module"
    return counter.total


# --------------------------------------------------------------------------- the catalogue itself


def test_catalogue_names_unique_and_twins_exist():
    assert len({e.name for e in zoo.ZOO}) == len(zoo.ZOO)
    for e in zoo.REFUSED:
        assert e.twin in zoo.BY_NAME, f"{e.name}: twin {e.twin!r} is not in the zoo"
        assert zoo.BY_NAME[e.twin].accepted, f"{e.name}: twin {e.twin!r} is not an accepted entry"


def test_catalogue_every_accepted_form_has_a_near_miss():
    twins = {e.twin for e in zoo.REFUSED}
    missing = [e.name for e in zoo.ACCEPTED if e.name not in twins]
    assert not missing, f"accepted entries without a refused near-miss: {missing}"


def test_catalogue_covers_every_axis_and_refusal_class():
    covered = {a for e in zoo.ACCEPTED for a in e.axes}
    assert set(zoo.AXES) - covered == set(), f"axes not covered: {sorted(set(zoo.AXES) - covered)}"
    assert covered - set(zoo.AXES) == set(), f"unknown axes in the zoo: {sorted(covered - set(zoo.AXES))}"
    for cls, member in zoo.REFUSAL_CLASSES.items():
        assert any(member(e) for e in zoo.REFUSED), f"no near-miss of class {cls!r}"


@pytest.mark.parametrize("entry", [e for e in zoo.ACCEPTED if e.inputs == "qkv"], ids=ids)
def test_catalogue_accepted_entry_is_the_based_function_of_its_spec(entry):
    module, inputs = entry.make(torch.float64, 0)
    assert_rel_close(module(*inputs), entry_reference(entry, inputs), 1e-12, f"{entry.name} vs its spec")


@pytest.mark.parametrize("entry", zoo.REFUSED, ids=ids)
def test_catalogue_near_miss_differs_from_its_twin(entry):
    twin = zoo.BY_NAME[entry.twin]
    module, inputs = entry.make(torch.float64, 0)
    twin_module, twin_inputs = twin.make(torch.float64, 0)
    if twin.inputs == "qkv":
        ref = entry_reference(twin, inputs)
    else:                                                     # same seed: same weights, same x
        twin_module.load_state_dict(dict(module.named_parameters()), strict=False)   # buffers stay the twin's
        ref = twin_module(*inputs)
    assert rel_error(module(*inputs), ref) > 1e-3, f"{entry.name} computes the same function as {twin.name}"


# --------------------------------------------------------------------------- explain()


def check_site_spec(name, spec, expected: zoo.Accept):
    from based_compile.op.spec import BasedSpec

    assert isinstance(spec, BasedSpec), f"{name}: site.spec is {type(spec).__name__}, not BasedSpec"
    if expected.strict_layout:
        assert spec.layout == expected.layout, f"{name}: layout {spec.layout}, expected {expected.layout}"
    else:
        assert spec.layout in ("BHTD", "BTHD"), f"{name}: layout {spec.layout!r}"
    got = (spec.c0, spec.c1 * spec.scale, spec.c2 * spec.scale ** 2)
    for what, g, e in zip(("c0", "c1*scale", "c2*scale^2"), got, expected.effective):
        assert math.isclose(g, e, rel_tol=1e-9, abs_tol=1e-12), \
            f"{name}: {what} = {g!r}, expected {e!r} (spec: {spec})"
    assert spec.causal == expected.causal, f"{name}: causal={spec.causal}, expected {expected.causal}"
    assert spec.normalize == expected.normalize, f"{name}: normalize={spec.normalize}, expected {expected.normalize}"
    if expected.normalize:
        assert math.isclose(spec.eps, expected.eps, rel_tol=1e-9, abs_tol=1e-30), \
            f"{name}: eps={spec.eps!r}, expected {expected.eps!r}"
    assert spec.group == expected.group, f"{name}: group={spec.group}, expected {expected.group}"


def check_accepted_report(entry, ex):
    """explain()'s report of an accepted entry (or the pass's report of its compile): its sites, specs."""
    assert len(ex.sites) == entry.expected.count, \
        f"{entry.name}: {len(ex.sites)} sites, expected {entry.expected.count}; refusals: {ex.refusals}"
    for site in ex.sites:
        check_site_spec(entry.name, site.spec, entry.expected)
        assert isinstance(site.source, str) and site.source.strip(), f"{entry.name}: empty site.source"
        assert isinstance(site.form, str) and site.form.strip(), f"{entry.name}: empty site.form"
        assert isinstance(site.kernel, str) and site.kernel.strip(), f"{entry.name}: empty site.kernel"
    assert str(ex).strip(), "explain() prints nothing"


def check_refused_report(entry, ex):
    """explain()'s report of a near-miss (or the pass's report of its compile): no site, the category."""
    assert not ex.sites, f"{entry.name}: near-miss rewritten: {[str(s.spec) for s in ex.sites]}"
    for r in ex.refusals:
        assert r.category in zoo.CATEGORIES, f"{entry.name}: unknown refusal category {r.category!r}"
        assert isinstance(r.reason, str) and r.reason.strip(), f"{entry.name}: refusal without a reason"
    want = entry.expected.category
    if want is not None:
        got = [r.category for r in ex.refusals]
        assert want in got, f"{entry.name}: expected a {want!r} refusal, got {got} ({ex.refusals})"
        assert want in str(ex), f"{entry.name}: explain() does not print the {want!r} refusal"


def test_explain_source_points_at_user_code():
    import based_compile

    module, inputs = zoo.BY_NAME["matmul_at"].make(torch.float64, 0)
    ex = based_compile.explain(module, *inputs)
    assert ex.sites and any("zoo.py" in s.source for s in ex.sites), \
        f"site.source does not name the user's file: {[s.source for s in ex.sites]}"


# --------------------------------------------------------------------------- compiled vs eager


@pytest.mark.parametrize("entry", zoo.ACCEPTED, ids=ids)
def test_compiled_accepted_is_found_with_its_spec_matches_eager_and_runs_based_op(entry):
    module, compiled, inputs = compile_with(entry, torch.float64)
    reports = PassReports()
    assert_matches_eager(module, compiled, inputs, TOL[torch.float64], reports=reports)
    assert reports.graphs, reports          # one graph, traced once (or again after a restart of Dynamo's analysis)
    for report in reports.graphs:
        check_accepted_report(entry, report)
    fwd = count_based_calls(compiled, inputs)
    assert fwd == entry.expected.count, f"{entry.name}: {fwd} torch.ops.based calls in the forward, " \
                                        f"expected {entry.expected.count}"


def first_entry_per_axis(prefixes):
    chosen = {}
    for axis in zoo.AXES:
        if axis.startswith(prefixes):
            entry = next(e for e in zoo.ACCEPTED if axis in e.axes)
            chosen[entry.name] = entry
    return list(chosen.values())


# Every mask spelling and both feature-map forms (both linear shapes), under dynamic shapes.
DYNAMIC = first_entry_per_axis(("mask:", "form:")) + [zoo.BY_NAME["linear_cumsum_outer_shape"]]


@pytest.mark.parametrize("entry", DYNAMIC, ids=ids)
def test_compiled_dynamic_two_lengths_one_graph(entry):
    """dynamic=True: a second length reuses the graph, still rewritten, still exact."""
    module, _ = entry.make(torch.float64, 0)
    backend = CountingBackend(inner="eager")
    compiled = torch.compile(module, backend=backend, dynamic=True)
    compiled.counting_backend = backend
    for t in (9, 16):
        _, inputs = entry.make(torch.float64, t, t=t)
        assert_matches_eager(module, compiled, inputs, TOL[torch.float64])
        fwd = count_based_calls(compiled, inputs)
        assert fwd == entry.expected.count, f"{entry.name}, T={t}: {fwd} torch.ops.based calls"
    assert backend.graphs == 1, f"{entry.name}: {backend.graphs} graphs for two lengths with dynamic=True"


# Forms whose structure is easy to misread (head mapping, layouts, folded batches, einsum
# letters, stacked sites, cumsum shapes): the structural match alone must be right.
STRUCTURE_AXES = ("gqa:", "layout:", "matmul:bmm", "matmul:einsum", "input:projected", "count:", "form:linear")
STRUCTURAL = [e for e in zoo.ACCEPTED if any(a.startswith(STRUCTURE_AXES) for a in e.axes)]


@pytest.mark.parametrize("entry", STRUCTURAL, ids=ids)
def test_compiled_without_verify_matches_eager(entry):
    """verify=False: no numerical probe to catch a misread, so the rewrite itself must be exact."""
    module, compiled, inputs = compile_with(entry, torch.float64, inner="eager", verify=False)
    assert_matches_eager(module, compiled, inputs, TOL[torch.float64])
    fwd = count_based_calls(compiled, inputs)
    assert fwd == entry.expected.count, f"{entry.name}: {fwd} torch.ops.based calls, expected {entry.expected.count}"


@pytest.mark.parametrize("entry", STRUCTURAL, ids=ids)
def test_compiled_with_the_probe_skipped_for_size_matches_eager(entry, monkeypatch):
    """verify=True on shapes too large for the numerical probe: the structure alone decides, as
    with verify=False (a tiled GQA once ran with the un-repeated heads here: error 1.0)."""
    from based_compile.graph import verify
    monkeypatch.setattr(verify, "PROBE_MAX_ELEMENTS", 0)
    module, compiled, inputs = compile_with(entry, torch.float64, inner="eager")
    assert_matches_eager(module, compiled, inputs, TOL[torch.float64])
    fwd = count_based_calls(compiled, inputs)
    assert fwd == entry.expected.count, f"{entry.name}: {fwd} torch.ops.based calls, expected {entry.expected.count}"


def _near_miss_traits(entry):
    """What a compiled near-miss stands for: its twin's axes, its refusal classes and its category."""
    traits = {("axis", a) for a in zoo.BY_NAME[entry.twin].axes}
    traits |= {("class", c) for c, member in zoo.REFUSAL_CLASSES.items() if member(entry)}
    return traits | {("category", entry.expected.category)}


def _compiled_near_misses():
    """Near-misses to compile (each refused: by the report of its compile): greedily, until each axis of an
    accepted twin, each refusal class and each refusal category is compiled at least once (48 of 98;
    the others refuse on the same path, in a form the chosen ones share)."""
    left, chosen = set().union(*map(_near_miss_traits, zoo.REFUSED)), []
    while left:
        best = max(zoo.REFUSED, key=lambda e: len(_near_miss_traits(e) & left))   # first of the best
        chosen.append(best)
        left -= _near_miss_traits(best)
    return chosen


COMPILED_NEAR_MISSES = _compiled_near_misses()


def test_compiled_near_misses_cover_every_axis_class_and_category():
    covered = set().union(*map(_near_miss_traits, COMPILED_NEAR_MISSES))
    assert covered == set().union(*map(_near_miss_traits, zoo.REFUSED))
    assert {a for _, a in (t for t in covered if t[0] == "axis")} == {a for e in zoo.ACCEPTED for a in e.axes}
    assert {c for kind, c in covered if kind == "class"} == set(zoo.REFUSAL_CLASSES)


@pytest.mark.parametrize("entry", [e for e in zoo.REFUSED if e.name not in {c.name for c in COMPILED_NEAR_MISSES}],
                         ids=ids)
def test_explain_refuses_near_miss(entry):
    """The near-misses not compiled below (those are checked on the compile's report)."""
    import based_compile

    module, inputs = entry.make(torch.float64, 0)
    check_refused_report(entry, based_compile.explain(module, *inputs))


@pytest.mark.parametrize("entry", COMPILED_NEAR_MISSES, ids=ids)
def test_compiled_near_miss_is_refused_matches_eager_without_based_op(entry):
    # inner="eager": nothing was rewritten, so AOTAutograd would only test PyTorch (and cost time)
    module, compiled, inputs = compile_with(entry, torch.float64, inner="eager")
    reports = PassReports()
    assert_matches_eager(module, compiled, inputs, TOL[torch.float64], reports=reports)
    assert reports.graphs, reports
    for report in reports.graphs:
        check_refused_report(entry, report)
    calls = count_based_calls(compiled, inputs, backward=True)
    assert calls == 0, f"{entry.name}: the based op ran {calls} times on a near-miss"


@pytest.mark.parametrize("entry", [zoo.BY_NAME[n] for n in FLOAT32_NAMES], ids=ids)
def test_compiled_accepted_float32(entry):
    module, compiled, inputs = compile_with(entry, torch.float32, inner="eager")
    assert_matches_eager(module, compiled, inputs, TOL[torch.float32])
    fwd = count_based_calls(compiled, inputs)
    assert fwd == entry.expected.count, f"{entry.name}: {fwd} torch.ops.based calls, expected {entry.expected.count}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["matmul_at", "linear_cumsum_based", "gqa_repeat_interleave"])
def test_compiled_half_precision_at_least_as_accurate_as_eager(name, dtype):
    """In half precision the rewrite must not lose accuracy: against float64 on the same
    (rounded) inputs, compiled values and gradients are within 2x of eager's own error."""
    entry = zoo.BY_NAME[name]
    module, compiled, inputs = compile_with(entry, dtype)
    module64, _ = entry.make(torch.float64, 0)
    out_c, grads_c = forward_backward(compiled, inputs, seed=1)
    out_e, grads_e = forward_backward(module, inputs, seed=1)
    out_r, grads_r = forward_backward(module64, [x.double() for x in inputs], seed=1)
    assert out_c.dtype == dtype
    floor = torch.finfo(dtype).eps
    for what, c, e, r in [("output", out_c, out_e, out_r)] + [
            (f"gradient of input {i}", gc, ge, gr) for i, (gc, ge, gr) in enumerate(zip(grads_c, grads_e, grads_r))]:
        err_c, err_e = rel_error(c, r), rel_error(e, r)
        assert err_c <= 2 * err_e + floor, f"{name} {dtype} {what}: compiled error {err_c:.2e}, eager {err_e:.2e}"
    assert count_based_calls(compiled, inputs) == 1


def test_compiled_inference_without_grad_runs_based_op():
    entry = zoo.BY_NAME["featmap_quadratic_based"]
    module, compiled, inputs = compile_with(entry, torch.float64)
    with torch.no_grad():
        out = compiled(*inputs)                               # compiles the inference graph
        assert_rel_close(out, module(*inputs), TOL[torch.float64], "inference output")
        with BasedOpCounter() as counter:
            compiled(*inputs)
    assert compiled.counting_backend.graphs == 1
    assert counter.total == 1, f"torch.ops.based calls in inference: {counter.calls}"


def test_rewrite_off_runs_no_based_op():
    """The counter is not vacuous: with rewrite=False the same accepted form runs without the op."""
    entry = zoo.BY_NAME["matmul_at"]
    module, compiled, inputs = compile_with(entry, torch.float64, rewrite=False)
    assert_matches_eager(module, compiled, inputs, TOL[torch.float64])
    assert count_based_calls(compiled, inputs, backward=True) == 0


@pytest.mark.parametrize("name", ["poly_taylor", "linear_cumsum_based__total_norm"])
def test_inductor_inner(name):
    entry = zoo.BY_NAME[name]
    module, compiled, inputs = compile_with(entry, torch.float32, inner="inductor")
    assert_matches_eager(module, compiled, inputs, TOL[torch.float32])
    want = entry.expected.count if entry.accepted else 0
    fwd = count_based_calls(compiled, inputs)
    assert fwd == want, f"{name}: {fwd} torch.ops.based calls, expected {want}"


def test_backend_by_name_after_import():
    import based_compile  # noqa: F401  (registers "based")

    entry = zoo.BY_NAME["gqa_repeat_interleave"]
    module, inputs = entry.make(torch.float32, 0)
    compiled = torch.compile(module, backend="based")
    assert_matches_eager(module, compiled, inputs, TOL[torch.float32])
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    with BasedOpCounter() as counter:
        compiled(*inputs)
    assert counter.total == 1, f"torch.ops.based calls: {counter.calls}"


def test_pass_logs_to_based_compile_logger(caplog):
    entry = zoo.BY_NAME["matmul_at__cubic"]
    module, compiled, inputs = compile_with(entry, torch.float64)
    with caplog.at_level(logging.DEBUG, logger="based_compile"):
        compiled(*inputs)
    assert any(r.name.startswith("based_compile") for r in caplog.records), "the pass logged nothing"
