"""One decode-speed measurement: its arithmetic on a stub with known timings, and the scorecard
and bench/inference.py both going through it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from qlora_pipeline import speed

REPO = Path(__file__).resolve().parents[1]


class StubLlama:
    """Prompt evaluation takes 20 ms; each generated token 10 ms (the first after the prompt)."""

    def reset(self):
        pass

    def eval(self, ids):
        time.sleep(0.02)

    def generate(self, ids, **kwargs):
        time.sleep(0.02)
        while True:
            yield 1
            time.sleep(0.01)


def test_decode_speed_counts_tokens_after_the_first_over_their_time():
    result = speed.decode_speed(StubLlama(), list(range(40)), new_tokens=11, runs=2)
    assert result["tokens_per_s"] == pytest.approx(100, rel=0.25)  # 10 tokens in 10 x 10 ms
    assert result["prompt_tokens_per_s"] == pytest.approx(40 / 0.02, rel=0.25)
    assert result["time_to_first_token_s"] == pytest.approx(0.02, abs=0.01)


def test_too_few_tokens_to_time_is_refused():
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        speed.decode_speed(StubLlama(), [1], new_tokens=1, runs=1)


def test_the_scorecard_and_the_benchmark_measure_with_the_same_function(trained_run, monkeypatch):
    from qlora_pipeline.evaluate import generation_speed

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
