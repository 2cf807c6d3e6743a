"""Atomic writes: complete or invisible, and what a killed write leaves is undone next time."""

from __future__ import annotations

import os
import time

import pytest

from qlora_pipeline.errors import DiskFullError
from qlora_pipeline.paths import atomic_dir, file_manifest, manifest_difference, write_text_atomic


def test_a_failed_atomic_dir_leaves_the_previous_folder(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_leftovers_of_a_killed_write_are_undone(tmp_path):
    final = tmp_path / "merged"
    (tmp_path / ".merged.abc123.tmp").mkdir()  # killed while writing
    (tmp_path / ".merged.abc123.tmp" / "part").write_text("partial")
    (tmp_path / ".merged.old").mkdir()  # killed between the two renames of a replacement
    (tmp_path / ".merged.old" / "weights").write_text("previous, complete")
    with pytest.raises(RuntimeError):
        with atomic_dir(final):
            raise RuntimeError("the next write fails too")
    assert (final / "weights").read_text() == "previous, complete"  # put back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_manifest_notices_changed_content_of_the_same_size(tmp_path):
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "a.gguf").write_bytes(b"1234")
    (tmp_path / "gguf" / ".a.gguf.tmp").write_bytes(b"temporary")
    recorded = file_manifest(tmp_path, ["gguf"])
    assert list(recorded) == ["gguf/a.gguf"]
    (tmp_path / "gguf" / "a.gguf").write_bytes(b"4321")
    assert manifest_difference(recorded, file_manifest(tmp_path, ["gguf"], previous=recorded)) == "gguf/a.gguf"


def test_the_same_content_written_again_keeps_its_entry(tmp_path):
    """A deterministic step run again (the quantizer) changes no manifest that records its file."""
    (tmp_path / "a.gguf").write_bytes(b"1234")
    recorded = file_manifest(tmp_path, ["a.gguf"])
    time.sleep(0.01)
    (tmp_path / "a.gguf").write_bytes(b"1234")
    assert (tmp_path / "a.gguf").stat().st_mtime_ns != recorded["a.gguf"]["mtime_ns"]
    assert file_manifest(tmp_path, ["a.gguf"], previous=recorded) == recorded
    (tmp_path / "a.gguf").write_bytes(b"4321")
    changed = file_manifest(tmp_path, ["a.gguf"], previous=recorded)["a.gguf"]
    assert changed["sha256"] != recorded["a.gguf"]["sha256"]


def test_a_full_disk_keeps_the_previous_file(tmpfs):
    disk = tmpfs(1)
    path = disk / "report.json"
    write_text_atomic(path, "previous")
    with pytest.raises(DiskFullError, match=f"not enough disk space to write {path} \\(needs about 2.0 MB"):
        write_text_atomic(path, "x" * 2_000_000)
    assert path.read_text() == "previous"
    assert [p.name for p in disk.iterdir()] == ["report.json"]


def test_manifest_holds_by_size_and_content_and_rehashes_on_request(tmp_path):
    from qlora_pipeline.paths import manifest_holds

    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    recorded = file_manifest(tmp_path, ["a.bin"])
    assert manifest_holds(tmp_path, recorded)
    stat = (tmp_path / "a.bin").stat()
    (tmp_path / "a.bin").write_bytes(b"y" * 100)  # same size; the old time put back: a stat cannot tell
    os.utime(tmp_path / "a.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert manifest_holds(tmp_path, recorded) and not manifest_holds(tmp_path, recorded, rehash=True)
    (tmp_path / "a.bin").unlink()
    assert not manifest_holds(tmp_path, recorded)
