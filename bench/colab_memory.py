"""The memory of the Colab notebook sequence on Phi-3.5-mini's full size, on this CPU.

    .venv/bin/python bench/colab_memory.py        # ~30-40 min on 2 cores; ~35 GB of disk

Runs the three S29 notebooks exactly as ``make rehearsal`` does (qlora_pipeline.course.rehearsal: each in
its own working directory and kernel, sharing only a "Drive" folder, preset phi35-colab-t4, data
from the offline twin hub) but on a random-weight model of Phi-3.5-mini's full shape (3.8B
parameters, 7.6 GB in bf16; bench/fullsize_model.py), with caps so a CPU gets through it: one
training step of 256 tokens, a few hundred tokens per evaluation, Q8_0 only, short answers.
On a CPU the models Colab puts on the T4 sit in RAM, so the peak here is an upper bound of
Colab's RAM use. Merged and evaluated in bf16 (on Colab: fp16 on the GPU): fp16 would be widened
to fp32 on a CPU (15 GB), which Colab never does. Writes bench/results/colab_memory.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "qlora_pipeline" / "fullsize"
RESULTS = REPO / "bench" / "results"

CAPS = [
    "model.compute_dtype=float32",
    "train.mixed_precision=no",  # no fp16 autocast on a CPU
    "train.max_steps=1",
    "train.batch_tokens=256",
    "train.gradient_accumulation_steps=1",
    "train.eval_every=1",
    "train.checkpoint_every=1",
    "train.eval_max_batches=1",
    "data.max_seq_len=256",
    "merge.dtype=bfloat16",
    "merge.check_samples=1",
    "export.quant_types=[Q8_0]",
    "eval.hf_max_tokens=256",
    "eval.parity_tokens=128",
    "eval.kld_max_tokens=128",
    "eval.heldout_questions=none",
    "eval.speed_runs=1",
    "eval.speed_new_tokens=4",
    "eval.samples=1",
    "eval.sample_max_tokens=4",
]

# Notebook parameters: the variant exported above, and short answers (a CPU makes ~1 token/s).
PARAMS = ["CHOSEN=Q8_0", "ANSWER_TOKENS=8", "MAX_TOKENS=8"]


def run_sequence(base: Path, out: Path) -> float:
    hub = REPO / "runs" / "twin-hub"
    subprocess.run([sys.executable, "-m", "qlora_pipeline.cli", "hub-twin", "--out", str(hub)], check=True)
    overrides = [f"model.name_or_path={base}"] + CAPS
    env = {**os.environ, "HF_HOME": str(hub), "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable,
        "-m",
        "qlora_pipeline.course.rehearsal",
        str(out),
        "--preset",
        "phi35-colab-t4",
        "--repo",
        str(REPO),
        "--full-model-bytes",
        str(sum(f.stat().st_size for f in base.glob("*.safetensors"))),
    ]
    command += [arg for o in overrides for arg in ("--override", o)]
    command += [arg for p in PARAMS for arg in ("--param", p)]
    started = time.time()
    subprocess.run(command, check=True, env=env)
    return time.time() - started


def report(base: Path, out: Path, minutes: float | None) -> None:
    """bench/results/colab_memory.{json,md,png} from the rehearsal's record, with each notebook's
    heaviest cells (peak memory per cell, from papermill's cell timestamps)."""
    from qlora_pipeline.course.rehearsal import cell_peaks, plot_memory

    rehearsal = json.loads((out / "rehearsal.json").read_text())
    model_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    plot_memory(rehearsal, out / "memory.png", model_bytes)
    if minutes is None:  # --report-only: the notebooks' own time (without the model build)
        minutes = round(sum(nb["seconds"] for nb in rehearsal["notebooks"].values()) / 60, 1)
    notebooks = {}
    for name, nb in rehearsal["notebooks"].items():
        cells = cell_peaks(out / "executed" / name, nb["samples"], nb.get("started"))
        notebooks[name] = {**{k: v for k, v in nb.items() if k != "samples"}, "cells": cells}
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "model_bytes": model_bytes,
        "caps": CAPS,
        "minutes": minutes,
        "notebooks": notebooks,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "colab_memory.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "colab_memory.png").write_bytes((out / "memory.png").read_bytes())
    lines = [
        "# The Colab notebook sequence at Phi-3.5-mini's full size: kernel memory",
        "",
        f"{result['machine']}, {result['date']}; one full-size model is {model_bytes / 1e9:.2f} GB (bf16); "
        "free Colab has 12.7 GB of RAM. Each notebook in its own kernel, as on Colab; on a CPU the models "
        "Colab puts on the T4 are in RAM too, so these are upper bounds.",
        "",
        "| notebook | time | peak RSS | peak anonymous | peak RSS / one model |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, nb in notebooks.items():
        lines.append(
            f"| {name} | {nb['seconds'] / 60:.1f} min | {nb['peak_rss_bytes'] / 1e9:.2f} GB | "
            f"{nb['peak_anonymous_bytes'] / 1e9:.2f} GB | {nb['peak_rss_bytes'] / model_bytes:.2f} |"
        )
    lines += [
        "",
        "The cells above 1 GB (peak while the cell ran):",
        "",
        "| notebook | cell | first line | time | peak RSS | peak anonymous |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, nb in notebooks.items():
        for cell in nb["cells"]:
            if cell["peak_rss_bytes"] > 1e9:
                lines.append(
                    f"| {name} | {cell['cell']} | `{cell['first_line']}` | {cell['seconds']:.0f} s | "
                    f"{cell['peak_rss_bytes'] / 1e9:.2f} GB | {cell['peak_anonymous_bytes'] / 1e9:.2f} GB |"
                )
    lines += [
        "",
        "RSS counts mapped safetensors/GGUF pages (page cache the kernel can drop under pressure); "
        "anonymous memory is what the process itself holds. Caps: " + ", ".join(CAPS),
        "",
        "![memory](colab_memory.png)",
        "",
    ]
    (RESULTS / "colab_memory.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-only", action="store_true", help="rewrite the results from the last run")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    base, out = CACHE / "base", CACHE / "colab-sequence"
    minutes = None
    if not args.report_only:
        from fullsize_model import build

        if not (base / "model.safetensors.index.json").is_file():
            print(f"building the full-size model in {base} (random weights, 7.6 GB)", flush=True)
            build(base)
        minutes = round(run_sequence(base, out) / 60, 1)
    report(base, out, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
