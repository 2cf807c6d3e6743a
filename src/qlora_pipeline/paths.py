"""Where things live: the cache folder, atomic writes, file manifests and free disk space."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qlora_pipeline.errors import DiskFullError


def cache_root() -> Path:
    """Cache for expensive, reproducible things (llama.cpp files, the tiny base model).

    ``QLORA_PIPELINE_CACHE`` overrides it; the default follows XDG.
    """
    env = os.environ.get("QLORA_PIPELINE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "qlora_pipeline"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file under a temporary name in the same folder, fsync, then rename over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, len(text.encode())) from None
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def save_figure_atomic(fig, path: Path, dpi: int = 110) -> None:
    """Save a matplotlib figure under a temporary name, then rename it into place; close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def recover_interrupted(final: Path) -> None:
    """Undo what a killed ``atomic_dir``/``write_text_atomic`` left beside ``final``.

    Temporary names start with a dot and are never read, so removing them is safe. A process
    killed between the two renames of a replacement leaves the previous complete folder as
    ``.NAME.old`` and nothing at ``NAME``: it is put back, so the last complete version survives.
    """
    final = Path(final)
    if not final.parent.is_dir():
        return
    for leftover in final.parent.glob(f".{final.name}.*.tmp"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


@contextlib.contextmanager
def atomic_dir(final: Path, size_hint: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it replaces ``final`` in one rename.

    On any error the temporary folder is removed and ``final`` is left as it was, so a
    folder at the final path is always complete. A write that fills the disk raises
    ``DiskFullError`` naming ``final`` (and ``size_hint``, the bytes it expected to need).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            if old.exists():
                shutil.rmtree(old)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        full = isinstance(exc, Exception) and looks_like_disk_full(exc, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise disk_full(final, size_hint) from None
        raise


# ---------------------------------------------------------------------------- manifests


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def file_manifest(root: Path, names: tuple[str, ...] | list[str], previous: dict | None = None, locate=None) -> dict:
    """``{relative path: {bytes, mtime_ns, sha256}}`` for every file under ``names`` (files or
    folders relative to ``root``; dot-files, which are temporary, left out).

    A file whose size and modification time equal its entry in ``previous`` keeps that hash
    unread (as make and git do), so checking a 7.6 GB merged model costs a stat, not a read.
    Extra keys of an entry in ``previous`` (a GGUF's ``file``) are kept with it. ``locate`` maps a
    name to its path when it is not ``root / name`` (``RunLayout.resolve``: the large parts).
    """
    root = Path(root)
    previous = previous or {}
    out = {}
    for name in names:
        top = locate(name) if locate else root / name
        files = [top] if top.is_file() else sorted(f for f in top.rglob("*") if f.is_file()) if top.is_dir() else []
        for file in files:
            rel = (Path(name) / file.relative_to(top)).as_posix()
            if any(part.startswith(".") for part in Path(rel).parts):
                continue
            stat = file.stat()
            old = previous.get(rel)
            if old and old["bytes"] == stat.st_size and old.get("mtime_ns") == stat.st_mtime_ns:
                out[rel] = old
                continue
            entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(file)}
            # The same content written again (a deterministic step run once more) keeps its entry,
            # so a manifest that records it reads the same and what depends on it stays done; the
            # stale time only costs one more hash of that file next time.
            same = old is not None and (old["bytes"], old.get("sha256")) == (entry["bytes"], entry["sha256"])
            out[rel] = old if same else entry
    return out


def manifest_difference(recorded: dict, current: dict) -> str | None:
    """The first path that differs between two manifests (by size or content), or None."""
    for rel in sorted(set(recorded) | set(current)):
        a, b = recorded.get(rel), current.get(rel)
        if a is None or b is None or a["bytes"] != b["bytes"] or a.get("sha256") != b.get("sha256"):
            return rel
    return None


def manifest_holds(root: Path, recorded: dict, rehash: bool = False) -> bool:
    """Whether every file ``recorded`` (a ``file_manifest``) is under ``root`` as recorded: size
    and sha256. The one completeness check of checkpoints, GGUF files and stage records. A file
    whose size and modification time still match keeps its recorded hash unless ``rehash``."""
    current = file_manifest(root, list(recorded), previous=None if rehash else recorded)
    return manifest_difference(recorded, current) is None


# ---------------------------------------------------------------------------- disk space


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing_ancestor(path)).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def disk_full(path: Path, needed: int | None) -> DiskFullError:
    need = f"needs about {human_bytes(needed)}, " if needed else ""
    return DiskFullError(
        f"not enough disk space to write {path} ({need}{human_bytes(free_bytes(path))} free); "
        "free some space or use a --run-dir on a larger disk (the previous version is untouched)"
    )


def looks_like_disk_full(error: Exception | str, where: Path) -> bool:
    """Whether a failed write ran out of space. ``error``: the exception, or the error text of
    a tool that failed. Writers report it differently (OSError ENOSPC, safetensors'
    "StorageFull", torch.save's "file write failed", llama.cpp's status 1), so a disk with
    under 1 MiB left at the moment of failure counts too."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    if "No space left" in text or "StorageFull" in text:
        return True
    try:
        return free_bytes(where) < 1 << 20
    except OSError:
        return False


def require_free_space(path: Path, needed: int) -> None:
    """Refuse, before writing, an artifact of about ``needed`` bytes that cannot fit (5% kept spare)."""
    if free_bytes(path) < needed * 1.05:
        raise disk_full(path, needed)
