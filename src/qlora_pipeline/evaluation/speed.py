"""Decode speed of a llama.cpp model: the one measurement the scorecard and ``bench/`` share.

Per run, on a fresh context: the prompt is evaluated alone (prompt tokens/s), then answered
greedily through ``Llama.generate`` (the loop ``create_completion`` and so the chat and the app
use), with a timestamp per token. Decode speed is the tokens after the first over the time
between the first and the last; time to first token includes the prompt. The first run warms
caches and is not counted; each figure is the median of the rest.
"""

from __future__ import annotations

import statistics
import time


def decode_speed(llm, prompt_ids: list[int], new_tokens: int, runs: int) -> dict:
    """``{"prompt_tokens_per_s", "tokens_per_s", "time_to_first_token_s"}`` for ``llm`` (a
    ``llama_cpp.Llama``), medians of ``runs`` runs after a warm-up; ``new_tokens`` >= 2."""
    if new_tokens < 2 or runs < 1:
        raise ValueError(f"decode_speed needs new_tokens >= 2 and runs >= 1 (got {new_tokens}, {runs})")
    prompt, decode, first_token = [], [], []
    for _ in range(runs + 1):
        llm.reset()
        started = time.perf_counter()
        llm.eval(prompt_ids)
        prompt.append(len(prompt_ids) / (time.perf_counter() - started))
        # Empty the context again: generate() reuses a matching prefix, and would then not count
        # the prompt in the time to the first token.
        llm.reset()
        started = time.perf_counter()
        stamps = []
        for _token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) >= new_tokens:
                break  # generate() does not stop at end-of-turn: every run makes the same count
        decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        first_token.append(stamps[0] - started)
    return {
        "prompt_tokens_per_s": statistics.median(prompt[1:]),
        "tokens_per_s": statistics.median(decode[1:]),
        "time_to_first_token_s": statistics.median(first_token[1:]),
    }
