"""Shared by the benchmarks: machine description, measured subprocesses, result files.

Every figure a benchmark reports comes from a run of it; each writes
``bench/results/<name>.json`` (all figures, the machine, the date) and ``<name>.md`` (the table
README.md links to).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from qlora_pipeline.memory import MemorySampler
from qlora_pipeline.paths import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import llama_cpp
    import torch
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "date": datetime.date.today().isoformat(),
    }


def machine_line(m: dict) -> str:
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}"


def measured_run(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd`` in the repository root; its wall time and the peak RSS of that process alone
    (``wait4``'s rusage).

    ru_maxrss covers the process itself (and not its children) — every measured step runs its
    work in the process it starts.
    """
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=err_file
        )
        with MemorySampler(interval=0.05, pid=proc.pid) as memory:
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        err_file.seek(0)
        err = err_file.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])}... failed ({proc.returncode}): {err.decode()[-1500:]}")
    return {
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_anon_bytes": memory.peak_anonymous,
        "stdout": out.decode(),
    }


def step_command(step: str, /, **arguments) -> list[str]:
    """The command line that runs ``bench/steps.py``'s ``step`` in a fresh interpreter."""
    return [sys.executable, "-m", "bench.steps", step, json.dumps(arguments)]


def run_step(step: str, /, **arguments) -> dict:
    """Run ``step`` of ``bench/steps.py`` in a fresh interpreter: its ``result``, wall
    ``seconds``, ``peak_rss_bytes`` (the largest of that interpreter and any process it ran:
    llama.cpp's converter runs as a child of the export code) and ``peak_anon_bytes``."""
    run = measured_run(step_command(step, **arguments))
    lines = run.pop("stdout").strip().splitlines()
    run["peak_rss_bytes"] = max(run["peak_rss_bytes"], json.loads(lines[-1])["children_peak_rss_bytes"])
    run["result"] = json.loads(lines[-2])
    return run


def median_of(fn, runs: int) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def save(name: str, result: dict, table: list[list], header: list[str], title: str, notes: str = "") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS / f"{name}.json", result)
    lines = [f"# {title}", "", f"Machine: {machine_line(result['machine'])}.", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---" if i == 0 else "---:" for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table]
    if notes:
        lines += ["", notes.strip()]
    write_text_atomic(RESULTS / f"{name}.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / (name + '.json')} and {name}.md")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"
