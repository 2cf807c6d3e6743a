"""Generation tokens/s against file size per variant, from bench/results/{inference,fullsize}.json.

.venv/bin/python bench/plot.py      # writes bench/results/speed_vs_size.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine_line  # noqa: E402

from qlora_pipeline.paths import save_figure_atomic  # noqa: E402


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if (RESULTS / "inference.json").is_file():
        data = json.loads((RESULTS / "inference.json").read_text())
        points = [
            (k.split("@")[0], r["file_bytes"] / 1e6, r["gen_tokens_per_s"])
            for k, r in data["results"].items()
            if k.endswith("@2")
        ]
        panels.append(("tiny model (20M), 2 threads", "file size (MB)", points, data["machine"]))
    if (RESULTS / "fullsize.json").is_file():
        data = json.loads((RESULTS / "fullsize.json").read_text())
        steps = data["steps"]
        points = []
        for quant in ("Q4_K_M", "Q5_K_M"):
            if f"generate:{quant}" in steps:
                points.append(
                    (quant, steps[f"quantize:{quant}"]["bytes"] / 1e9, steps[f"generate:{quant}"]["tokens_per_s"])
                )
                bound = steps["bandwidth"]["copy_bytes_per_s"] / steps[f"generate:{quant}"]["bytes_per_token"]
                points.append((f"{quant} bound", steps[f"quantize:{quant}"]["bytes"] / 1e9, bound))
        panels.append(("Phi-3.5-mini shape (3.8B), 2 threads", "file size (GB)", points, data["machine"]))
    if not panels:
        print("error: no results yet; run make bench or make bench-full first", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (title, xlabel, points, _machine) in zip(axes[0], panels):
        for name, size, speed in points:
            bound = name.endswith("bound")
            ax.scatter(
                [size],
                [speed],
                marker="_" if bound else "o",
                s=300 if bound else 50,
                color="grey" if bound else ("tab:red" if "transformers" in name else "tab:blue"),
            )
            ax.annotate(name, (size, speed), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("generation tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Generation speed vs file size ({machine_line(panels[-1][3])})", fontsize=9)
    fig.tight_layout()
    save_figure_atomic(fig, RESULTS / "speed_vs_size.png")
    print(f"wrote {RESULTS / 'speed_vs_size.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
