"""Training throughput on the tiny model: our accelerate loop vs TRL's SFTTrainer; and peak memory
of a training step for QLoRA (NF4 base) vs LoRA (fp32 base) vs full fine-tuning.

    .venv/bin/python bench/train_throughput.py [--epochs 4]

Same base (the tiny Phi-3.5, NF4), same LoRA (r 16, alpha 32, dropout 0.05, four targets, seed
0), same tokenized examples with the same assistant-only labels (our ChatEncoder; TRL takes a
pre-tokenized ``input_ids`` + ``labels`` dataset as is), AdamW, lr 1e-3, cosine with 5% warm-up,
clipping 1.0, the same number of optimizer steps and about the same examples per step. Tokens
are real (non-padding) tokens. The validation loss of every trained model is computed by the
same function (``batches.evaluate_loss``). Each trainer runs in its own fresh process (``bench/steps.py``).
Writes bench/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, gb, machine, run_step, save  # noqa: E402

WORK = REPO / "runs" / "bench-train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=float, default=4)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    common = [
        f"train.epochs={args.epochs}",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "train.log_every=10",
    ]
    ours_run, trl_run = str(WORK / "ours"), str(WORK / "trl")
    for run in (ours_run, trl_run):
        run_step("prepare_run", run=run, overrides=common)
    print("ours: training", flush=True)
    ours = run_step("train_ours", run=ours_run, overrides=common)
    ours_result = ours["result"]
    # As many examples per TRL step as our packed batches hold on average (same tokens per step).
    batch = max(1, round(_mean_examples_per_step(Path(ours_run), ours_result)))
    results = {"ours": {**ours_result, "peak_rss_bytes": ours["peak_rss_bytes"]}}
    for name, padding_free in (("trl", False), ("trl_padding_free", True)):
        print(f"{name}: training (batch {batch} examples)", flush=True)
        run = run_step(
            "train_trl",
            run=trl_run,
            overrides=common,
            batch=batch,
            steps=ours_result["steps"],
            padding_free=padding_free,
        )
        results[name] = {**run["result"], "peak_rss_bytes": run["peak_rss_bytes"]}
    memory = {}
    for mode, overrides in (
        ("qlora", ["model.quantize=nf4"]),
        ("lora", ["model.quantize=none"]),
        ("full", ["model.quantize=none"]),
    ):
        print(f"memory: {mode}", flush=True)
        run = run_step("training_memory", overrides=overrides, mode=mode)
        memory[mode] = {**run["result"], "peak_rss_bytes": run["peak_rss_bytes"], "seconds": run["seconds"]}
    baseline = run_step("import_libraries")["peak_rss_bytes"]

    speedup = results["ours"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    rows = [
        [
            name,
            f"{r['steps']}",
            f"{int(r['tokens']):,}",
            f"{r['tokens_per_s']:.0f}",
            f"{r['tokens_per_s'] / results['trl']['tokens_per_s']:.2f}x",
            f"{r['val_loss']:.4f}",
            gb(r["peak_rss_bytes"]),
        ]
        for name, r in results.items()
    ]
    # bitsandbytes packs two 4-bit weights per element, so the NF4 model's numel undercounts:
    # every method is divided by the same (full-precision) parameter count.
    base_params = memory["full"]["base_params"]
    mem_rows = [
        [
            mode,
            f"{m['trainable']:,}",
            gb(m["peak_rss_bytes"]),
            gb(m["peak_rss_bytes"] - baseline),
            f"{(m['peak_rss_bytes'] - baseline) / base_params:.2f}",
            f"{m['peak_rss_bytes'] / memory['qlora']['peak_rss_bytes']:.2f}x",
        ]
        for mode, m in memory.items()
    ]
    notes = (
        "| memory (step, seq 512) | trainable params | peak RSS | above the libraries' import | bytes per base "
        "parameter (above import) | vs QLoRA |\n| --- | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join("| " + " | ".join(r) + " |" for r in mem_rows)
        + f"\n\nImporting torch, transformers, peft, bitsandbytes and accelerate alone: {gb(baseline)} RSS. "
        f"TRL batch: {batch} examples per step (our packed batches' mean). Ours / TRL tokens/s: {speedup:.2f}x."
    )
    result = {
        "machine": machine(),
        "epochs": args.epochs,
        "trl_batch": batch,
        "training": results,
        "speedup_vs_trl": speedup,
        "memory": memory,
        "import_rss_bytes": baseline,
        "goal": {"speedup": 1.3, "met": speedup >= 1.3 and results["ours"]["val_loss"] <= results["trl"]["val_loss"]},
    }
    save(
        "train",
        result,
        rows,
        ["trainer", "steps", "real tokens", "tokens/s", "vs TRL", "val loss", "peak RSS"],
        "Training on the tiny model: our loop vs TRL SFTTrainer, and memory per method",
        notes,
    )
    return 0


def _mean_examples_per_step(run: Path, ours: dict) -> float:
    from qlora_pipeline.data import read_split

    examples = len(read_split(run, "train"))
    cfg = json.loads((run / "config.json").read_text())
    epochs = cfg["train"]["epochs"]
    return examples * epochs / ours["steps"]


if __name__ == "__main__":
    sys.exit(main())
