"""The code's shape: no function in the package over 80 lines (scripts/long_functions.py)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from long_functions import long_functions  # noqa: E402


def test_no_function_in_the_package_is_over_80_lines():
    assert long_functions([REPO / "src"], 80) == []


def test_the_scan_finds_a_long_function(tmp_path, monkeypatch):
    import long_functions as module

    monkeypatch.setattr(module, "REPO", tmp_path)
    body = "\n".join(f"    x{i} = {i}" for i in range(85))
    (tmp_path / "long.py").write_text(f"def short():\n    pass\n\n\ndef long():\n{body}\n")
    assert [(lines, name) for lines, _, name in long_functions([tmp_path], 80)] == [(86, "long")]


def test_the_readme_tree_names_every_module_and_only_existing_ones():
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    tree = readme.split("## Where the code lives", 1)[1].split("```")[1]
    package, bench = tree.split("\nbench/", 1)
    named = set(re.findall(r"(?<![\w/])([a-z0-9_]+(?:/[a-z0-9_]+)*)\.py\b", package))
    assert all((REPO / "bench" / name).is_file() for name in re.findall(r"\b[a-z0-9_]+\.py\b", bench))
    source = REPO / "src" / "qlora_pipeline"
    modules = {p.relative_to(source).with_suffix("").as_posix() for p in source.rglob("*.py") if p.stem != "__init__"}
    assert modules - named == set(), "modules missing from the README tree"
    assert named - modules == set(), "the README tree names modules that do not exist"


def test_no_benchmark_runs_a_program_held_in_a_string():
    """Measured steps are functions in bench/steps.py (linted, importable), run as
    ``python -m bench.steps NAME``; none is Python source handed to ``python -c``."""
    for path in sorted((REPO / "bench").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert '"-c"' not in text, f"{path.name} runs Python source held in a string"
    steps = (REPO / "bench" / "steps.py").read_text(encoding="utf-8")
    for name in ("decode_speed", "convert", "quantize", "qlora_step", "train_ours", "train_trl"):
        assert f"\ndef {name}(" in steps


def test_no_module_in_the_package_is_over_600_lines():
    """A module that does five jobs hides its structure; split it by job (as serve/ and evaluation/)."""
    long = {
        p.relative_to(REPO).as_posix(): n
        for p in (REPO / "src").rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600
    }
    assert long == {}


def test_the_readme_is_a_two_minute_read_and_its_links_resolve():
    """At most 200 lines; the rest lives in docs/ and bench/README.md, and every local link resolves."""
    import re

    for doc in [REPO / "README.md", REPO / "bench" / "README.md", *(REPO / "docs").glob("*.md")]:
        text = doc.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            assert link.startswith("http") or (doc.parent / link).exists(), f"{doc.name}: {link}"
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
