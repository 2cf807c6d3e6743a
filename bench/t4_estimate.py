"""The Colab T4 estimate per notebook, for the README's journey table.

    .venv/bin/python bench/t4_estimate.py --run runs/journey/drive/MyDrive/qlora-gguf-course/runs/notebooks/s29

No T4 is reachable here, so this is an estimate, computed by the notebooks' own ``timing.estimate``
(what notebook 1 prints on the GPU it runs on) from:

- token counts: ``timing.step_counts`` of the ``phi35-colab-t4`` preset as it ships (not the
  journey's CPU overrides) on the rehearsed run's data splits, the data-dependent counts scaled from
  the bundled sample to the real oasst1 by size (datasets' num_bytes: the card's against the
  sample's), then the preset's caps applied;
- rates: the published T4 anchor in DESIGN.md (Unsloth's Phi-3.5-mini notebook, 4-bit, LoRA r16:
  60 steps of 2 x 4 x 2,048 tokens in 500 s = 1,966 training tokens/s) and a forward pass at three
  times that (a forward is about a third of a training step's arithmetic). Unsloth's kernels are
  faster than plain transformers + bitsandbytes, so the training times are a lower bound.

Only the transformers steps are counted, as ``timing.estimate`` counts them (downloads, the merge's
save, the GGUF conversion and quantization are timed as they run). Writes
bench/results/t4_estimate.{json,md}.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qlora_pipeline.base import resolve_base
from qlora_pipeline.chat_format import ChatEncoder
from qlora_pipeline.config import load_config
from qlora_pipeline.course.journey import OASST1_BYTES, oasst1_scale
from qlora_pipeline.course.timing import estimate, format_duration, step_counts
from qlora_pipeline.model import load_tokenizer
from qlora_pipeline.paths import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
T4_TRAIN_TOKENS_PER_S = 60 * 2 * 4 * 2048 / 500  # Unsloth's published Phi-3.5-mini T4 run (DESIGN.md)
FORWARD_OVER_TRAIN = 3.0
SCALED = ("train_tokens", "validation_tokens_during_training")


def full_size_counts(run: Path, preset: str, twin_hub: Path) -> tuple[dict, dict]:
    """Counts of the preset as it ships (no CPU overrides) on the rehearsed run's splits, and the
    same for the real oasst1: the data-dependent counts scaled by size, then the preset's
    caps applied (a capped validation pass, capped scoring)."""
    cfg = load_config(preset, ["prefer.enabled=true"])  # the prefer stage's cost too, as if turned on
    counts = step_counts(cfg, run, ChatEncoder.from_hf(load_tokenizer(resolve_base(cfg))))
    scale = oasst1_scale(twin_hub)
    tcfg = cfg.train
    steps = int(counts["optimizer_steps"] * scale)
    evals = steps // tcfg.eval_every + 2  # before training, every eval_every steps, at the end (timing.step_counts)
    val_pass = counts["validation_tokens_during_training"] / (counts["optimizer_steps"] // tcfg.eval_every + 2)
    if tcfg.eval_max_batches is not None:
        val_pass = min(val_pass * scale, tcfg.eval_max_batches * tcfg.batch_tokens)
    hf = counts["hf_tokens_per_model"] * scale
    full = {
        "optimizer_steps": steps,
        "train_tokens": int(counts["train_tokens"] * scale),
        "validation_tokens_during_training": int(evals * val_pass),
        "hf_tokens_per_model": int(min(hf, 2 * cfg.eval.hf_max_tokens) if cfg.eval.hf_max_tokens else hf),
        "merge_check_tokens": counts["merge_check_tokens"],  # merge.check_samples conversations either way
        **_dpo_full_size(cfg, counts, scale),
    }
    return counts, full


def _dpo_full_size(cfg, counts: dict, scale: float) -> dict:
    """The prefer stage at full size: its training tokens grow with the pairs; evaluations are
    capped by prefer.eval_max_pairs (already applied to the counts) and grow with the steps."""
    steps = int(counts["dpo_steps"] * scale)
    train = counts["dpo_train_tokens"] * scale
    per_eval = (counts["dpo_forward_tokens"] - counts["dpo_train_tokens"]) / (
        counts["dpo_steps"] // cfg.prefer.eval_every + 1
    )
    return {
        "dpo_steps": steps,
        "dpo_train_tokens": int(train),
        "dpo_forward_tokens": int(train + per_eval * (steps // cfg.prefer.eval_every + 1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run of the phi35-colab-t4 preset (the journey's)")
    parser.add_argument("--preset", default="phi35-colab-t4")
    parser.add_argument("--twin-hub", type=Path, default=Path("runs/twin-hub"), help="the sample's prepared cache")
    args = parser.parse_args(argv)
    rehearsed, full = full_size_counts(args.run, args.preset, args.twin_hub)
    table = estimate(full, T4_TRAIN_TOKENS_PER_S, FORWARD_OVER_TRAIN * T4_TRAIN_TOKENS_PER_S)
    per_notebook = {name: sum(steps.values()) for name, steps in table.items() if name != "rates"}
    write_json_atomic(
        RESULTS / "t4_estimate.json",
        {"rehearsed_counts": rehearsed, "full_counts": full, "estimate": table, "per_notebook_s": per_notebook},
    )
    lines = [
        "# Colab T4 estimate per notebook (transformers steps; `bench/t4_estimate.py`)",
        "",
        f"Rates: training {T4_TRAIN_TOKENS_PER_S:,.0f} tokens/s (published T4 anchor, a lower bound for plain "
        f"transformers), forward {FORWARD_OVER_TRAIN * T4_TRAIN_TOKENS_PER_S:,.0f} tokens/s. Counts: the preset "
        f"as shipped on the rehearsed run's splits, scaled to oasst1's {OASST1_BYTES / 1e6:.0f} MB; "
        "preset caps applied.",
        "",
        "| notebook | step | estimate |",
        "| --- | --- | ---: |",
    ]
    for name, steps in table.items():
        if name != "rates":
            lines += [f"| {name} | {step} | {format_duration(s)} |" for step, s in steps.items()]
    write_text_atomic(RESULTS / "t4_estimate.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps({"full_counts": full}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
