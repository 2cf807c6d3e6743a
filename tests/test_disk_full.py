"""A full disk while writing a checkpoint or a GGUF: one clear error, the previous artifact intact.

The run folders live on a small tmpfs mounted for the test (``tmpfs`` in conftest), so the disk
really fills: once refused by the free-space check before writing, once with that
check switched off so the write itself fails half-way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_config

from qlora_pipeline.checkpoints import checkpoint_is_complete
from qlora_pipeline.errors import DiskFullError
from qlora_pipeline.paths import file_sha256, free_bytes
from qlora_pipeline.train import train


def fill_leaving(disk: Path, free: int) -> None:
    """A ballast file that leaves about ``free`` bytes on the disk."""
    with open(disk / "ballast", "wb") as f:
        f.truncate(0)
        f.write(b"\0" * max(0, free_bytes(disk) - free))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("checked", [True, False], ids=["refused-before-writing", "failed-while-writing"])
def test_disk_full_during_a_checkpoint(prepared_run, tmpfs, monkeypatch, checked):
    disk = tmpfs(32)
    run = shutil.copytree(prepared_run, disk / "run")
    cfg = make_config()
    train(cfg, run, stop_after_steps=2, log=lambda *a, **k: None)
    previous = run / "checkpoints" / "step-000002"
    before = {f.name: file_sha256(f) for f in previous.iterdir()}
    size = sum(f.stat().st_size for f in previous.iterdir())
    fill_leaving(disk, size // 2)
    if not checked:  # the write itself has to hit the full disk
        monkeypatch.setattr("qlora_pipeline.checkpoints.require_free_space", lambda *a: None)
    with pytest.raises(DiskFullError) as info:
        train(cfg, run, resume=True, log=lambda *a, **k: None)
    message = str(info.value)
    assert message.startswith(f"not enough disk space to write {run / 'checkpoints' / 'step-000004'} (")
    assert "needs about" in message and "free some space" in message and "\n" not in message
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # nothing half-written
    assert checkpoint_is_complete(previous) and {f.name: file_sha256(f) for f in previous.iterdir()} == before


@pytest.mark.parametrize("checked", [True, False], ids=["refused-before-writing", "failed-while-writing"])
def test_disk_full_during_gguf_export(trained_run, tmpfs, monkeypatch, checked):
    from qlora_pipeline.export import export
    from qlora_pipeline.gguf.variants import gguf_path

    needed = sum(f.stat().st_size for f in (trained_run / "merged").iterdir())
    needed += sum(f.stat().st_size for f in (trained_run / "gguf").iterdir())
    disk = tmpfs(needed // 2**20 + 48)
    run = disk / "run"
    run.mkdir()
    for name in ("merged", "gguf"):
        shutil.copytree(trained_run / name, run / name)
    f16 = gguf_path(run, "F16")
    before = file_sha256(f16)
    fill_leaving(disk, f16.stat().st_size)  # room for one F16 file, not the converter's two copies
    if not checked:
        monkeypatch.setattr("qlora_pipeline.gguf.convert.require_free_space", lambda *a: None)
    cfg = make_config("export.model_name=Phi-3 renamed")  # a new name: every GGUF must be written again
    with pytest.raises(DiskFullError) as info:
        export(cfg, run, log=lambda *a: None)
    message = str(info.value)
    assert message.startswith(f"not enough disk space to write {f16} (needs about ")
    assert "free some space" in message and "\n" not in message
    assert file_sha256(f16) == before  # the previous complete file is untouched
    assert leftovers(run / "gguf") == []


def test_disk_full_through_the_command_line(prepared_run, tmpfs):
    """The same error as one line and exit status 2 from `qlora-pipeline train`."""
    import sys

    from conftest import TEST_OVERRIDES

    disk = tmpfs(32)
    run = shutil.copytree(prepared_run, disk / "run")
    fill_leaving(disk, 200_000)  # less than the first checkpoint
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora_pipeline.cli",
            "train",
            "--run-dir",
            str(run),
            "--preset",
            "tiny",
            *TEST_OVERRIDES,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]  # after the progress bars, which stderr also carries
    assert last.startswith(f"error: not enough disk space to write {run / 'checkpoints' / 'step-000002'}")
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1
    assert not (run / "adapter").exists()
