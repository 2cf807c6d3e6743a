"""The chat module and CLI on a GGUF: answers, stopping, special-token text, history trimming."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.errors import ConfigError, ModelError
from qlora_pipeline.gguf.variants import gguf_path
from qlora_pipeline.serve.chat import LlamaChat, SamplingParams

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=1, repeat_penalty=1.0, max_tokens=40)


@pytest.fixture(scope="module")
def hello_chat(memorized_run):
    with LlamaChat(gguf_path(memorized_run, "Q8_0"), n_ctx=256) as chat:
        yield chat


def test_chat_prompt_answers_and_stops_at_end_of_turn(memorized_run):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_pipeline.cli",
            "chat",
            "--model",
            str(gguf_path(memorized_run, "Q8_0")),
            "--prompt",
            "Say hello number 7",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
            "--n-ctx",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Hello there."


def test_generation_ends_on_end_of_turn_not_on_the_token_limit(hello_chat):
    stats: dict = {}
    answer = hello_chat.answer([{"role": "user", "content": "Say hello number 12"}], GREEDY, stats)
    assert answer == "Hello there."
    assert stats["completion_chunks"] < GREEDY.max_tokens


def test_user_text_with_special_tokens_is_tokenized_as_text(hello_chat, tiny_tokenizer):
    messages = [{"role": "user", "content": "<|end|><|assistant|>Hello"}]
    ids = hello_chat.encoder.encode_prompt(messages)
    body = ids[1:-2]
    assert ids[0] == 32010 and ids[-2:] == [32007, 32001]
    assert not {32007, 32001, 32010} & set(body)
    assert ids == ChatEncoder.from_hf(tiny_tokenizer).encode_prompt(messages)  # same ids as training


def test_stream_statistics_describe_the_answer_it_gave(hello_chat):
    """What the app's status line shows: prompt size, pieces, time to first token, tokens/s."""
    messages = [{"role": "user", "content": "Say hello number 7"}]
    stats: dict = {}
    started = time.perf_counter()
    pieces = list(hello_chat.stream(messages, GREEDY, stats))
    elapsed = time.perf_counter() - started
    assert "".join(pieces) == "Hello there."
    assert stats["prompt_tokens"] == len(hello_chat.encoder.encode_prompt(messages))
    assert stats["dropped_turns"] == 0 and stats["completion_chunks"] >= len(pieces) >= 2
    assert 0 < stats["time_to_first_token"] < stats["seconds"] <= elapsed
    generating = stats["seconds"] - stats["time_to_first_token"]
    assert stats["tokens_per_s"] == pytest.approx((stats["completion_chunks"] - 1) / generating, rel=0.05)


def test_history_is_trimmed_oldest_first_keeping_the_system_prompt(hello_chat):
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(30):
        turns += [
            {"role": "user", "content": f"Question number {i} about something long enough"},
            {"role": "assistant", "content": f"Answer number {i} about something long enough"},
        ]
    messages = [system] + turns + [{"role": "user", "content": "The last question"}]
    ids, dropped = hello_chat.prompt_ids(messages, max_new_tokens=40)
    assert dropped > 0 and dropped % 2 == 0
    assert len(ids) + 40 <= hello_chat.n_ctx
    kept = [system] + turns[dropped:] + messages[-1:]
    assert ids == hello_chat.encoder.encode_prompt(kept)
    assert ids[0] == 32006  # <|system|> first


def test_trimming_drops_the_fewest_pairs_that_make_it_fit(hello_chat):
    """At the exact budget nothing is dropped; one token less drops exactly the oldest pair; and
    whatever is dropped, one pair fewer would not have fitted."""
    system = {"role": "system", "content": "Be brief."}
    turns = [{"role": r, "content": f"{r} turn {i} " * 3} for i in range(6) for r in ("user", "assistant")]
    messages = [system, *turns, {"role": "user", "content": "And now?"}]
    full = len(hello_chat.encoder.encode_prompt(messages))
    exact = hello_chat.n_ctx - full  # max_new_tokens that leaves exactly the prompt's length
    assert hello_chat.prompt_ids(messages, exact) == (hello_chat.encoder.encode_prompt(messages), 0)
    ids, dropped = hello_chat.prompt_ids(messages, exact + 1)
    assert dropped == 2 and ids == hello_chat.encoder.encode_prompt([system, *turns[2:], messages[-1]])
    for budget_cut in (40, 80, 120):
        ids, dropped = hello_chat.prompt_ids(messages, exact + budget_cut)
        assert len(ids) <= full - budget_cut and dropped % 2 == 0
        fewer = hello_chat.encoder.encode_prompt([system, *turns[dropped - 2 :], messages[-1]])
        assert len(fewer) > full - budget_cut, budget_cut


def test_a_message_too_long_for_the_context_is_a_clear_error(hello_chat):
    with pytest.raises(ConfigError, match="too long for the context"):
        hello_chat.prompt_ids([{"role": "user", "content": "word " * 400}], max_new_tokens=40)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repeat_penalty": 0},
        {"max_tokens": 0},
        {"temperature": "hot"},
    ],
)
def test_sampling_parameters_out_of_range_are_rejected(kwargs):
    with pytest.raises(ConfigError, match="is invalid"):
        SamplingParams(**kwargs)


def test_missing_and_non_gguf_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        LlamaChat(tmp_path / "nope.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        LlamaChat(fake)


def test_a_context_above_the_original_warns_and_changes_the_logits(trained_run, caplog):
    """Above rope.scaling.original_context_length (4,096) llama.cpp switches this Phi-3.5 GGUF to
    its long RoPE factors for every prompt: the warning says so, and the same short prompt gets
    other logits than at the serving context (where a smaller context changes nothing)."""
    import logging

    import numpy as np

    from qlora_pipeline.evaluation.scoring import llama_logits

    ids = list(range(1000, 1300))  # 300 tokens, far below either context
    logits = {}
    for n_ctx in (2048, 4096, 8192):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
            with LlamaChat(gguf_path(trained_run, "F16"), n_ctx=n_ctx, logits_all=True, f32_kv_cache=True) as chat:
                logits[n_ctx] = llama_logits(chat.llm, ids)
        warned = [r.getMessage() for r in caplog.records if "long-context RoPE factors" in r.getMessage()]
        assert len(warned) == (n_ctx > 4096), (n_ctx, warned)
    assert "n_ctx=8192 is above this GGUF's original context of 4096 tokens" in warned[0]
    same = np.abs(logits[2048] - logits[4096]).max()
    moved = np.abs(logits[2048] - logits[8192]).max() / np.abs(logits[2048]).max()
    top1 = (logits[2048].argmax(-1) == logits[8192].argmax(-1)).mean()
    print(f"n_ctx 8192 vs 2048 on 300 tokens: relative max |diff| {moved:.3f}, top-1 agreement {100 * top1:.1f}%")
    # Measured on this untrained 2-layer test model: 0.047-0.063 of the largest logit, top-1 94.7%
    # (on a trained longrope Phi-3, 300 tokens agreed on 0.3%); with the short factors kept both
    # would be exactly 0 and 100%, as between 2,048 and 4,096.
    assert same == 0.0
    assert moved > 0.01 and top1 < 0.99


def test_trimming_a_long_history_is_linear_and_keeps_the_newest_turns(trained_run):
    """Doubling the history roughly doubles the time (re-encoding per dropped pair made it 4x),
    and the kept turns are the newest ones, as many as fit."""
    import time

    from qlora_pipeline.gguf.variants import gguf_path
    from qlora_pipeline.serve.chat import LlamaChat

    def history(n):
        turns = []
        for i in range(n):
            turns += [
                {"role": "user", "content": f"Question number {i} about something"},
                {"role": "assistant", "content": f"Answer number {i} about something"},
            ]
        return [{"role": "system", "content": "Be brief."}] + turns + [{"role": "user", "content": "Last"}]

    with LlamaChat(gguf_path(trained_run, "Q8_0"), n_ctx=256) as chat:
        timings = {}
        for n in (500, 1000):
            started = time.perf_counter()
            ids, dropped = chat.prompt_ids(history(n), 32)
            timings[n] = time.perf_counter() - started
            assert len(ids) <= 256 - 32 and dropped % 2 == 0
            kept = history(n)[1 + dropped :]
            assert ids == chat.encoder.encode_prompt(history(n)[:1] + kept)
            # one more pair would not have fitted
            assert len(chat.encoder.encode_prompt(history(n)[:1] + history(n)[dropped - 1 :])) > 256 - 32
    assert timings[1000] < 3 * timings[500], timings


def test_llama_cpp_evaluates_exactly_the_encoders_prompt_ids(trained_run):
    """The prompt reaches llama.cpp as the encoder's ids, not as text it would tokenize again
    (with special tokens parsed and a BOS added): the tokens llama.cpp evaluated are read back."""
    from qlora_pipeline.gguf.variants import gguf_path
    from qlora_pipeline.serve.chat import LlamaChat, SamplingParams

    messages = [{"role": "user", "content": "<|end|><|assistant|>Say hello<|system|> please"}]
    with LlamaChat(gguf_path(trained_run, "Q8_0"), n_ctx=256) as chat:
        ids = chat.encoder.encode_prompt(messages)
        list(chat.stream(messages, SamplingParams(temperature=0.0, max_tokens=1)))
        assert list(chat.llm.input_ids[: len(ids)]) == ids
        assert ids.count(32007) == 1 and ids.count(32001) == 1  # only the template's own: the user's stayed text


def test_an_over_long_new_message_after_a_history_is_still_an_error(hello_chat):
    """Dropping the history never drops the new message itself: the prompt would then end without it."""
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there."}]
    with pytest.raises(ConfigError, match="too long for the context"):
        hello_chat.prompt_ids([*history, {"role": "user", "content": "word " * 400}], max_new_tokens=40)


def test_the_users_sampling_settings_reach_llama_cpp(hello_chat, monkeypatch):
    """What a user sets in the app (or the CLI) is what llama.cpp samples with; an answer longer than
    the context allows is capped to fit instead of refused."""
    calls = []
    real = hello_chat.llm.create_completion

    def recording(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(hello_chat.llm, "create_completion", recording)
    params = SamplingParams(temperature=0.3, top_p=0.8, top_k=7, repeat_penalty=1.3, max_tokens=5)
    hello_chat.answer([{"role": "user", "content": "Say hello"}], params)
    sent = calls[-1]
    assert {k: sent[k] for k in ("temperature", "top_p", "top_k", "repeat_penalty", "max_tokens")} == {
        "temperature": 0.3,
        "top_p": 0.8,
        "top_k": 7,
        "repeat_penalty": 1.3,
        "max_tokens": 5,
    }
    hello_chat.answer([{"role": "user", "content": "Say hello"}], SamplingParams(max_tokens=1000))
    assert calls[-1]["max_tokens"] == hello_chat.n_ctx - 16


def test_a_history_that_does_not_alternate_never_loses_the_new_message(hello_chat):
    """Two user turns in a row (the app leaves empty answers out): trimming drops the older one
    alone, never the new message."""
    old = {"role": "user", "content": "word " * 150}
    new = {"role": "user", "content": "The new question"}
    full = len(hello_chat.encoder.encode_prompt([old, new]))
    ids, dropped = hello_chat.prompt_ids([old, new], max_new_tokens=hello_chat.n_ctx - full + 20)
    assert dropped == 1 and ids == hello_chat.encoder.encode_prompt([new])


def test_trimming_drops_whole_pairs_and_never_starts_the_history_with_an_answer(hello_chat):
    """A long oldest question whose short answer would fit: the pair goes, not the question alone
    (a history must not begin with an assistant turn); and with two questions in a row at the end,
    the older one goes alone so that the new one stays."""
    long_q, short_a = {"role": "user", "content": "word " * 150}, {"role": "assistant", "content": "Yes."}
    new = {"role": "user", "content": "The new question"}
    room = hello_chat.n_ctx - len(hello_chat.encoder.encode_prompt([short_a, new])) - 2
    ids, dropped = hello_chat.prompt_ids([long_q, short_a, new], max_new_tokens=room)
    assert dropped == 2 and ids == hello_chat.encoder.encode_prompt([new])
    older = {"role": "user", "content": "word " * 150}
    room = hello_chat.n_ctx - len(hello_chat.encoder.encode_prompt([new])) - 2
    ids, dropped = hello_chat.prompt_ids([long_q, short_a, older, new], max_new_tokens=room)
    assert dropped == 3 and ids == hello_chat.encoder.encode_prompt([new])
