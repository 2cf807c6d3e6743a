"""Colab's side of the course: llama-cpp-python's prebuilt wheel, and the run folder on Google Drive.

    from qlora_pipeline.course.colab import install_llama_cpp, course_run_dir, flush_drive
    install_llama_cpp()          # notebook 3's set-up cell (notebooks 1 and 2 never load a GGUF)
    RUN_DIR = course_run_dir(RUN_DIR, USE_DRIVE)
    flush_drive()                # each notebook's last cell: Drive's pending writes, before the VM goes

``pip install llama-cpp-python`` compiles llama.cpp: 10-20 minutes on Colab's 2 vCPUs without
CUDA, 20-40 with it, once per VM. llama-cpp-python publishes prebuilt wheels on its own index,
one per CUDA version (``CUDA_WHEEL_TAGS``) and one for CPUs, tagged ``py3-none`` since the
mid-2026 releases (any Python 3 from 3.8). We take the wheel that matches the runtime, binary
only, and compile (saying how long that takes) only when there is none. ``run`` is the command
runner, so a test sees every command without installing anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl/{tag}"
# The CUDA versions that index serves (llama-cpp-python's README and its build-wheels-cuda workflow:
# 11.8, 12.1-12.5, 13.0, 13.2). CUDA keeps minor-version compatibility within a major version, so
# a runtime takes the newest wheel of its major version that is not newer than itself (12.8 -> cu125).
CUDA_WHEEL_TAGS = {
    (11, 8): "cu118",
    (12, 1): "cu121",
    (12, 2): "cu122",
    (12, 3): "cu123",
    (12, 4): "cu124",
    (12, 5): "cu125",
    (13, 0): "cu130",
    (13, 2): "cu132",
}
CPU_WHEEL_TAG = "cpu"
WHEEL_MIN_PYTHON = (3, 8)  # the wheels are py3-none (pyproject: wheel.py-api = "py3", requires-python >= 3.8)


def pinned_llama_cpp_version(requirements: Path) -> str:
    """The ``llama-cpp-python==X`` pin of requirements.txt."""
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("llama-cpp-python=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError(f"{requirements} pins no llama-cpp-python version")


def wheel_tag(cuda_version: str | None, python: tuple[int, int] | None = None) -> str | None:
    """The wheel index for a runtime: ``"12.8"`` -> ``"cu125"``, no CUDA -> ``"cpu"``; None when
    no prebuilt wheel fits (a CUDA older than the oldest wheel, or a Python before 3.8)."""
    if (python or sys.version_info[:2]) < WHEEL_MIN_PYTHON:
        return None
    if not cuda_version:
        return CPU_WHEEL_TAG
    try:
        major, minor = (int(part) for part in cuda_version.split(".")[:2])
    except ValueError:
        return None
    fitting = [key for key in CUDA_WHEEL_TAGS if key[0] == major and key[1] <= minor]
    return CUDA_WHEEL_TAGS[max(fitting)] if fitting else None


def install_llama_cpp(
    requirements: Path = Path("requirements.txt"),
    cuda_version: str | None = None,
    run: Callable = subprocess.run,
    log=print,
) -> str:
    """Install the pinned llama-cpp-python: ``"wheel"`` (prebuilt, CUDA or CPU) or ``"compiled"``."""
    version = pinned_llama_cpp_version(requirements)
    if cuda_version is None:
        import torch

        cuda_version = torch.version.cuda if torch.cuda.is_available() else ""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    # a CUDA runtime without a CUDA wheel still takes the CPU wheel before a 20-40 minute compile:
    # the GGUFs then run on the CPU (N_GPU_LAYERS does nothing), as the notebook's defaults do anyway
    tags = [t for t in dict.fromkeys([wheel_tag(cuda_version), wheel_tag(None)]) if t]
    for tag in tags:
        only_binary = ["--only-binary=llama-cpp-python", "--extra-index-url", WHEEL_INDEX.format(tag=tag)]
        if run(pip + only_binary + [f"llama-cpp-python=={version}"]).returncode == 0:
            log(f"llama-cpp-python {version}: prebuilt {'CPU' if tag == CPU_WHEEL_TAG else 'CUDA'} wheel ({tag})")
            return "wheel"
    minutes = "20-40" if cuda_version else "10-20"
    log(
        f"llama-cpp-python {version}: no prebuilt wheel for this runtime (CUDA {cuda_version or 'none'}, Python "
        f"{sys.version_info[0]}.{sys.version_info[1]}); compiling llama.cpp{' with CUDA' if cuda_version else ''}, "
        f"about {minutes} minutes on 2 vCPUs"
    )
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_CUDA=on"} if cuda_version else None
    run(pip + [f"llama-cpp-python=={version}"], check=True, env=env)
    return "compiled"


# ---------------------------------------------------------------------------- RUN_DIR on Google Drive
# Each Colab notebook gets its own VM whose disk is gone when it disconnects: notebook 2 would not
# find notebook 1's adapter, and training could not resume from its checkpoints. On Colab the run
# folder therefore lives on the user's Google Drive unless the notebook opts out. Drive keeps what
# is small and precious; the merged model and the GGUFs (over 20 GB at full size, on a free Drive
# of 15 GB) go to the VM's own disk (``layout.place_large_files``) and travel by the Hub.
# QLORA_COLAB_CONTENT stands in for Colab's /content when the journey rehearses it on one machine.
CONTENT = Path(os.environ.get("QLORA_COLAB_CONTENT", "/content"))
DRIVE_MOUNT = str(CONTENT / "drive")
DRIVE_FOLDER = "qlora-gguf-course"


def on_colab() -> bool:
    return "google.colab" in sys.modules


def course_run_dir(run_dir: str, use_drive: bool = True, mount: str | None = None) -> str:
    """RUN_DIR as the notebook will use it: on Colab (unless ``use_drive`` is False, or RUN_DIR is
    already absolute) the same relative path under MyDrive/qlora-gguf-course, Drive mounted first
    (once: a restarted kernel finds it mounted), with the large parts on the VM's disk. Elsewhere
    RUN_DIR as given."""
    if not use_drive or not on_colab() or os.path.isabs(run_dir):
        return run_dir
    from qlora_pipeline.layout import place_large_files

    mount = mount or DRIVE_MOUNT
    my_drive = Path(mount) / "MyDrive"
    if not my_drive.is_dir():
        from google.colab import drive

        drive.mount(mount)
    path = my_drive / DRIVE_FOLDER / run_dir
    path.mkdir(parents=True, exist_ok=True)
    large = Path(mount).parent / "qlora-large" / run_dir
    place_large_files(path, large)
    print(f"RUN_DIR on Google Drive: {path}; the merged model and GGUFs on this VM's disk: {large}")
    return str(path)


def flush_drive() -> bool:
    """Write Drive's pending changes before the VM goes away (Colab's ``flush_and_unmount``);
    False off Colab or when Drive is not mounted."""
    if not on_colab() or not (Path(DRIVE_MOUNT) / "MyDrive").is_dir():
        return False
    from google.colab import drive

    drive.flush_and_unmount()
    print("Google Drive flushed and unmounted: this notebook's run files are saved")
    return True


def install_course_packages(
    requirements: Path = Path("course/requirements.txt"),
    llama_cpp: bool = False,
    run: Callable = subprocess.run,
    log=print,
) -> None:
    """The set-up cell's install: the pinned set, with llama-cpp-python only where the notebook
    loads a GGUF (notebook 3; a prebuilt wheel first). Notebooks 1 and 2 never do, and pip would
    otherwise compile llama.cpp on their VMs for nothing."""
    requirements = Path(requirements)
    if llama_cpp:
        install_llama_cpp(requirements, run=run, log=log)
    lines = requirements.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not line.strip().startswith("llama-cpp-python")]
    without = requirements.with_name(".requirements-notebook.txt")
    without.write_text("\n".join(kept) + "\n", encoding="utf-8")
    run([sys.executable, "-m", "pip", "install", "-q", "-r", str(without)], check=True)
