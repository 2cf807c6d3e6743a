"""Training throughput on the tiny model: our accelerate loop vs TRL's SFTTrainer; and peak memory
of a training step for QLoRA (NF4 base) vs LoRA (fp32 base) vs full fine-tuning.

    .venv/bin/python bench/train_throughput.py [--epochs 4]

Same base (the tiny Phi-3.5, NF4), same LoRA (r 16, alpha 32, dropout 0.05, four targets, seed
0), same tokenized examples with the same assistant-only labels (our ChatEncoder; TRL takes a
pre-tokenized ``input_ids`` + ``labels`` dataset as is), AdamW, lr 1e-3, cosine with 5% warm-up,
clipping 1.0, the same number of optimizer steps and about the same examples per step. Tokens
are real (non-padding) tokens. The validation loss of every trained model is computed by the
same function (``train.evaluate_loss``). Each trainer runs in its own fresh process.
Writes bench/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, gb, machine, python_step, save  # noqa: E402

WORK = REPO / "runs" / "bench-train"

PREPARE = """
from pathlib import Path
from qlora_pipeline.config import load_config
from qlora_pipeline.pipeline import run_pipeline
run_pipeline(load_config("tiny", {overrides!r}), Path({run!r}), log=lambda *a: None, until="prepare")
"""

OURS = """
import json, time
from pathlib import Path
from qlora_pipeline.config import load_config
from qlora_pipeline.pipeline import run_stage, save_run_config
cfg = load_config("tiny", {overrides!r})
run = Path({run!r})
save_run_config(cfg, run)
t = time.perf_counter()
run_stage("train", cfg, run)
wall = time.perf_counter() - t
rows = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
steps = [r for r in rows if "loss" in r]
vals = [r for r in rows if "val_loss" in r]
print(json.dumps({{"steps": steps[-1]["step"], "tokens": steps[-1]["tokens"], "tokens_per_s": steps[-1]["tokens_per_s"],
                  "val_loss": vals[-1]["val_loss"], "wall_seconds": wall}}))
"""

TRL = """
import json, time, torch
from pathlib import Path
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import load_config
from qlora_pipeline.data import read_split, tokenize_conversations
from qlora_pipeline.model import attach_lora, load_base_for_training, load_tokenizer, pick_device, resolve_base
from qlora_pipeline.runtime import tune_allocator
from qlora_pipeline.batches import evaluate_loss
cfg = load_config("tiny", {overrides!r})
run = Path({run!r})
base = resolve_base(cfg, log=lambda *a: None)
tokenizer = load_tokenizer(base)
encoder = ChatEncoder.from_hf(tokenizer)
train, _ = tokenize_conversations(encoder, read_split(run, "train"), cfg.data.max_seq_len, cfg.data.overlong)
val, _ = tokenize_conversations(encoder, read_split(run, "val"), cfg.data.max_seq_len, cfg.data.overlong)
device = pick_device()
model = load_base_for_training(cfg.model, base, device)
model, _ = attach_lora(model, cfg.lora, cfg.model, seed=cfg.train.seed)
tune_allocator()  # as our train stage does, after loading
args = SFTConfig(output_dir=str(run / "trl"), per_device_train_batch_size={batch}, gradient_accumulation_steps=1,
                 max_steps={steps}, learning_rate=cfg.train.learning_rate, lr_scheduler_type="cosine",  # a float < 1: a ratio
                 warmup_steps=cfg.train.warmup_ratio, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
                 use_cpu=True, bf16=False, fp16=False, report_to=[], save_strategy="no", logging_steps=10,
                 max_length=None if {padding_free} else cfg.data.max_seq_len, padding_free={padding_free},  # inputs are cut already seed=cfg.train.seed,
                 dataloader_num_workers=0, gradient_checkpointing=False, disable_tqdm=True)
dataset = Dataset.from_list([{{"input_ids": e["input_ids"], "labels": e["labels"]}} for e in train])
trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
t = time.perf_counter()
metrics = trainer.train().metrics
wall = time.perf_counter() - t
tokens = max(r.get("num_tokens", 0) for r in trainer.state.log_history)
model.eval()
val_loss = evaluate_loss(model, val, cfg.train.batch_tokens, device.name)
print(json.dumps({{"steps": trainer.state.global_step, "tokens": tokens, "tokens_per_s": tokens / metrics["train_runtime"],
                  "val_loss": val_loss, "wall_seconds": wall, "train_runtime": metrics["train_runtime"]}}))
"""

MEMORY = """
import json, resource, torch
from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import load_config
from qlora_pipeline.model import attach_lora, load_base_for_training, pick_device, resolve_base
from qlora_pipeline.runtime import tune_allocator
cfg = load_config("tiny", {overrides!r})
base = resolve_base(cfg, log=lambda *a: None)
device = pick_device()
model = load_base_for_training(cfg.model, base, device)
mode = {mode!r}
if mode == "full":
    for p in model.parameters():
        p.requires_grad_(True)
else:
    model, _ = attach_lora(model, cfg.lora, cfg.model, seed=0)
model.train()
tune_allocator()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0))
for _ in range(2):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
print(json.dumps({{"trainable": sum(p.numel() for p in params), "base_params": base_params}}))
"""


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
        python_step(PREPARE.format(overrides=common, run=run))
    print("ours: training", flush=True)
    ours = python_step(OURS.format(overrides=common, run=ours_run))
    ours_result = ours["result"]
    # As many examples per TRL step as our packed batches hold on average (same tokens per step).
    batch = max(1, round(_mean_examples_per_step(Path(ours_run), ours_result)))
    results = {"ours": {**ours_result, "peak_rss_bytes": ours["peak_rss_bytes"]}}
    for name, padding_free in (("trl", False), ("trl_padding_free", True)):
        print(f"{name}: training (batch {batch} examples)", flush=True)
        run = python_step(
            TRL.format(
                overrides=common, run=trl_run, batch=batch, steps=ours_result["steps"], padding_free=padding_free
            )
        )
        results[name] = {**run["result"], "peak_rss_bytes": run["peak_rss_bytes"]}
    memory = {}
    for mode, overrides in (
        ("qlora", ["model.quantize=nf4"]),
        ("lora", ["model.quantize=none"]),
        ("full", ["model.quantize=none"]),
    ):
        print(f"memory: {mode}", flush=True)
        run = python_step(MEMORY.format(overrides=overrides, mode=mode))
        memory[mode] = {**run["result"], "peak_rss_bytes": run["peak_rss_bytes"], "seconds": run["seconds"]}
    baseline = python_step("import torch, transformers, peft, bitsandbytes, accelerate")["peak_rss_bytes"]

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
