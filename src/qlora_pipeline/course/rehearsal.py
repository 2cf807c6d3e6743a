"""The Colab path rehearsed: the three S29 notebooks, each on its own "VM", sharing only "Drive".

    python -m qlora_pipeline.course.rehearsal OUT --preset phi35-colab-t4 [--override KEY=VALUE ...]

On Colab every notebook gets a fresh VM: its working directory and kernel are new, and only Google
Drive (and the Hub) outlive it. Here each notebook runs with papermill in a kernel of its own, in
an empty working directory OUT/vm-N, with RUN_DIR under OUT/drive, the one folder they share. After
each, the VM's directory must still be empty (the run's files all went to "Drive"), and notebooks 2
and 3 run with no Hub repo named, so they can only have found notebook 1's work on "Drive".

While a notebook runs, the resident memory (RSS) of its kernel and the kernel's children is
sampled; OUT/rehearsal.json keeps each notebook's time and peak, and OUT/memory.png the curve
(the Colab RAM line drawn), the memory figure of the Colab path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.memory import MemorySampler
from qlora_pipeline.paths import write_json_atomic

S29 = ("S29_finetuning_llm.ipynb", "S29_phi3_inference.ipynb", "S29_phi3_QuantizeLLMs_checkpoint.ipynb")
COLAB_RAM_BYTES = 12.7e9  # free Colab's RAM (the T4's VM)
RUN_FILES = (
    "config.json",
    "adapter/adapter_model.safetensors",
    "merged/config.json",
    "gguf/model-F16.gguf",
    "report.json",
)


def drive_run_dir(out: Path) -> Path:
    return Path(out).resolve() / "drive" / "MyDrive" / "qlora-gguf-course" / "s29"


def run_sequence(out: Path, repo: Path, parameters: dict, timeout: int = 3600, log=print) -> dict:
    """The three S29 notebooks in order, each in a fresh working directory and kernel."""
    from qlora_pipeline.course.notebook import run_notebook

    out = Path(out).resolve()
    run_dir = drive_run_dir(out)
    shutil.rmtree(out / "drive", ignore_errors=True)
    results: dict = {"run_dir": str(run_dir), "notebooks": {}}
    for i, name in enumerate(S29, start=1):
        vm = out / f"vm-{i}"
        shutil.rmtree(vm, ignore_errors=True)
        vm.mkdir(parents=True)
        params = {**parameters, "RUN_DIR": str(run_dir)}  # the same Drive path, as Colab's mount gives
        started = time.time()
        with MemorySampler() as memory:
            run_notebook(repo / name, out / "executed" / name, parameters=params, cwd=vm, timeout=timeout)
        left_on_vm = sorted(str(p.relative_to(vm)) for p in vm.rglob("*"))
        if left_on_vm:
            raise PipelineError(
                f"{name} wrote {left_on_vm[:3]} to its VM's disk, which Colab throws away; "
                "everything must go to RUN_DIR"
            )
        results["notebooks"][name] = {
            "seconds": round(time.time() - started, 1),
            "peak_rss_bytes": memory.peak,
            "peak_anonymous_bytes": memory.peak_anonymous,
            "started": memory.started,
            "samples": memory.samples,
        }
        log(
            f"{name}: {time.time() - started:.0f} s on vm-{i}, kernel peak RSS {memory.peak / 1e9:.2f} GB "
            f"(anonymous {memory.peak_anonymous / 1e9:.2f} GB)"
        )
        write_json_atomic(out / "rehearsal.json", results)  # what is measured so far survives a later failure
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise PipelineError(f"the notebooks ran but {run_dir} lacks {missing}")
    return results


def cell_peaks(executed: Path, samples: list, started: float | None = None) -> list[dict]:
    """Peak memory per code cell of an executed notebook: the samples taken between the cell's
    start and end (papermill's timestamps). ``started``: the sampler's start (epoch seconds);
    without it, papermill's own start of the notebook (a kernel start-up later)."""
    from datetime import datetime

    import nbformat

    nb = nbformat.read(str(executed), as_version=4)
    epoch = lambda stamp: datetime.fromisoformat(stamp).timestamp()  # noqa: E731
    origin = started if started is not None else epoch(nb.metadata.papermill["start_time"])
    rows = []
    for index, cell in enumerate(nb.cells):
        meta = cell.metadata.get("papermill", {})
        if cell.cell_type != "code" or not meta.get("start_time") or not meta.get("end_time"):
            continue
        begin, end = epoch(meta["start_time"]) - origin, epoch(meta["end_time"]) - origin
        inside = [(rss, anon) for t, rss, anon in samples if begin <= t <= end]
        if inside:
            rows.append(
                {
                    "cell": index,
                    "first_line": cell.source.splitlines()[0][:70],
                    "seconds": round(end - begin, 1),
                    "peak_rss_bytes": max(r for r, _ in inside),
                    "peak_anonymous_bytes": max(a for _, a in inside),
                }
            )
    return rows


def plot_memory(results: dict, out_png: Path, full_model_bytes: int | None = None) -> None:
    """RSS over time, notebook after notebook, against Colab's RAM (and one full-size model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qlora_pipeline.paths import save_figure_atomic

    fig, ax = plt.subplots(figsize=(11, 3.8))
    offset = 0.0
    for name, nb in results["notebooks"].items():
        xs = [offset + t for t, _, _ in nb["samples"]]
        (line,) = ax.plot(
            xs,
            [rss / 1e9 for _, rss, _ in nb["samples"]],
            label=f"{name}: RSS (peak {nb['peak_rss_bytes'] / 1e9:.1f} GB)",
        )
        ax.plot(
            xs,
            [anon / 1e9 for _, _, anon in nb["samples"]],
            color=line.get_color(),
            lw=0.8,
            ls="--",
            label=f"  anonymous (peak {nb['peak_anonymous_bytes'] / 1e9:.1f} GB)",
        )
        offset = xs[-1] if xs else offset
    ax.axhline(COLAB_RAM_BYTES / 1e9, color="red", ls="--", lw=1, label="free Colab RAM (12.7 GB)")
    if full_model_bytes:
        for k, style in ((1, ":"), (2, "-.")):
            ax.axhline(
                k * full_model_bytes / 1e9,
                color="grey",
                ls=style,
                lw=1,
                label=f"{k} full-size model{'s' if k > 1 else ''} ({k * full_model_bytes / 1e9:.1f} GB)",
            )
    ax.set_xlabel("seconds (three notebooks, three kernels)")
    ax.set_ylabel("kernel memory, GB")
    ax.set_title("The Colab notebook sequence: resident memory")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    fig.tight_layout()
    save_figure_atomic(fig, Path(out_png))
    plt.close(fig)


def _param(text: str) -> tuple[str, object]:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier():
        raise SystemExit(f"error: --param {text!r} is not NAME=VALUE")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the VMs, the shared Drive and the executed notebooks")
    parser.add_argument("--preset", default="phi35-colab-t4")
    parser.add_argument("--override", action="append", default=[], help="KEY=VALUE for every notebook's OVERRIDES")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        help="NAME=VALUE: a notebook parameter (VALUE read as JSON, else as a string)",
    )
    parser.add_argument("--repo", type=Path, default=Path.cwd(), help="the checkout holding the notebooks")
    parser.add_argument("--full-model-bytes", type=int, default=None, help="draw this size as one model")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    try:
        params = {"PRESET": args.preset, "OVERRIDES": args.override, **dict(_param(p) for p in args.param)}
        results = run_sequence(args.out, args.repo.resolve(), params, timeout=args.timeout)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    plot_memory(results, args.out / "memory.png", args.full_model_bytes)
    summary = {name: {k: v for k, v in nb.items() if k != "samples"} for name, nb in results["notebooks"].items()}
    write_json_atomic(args.out / "rehearsal.json", {**results, "summary": summary})
    print(json.dumps(summary, indent=1))
    print(
        f"notebooks 2 and 3 found notebook 1's work through {results['run_dir']} alone; "
        f"memory curve: {args.out / 'memory.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
