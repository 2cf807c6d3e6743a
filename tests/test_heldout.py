"""Exact match on held-out questions: normalisation, the file format and its errors."""

from __future__ import annotations

import pytest

from qlora_pipeline.errors import DataError
from qlora_pipeline.evaluation.heldout import exact_match, load_questions, normalize, score


def test_exact_match_ignores_case_punctuation_and_spacing_only():
    assert exact_match("The capital of France is Paris.", "the capital of france is paris")
    assert exact_match("  The capital of  France is Paris!", "The capital of France is Paris.")
    assert not exact_match("The capital of France is Lyon.", "The capital of France is Paris.")
    assert not exact_match("The capital of France is Paris. It is big.", "The capital of France is Paris.")
    assert normalize("A cow-says, moo") == "a cow says moo"


def test_score_counts_exact_matches_and_keeps_every_answer():
    questions = [{"question": "q1", "answer": "Yes."}, {"question": "q2", "answer": "No."}]
    result = score(questions, lambda messages: "yes" if messages[0]["content"] == "q1" else "maybe")
    assert result == {"exact_match": 0.5, "answers": ["yes", "maybe"]}


def test_none_gives_no_questions():
    assert load_questions("none") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json\n", "malformed JSON"),
        ('{"question": "q"}\n', 'needs string fields "question" and "answer"'),
    ],
)
def test_bad_question_files_name_the_line(tmp_path, text, message):
    path = tmp_path / "q.jsonl"
    path.write_text(text)
    with pytest.raises(DataError, match=f"{path}:1: {message}"):
        load_questions(str(path))


def test_missing_question_file_says_what_to_set(tmp_path):
    with pytest.raises(DataError, match="set eval.heldout_questions to sample, general, none or a .jsonl file"):
        load_questions(str(tmp_path / "missing.jsonl"))
