"""Every measured table of the README is what its results JSON renders to (benchmarks/tables.py)."""
from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import tables  # noqa: E402


def test_readme_tables_match_their_json():
    text = tables.README.read_text()
    blocks = tables.readme_blocks(text)
    assert {"kernels", "e2e", "distributed"} <= set(blocks), sorted(blocks)
    for name, body in blocks.items():
        assert name in tables.RENDERERS, f"README table {name!r} has no renderer"
        assert body == tables.render(name), (f"README table {name!r} differs from benchmarks/results/{name}.json: "
                                             "run `python -m benchmarks.tables --write`")


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    """The check reads the numbers: one changed value in a results file makes its table stale."""
    measured = [name for name in tables.readme_blocks(tables.README.read_text())
                if (tables.RESULTS / f"{name}.json").exists()]
    for name in measured:
        data = json.loads((tables.RESULTS / f"{name}.json").read_text())
        rows = data.get("results", data.get("rows", data.get("runs")))
        key, row = next((key, r) for r in rows for key in ("fwd_ms", "ms", "step_s", "step_ms", "chunked_fwd")
                        if isinstance(r.get(key), float))
        row[key] *= 1.5
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert sorted(tables.stale_tables(tables.README.read_text())) == sorted(measured)


def test_every_image_and_results_file_named_in_the_readme_exists():
    import re

    text = tables.README.read_text()
    for path in re.findall(r"\]\((benchmarks/results/[^)]+)\)", text) + re.findall(r"`(benchmarks/results/[^`]+)`", text):
        assert (ROOT / path).exists(), path


def test_every_results_file_is_cited_by_the_readme():
    """benchmarks/results/ holds the README's current results only; older data lives in benchmarks/notes/."""
    text = tables.README.read_text()
    stray = [p.name for p in sorted(tables.RESULTS.iterdir()) if f"benchmarks/results/{p.name}" not in text]
    assert not stray, f"not cited by README.md (move to benchmarks/notes/ and cite in NOTES.md): {stray}"
