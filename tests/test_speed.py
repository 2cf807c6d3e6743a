"""One decode-speed measurement: its arithmetic on a stub with known timings, and the scorecard
and bench/inference.py both going through it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from qlora_pipeline.evaluation import speed

REPO = Path(__file__).resolve().parents[1]


class StubLlama:
    """Prompt evaluation takes 20 ms; each generated token 10 ms (the first after the prompt).
    As llama-cpp-python's, ``generate`` skips a prompt the context holds already."""

    def __init__(self):
        self.holds_prompt = False

    def reset(self):
        self.holds_prompt = False

    def eval(self, ids):
        time.sleep(0.02)
        self.holds_prompt = True

    def generate(self, ids, **kwargs):
        if not self.holds_prompt:
            self.eval(ids)
        while True:
            yield 1
            time.sleep(0.01)


def test_decode_speed_counts_tokens_after_the_first_over_their_time():
    result = speed.decode_speed(StubLlama(), list(range(40)), new_tokens=11, runs=2)
    assert result["tokens_per_s"] == pytest.approx(100, rel=0.25)  # 10 tokens in 10 x 10 ms
    assert result["prompt_tokens_per_s"] == pytest.approx(40 / 0.02, rel=0.25)
    assert result["time_to_first_token_s"] == pytest.approx(0.02, abs=0.01)  # the prompt included


def test_too_few_tokens_to_time_is_refused():
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        speed.decode_speed(StubLlama(), [1], new_tokens=1, runs=1)


def test_the_scorecard_and_the_benchmark_measure_with_the_same_function(trained_run, monkeypatch):
    from qlora_pipeline.evaluation.scoring import generation_speed

    calls = []

    def recorder(llm, prompt_ids, new_tokens, runs):
        calls.append((type(llm).__name__, len(prompt_ids), new_tokens, runs))
        return {"prompt_tokens_per_s": 1.0, "tokens_per_s": 2.0, "time_to_first_token_s": 3.0}

    monkeypatch.setattr(speed, "decode_speed", recorder)
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    sys.modules.pop("inference", None)
    import inference

    q8 = trained_run / "gguf" / "model-Q8_0.gguf"
    scorecard = generation_speed(q8, [1, 2, 3], 8, 1, n_ctx=256, threads=1)
    bench = inference.llama_speed(q8, threads=1, runs=1)
    assert scorecard["tokens_per_s"] == bench["gen_tokens_per_s"] == 2.0
    assert [c[0] for c in calls] == ["Llama", "Llama"]


def test_a_benchmark_step_measures_in_a_process_of_its_own(trained_run, monkeypatch):
    """bench/fullsize.py and bench/profile_generate.py time ``python -m bench.steps decode_speed``:
    the scorecard's figures, from a fresh interpreter whose peak RSS the benchmark reads."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import common

    q8 = trained_run / "gguf" / "model-Q8_0.gguf"
    run = common.run_step("decode_speed", model=str(q8), threads=1, tokens=4, runs=1)
    assert set(run["result"]) == {"prompt_tokens_per_s", "tokens_per_s", "time_to_first_token_s"}
    assert run["result"]["tokens_per_s"] > 0
    assert run["peak_rss_bytes"] > q8.stat().st_size  # read from the process that loaded the model
    with pytest.raises(RuntimeError, match="no step named 'nope'"):
        common.run_step("nope")
