"""Installing llama-cpp-python on Colab: a prebuilt CUDA wheel where the index has one, else a
compile (with CUDA on a GPU) announced with its duration. Commands are recorded, not run."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO

from qlora_pipeline.course.colab import install_llama_cpp, pinned_llama_cpp_version, wheel_tag

VERSION = pinned_llama_cpp_version(REPO / "requirements.txt")


def recorder(wheel_found: bool = False, index: str | None = None):
    """A stand-in for subprocess.run: a compile always succeeds; a binary-only install succeeds
    when ``wheel_found``, or when it asks the wheel index ``index`` (``cpu``, ``cu124``, ...)."""
    calls = []

    def run(command, **kwargs):
        calls.append((command, kwargs.get("env")))
        binary_only = any(str(part).startswith("--only-binary") for part in command)
        on_index = index is not None and any(str(part).endswith(f"/whl/{index}") for part in command)
        found = wheel_found or on_index or not binary_only
        return subprocess.CompletedProcess(command, 0 if found else 1)

    return calls, run


def test_the_pin_is_read_from_requirements():
    assert VERSION.count(".") == 2


@pytest.mark.parametrize(
    "cuda, python, tag",
    [
        ("12.4", (3, 11), "cu124"),  # a wheel for exactly this CUDA
        ("12.1", (3, 10), "cu121"),
        ("12.8", (3, 12), "cu125"),  # Colab 2026 (torch cu128): the newest 12.x wheel, by minor-version compatibility
        ("12.6", (3, 13), "cu125"),  # the wheels are py3-none: a new Python takes them too
        ("13.1", (3, 12), "cu130"),
        ("13.2", (3, 12), "cu132"),
        ("11.8", (3, 11), "cu118"),
        ("11.7", (3, 11), None),  # older than every CUDA wheel: compile
        ("12.0", (3, 11), None),  # no cu120 wheel, and a cu121 one needs 12.1
        ("10.2", (3, 11), None),
        ("12.4", (3, 7), None),  # before the wheels' requires-python
        ("", (3, 12), "cpu"),  # no GPU: the CPU wheel index
        (None, (3, 11), "cpu"),
        ("garbage", (3, 11), None),
    ],
)
def test_wheel_index_tag_follows_the_cuda_and_python_versions(cuda, python, tag):
    assert wheel_tag(cuda, python) == tag


def test_a_gpu_runtime_with_a_wheel_installs_it_without_compiling():
    calls, run = recorder(wheel_found=True)
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="12.4", run=run, log=said.append) == "wheel"
    ((command, env),) = calls
    assert command[-3:] == [
        "--extra-index-url",
        "https://abetlen.github.io/llama-cpp-python/whl/cu124",
        f"llama-cpp-python=={VERSION}",
    ]
    assert "--only-binary=llama-cpp-python" in command and env is None
    assert said == [f"llama-cpp-python {VERSION}: prebuilt CUDA wheel (cu124)"]


def test_no_wheel_falls_back_to_a_cuda_compile_and_says_how_long():
    calls, run = recorder(wheel_found=False)
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="12.4", run=run, log=said.append) == "compiled"
    assert len(calls) == 3 and calls[2][1]["CMAKE_ARGS"] == "-DGGML_CUDA=on"  # CUDA wheel, CPU wheel, compile
    assert "compiling llama.cpp with CUDA, about 20-40 minutes" in said[0]


def test_a_cuda_runtime_without_a_cuda_wheel_takes_the_cpu_wheel_before_compiling():
    calls, run = recorder(index="cpu")
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="11.7", run=run, log=said.append) == "wheel"
    assert len(calls) == 1 and said == [f"llama-cpp-python {VERSION}: prebuilt CPU wheel (cpu)"]


def test_a_cpu_runtime_takes_the_cpu_wheel():
    calls, run = recorder(wheel_found=True)
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="", run=run, log=said.append) == "wheel"
    ((command, env),) = calls
    assert "https://abetlen.github.io/llama-cpp-python/whl/cpu" in command and env is None
    assert said == [f"llama-cpp-python {VERSION}: prebuilt CPU wheel (cpu)"]


def test_a_cpu_runtime_without_a_wheel_compiles_for_the_cpu_and_says_how_long():
    calls, run = recorder(wheel_found=False)
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="", run=run, log=said.append) == "compiled"
    assert calls[-1][0][-1] == f"llama-cpp-python=={VERSION}" and calls[-1][1] is None
    assert "about 10-20 minutes" in said[0]


def _fake_colab(monkeypatch, mounted: list):
    import sys
    import types

    colab = types.ModuleType("google.colab")
    drive = types.ModuleType("google.colab.drive")

    def mount(where):
        mounted.append(where)
        (__import__("pathlib").Path(where) / "MyDrive").mkdir(parents=True)

    drive.mount = mount
    colab.drive = drive
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.drive", drive)


def test_on_colab_run_dir_goes_to_drive_mounted_once(tmp_path, monkeypatch):
    from qlora_pipeline.course.colab import course_run_dir

    mounted: list = []
    _fake_colab(monkeypatch, mounted)
    mount = tmp_path / "drive"
    first = course_run_dir("runs/notebooks/s29", mount=str(mount))
    assert first == str(mount / "MyDrive" / "qlora-gguf-course" / "runs/notebooks/s29")
    assert (mount / "MyDrive" / "qlora-gguf-course" / "runs" / "notebooks" / "s29").is_dir()
    # A restarted kernel runs the set-up cell again: same folder, no second mount.
    assert course_run_dir("runs/notebooks/s29", mount=str(mount)) == first and mounted == [str(mount)]


def test_on_colab_the_large_parts_go_to_the_vm_disk_not_drive(tmp_path, monkeypatch):
    from qlora_pipeline.course.colab import course_run_dir
    from qlora_pipeline.layout import RunLayout

    _fake_colab(monkeypatch, [])
    run = RunLayout(course_run_dir("runs/s29", mount=str(tmp_path / "drive")))
    vm_disk = tmp_path / "qlora-large" / "runs" / "s29"
    assert run.merged == vm_disk / "merged" and run.gguf("Q4_K_M") == vm_disk / "gguf" / "model-Q4_K_M.gguf"
    assert run.adapter.parent == run.checkpoints.parent == run.root  # the small, precious parts stay on Drive
    assert (
        run.relative(run.gguf("Q4_K_M"))
        == "gguf/model-Q4_K_M.gguf"
        == run.relative(run.root / "gguf/x")[:5] + "model-Q4_K_M.gguf"
    )


def test_run_dir_stays_local_when_opted_out_absolute_or_off_colab(tmp_path, monkeypatch):
    import sys

    from qlora_pipeline.course.colab import course_run_dir

    mounted: list = []
    _fake_colab(monkeypatch, mounted)
    assert course_run_dir("runs/x", use_drive=False, mount=str(tmp_path)) == "runs/x"
    assert course_run_dir(str(tmp_path / "mine"), mount=str(tmp_path)) == str(tmp_path / "mine")
    monkeypatch.delitem(sys.modules, "google.colab")
    assert course_run_dir("runs/x", mount=str(tmp_path)) == "runs/x"
    assert mounted == []
