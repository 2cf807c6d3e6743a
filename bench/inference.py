"""Inference speed on the tiny model: llama-cpp-python on F16/Q8_0/Q5_K_M/Q4_K_M vs transformers fp32.

    .venv/bin/python bench/inference.py [--run runs/demo] [--runs 5]

Both sides run the same merged model (``RUN/merged`` and ``RUN/gguf``), greedy, a 64-token
prompt and 64 new tokens, at 1 and 2 threads; medians of ``--runs`` runs after one warm-up.
Prompt processing: the prompt's forward pass (tokens/s). Generation: for llama.cpp, the scorecard's
own measurement (``qlora_pipeline.evaluation.speed.decode_speed``: tokens after the first over the time
between first and last); for transformers, ``generate`` with the KV cache, its prefill subtracted.
Writes bench/results/inference.json and inference.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, save  # noqa: E402

PROMPT = 64
NEW = 64
VARIANTS = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M")


def prompt_ids() -> list[int]:
    # Ids of ordinary tokens (no special ones), the same for every engine.
    return [1] + [(i * 37) % 28000 + 1000 for i in range(PROMPT - 1)]


def llama_speed(path: Path, threads: int, runs: int) -> dict:
    """The scorecard's own measurement (``speed.decode_speed``) at ``threads``."""
    from llama_cpp import Llama

    from qlora_pipeline.evaluation.speed import decode_speed

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    speed = decode_speed(llm, prompt_ids(), NEW, runs)
    llm.close()
    return {
        "prompt_tokens_per_s": speed["prompt_tokens_per_s"],
        "gen_tokens_per_s": speed["tokens_per_s"],
        "time_to_first_token_s": speed["time_to_first_token_s"],
        "file_bytes": path.stat().st_size,
    }


def transformers_speed(merged: Path, threads: int, runs: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids()])
    pp, gen = [], []
    with torch.inference_mode():
        for run in range(runs + 1):
            t = time.perf_counter()
            model(input_ids=ids)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(
                ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None
            )
            total = time.perf_counter() - t
            assert out.shape[1] == PROMPT + NEW
            if run:
                pp.append(PROMPT / prefill)
                gen.append(NEW / max(total - prefill, 1e-9))
    return {
        "prompt_tokens_per_s": statistics.median(pp),
        "gen_tokens_per_s": statistics.median(gen),
        "file_bytes": sum(f.stat().st_size for f in merged.glob("*.safetensors")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not (args.run / "gguf" / "model-Q4_K_M.gguf").is_file():
        print(f"error: {args.run} has no GGUF files; run `make demo` first", file=sys.stderr)
        return 2
    results: dict = {}
    for threads in (1, 2):
        results[f"transformers_fp32@{threads}"] = transformers_speed(args.run / "merged", threads, args.runs)
        for variant in VARIANTS:
            results[f"{variant}@{threads}"] = llama_speed(
                args.run / "gguf" / f"model-{variant}.gguf", threads, args.runs
            )
        print(f"{threads} thread(s) done", flush=True)
    rows = []
    for key, r in results.items():
        name, threads = key.split("@")
        ref = results[f"transformers_fp32@{threads}"]
        rows.append(
            [
                name,
                threads,
                f"{r['file_bytes'] / 1e6:.2f} MB",
                f"{r['prompt_tokens_per_s']:.0f}",
                f"{r['gen_tokens_per_s']:.0f}",
                f"{r['gen_tokens_per_s'] / ref['gen_tokens_per_s']:.1f}x",
            ]
        )
    ratio = results["Q4_K_M@2"]["gen_tokens_per_s"] / results["transformers_fp32@2"]["gen_tokens_per_s"]
    result = {
        "machine": machine(),
        "run": str(args.run),
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "runs": args.runs,
        "results": results,
        "q4_vs_transformers_gen_2_threads": ratio,
        "goal": {"ratio": 5.0, "met": ratio >= 5.0},
    }
    save(
        "inference",
        result,
        rows,
        ["engine / variant", "threads", "size", "prompt tokens/s", "gen tokens/s", "gen vs transformers"],
        "Inference on the tiny model: llama-cpp-python GGUF variants vs transformers fp32",
        f"Greedy; {PROMPT}-token prompt, {NEW} new tokens; medians of {args.runs} runs. "
        f"Q4_K_M generation vs transformers fp32 at 2 threads: {ratio:.1f}x.",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
