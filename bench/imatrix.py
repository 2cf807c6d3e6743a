"""What the importance matrix buys on the run's own held-out conversations: for Q6_K, Q4_K_M,
IQ4_XS, Q3_K_M and Q2_K, each without and with the run's matrix (``<TYPE>-imat``), the KL
divergence, top-1 agreement and perplexity against F16, the size and bits per weight.

    .venv/bin/python bench/imatrix.py [--run runs/demo]        # make bench-imatrix

Copies the run (its merged model, data and configuration) to runs/bench-imatrix and runs the
``export`` and ``evaluate`` stages there through ``qlora-pipeline`` with the ten variants: the
code and the scorecard a user gets. Writes bench/results/imatrix.{json,md} and imatrix.png
(the scorecard's size-KL frontier, with and without the matrix).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, machine, save  # noqa: E402

TYPES = ("Q6_K", "Q4_K_M", "IQ4_XS", "Q3_K_M", "Q2_K")
WORK = REPO / "runs" / "bench-imatrix"
HEADER = [
    "type",
    "size (MB)",
    "bits/weight",
    "KL vs F16",
    "KL with matrix",
    "KL change",
    "top-1 (plain / matrix)",
    "perplexity (plain / matrix)",
]


def run_stages(run: Path, variants: list[str]) -> dict:
    """The export and evaluate stages on ``run`` with ``variants``; the report's GGUF section."""
    override = f"export.quant_types=[{','.join(variants)}]"
    for stage in ("export", "evaluate"):
        print(f"{stage}: running", flush=True)
        cli = str(Path(sys.executable).parent / "qlora-pipeline")
        subprocess.run([cli, stage, "--run-dir", str(run), override], check=True)
    return json.loads((run / "report.json").read_text())


def table(gguf: dict) -> list[list]:
    rows = []
    for quant in TYPES:
        plain, weighted = gguf[quant], gguf[f"{quant}-imat"]
        change = weighted["kld_vs_f16"] / plain["kld_vs_f16"] - 1
        rows.append(
            [
                quant,
                f"{plain['bytes'] / 1e6:.2f}",
                f"{plain['bits_per_weight']:.2f}",
                f"{plain['kld_vs_f16']:.5f}",
                f"{weighted['kld_vs_f16']:.5f}",
                f"{100 * change:+.1f}%",
                f"{100 * plain['top1_vs_f16']:.2f}% / {100 * weighted['top1_vs_f16']:.2f}%",
                f"{plain['ppl']:.4f} / {weighted['ppl']:.4f}",
            ]
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo")
    args = parser.parse_args()
    if not (args.run / "merged").is_dir():
        print(f"error: {args.run}/merged does not exist; run `make demo` first (or name a run)", file=sys.stderr)
        return 2
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.copytree(args.run, WORK, symlinks=True)  # copy2 keeps the times: the F16 GGUF is reused
    report = run_stages(WORK, [v for quant in TYPES for v in (quant, f"{quant}-imat")])
    gguf = report["gguf"]
    matrix = json.loads((WORK / "gguf" / "manifest.json").read_text())["files"]["imatrix"]
    shutil.copyfile(WORK / "scorecard.png", RESULTS / "imatrix.png")
    result = {"machine": machine(), "run": str(args.run), "gguf": gguf, "imatrix_file": matrix}
    save(
        "imatrix",
        result,
        table(gguf),
        HEADER,
        "The importance matrix on the run's held-out conversations (tiny model)",
        f"Matrix: {matrix['bytes']:,} bytes, collected over the run's training conversations "
        f"(`export.imatrix_tokens`); KL, top-1 and perplexity on the test split, as the scorecard "
        "measures them. ![frontier](imatrix.png)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
