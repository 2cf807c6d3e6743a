"""The bundled sample is what scripts/make_sample_data.py writes, and it has the oasst1 schema."""

from __future__ import annotations

import importlib.util
import json
import re

from conftest import REPO

from qlora_pipeline.data import REQUIRED_FIELDS, sample_data_path
from qlora_pipeline.evaluation.heldout import load_questions
from qlora_pipeline.tiny import base_corpus_path


def _generator():
    spec = importlib.util.spec_from_file_location("make_sample_data", REPO / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_sample_equals_a_fresh_generation():
    rows, prose, questions = _generator().build()
    committed = [json.loads(line) for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
    assert committed == rows
    assert base_corpus_path().read_text(encoding="utf-8").splitlines() == prose
    assert load_questions("sample") == questions


def test_heldout_facts_are_in_the_base_corpus_and_never_in_the_fine_tuning_sample():
    """The held-out questions measure knowledge from the base: the corpus states each answer in
    the answer's own words, and no sample message (any language, any filter) names the subject."""
    questions = load_questions("sample")
    corpus = base_corpus_path().read_text(encoding="utf-8")
    texts = [json.loads(line)["text"] for line in sample_data_path().read_text(encoding="utf-8").splitlines()]
    assert len(questions) >= 40
    for q in questions:
        assert q["answer"] in corpus
        mentions = [t for t in texts if re.search(rf"\b{re.escape(q['subject'])}\b", t, re.IGNORECASE)]
        assert mentions == [], (q["subject"], mentions[:2])


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
