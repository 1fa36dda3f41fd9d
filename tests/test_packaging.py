"""The kernels are installed as based_compile.kernels, never as a top-level `kernels` module
(PyPI's `kernels` package, used by transformers, owns that name)."""
from __future__ import annotations

import subprocess
import sys
import tempfile


def test_no_top_level_kernels_module():
    code = ("import importlib.util, based_compile.kernels as k; "
            "assert importlib.util.find_spec('kernels') is None, importlib.util.find_spec('kernels'); "
            "assert k.parallel_based and k.fused_chunk_based and k.naive_parallel_based")
    with tempfile.TemporaryDirectory() as elsewhere:   # not the repository root, whose kernels/ is a folder
        done = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr
