"""The chat app as a Hugging Face Space folder: ``qlora-pipeline space --out runs/space [--push USER/SPACE]``.

A Space installs ``app/requirements.txt``, not this package (whose training dependencies, torch
among them, would take gigabytes), so the folder carries the few light modules the app imports.
A test imports the folder with torch and transformers blocked to keep it that way.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.hub import push_folder
from qlora_pipeline.paths import atomic_dir

APP_DIR = Path(__file__).resolve().parents[2] / "app"
SPACE_MODULES = ("__init__.py", "errors.py", "runtime.py", "chat_format.py", "chat.py", "chat_app.py")
SPACE_FILES = ("app.py", "README.md", "requirements.txt")


def build_space(out: Path, app_dir: Path = APP_DIR) -> Path:
    """Write the Space folder (atomically: a failed build leaves no half folder)."""
    missing = [name for name in SPACE_FILES if not (app_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{app_dir} lacks {', '.join(missing)}; run this from a clone of the course repository")
    package = Path(__file__).resolve().parent
    with atomic_dir(Path(out)) as tmp:
        for name in SPACE_FILES:
            shutil.copy2(app_dir / name, tmp / name)
        (tmp / "qlora_pipeline").mkdir()
        for name in SPACE_MODULES:
            shutil.copy2(package / name, tmp / "qlora_pipeline" / name)
    return Path(out)


def space_main(args) -> int:
    folder = build_space(args.out)
    print(f"wrote the Space to {folder} ({len(SPACE_FILES)} files + {len(SPACE_MODULES)} modules)")
    if args.push:
        print(f"pushed to {push_folder(folder, args.push, private=False, repo_type='space')}")
    return 0
