"""``google.colab.drive``: mount the student's Google Drive, and flush it before the VM goes."""

import os
from pathlib import Path

from google.colab._log import record


def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False) -> None:
    """Colab asks for Google's permission and mounts My Drive at ``mountpoint/MyDrive``; here
    ``mountpoint/MyDrive`` becomes a link to the folder that plays it."""
    drive = os.environ.get("COLAB_STANDIN_DRIVE")
    if not drive:
        raise ValueError("mount failed: this journey step runs with Google Drive turned off")
    my_drive = Path(mountpoint) / "MyDrive"
    my_drive.parent.mkdir(parents=True, exist_ok=True)
    if not my_drive.exists():
        Path(drive).mkdir(parents=True, exist_ok=True)
        my_drive.symlink_to(Path(drive).resolve(), target_is_directory=True)
    record("drive.mount", mountpoint=str(mountpoint))


def flush_and_unmount(timeout_ms: int = 86400000) -> None:
    """Write pending changes to Drive and unmount it (Colab's call before a VM ends)."""
    for link in Path(os.environ.get("QLORA_COLAB_CONTENT", "/content")).glob("drive/MyDrive"):
        if link.is_symlink():
            link.unlink()
    record("drive.flush_and_unmount")
