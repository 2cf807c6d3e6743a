"""The scorecard's statistics and the report's bookkeeping, on inputs whose answers are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qlora_pipeline.evaluation.report import read_report, scorecard_table, update_report
from qlora_pipeline.evaluation.scoring import (
    _labelled_positions,
    _log_softmax,
    kl_divergence_sum,
    take_examples,
    top1_agreements,
)


def logp(*rows: list[float]) -> np.ndarray:
    return np.log(np.array(rows, dtype=np.float64))


def test_kl_of_two_known_distributions():
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3); and the other way round differs.
    p, q = logp([0.5, 0.5]), logp([0.25, 0.75])
    assert kl_divergence_sum(p, q) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl_divergence_sum(q, p) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    assert kl_divergence_sum(p, q) != pytest.approx(kl_divergence_sum(q, p))


def test_kl_sums_over_positions_and_is_zero_only_for_the_same_distribution():
    p = logp([0.7, 0.2, 0.1], [0.1, 0.1, 0.8])
    q = logp([0.6, 0.3, 0.1], [0.1, 0.1, 0.8])
    assert kl_divergence_sum(p, p) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence_sum(p, q) == pytest.approx(kl_divergence_sum(p[:1], q[:1]))  # the second row is equal
    assert kl_divergence_sum(p, q) > 0


def test_top1_agreement_counts_positions_with_the_same_argmax():
    ref = logp([0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.4, 0.5, 0.1])
    other = logp([0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1])
    assert top1_agreements(ref, other) == 1
    assert top1_agreements(ref, ref) == 3


def test_log_softmax_matches_torch_and_survives_large_logits():
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 2.0, 3.0], [1000.0, 1001.0, 999.0]], dtype=np.float32)
    ours = _log_softmax(x)
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, torch.log_softmax(torch.from_numpy(x), -1).numpy(), rtol=1e-6, atol=1e-6)


def test_only_assistant_targets_are_scored():
    # position t predicts token t+1: the labelled tokens are 3 and 4 (ids 30 and 40)
    example = {"input_ids": [10, 20, 30, 40, 50], "labels": [-100, -100, 30, 40, -100]}
    positions, targets = _labelled_positions(example)
    assert positions.tolist() == [1, 2] and targets.tolist() == [30, 40]


def test_the_token_budget_takes_whole_examples_until_it_is_reached():
    examples = [{"input_ids": [0] * n} for n in (5, 5, 5, 5)]
    assert len(take_examples(examples, 10)) == 2
    assert len(take_examples(examples, 11)) == 3  # the example that crosses the budget is kept whole
    assert take_examples(examples, 0) == []


def test_update_report_replaces_one_section_and_renders_the_markdown(tmp_path):
    assert read_report(tmp_path) == {}
    update_report(tmp_path, "samples", [{"prompt": "Hi?", "reference": None, "answers": {"F16": "Hello."}}])
    row = {"path": "gguf/model-F16.gguf", "bytes": 2_000_000, "bits_per_weight": 16.0, "ppl": 3.5,
           "kld_vs_f16": 0.0, "top1_vs_f16": 1.0, "tokens_per_s": 100.0, "time_to_first_token_s": 0.1,
           "scored_tokens": 10}  # fmt: skip
    report = update_report(tmp_path, "gguf", {"F16": row})
    assert set(report) == {"samples", "gguf"} == set(json.loads((tmp_path / "report.json").read_text()))
    markdown = (tmp_path / "report.md").read_text()
    assert "**Hi?**" in markdown and scorecard_table({"F16": row}) in markdown
    assert "| F16 | 2.00 | 16.00 | 3.5000 |" in scorecard_table({"F16": row})
