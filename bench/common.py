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
    """Run ``cmd``; its wall time and the peak RSS of that process alone (``wait4``'s rusage).

    ru_maxrss covers the process itself (and not its children) — every measured step runs its
    work in the process it starts.
    """
    import tempfile

    started = time.perf_counter()
    with tempfile.TemporaryFile() as err_file:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=err_file)
        with MemorySampler(interval=0.05, pid=proc.pid) as memory:
            out = proc.stdout.read()
            _, status, usage = os.wait4(proc.pid, 0)
        err_file.seek(0)
        err = err_file.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {err.decode()[-1500:]}")
    return {
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "peak_anon_bytes": memory.peak_anonymous,
        "stdout": out.decode(),
    }


CHILDREN_RSS = (
    "\nimport resource as _r, json as _j\n"
    "print(_j.dumps({'children_peak_rss_bytes': _r.getrusage(_r.RUSAGE_CHILDREN).ru_maxrss * 1024}))"
)


def python_step(code: str, env: dict | None = None) -> dict:
    """Run Python ``code`` in a fresh interpreter; the last stdout line, if JSON, is its result.

    ``peak_rss_bytes`` is the largest of that interpreter and any process it ran (llama.cpp's
    converter runs as a child of the export code).
    """
    run = measured_run([sys.executable, "-c", code + CHILDREN_RSS], env)
    lines = run.pop("stdout").strip().splitlines()
    children = json.loads(lines.pop())["children_peak_rss_bytes"] if lines else 0
    run["peak_rss_bytes"] = max(run["peak_rss_bytes"], children)
    try:
        run["result"] = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        run["result"] = None
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
