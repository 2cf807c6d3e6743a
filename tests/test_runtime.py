"""The CPUs a process may use: affinity mask and cgroup quota, not the host's core count."""

from __future__ import annotations

import os

import pytest

from qlora_pipeline.runtime import cgroup_cpu_quota, usable_cpus


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2: 2 CPUs
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: llama.cpp gets 2 threads
        ({"cpu.max": "max 100000\n"}, None),  # no quota
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_cgroup_quota_is_read_from_v2_or_v1_files(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == expected


def test_usable_cpus_take_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))  # a big host
    assert usable_cpus(tmp_path) == 64
    (tmp_path / "cpu.max").write_text("200000 100000\n")  # a Space's 2 vCPUs
    assert usable_cpus(tmp_path) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})  # pinned to one core
    assert usable_cpus(tmp_path) == 1


def test_a_gguf_opened_without_threads_gets_the_usable_cpus(trained_run, monkeypatch):
    import qlora_pipeline.serve.chat as chat_module
    from qlora_pipeline.gguf.variants import gguf_path
    from qlora_pipeline.serve.chat import LlamaChat

    monkeypatch.setattr(chat_module, "usable_cpus", lambda: 1)
    with LlamaChat(gguf_path(trained_run, "Q8_0"), n_ctx=256, n_threads=None) as chat:
        assert chat.llm.n_threads == 1 and chat.llm.n_threads_batch == 1


@pytest.mark.parametrize("hardware_bf16, expected", [(False, "float16"), (True, "bfloat16")])
def test_auto_dtype_on_cuda_counts_only_hardware_bf16(monkeypatch, hardware_bf16, expected):
    """A T4 (sm_75) has no bf16; torch 2.13 says it does when emulation counts."""
    import torch

    from qlora_pipeline.model import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4" if not hardware_bf16 else "A100")
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: True if including_emulation else hardware_bf16
    )
    device = pick_device("auto", "auto")
    assert device.name == "cuda" and str(device.compute_dtype) == f"torch.{expected}"
    assert device.mixed_precision == {"float16": "fp16", "bfloat16": "bf16"}[expected]
