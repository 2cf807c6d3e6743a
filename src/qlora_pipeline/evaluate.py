"""The ``evaluate`` stage: what did fine-tuning buy, measured on held-out conversations.

    qlora-pipeline evaluate --run-dir runs/demo

For the base, base + adapter and merged model (all at full precision): the loss per assistant
token on the validation split and the perplexity on the test split, with the same masking as
training. Results go to ``RUN/report.json`` (section ``hf``) and ``RUN/report.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.errors import StageOrderError
from qlora_pipeline.paths import write_json_atomic, write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def read_report(run_dir: Path) -> dict:
    path = Path(run_dir) / REPORT_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def update_report(run_dir: Path, section: str, values: dict) -> dict:
    """Replace one section of report.json (atomically) and re-render report.md."""
    report = read_report(run_dir)
    report[section] = values
    write_json_atomic(Path(run_dir) / REPORT_JSON, report)
    write_text_atomic(Path(run_dir) / REPORT_MD, render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    lines = ["# Run report", ""]
    hf = report.get("hf")
    if hf:
        lines += ["## Fine-tuning (transformers, full precision)", "",
                  "| model | validation loss | test perplexity |", "| --- | ---: | ---: |"]
        for name, label in (("base", "base"), ("adapter", "base + adapter"), ("merged", "merged")):
            val = hf.get(f"{name}_val_loss")
            ppl = hf.get(f"{name}_ppl")
            lines.append(f"| {label} | {val:.4f} | {ppl:.3f} |" if val is not None else
                         f"| {label} | – | {ppl:.3f} |")
        if hf.get("val_loss_reduction") is not None:
            lines += ["", f"Validation loss on assistant tokens fell by {100 * hf['val_loss_reduction']:.1f}% "
                          "relative to the base model."]
        lines.append("")
    return "\n".join(lines) + "\n"


def evaluate_hf(cfg: PipelineConfig, run_dir: Path, log=print) -> dict:
    """Validation loss and test perplexity of base, base + adapter and merged model."""
    from qlora_pipeline.chat_format import ChatEncoder
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.merge import load_adapter, merge_dtype
    from qlora_pipeline.model import load_base_full_precision, load_tokenizer, resolve_base
    from qlora_pipeline.train import evaluate_loss

    run_dir = Path(run_dir)
    for needed, stage in (("adapter/adapter_config.json", "train"), ("merged/config.json", "merge")):
        if not (run_dir / needed).is_file():
            raise StageOrderError(f"{run_dir / needed} is missing; run `qlora-pipeline {stage} --run-dir {run_dir}` first")
    base = resolve_base(cfg, log_fn=log)
    tokenizer = load_tokenizer(base, cfg.model.revision)
    encoder = ChatEncoder.from_hf(tokenizer)
    splits = {}
    for split in ("val", "test"):
        splits[split], _ = tokenize_conversations(encoder, read_split(run_dir, split), cfg.data.max_seq_len,
                                                  cfg.data.overlong)
    bt = cfg.train.batch_tokens

    def measure(model, name: str) -> dict:
        val = evaluate_loss(model, splits["val"], bt, "cpu", desc=f"{name}: validation") if splits["val"] else None
        test = evaluate_loss(model, splits["test"], bt, "cpu", desc=f"{name}: test") if splits["test"] else None
        return {f"{name}_val_loss": val, f"{name}_ppl": math.exp(test) if test is not None else None}

    dtype = merge_dtype(cfg, base)
    results: dict = {}
    model = load_base_full_precision(base, cfg.model, dtype=dtype)
    results.update(measure(model, "base"))
    results.update(measure(load_adapter(model, run_dir / "adapter"), "adapter"))
    del model
    merged = load_base_full_precision(str(run_dir / "merged"), cfg.model, dtype=dtype)
    results.update(measure(merged, "merged"))
    if results["base_val_loss"] and results["adapter_val_loss"] is not None:
        results["val_loss_reduction"] = 1 - results["adapter_val_loss"] / results["base_val_loss"]
    results["val_tokens_examples"] = len(splits["val"])
    results["test_examples"] = len(splits["test"])
    update_report(run_dir, "hf", results)
    log(f"validation loss: base {results['base_val_loss']:.4f} -> adapter {results['adapter_val_loss']:.4f} "
        f"({100 * results.get('val_loss_reduction', 0):.1f}% lower); test perplexity base "
        f"{results['base_ppl']:.2f}, adapter {results['adapter_ppl']:.2f}, merged {results['merged_ppl']:.2f}")
    return results
