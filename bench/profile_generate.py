"""Why full-size Q4_K_M generation stays below the memory-bandwidth bound: thread scaling and a profile.

    .venv/bin/python bench/profile_generate.py [--quant Q4_K_M]

1. Generation tokens/s at 1 and 2 threads. A memory-bound decoder barely speeds up with a second
   core (one core can already stream most of the bandwidth); a compute-bound one nearly doubles.
2. py-spy (``--native``) samples the 2-thread generation; the leaf functions it lands in show
   where the time goes (llama.cpp's quantized dot-product kernels vs the rest).
Writes bench/results/profile_generate.json and .md. Needs ``make bench-full`` first (the GGUF).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, machine, run_step, save, step_command  # noqa: E402
from fullsize import gguf  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", default="Q4_K_M")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    path = gguf(args.quant)
    if not path.is_file():
        print(f"error: {path} does not exist; run `make bench-full` first", file=sys.stderr)
        return 2

    def generation(threads: int) -> dict:
        return {"model": str(path), "threads": threads, "tokens": args.tokens, "runs": 1}

    speeds = {t: run_step("decode_speed", **generation(t))["result"]["tokens_per_s"] for t in (1, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        subprocess.run(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--native",
                "--format",
                "raw",
                "--rate",
                "50",
                "--threads",
                "--output",
                str(raw),
                "--",
                *step_command("decode_speed", **generation(2)),
            ],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        leaves: collections.Counter = collections.Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            leaf = frames[-1].split(" (")[0] if frames else "?"
            leaves[leaf] += int(count)
            total += int(count)
    top = [(name, count / total) for name, count in leaves.most_common(12)]
    scaling = speeds[2] / speeds[1]
    result = {
        "machine": machine(),
        "quant": args.quant,
        "tokens_per_s": speeds,
        "two_thread_scaling": scaling,
        "profile_top_leaves": top,
        "samples": total,
    }
    rows = [[name[:80], f"{100 * share:.1f}%"] for name, share in top]
    save(
        "profile_generate",
        result,
        rows,
        ["leaf function (py-spy --native, 2 threads)", "share of samples"],
        f"Where full-size {args.quant} generation time goes",
        f"Generation tokens/s: 1 thread {speeds[1]:.2f}, 2 threads {speeds[2]:.2f} (x{scaling:.2f} from the "
        "second core).",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
