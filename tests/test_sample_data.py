"""The bundled sample is what scripts/make_sample_data.py writes, and it has the oasst1 schema."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO
from qlora_pipeline.data import REQUIRED_FIELDS, sample_data_path
from qlora_pipeline.tiny import base_corpus_path


def _generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sample_equals_a_fresh_generation():
    rows, prose = _generator().build()
    committed = [json.loads(line) for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
    assert committed == rows
    assert base_corpus_path().read_text(encoding="utf-8").splitlines() == prose


def test_sample_has_the_oasst1_schema_and_variety():
    rows = [json.loads(line) for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
    for row in rows:
        assert REQUIRED_FIELDS.keys() <= row.keys()
    roots = [r for r in rows if r["parent_id"] is None]
    assert len(roots) >= 300
    assert {r["lang"] for r in roots} >= {"en", "de", "es", "fr"}
    assert any(r["deleted"] for r in rows) and any(r["review_result"] is False for r in rows)
    assert any(r["rank"] is not None and r["rank"] > 0 for r in rows)
    children = {}
    for r in rows:
        children.setdefault(r["parent_id"], []).append(r)
    assert sum(1 for r in roots if len(children.get(r["message_id"], [])) > 1) >= 100  # branching trees
