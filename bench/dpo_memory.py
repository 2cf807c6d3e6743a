"""The prefer stage's (DPO) memory on Phi-3.5-mini's full shape, on this CPU, beside SFT's.

    .venv/bin/python bench/dpo_memory.py       # ~40 min on 2 cores; ~8 GB of disk for the model

The ``phi35-colab-t4`` preset on the offline twin hub's oasst1 sample (``make rehearsal``'s data),
with the random-weight full-size model (``bench/fullsize_model.py``) as its base and the caps
``bench/colab_memory.py`` uses so a CPU gets through: ``qlora-pipeline train`` for one step of 256
tokens, then ``qlora-pipeline prefer`` for one DPO step of one pair (its two sequences cut to 256
tokens, the policy trained, the reference read), one evaluation and the final measurement of base,
SFT and DPO. Each stage is its own process, measured from outside (peak RSS from ``wait4``, peak
anonymous memory sampled). On a CPU the 4-bit model Colab keeps on the T4 sits in RAM, so these
are upper bounds of what the T4 holds; the comparison that carries over is DPO against SFT under
the same caps. Writes bench/results/dpo_memory.{json,md}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from colab_memory import CACHE, CAPS  # noqa: E402
from common import REPO, gb, machine, measured_run, save  # noqa: E402

# The prefer stage under the same kind of caps: one step, one pair per micro-batch, 256 tokens.
PREFER_CAPS = [
    "prefer.enabled=true",
    "prefer.max_steps=1",
    "prefer.batch_size=1",
    "prefer.gradient_accumulation_steps=1",
    "prefer.max_length=256",
    "prefer.eval_every=1",
    "prefer.checkpoint_every=1",
    "prefer.eval_max_pairs=1",
]


def long_pairs(run: Path, words: int = 90) -> int:
    """Every split's pairs replaced by one pair whose two sequences are each near the 256-token cap
    (the sample's own pairs are a few dozen tokens: a DPO step on them measures little but the
    model). Returns the longer sequence's length in tokens, as the stage's encoder counts it."""
    import json

    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.layout import SPLITS, RunLayout
    from qlora_pipeline.model import load_tokenizer
    from qlora_pipeline.pairs import encode_pairs

    pair = {
        "prompt": [{"role": "user", "content": "Tell me about the river. " + "The river runs on. " * (words // 4)}],
        "chosen": [{"role": "assistant", "content": "It flows north to the sea. " * (words // 6)}],
        "rejected": [{"role": "assistant", "content": "Rivers are wet and long. " * (words // 5)}],
    }
    for split in SPLITS:
        RunLayout(run).pairs(split).write_text(json.dumps(pair) + "\n")
    encoder = ChatEncoder.from_hf(load_tokenizer(str(CACHE / "base")))
    [example], _ = encode_pairs(encoder, [pair], max_len=1 << 20)
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def stage_command(stage: str, run: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "qlora_pipeline.cli", stage, "--run-dir", str(run), *overrides]


def main() -> int:
    base, run = CACHE / "base", CACHE / "dpo-run"
    if not (base / "model.safetensors.index.json").is_file():
        from fullsize_model import build

        print(f"building the full-size model in {base} (random weights, 7.6 GB)", flush=True)
        build(base)
    hub = REPO / "runs" / "twin-hub"
    subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "hub-twin", "--out", str(hub)], check=True)
    env = {"HF_HOME": str(hub), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    shutil.rmtree(run, ignore_errors=True)
    overrides = ["--preset", "phi35-colab-t4", f"model.name_or_path={base}", *CAPS, *PREFER_CAPS]
    subprocess.run(stage_command("prepare", run, overrides), check=True, env={**os.environ, **env})
    pair_tokens = long_pairs(run)
    print(f"one pair of two sequences of up to {pair_tokens} tokens", flush=True)
    measured = {}
    for stage in ("train", "prefer"):
        print(f"{stage} on the full-size shape ...", flush=True)
        result = measured_run(stage_command(stage, run, overrides[2:]), env=env)  # the run's own config
        measured[stage] = {k: v for k, v in result.items() if k != "stdout"}
        print(f"  {gb(result['peak_rss_bytes'])} peak RSS, {gb(result['peak_anon_bytes'])} peak anonymous, "
              f"{result['seconds']:.0f} s", flush=True)  # fmt: skip
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    ratio = measured["prefer"]["peak_anon_bytes"] / measured["train"]["peak_anon_bytes"]
    save(
        "dpo_memory",
        {
            "machine": machine(),
            "model_bytes": model_bytes,
            "caps": CAPS + PREFER_CAPS,
            "dpo_sequence_tokens": pair_tokens,
            "stages": measured,
        },
        [
            [stage, gb(m["peak_rss_bytes"]), gb(m["peak_anon_bytes"]), f"{m['seconds'] / 60:.1f} min"]
            for stage, m in measured.items()
        ],
        ["stage (own process)", "peak RSS", "peak anonymous", "time"],
        "SFT and DPO on Phi-3.5-mini's full shape (4-bit base, LoRA r16), CPU, capped",
        notes=f"One full-size model is {model_bytes / 1e9:.2f} GB in bf16. The prefer stage holds "
        f"{ratio:.2f}x the anonymous memory of the train stage under the same caps (one 256-token SFT "
        f"step; one DPO step of one pair, each of its two sequences up to {pair_tokens} tokens: policy forward "
        "and backward on both, the reference adapter's forward, then base, SFT and DPO scored on it). "
        "RSS counts mapped safetensors pages the "
        "kernel can drop; anonymous memory is what the process holds. Caps: " + ", ".join(CAPS + PREFER_CAPS),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
