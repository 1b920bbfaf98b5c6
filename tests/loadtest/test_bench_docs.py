"""The bench's generated section of docs/benchmarks.md (``loadtest/bench.py``), pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import bench

DOC = {"command": "python -m loadtest.bench all --write-docs",
       "generated_at": "2026-12-01T00:00:00Z",
       "machine": {"nproc": 2, "cpu": "AMD EPYC", "memory_gib": 23.5, "python": "3.11.7",
                   "platform": "Linux"},
       "quick": False, "runs": 3, "acceptance_runs": 1}


def test_write_docs_rewrites_only_the_marked_section(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text(f"# Title\n\nhand text\n\n{bench.BEGIN}\nold table\n{bench.END}\n\nmore\n")
    rows = [("fan-out | x", "0.85 (0.77-0.90)", "3", ">= 1.2x bare", "missed by 29 %"),
            ("  frames/s", "1 vs 2", "3", "-", "")]
    bench.write_docs(path, bench.docs_section(rows, DOC, {}))
    text = path.read_text()
    assert text.startswith("# Title\n\nhand text\n\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\n\nmore\n")
    assert "old table" not in text
    assert "`python -m loadtest.bench all --write-docs` at 2026-12-01T00:00:00Z" in text
    assert "| fan-out \\| x | 0.85 (0.77-0.90) | 3 | >= 1.2x bare | missed by 29 % |" in text
    assert "| &emsp;frames/s | 1 vs 2 | 3 | - |   |" in text
    bench.write_docs(path, bench.docs_section(rows, DOC, {}))
    assert path.read_text() == text


def test_write_docs_needs_the_markers(tmp_path: Path) -> None:
    path = tmp_path / "benchmarks.md"
    path.write_text("# no markers\n")
    with pytest.raises(SystemExit):
        bench.write_docs(path, "x")


def test_the_docs_have_the_markers() -> None:
    text = (bench.ROOT / "docs" / "benchmarks.md").read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert text.index(bench.BEGIN) < text.index(bench.END)


def test_another_gateways_figures_stay_out_of_the_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A comparison run (LOADTEST_GATEWAY_CMD: another checkout's gateway) writes a
    scratch file and may not rewrite the docs: once, such runs merged the old code's
    figures into the committed bench.json under the docs' table."""
    assert bench.parse(["cluster"]).output.name == "bench.json"
    monkeypatch.setenv("LOADTEST_GATEWAY_CMD", "python -m gateway.cli")
    assert bench.parse(["cluster"]).output.name == "bench-other.json.tmp"
    with pytest.raises(SystemExit):
        bench.parse(["all", "--write-docs"])
