"""Supported versions: an older torch or Triton is refused at import with the range named, before
Dynamo is reached (also when Dynamo loads the ``based`` entry point); a newer one is warned about;
pyproject.toml states the same lower bounds."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings

import pytest

from based_compile import versions


@pytest.mark.parametrize("text, parsed", [("2.13.0+cpu", (2, 13)), ("2.11.0+cu130", (2, 11)), ("2.14.1", (2, 14)),
                                          ("2.12.0a0+git1a2b3c", (2, 12)), ("3.6.0", (3, 6)), ("10.0", (10, 0)),
                                          ("", None), ("nightly", None)])
def test_parse(text, parsed):
    assert versions.parse(text) == parsed


@pytest.mark.parametrize("name, version", [("torch", "2.10.0+cu128"), ("torch", "2.10.1"), ("torch", "2.6.0"),
                                           ("torch", "1.13.1"), ("triton", "3.5.1"), ("triton", "2.3.0")])
def test_older_is_refused_naming_range_and_found(name, version):
    with pytest.raises(ImportError) as info:
        versions.check(name, version)
    message = str(info.value)
    assert versions.supported_range(name) in message and f"found {name} {version}" in message


@pytest.mark.parametrize("name, version", [("torch", "2.11.0+cu130"), ("torch", "2.13.0+cpu"), ("torch", "2.14.1"),
                                           ("triton", "3.6.0"), ("triton", "3.8.0"), ("triton", "3.9.0"),
                                           ("triton", None), ("torch", "unreadable")])
def test_tested_is_accepted_silently(name, version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        versions.check(name, version)


@pytest.mark.parametrize("name, version", [("torch", "2.15.0"), ("torch", "3.0.0"), ("triton", "3.10.0")])
def test_newer_is_accepted_with_a_warning(name, version):
    with pytest.warns(UserWarning, match=f"found {name} {version}, which is newer and untested"):
        versions.check(name, version)


def test_supported_range_text():
    assert versions.supported_range("torch") == "torch >= 2.11 (tested: 2.11 to 2.14)"
    assert versions.supported_range("triton") == "triton >= 3.6 (tested: 3.6 to 3.9)"


def test_pyproject_bounds_are_the_supported_minimums():
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    torch_min, triton_min = (f"{v[0]}.{v[1]}" for v in (versions.TORCH_MIN, versions.TRITON_MIN))
    assert f"torch>={torch_min}" in dependencies
    assert any(d.replace(" ", "").startswith(f"triton>={triton_min};") for d in dependencies), dependencies


_OLD_TORCH = """
import torch
torch.__version__ = "2.10.0+cu128"
for attempt in ("backend", "import"):
    try:
        if attempt == "backend":   # Dynamo imports the entry point based_compile.backend:based_backend
            torch.compile(lambda x: x + 1, backend="based")(torch.ones(2))
        else:
            import based_compile
    except ImportError as err:
        print(attempt, "->", err)
    else:
        print(attempt, "-> no error")
"""


def test_old_torch_is_named_on_import_and_on_backend_based():
    """A fresh interpreter whose torch claims 2.10: both ``backend="based"`` (Dynamo loading the entry
    point, nothing of based_compile imported yet) and ``import based_compile`` raise the named error."""
    with tempfile.TemporaryDirectory() as elsewhere:      # the installed package, not the checkout's folders
        done = subprocess.run([sys.executable, "-c", _OLD_TORCH], cwd=elsewhere, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    expected = "torch >= 2.11 (tested: 2.11 to 2.14); found torch 2.10.0+cu128"
    assert [line.split(" -> ")[0] for line in lines] == ["backend", "import"], done.stdout
    assert all(expected in line for line in lines), done.stdout
