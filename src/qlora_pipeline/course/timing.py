"""How long the course notebooks' long steps will take, from tokens/s measured on this machine.

Notebook 1 times one real optimizer step and one forward pass on the preset's model, estimates
every long transformers step of the three notebooks from those rates and the preset's token
counts and caps, prints it, and keeps it in RUN_DIR/time_estimate.json; notebooks 2 and 3 print
their part again before their long steps (a new Colab VM, same GPU type).
"""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.config import PipelineConfig
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import write_json_atomic


def _tokens(examples: list[dict]) -> int:
    return sum(len(ex["input_ids"]) for ex in examples)


def step_counts(cfg: PipelineConfig, run_dir: Path, encoder) -> dict[str, int]:
    """Token counts behind each long step, from the prepared splits and the preset's caps."""
    from qlora_pipeline.data import read_split, tokenize_conversations
    from qlora_pipeline.evaluate import hf_splits
    from qlora_pipeline.train import step_plan

    tcfg = cfg.train
    train, _ = tokenize_conversations(encoder, read_split(run_dir, "train"), cfg.data.max_seq_len, cfg.data.overlong)
    total_steps, plan = step_plan(train, tcfg)
    micro_batches = plan[: total_steps * tcfg.gradient_accumulation_steps]
    splits = hf_splits(cfg, run_dir, encoder)
    val_per_eval = _tokens(splits["val"])
    if tcfg.eval_max_batches is not None:
        val_per_eval = min(val_per_eval, tcfg.eval_max_batches * tcfg.batch_tokens)
    evals = total_steps // tcfg.eval_every + 2  # before training, every eval_every steps, at the end
    check, _ = tokenize_conversations(
        encoder, read_split(run_dir, "val")[: cfg.merge.check_samples], cfg.data.max_seq_len, cfg.data.overlong
    )
    return {
        "optimizer_steps": total_steps,
        "train_tokens": sum(len(train[i]["input_ids"]) for batch in micro_batches for i in batch),
        "validation_tokens_during_training": evals * val_per_eval,
        "hf_tokens_per_model": _tokens(splits["val"]) + _tokens(splits["test"]),
        "merge_check_tokens": _tokens(check),
        **(dpo_counts(cfg, run_dir, encoder, val_per_eval) if cfg.prefer.enabled else {}),
    }


def _pair_tokens(examples: list[dict]) -> int:
    """Tokens of a pair's two sequences: the prompt with the chosen reply, and with the rejected one."""
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


def dpo_counts(cfg: PipelineConfig, run_dir: Path, encoder, sft_val_tokens: int) -> dict[str, int]:
    """Token counts of the prefer stage: the policy trains on every pair's two sequences and the
    reference reads them once more (a forward pass); validation pairs are read by both at every
    evaluation; at the end base, SFT and DPO read the test pairs and the SFT validation loss is
    taken twice."""
    import math

    from qlora_pipeline.pairs import encode_pairs, pair_length_limit, read_pairs

    p = cfg.prefer
    max_len = pair_length_limit(cfg)
    pairs = {split: encode_pairs(encoder, read_pairs(run_dir, split), max_len)[0] for split in ("train", "val", "test")}
    if p.eval_max_pairs is not None:
        pairs["val"], pairs["test"] = pairs["val"][: p.eval_max_pairs], pairs["test"][: p.eval_max_pairs]
    per_step = p.batch_size * p.gradient_accumulation_steps
    steps = p.max_steps or math.ceil(p.epochs * len(pairs["train"]) / per_step)
    train_tokens = _pair_tokens(pairs["train"]) * steps * per_step / max(1, len(pairs["train"]))
    evals = steps // p.eval_every + 1
    return {
        "dpo_steps": steps,
        "dpo_train_tokens": int(train_tokens),
        "dpo_forward_tokens": int(
            train_tokens + 2 * evals * _pair_tokens(pairs["val"]) + 3 * _pair_tokens(pairs["test"]) + 2 * sft_val_tokens
        ),
    }


def estimate(counts: dict[str, int], train_tokens_per_s: float, forward_tokens_per_s: float) -> dict:
    """Seconds per long step of each notebook (transformers steps only; GGUF steps are timed as they run)."""
    fwd = forward_tokens_per_s
    table = {
        "rates": {"train_tokens_per_s": train_tokens_per_s, "forward_tokens_per_s": fwd},
        "S29_finetuning_llm": {
            "training": counts["train_tokens"] / train_tokens_per_s + counts["validation_tokens_during_training"] / fwd,
            "base and adapter scores": 2 * counts["hf_tokens_per_model"] / fwd,
        },
        "S29_phi3_inference": {"merge check (base + adapter, then merged)": 2 * counts["merge_check_tokens"] / fwd},
        "S29_phi3_QuantizeLLMs_checkpoint": {
            "base, adapter and merged scores": 3 * counts["hf_tokens_per_model"] / fwd
        },
    }
    if "dpo_train_tokens" in counts:  # prefer.enabled: the prefer stage runs in notebook 1, after training
        table["S29_finetuning_llm"]["preference tuning (DPO)"] = dpo_seconds(counts, train_tokens_per_s, fwd)
    return table


def dpo_seconds(counts: dict[str, int], train_tokens_per_s: float, forward_tokens_per_s: float) -> float:
    """The prefer stage: the policy's training tokens, plus every forward-only token (reference,
    evaluations, final measurements)."""
    return counts["dpo_train_tokens"] / train_tokens_per_s + counts["dpo_forward_tokens"] / forward_tokens_per_s


def save_estimate(run_dir: Path, table: dict) -> None:
    write_json_atomic(RunLayout(run_dir).time_estimate, table)


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_estimate(table: dict, notebook: str | None = None) -> str:
    """Lines of "notebook: step ≈ N min", for one notebook or all of them."""
    rates = table["rates"]
    lines = [
        f"measured here: training {rates['train_tokens_per_s']:,.0f} tokens/s, "
        f"forward passes {rates['forward_tokens_per_s']:,.0f} tokens/s"
    ]
    for name, steps in table.items():
        if name == "rates" or (notebook and name != notebook):
            continue
        for step, seconds in steps.items():
            lines.append(f"  {name}: {step} ≈ {format_duration(seconds)}")
    return "\n".join(lines)


def print_estimate(run_dir: Path, notebook: str) -> None:
    """Notebooks 2 and 3: the estimate notebook 1 made, for this notebook's long steps."""
    path = RunLayout(run_dir).time_estimate
    if not path.is_file():
        print("no time estimate in RUN_DIR (notebook 1 makes it)")
        return
    print(format_estimate(json.loads(path.read_text()), notebook))
