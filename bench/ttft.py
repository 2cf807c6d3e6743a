"""Time to first token of the chat app for a 64-token prompt (issue 5's goal: <= 1 s on 2 cores).

    .venv/bin/python bench/ttft.py [--model runs/demo/gguf/model-Q4_K_M.gguf] [--runs 20]

Two measurements, each on a fresh context (``Llama.reset()``: no prompt-cache reuse between runs):
- ``direct``: ``LlamaChat.stream`` in this process, from the call to the first text piece
  (tokenizing, the prompt's forward pass and the first sampled token);
- ``app``: the running app through its Gradio API (``gradio_client``), from submitting to the
  first streamed output: adds the queue, the HTTP/SSE round trip and Gradio's processing.
Writes bench/results/ttft.json and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from qlora_pipeline.course.app_check import app_command, served
from qlora_pipeline.paths import write_json_atomic
from qlora_pipeline.serve.chat import LlamaChat, SamplingParams

PROMPT_TOKENS = 64
PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, max_tokens=32)
WORDS = (
    "river mountain garden window pencil orange silver thunder market candle harbor violin "
    "meadow lantern puzzle rocket blanket compass ladder"
).split()


def prompt_of(chat: LlamaChat, tokens: int, seed: int) -> str:
    """A user message whose chat prompt (template included) is exactly ``tokens`` long."""
    words: list[str] = []
    i = seed
    while True:
        text = " ".join(words + [WORDS[i % len(WORDS)]])
        if len(chat.encoder.encode_prompt([{"role": "user", "content": text}])) > tokens:
            break
        words.append(WORDS[i % len(WORDS)])
        i += 7
    message = " ".join(words)
    while len(chat.encoder.encode_prompt([{"role": "user", "content": message}])) < tokens:
        message += "."
    return message


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "median_s": statistics.median(ordered),
        "p90_s": ordered[int(0.9 * (len(ordered) - 1))],
        "max_s": ordered[-1],
        "min_s": ordered[0],
        "runs": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/gguf/model-Q4_K_M.gguf"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ttft.json")
    args = parser.parse_args()
    if not args.model.is_file():
        print(f"error: {args.model} does not exist; run `make demo` first", file=sys.stderr)
        return 2

    direct = []
    with LlamaChat(args.model, n_ctx=2048, n_threads=args.threads) as chat:
        messages = [prompt_of(chat, PROMPT_TOKENS, seed) for seed in range(args.runs + 1)]
        lengths = {len(chat.encoder.encode_prompt([{"role": "user", "content": m}])) for m in messages}
        assert lengths == {PROMPT_TOKENS}, lengths
        for i, message in enumerate(tqdm(messages, desc="direct", unit="run")):
            chat.llm.reset()
            started = time.perf_counter()
            stream = chat.stream([{"role": "user", "content": message}], PARAMS)
            next(stream)
            elapsed = time.perf_counter() - started
            stream.close()
            if i:  # the first run warms caches and is not counted
                direct.append(elapsed)

    from gradio_client import Client

    app = []
    with served(app_command("--model", str(args.model), "--threads", str(args.threads))) as url:
        client = Client(url, verbose=False)
        for i, message in enumerate(tqdm(messages, desc="app", unit="run")):
            started = time.perf_counter()
            job = client.submit(
                message,
                "",
                args.model.name,
                PARAMS.temperature,
                PARAMS.top_p,
                PARAMS.top_k,
                PARAMS.repeat_penalty,
                PARAMS.max_tokens,
                0,
                api_name="/chat",
            )
            while not job.outputs() and not job.done():
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
            job.result()
            if i:
                app.append(elapsed)

    result = {
        "model": str(args.model),
        "model_mb": round(args.model.stat().st_size / 1e6, 2),
        "prompt_tokens": PROMPT_TOKENS,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "direct": summary(direct),
        "app": summary(app),
        "goal_s": 1.0,
    }
    result["meets_goal"] = result["app"]["p90_s"] <= result["goal_s"]
    write_json_atomic(args.out, result)
    print(
        f"time to first token, {PROMPT_TOKENS}-token prompt, {args.model.name}, {args.threads} threads "
        f"({args.runs} runs each):"
    )
    for name in ("direct", "app"):
        s = result[name]
        print(
            f"  {name:6s} median {1000 * s['median_s']:.1f} ms, p90 {1000 * s['p90_s']:.1f} ms, "
            f"max {1000 * s['max_s']:.1f} ms"
        )
    print(
        f"goal <= {result['goal_s']:.1f} s at p90 through the app: {'met' if result['meets_goal'] else 'MISSED'}"
        f" -> {args.out}"
    )
    return 0 if result["meets_goal"] else 1


if __name__ == "__main__":
    sys.exit(main())
