"""The chat app as a Hugging Face Space folder: ``qlora-pipeline space --out runs/space [--push USER/SPACE]``.

A Space installs ``app/requirements.txt``, not this package (whose training dependencies, torch
among them, would take gigabytes). The folder therefore carries the ``serve`` subpackage whole,
plus the core modules it imports, found by reading its imports (``serving_modules``), not from a
hand-kept list: a list went stale once, and the Space crashed at start. A test starts the built
folder's ``app.py`` through ``app_main`` with torch blocked.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.paths import atomic_dir

APP_DIR = Path(__file__).resolve().parents[2] / "app"
SPACE_FILES = ("app.py", "README.md", "requirements.txt")
PACKAGE = "qlora_pipeline"


def _imported_modules(path: Path) -> set[str]:
    """The ``qlora_pipeline`` modules one file imports (at any depth: function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
    return found


def serving_modules(package_dir: Path | None = None, app_file: Path = APP_DIR / "app.py") -> list[Path]:
    """Every file the Space needs, relative to the package: ``serve/`` whole and what the Space's
    ``app.py`` imports, then each module those import, and theirs (``__init__.py`` of each package
    on the way)."""
    package_dir = package_dir or Path(__file__).resolve().parent
    wanted = {p.relative_to(package_dir) for p in (package_dir / "serve").rglob("*.py")}
    queue: list[Path | None] = [*wanted, None]  # None: the Space's app.py itself
    while queue:
        current = queue.pop()
        for module in _imported_modules(app_file if current is None else package_dir / current):
            parts = module.split(".")[1:]
            for candidate in (Path(*parts).with_suffix(".py") if parts else None, Path(*parts, "__init__.py")):
                if candidate and (package_dir / candidate).is_file() and candidate not in wanted:
                    wanted.add(candidate)
                    queue.append(candidate)
    wanted.add(Path("__init__.py"))
    return sorted(wanted)


def build_space(out: Path, app_dir: Path = APP_DIR) -> Path:
    """Write the Space folder (atomically: a failed build leaves no half folder)."""
    missing = [name for name in SPACE_FILES if not (app_dir / name).is_file()]
    if missing:
        raise ConfigError(f"{app_dir} lacks {', '.join(missing)}; run this from a clone of the course repository")
    package = Path(__file__).resolve().parent
    with atomic_dir(Path(out)) as tmp:
        for name in SPACE_FILES:
            shutil.copy2(app_dir / name, tmp / name)
        for module in serving_modules(package):
            (tmp / PACKAGE / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(package / module, tmp / PACKAGE / module)
    return Path(out)


def space_main(args) -> int:
    from qlora_pipeline.hub import push_space

    folder = build_space(args.out)
    print(f"wrote the Space to {folder} ({len(SPACE_FILES)} files + {len(serving_modules())} modules)")
    if args.push:
        print(f"pushed to {push_space(folder, args.push, args.model_repo, args.private)}")
    return 0


def publish_space(space: str, model_repo: str, private: bool = False) -> str:
    """Notebook 3's last step: build the Space folder (in a temporary folder: it is not part of the
    run) and create or update the student's Space from it, serving ``model_repo``; its URL."""
    import tempfile

    from qlora_pipeline.hub import push_space

    with tempfile.TemporaryDirectory(prefix="space-") as tmp:
        return push_space(build_space(Path(tmp) / "space"), space, model_repo, private)
