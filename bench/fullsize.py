"""The full-size Phi-3.5-mini path on this machine (random weights, the real shape): ``make bench-full``.

    .venv/bin/python bench/fullsize.py [--steps build,convert,quantize,bandwidth,generate,merge,qlora]

Steps (each in its own process, timed, with that process's peak RSS):
  build     bench/fullsize_model.py: 3.82B parameters, bf16, 4 shards
  convert   llama.cpp's converter to F16 GGUF (+ the end-of-turn metadata), as the export stage
  quantize  llama.cpp's quantizer to Q8_0, Q5_K_M, Q4_K_M (2 threads)
  bandwidth a 2-thread copy of 1 GiB arrays (read + write bytes / s): the machine's memory bandwidth
  generate  Q4_K_M and Q5_K_M generation tokens/s at 2 threads vs the bandwidth bound
  merge     a random rank-16 adapter on the four target modules, merged by streaming and by peft
  qlora     one QLoRA step (NF4 base, sequence 256, batch 1, gradient checkpointing)
Artifacts are cached in ~/.cache/qlora_pipeline/fullsize (about 25 GB); a step whose output
exists keeps its earlier measurement unless --redo names it. Writes bench/results/fullsize.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, gb, machine, run_step, save  # noqa: E402

from qlora_pipeline.paths import cache_root, write_json_atomic  # noqa: E402

ROOT = cache_root() / "fullsize"
BASE = ROOT / "phi35-mini-random"
GGUF = ROOT / "gguf"
QUANTS = ("Q8_0", "Q5_K_M", "Q4_K_M")
ANCHORS = {"Q4_K_M": 2.39e9, "Q5_K_M": 2.82e9}  # the real Phi-3.5-mini GGUFs
STEPS_FILE = RESULTS / "fullsize_steps.json"


def gguf(quant: str) -> Path:
    return GGUF / f"phi35-mini-random-{quant}.gguf"


def step_build() -> dict:
    run = run_step("build_fullsize", out=str(BASE))
    return {**run, **run.pop("result")}


def step_convert() -> dict:
    GGUF.mkdir(parents=True, exist_ok=True)
    name = "Phi-3.5 mini random (bench)"
    run = run_step("convert", model=str(BASE), out=str(gguf("F16")), name=name, end_of_turn_id=32007)
    return {**run, **run.pop("result")}


def step_quantize(quant: str) -> dict:
    run = run_step("quantize", source=str(gguf("F16")), out=str(gguf(quant)), quant=quant, threads=2)
    return {**run, **run.pop("result")}


def step_bandwidth() -> dict:
    """STREAM-style copy bandwidth with 2 threads: the machine's memory bandwidth."""
    run = run_step("copy_bandwidth", gib=1, threads=2)
    return {**run.pop("result"), "seconds": run["seconds"]}


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one generated token reads: every tensor but the token embedding (one row)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    total = 0
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            total += int(tensor.n_bytes) // int(tensor.shape[-1])
        else:
            total += int(tensor.n_bytes)
    return total


def step_generate(quant: str) -> dict:
    run = run_step("decode_speed", model=str(gguf(quant)), threads=2, tokens=16, runs=2)
    return {
        **run.pop("result"),
        "peak_rss_bytes": run["peak_rss_bytes"],
        "bytes_per_token": weight_bytes_per_token(gguf(quant)),
    }


def load_steps() -> dict:
    return json.loads(STEPS_FILE.read_text()) if STEPS_FILE.is_file() else {}


def record_step(steps: dict, name: str, fn, done: bool, redo: set) -> None:
    if name in steps and done and name.split(":")[0] not in redo:
        print(f"{name}: kept from the earlier run")
        return
    print(f"{name}: running", flush=True)
    steps[name] = fn()
    write_json_atomic(STEPS_FILE, steps)
    shown = {
        k: v
        for k, v in steps[name].items()
        if k in ("seconds", "peak_rss_bytes", "bytes", "tokens_per_s", "copy_bytes_per_s")
    }
    print(f"{name}: {shown}", flush=True)


def report(steps: dict) -> None:
    rows = []
    params = steps.get("build", {}).get("parameters", 3821079552)
    bw = steps.get("bandwidth", {}).get("copy_bytes_per_s")
    for quant in ("F16",) + QUANTS:
        make = steps.get("convert" if quant == "F16" else f"quantize:{quant}", {})
        gen = steps.get(f"generate:{quant}", {})
        size = make.get("bytes")
        bound = bw / gen["bytes_per_token"] if bw and gen.get("bytes_per_token") else None
        rows.append(
            [
                quant,
                gb(size) if size else "–",
                f"{8 * size / params:.2f}" if size else "–",
                f"{ANCHORS[quant] / 1e9:.2f} GB" if quant in ANCHORS else "–",
                f"{make['seconds']:.0f} s" if make else "–",
                gb(make["peak_rss_bytes"]) if make else "–",
                f"{gen['tokens_per_s']:.2f}" if gen else "–",
                f"{bound:.2f}" if bound else "–",
                f"{100 * gen['tokens_per_s'] / bound:.0f}%" if gen and bound else "–",
            ]
        )
    notes = [
        f"Random weights with Phi-3.5-mini's shape ({params / 1e9:.2f}B parameters); bf16 checkpoint built in "
        f"{steps['build']['seconds']:.0f} s, peak RSS {gb(steps['build']['peak_rss_bytes'])}."
        if "build" in steps
        else "",
        f"Copy bandwidth (2 threads, read + write): {bw / 1e9:.1f} GB/s; the bound is that divided by the "
        "weight bytes one token reads."
        if bw
        else "",
    ]
    for key, label in (("merge", "Merge"), ("qlora", "QLoRA step")):
        if key in steps:
            notes.append(f"{label}: " + ", ".join(f"{k} {v}" for k, v in steps[key].get("summary", {}).items()))
    result = {"machine": machine(), "steps": steps}
    save(
        "fullsize",
        result,
        rows,
        [
            "variant",
            "file size",
            "bits/weight",
            "real Phi-3.5 file",
            "make time",
            "make peak RSS",
            "gen tokens/s (2 thr)",
            "bandwidth bound",
            "of bound",
        ],
        "Full-size Phi-3.5-mini shape: GGUF sizes, times, memory, generation speed",
        "\n\n".join(n for n in notes if n),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="build,convert,quantize,bandwidth,generate,merge,qlora")
    parser.add_argument("--redo", default="", help="steps to measure again even if their output exists")
    args = parser.parse_args()
    wanted = set(args.steps.split(","))
    redo = set(filter(None, args.redo.split(",")))
    steps = load_steps()
    ROOT.mkdir(parents=True, exist_ok=True)
    if "build" in wanted:
        record_step(steps, "build", step_build, (BASE / "config.json").is_file(), redo)
    if "convert" in wanted:
        record_step(steps, "convert", step_convert, gguf("F16").is_file(), redo)
    if "quantize" in wanted:
        for quant in QUANTS:
            record_step(steps, f"quantize:{quant}", lambda q=quant: step_quantize(q), gguf(quant).is_file(), redo)
    if "bandwidth" in wanted:
        record_step(steps, "bandwidth", step_bandwidth, False, redo | {"bandwidth"})
    if "generate" in wanted:
        for quant in ("Q4_K_M", "Q5_K_M"):
            record_step(steps, f"generate:{quant}", lambda q=quant: step_generate(q), False, redo | {"generate"})
    if "merge" in wanted:
        from fullsize_merge import step_merge

        record_step(steps, "merge", step_merge, False, redo | {"merge"})
    if "qlora" in wanted:
        from fullsize_qlora import step_qlora

        record_step(steps, "qlora", step_qlora, False, redo | {"qlora"})
    report(steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
