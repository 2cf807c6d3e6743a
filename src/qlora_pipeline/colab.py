"""Installing llama-cpp-python on Colab: a prebuilt wheel where one exists, else a compile.

    from qlora_pipeline.colab import install_llama_cpp
    install_llama_cpp()          # the notebooks' set-up cell calls this before the pinned set

``pip install llama-cpp-python`` compiles llama.cpp, CPU-only, 10-20 minutes on Colab's 2
vCPUs, and a CPU build makes ``N_GPU_LAYERS`` do nothing. llama-cpp-python publishes CUDA
wheels on its own index for some CUDA versions (cu121-cu124) and releases; with a GPU we try the
index that matches the runtime's CUDA, binary only, and fall back to compiling (with CUDA when
there is a GPU) after saying how long that takes. Runs only the given ``run`` callable, so a
test can see every command without installing anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

WHEEL_INDEX = "https://abetlen.github.io/llama-cpp-python/whl/{tag}"
CUDA_WHEEL_TAGS = ("cu121", "cu122", "cu123", "cu124")  # the CUDA versions that index serves


def pinned_llama_cpp_version(requirements: Path) -> str:
    """The ``llama-cpp-python==X`` pin of requirements.txt."""
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("llama-cpp-python=="):
            return line.split("==", 1)[1].strip()
    raise RuntimeError(f"{requirements} pins no llama-cpp-python version")


def cuda_wheel_tag(cuda_version: str | None) -> str | None:
    """``"12.4"`` -> ``"cu124"`` when the wheel index serves that CUDA version, else None."""
    if not cuda_version:
        return None
    tag = "cu" + "".join(cuda_version.split(".")[:2])
    return tag if tag in CUDA_WHEEL_TAGS else None


def install_llama_cpp(
    requirements: Path = Path("requirements.txt"),
    cuda_version: str | None = None,
    run: Callable = subprocess.run,
    log=print,
) -> str:
    """Install the pinned llama-cpp-python: ``"wheel"`` (a prebuilt CUDA wheel) or ``"compiled"``."""
    version = pinned_llama_cpp_version(requirements)
    if cuda_version is None:
        import torch

        cuda_version = torch.version.cuda if torch.cuda.is_available() else None
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    tag = cuda_wheel_tag(cuda_version)
    if tag:
        found = run(
            pip
            + [
                "--only-binary=llama-cpp-python",
                "--extra-index-url",
                WHEEL_INDEX.format(tag=tag),
                f"llama-cpp-python=={version}",
            ]
        )
        if found.returncode == 0:
            log(f"llama-cpp-python {version}: prebuilt CUDA wheel ({tag})")
            return "wheel"
    minutes = "20-40" if cuda_version else "10-20"
    log(
        f"llama-cpp-python {version}: no prebuilt wheel for this runtime (CUDA {cuda_version or 'none'}); "
        f"compiling llama.cpp{' with CUDA' if cuda_version else ''}, about {minutes} minutes on 2 vCPUs"
    )
    env = {**os.environ, "CMAKE_ARGS": "-DGGML_CUDA=on"} if cuda_version else None
    run(pip + [f"llama-cpp-python=={version}"], check=True, env=env)
    return "compiled"


# ---------------------------------------------------------------------------- RUN_DIR on Google Drive
# Each Colab notebook gets its own VM whose disk is gone when it disconnects: notebook 2 would not
# find notebook 1's adapter, and training could not resume from its checkpoints. On Colab the run
# folder therefore lives on the user's Google Drive unless the notebook opts out.
DRIVE_MOUNT = "/content/drive"
DRIVE_FOLDER = "qlora-gguf-course"


def on_colab() -> bool:
    return "google.colab" in sys.modules


def course_run_dir(run_dir: str, use_drive: bool = True, mount: str | None = None) -> str:
    """RUN_DIR as the notebook will use it: on Colab (unless ``use_drive`` is False, or RUN_DIR is
    already absolute) the same relative path under MyDrive/qlora-gguf-course, Drive mounted first
    (once: a restarted kernel finds it mounted). Elsewhere RUN_DIR as given."""
    if not use_drive or not on_colab() or os.path.isabs(run_dir):
        return run_dir
    mount = mount or DRIVE_MOUNT
    my_drive = Path(mount) / "MyDrive"
    if not my_drive.is_dir():
        from google.colab import drive

        drive.mount(mount)
    path = my_drive / DRIVE_FOLDER / run_dir
    path.mkdir(parents=True, exist_ok=True)
    print(f"RUN_DIR on Google Drive: {path} (set USE_DRIVE = False to keep it on this VM's disk)")
    return str(path)
