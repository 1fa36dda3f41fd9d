"""The package's public API and its layers (DESIGN.md section 3), pinned.

Layers, top to bottom: ``explain`` -> ``backend`` / ``buffer_guard`` -> ``graph`` (the pass) ->
``op`` (the custom operator, policy, config, spec) -> ``kernels``. A module imports only its own
layer or the layers below it, and the module-level imports have no cycle.
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import tempfile

import based_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = {"backend", "based_backend", "explain", "Explanation", "Site", "Refusal", "config", "kernels",
          "StaleBufferError", "BasedSpec", "based_attention", "context_parallel", "shard_sequence", "sequence_halo",
          "shard_causal_convs"}
# Rank of each layer: a module may import modules of its own rank or lower.
RANKS = {"logs": 3, "explain": 4, "__init__": 5, "backend": 3, "buffer_guard": 3, "ddp_split": 3, "graph": 2, "op": 1,
         "kernels": 0, "versions": 0}


def test_public_api_is_pinned():
    assert set(based_compile.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(based_compile, name) is not None, name
    import based_compile.config as config     # the settings module keeps its import path

    assert config is based_compile.config and config.kernel == "auto"
    assert callable(based_compile.backend) and callable(based_compile.explain)
    assert issubclass(based_compile.StaleBufferError, RuntimeError)


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in (ROOT / "based_compile").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        found["based_compile.kernels." + path.stem] = path
    return {name.removesuffix(".__init__"): path for name, path in found.items()}


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """based_compile modules imported at module level (function-level imports count too: none may cycle)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("based_compile"):
                out.add(target)
                out.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("based_compile"))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_layers_import_downward_only_and_without_cycles():
    modules = _modules()
    edges = {name: {m for m in _imports(name, path) if m in modules and m != name}
             for name, path in modules.items()}
    upward = [(a, b) for a, targets in edges.items() for b in targets
              if _layer(b) != "__init__" and RANKS[_layer(b)] > RANKS[_layer(a)]]
    assert not upward, f"imports that go up a layer: {upward}"
    # no cycle among modules (a package's __init__ counts as the package)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [nxt])}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in modules:
        if name not in state and not name.endswith("__init__"):
            visit(name, [name])


def test_the_layers_are_folders():
    for folder in ("graph", "op"):
        assert (ROOT / "based_compile" / folder / "__init__.py").exists()
    top = sorted(p.stem for p in (ROOT / "based_compile").glob("*.py"))
    assert top == ["__init__", "backend", "buffer_guard", "ddp_split", "explain", "logs", "versions"], top


def test_import_in_a_fresh_process_has_no_cycle():
    code = "import based_compile.explain, based_compile.graph.driver, based_compile.op.custom_op"
    with tempfile.TemporaryDirectory() as elsewhere:
        done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr


def test_torch_logs_shows_sites_and_refusals():
    """TORCH_LOGS="+based_compile" (PyTorch's logging switch) prints each site, its spec and kernel,
    and each refusal with its reason, in a fresh process."""
    code = r'''
import torch, based_compile
def attn(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.5
    a = (1 + s + 0.5 * s * s).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
def cubic(q, k, v):
    s = q @ k.transpose(-2, -1) * 0.5
    a = (1 + s + 0.5 * s * s + s ** 3).tril()
    return (a @ v) / (a.sum(-1, keepdim=True) + 1e-6)
q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
torch.compile(attn, backend=based_compile.backend(inner="eager"))(q, k, v)
torch.compile(cubic, backend=based_compile.backend(inner="eager"))(q, k, v)
'''
    import os

    env = dict(os.environ, TORCH_LOGS="+based_compile")
    with tempfile.TemporaryDirectory() as elsewhere:
        done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                              timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "Based attention at" in err and "f(s) = 1 + 1*s + 0.5*s^2" in err and "kernel:" in err, err[-3000:]
    assert "refused at" in err and "(polynomial)" in err, err[-3000:]
    sites = [line for line in err.splitlines() if "Based attention at" in line]
    assert len(sites) == 1, "each decision is printed once:\n" + "\n".join(sites)
    env["TORCH_LOGS"] = "dynamo"          # not asked for: the pass stays quiet
    with tempfile.TemporaryDirectory() as elsewhere:
        quiet = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                               timeout=300, env=env)
    assert quiet.returncode == 0 and "Based attention at" not in quiet.stderr


def test_set_logs_accepts_the_setting():
    import logging

    torch_logging = __import__("torch._logging", fromlist=["set_logs"])
    try:
        torch_logging.set_logs(modules={"based_compile": logging.DEBUG})
        assert logging.getLogger("based_compile").getEffectiveLevel() == logging.DEBUG
    finally:
        torch_logging.set_logs()
