"""report.json, report.md and the scorecard: reading, updating and rendering the run's report."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_pipeline.evaluation.routes import format_routes
from qlora_pipeline.layout import RunLayout
from qlora_pipeline.paths import save_figure_atomic, write_json_atomic, write_text_atomic


def read_report(run_dir: Path) -> dict:
    path = RunLayout(run_dir).report_json
    return json.loads(path.read_text()) if path.is_file() else {}


def update_report(run_dir: Path, section: str, values: dict) -> dict:
    """Replace one section of report.json (atomically) and re-render report.md."""
    report = read_report(run_dir)
    report[section] = values
    layout = RunLayout(run_dir)
    write_json_atomic(layout.report_json, report)
    write_text_atomic(layout.report_md, render_markdown(report))
    return report


def _lora_markdown(lora: dict) -> list[str]:
    return [
        "## LoRA GGUF (base F16 + adapter-F16.gguf vs the merged F16 GGUF)",
        "",
        f"Adapter {lora['adapter_bytes'] / 1e6:.2f} MB ({100 * lora['adapter_bytes'] / lora['merged_bytes']:.1f}% "
        f"of the merged F16); over {lora['tokens']} test tokens max |diff| {lora['max_abs_logit_diff']:.2e} = "
        f"{lora['relative_diff']:.1e} of the largest logit, top-1 {100 * lora['top1']:.2f}%: "
        f"{'within' if lora['passes'] else 'OUTSIDE'} the F16 bound.",
        "",
    ]


def render_markdown(report: dict) -> str:
    lines = ["# Run report", ""]
    hf = report.get("hf")
    if hf:
        lines += [
            "## Fine-tuning (transformers, full precision)",
            "",
            "| model | validation loss | test perplexity |",
            "| --- | ---: | ---: |",
        ]
        for name, label in (("base", "base"), ("adapter", "base + adapter"), ("merged", "merged")):
            val = hf.get(f"{name}_val_loss")
            ppl = hf.get(f"{name}_ppl")
            if ppl is None:
                continue
            lines.append(f"| {label} | {val:.4f} | {ppl:.3f} |" if val is not None else f"| {label} | – | {ppl:.3f} |")
        if hf.get("val_loss_reduction") is not None:
            lines += [
                "",
                f"Validation loss on assistant tokens fell by {100 * hf['val_loss_reduction']:.1f}% "
                "relative to the base model.",
            ]
        lines.append("")
    if report.get("gguf"):
        lines += [
            "## Quantization scorecard (llama.cpp, test split)",
            "",
            scorecard_table(report["gguf"]),
            "",
            "![scorecard](scorecard.png)",
            "",
        ]
    if report.get("lora"):
        lines += _lora_markdown(report["lora"])
    parity = report.get("parity")
    if parity:
        lines += [
            "## Parity checks (GGUF vs transformers fp32, relative: max |diff| / max |logit|)",
            "",
            "| file | case | n_ctx | tokens | max abs diff | relative | top-1 | flips (widest margin) | within bound |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for key, row in parity_rows(parity):
            file_type, case = key.split("_")
            lines.append(
                f"| {file_type.upper()} | {case} | {row['n_ctx']} | {row['tokens']} | "
                f"{row['max_abs_logit_diff']:.2e} | {row['relative_diff']:.1e} | {100 * row['top1']:.2f}% | "
                f"{row['top1_flips']} ({row['widest_flipped_margin']:.1e}) | {'yes' if row['passes'] else 'NO'} |"
            )
        if parity.get("chat_prompt_ids"):
            lines += [
                "",
                "Chat prompt ids against llama-cpp-python's chat handler: " + format_routes(parity["chat_prompt_ids"]),
            ]
        lines.append("")
    if report.get("preference"):
        lines += _preference_markdown(report["preference"])
    heldout = report.get("heldout")
    if heldout:
        lines += [
            f"## Held-out questions ({heldout['questions']}, facts the fine-tuning data never mentions)",
            "",
            "| model | exact match |",
            "| --- | ---: |",
        ]
        lines += [f"| {name} | {100 * rate:.1f}% |" for name, rate in heldout["exact_match"].items()]
        lines.append("")
    if report.get("samples"):
        lines += ["## Sample answers (greedy)", ""]
        for sample in report["samples"]:
            lines.append(
                f"**{sample['prompt']}**" + (f" (reference: {sample['reference']})" if sample.get("reference") else "")
            )
            lines.append("")
            for name, answer in sample["answers"].items():
                lines.append(f"- {name}: {answer}")
            lines.append("")
    return "\n".join(lines) + "\n"


def _preference_markdown(pref: dict) -> list[str]:
    """The DPO section: each model on the test pairs, and what DPO cost in SFT validation loss."""
    lines = [
        f"## Preference tuning (DPO, beta {pref['beta']}; {pref['pairs']} test pairs)",
        "",
        "| model | likelihood preference | mean log-prob gap | implicit reward accuracy | mean margin | reference |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, label in (("base", "base"), ("sft", "SFT adapter"), ("dpo", "DPO adapter")):
        row = pref[name]
        reward = (
            f"{100 * row['reward_accuracy']:.1f}% | {row['mean_margin']:+.4f} | {row['reference']}"
            if "reward_accuracy" in row
            else "– | – | –"
        )
        like = f"{100 * row['likelihood_preference']:.1f}% | {row['mean_logp_gap']:+.3f}"
        lines.append(f"| {label} | {like} | {reward} |")
    loss = pref["sft_val_loss"]
    lines += [
        "",
        f"SFT validation loss {loss['before']:.4f} with the SFT adapter, {loss['after']:.4f} with the DPO "
        f"adapter ({100 * loss['rise']:+.2f}%). Likelihood preference: the share of pairs where the model "
        "alone gives the chosen reply the higher log-probability per token; the gap is its mean difference. "
        "Curves over the DPO steps: preference.png.",
        "",
    ]
    return lines


def heldout_section(questions: list[dict], results: dict[str, dict]) -> dict:
    """report.json's ``heldout``: exact match per model and every answer beside its reference."""
    return {
        "questions": len(questions),
        "exact_match": {name: r["exact_match"] for name, r in results.items()},
        "answers": [
            {
                "question": q["question"],
                "reference": q["answer"],
                "answers": {name: r["answers"][i] for name, r in results.items()},
            }
            for i, q in enumerate(questions)
        ],
    }


def parity_rows(parity: dict) -> list[tuple[str, dict]]:
    """The measured cases of report.json's ``parity`` (``f16_short``, ``f32_long``, ...)."""
    return [(key, row) for key, row in parity.items() if isinstance(row, dict) and "relative_diff" in row]


def parity_line(key: str, row: dict) -> str:
    """One parity case as a line: the stage's log and the run summary print this same text."""
    text = (
        f"parity {key}: max |diff| {row['max_abs_logit_diff']:.2e} = {row['relative_diff']:.1e} of the largest "
        f"logit, top-1 {100 * row['top1']:.2f}% ({row['tokens']} tokens at n_ctx {row['n_ctx']}; "
        f"{row['top1_flips']} flipped, reference margins there <= {row['widest_flipped_margin']:.1e})"
    )
    if row["passes"]:
        return text
    near_ties = ", every flip a near-tie within the measured difference" if row["flips_within_error"] else ""
    return text + " OUTSIDE its bound" + near_ties


def loss_line(hf: dict) -> str:
    """Validation loss and test perplexity of base, adapter (and merged): evaluate's log and the summary."""
    merged = f", merged {hf['merged_ppl']:.2f}" if "merged_ppl" in hf else ""
    return (
        f"validation loss (assistant tokens): base {hf['base_val_loss']:.4f} -> adapter {hf['adapter_val_loss']:.4f} "
        f"({100 * hf.get('val_loss_reduction', 0):.1f}% lower); test perplexity: base {hf['base_ppl']:.2f}, "
        f"adapter {hf['adapter_ppl']:.2f}{merged}"
    )


def plot_scorecard(gguf: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_pipeline.gguf.variants import F16, split_variant

    fig, ax = plt.subplots(figsize=(7, 4.2))
    # The size-KL frontier without and with the importance matrix: one line each, by size. F16
    # is the reference (KL 0), so it is left off the logarithmic axis.
    series = ((False, "llama.cpp's default weighting", "o", 5), (True, "importance matrix (-imat)", "s", -11))
    for with_matrix, label, marker, label_offset in series:
        rows = sorted(
            (r["bytes"] / 1e6, r["kld_vs_f16"], n)
            for n, r in gguf.items()
            if n != F16 and split_variant(n)[1] == with_matrix and r["kld_vs_f16"] > 0
        )
        if not rows:
            continue
        ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker=marker, markersize=7, label=label)
        for x, y, name in rows:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(7, label_offset), fontsize=8)
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.margins(x=0.15, y=0.2)  # room for the labels
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("mean KL divergence vs F16 (nats/token)")
    ax.set_title("What quantization cost on held-out conversations")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, out_png)


def scorecard_table(gguf: dict) -> str:
    lines = [
        "| variant | size (MB) | bits/weight | perplexity | KL vs F16 | top-1 vs F16 | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in gguf.items():
        lines.append(
            f"| {name} | {r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.2f} | {r['ppl']:.4f} | "
            f"{r['kld_vs_f16']:.5f} | {100 * r['top1_vs_f16']:.2f}% | {r['tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)
