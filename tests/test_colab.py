"""Installing llama-cpp-python on Colab: a prebuilt CUDA wheel where the index has one, else a
compile (with CUDA on a GPU) announced with its duration. Commands are recorded, not run."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO

from qlora_pipeline.colab import cuda_wheel_tag, install_llama_cpp, pinned_llama_cpp_version

VERSION = pinned_llama_cpp_version(REPO / "requirements.txt")


def recorder(wheel_found: bool):
    calls = []

    def run(command, **kwargs):
        calls.append((command, kwargs.get("env")))
        found = wheel_found or not any(str(part).startswith("--only-binary") for part in command)
        return subprocess.CompletedProcess(command, 0 if found else 1)

    return calls, run


def test_the_pin_is_read_from_requirements():
    assert VERSION.count(".") == 2


@pytest.mark.parametrize("cuda, tag", [("12.4", "cu124"), ("12.1", "cu121"), ("12.8", None), (None, None)])
def test_wheel_index_tag_follows_the_cuda_version(cuda, tag):
    assert cuda_wheel_tag(cuda) == tag


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
    assert len(calls) == 2 and calls[1][1]["CMAKE_ARGS"] == "-DGGML_CUDA=on"
    assert "compiling llama.cpp with CUDA, about 20-40 minutes" in said[0]


def test_a_cpu_runtime_compiles_for_the_cpu_without_asking_the_wheel_index():
    calls, run = recorder(wheel_found=True)
    said = []
    assert install_llama_cpp(REPO / "requirements.txt", cuda_version="", run=run, log=said.append) == "compiled"
    ((command, env),) = calls
    assert command[-1] == f"llama-cpp-python=={VERSION}" and env is None
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
    from qlora_pipeline.colab import course_run_dir

    mounted: list = []
    _fake_colab(monkeypatch, mounted)
    mount = tmp_path / "drive"
    first = course_run_dir("runs/notebooks/s29", mount=str(mount))
    assert first == str(mount / "MyDrive" / "qlora-gguf-course" / "runs/notebooks/s29")
    assert (mount / "MyDrive" / "qlora-gguf-course" / "runs" / "notebooks" / "s29").is_dir()
    # A restarted kernel runs the set-up cell again: same folder, no second mount.
    assert course_run_dir("runs/notebooks/s29", mount=str(mount)) == first and mounted == [str(mount)]


def test_run_dir_stays_local_when_opted_out_absolute_or_off_colab(tmp_path, monkeypatch):
    import sys

    from qlora_pipeline.colab import course_run_dir

    mounted: list = []
    _fake_colab(monkeypatch, mounted)
    assert course_run_dir("runs/x", use_drive=False, mount=str(tmp_path)) == "runs/x"
    assert course_run_dir(str(tmp_path / "mine"), mount=str(tmp_path)) == str(tmp_path / "mine")
    monkeypatch.delitem(sys.modules, "google.colab")
    assert course_run_dir("runs/x", mount=str(tmp_path)) == "runs/x"
    assert mounted == []
