"""Where the app's models come from (a local folder or a Hub repo's gguf_models.json) and the pool
that keeps them loaded for every user, never closing one that is still answering."""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qlora_pipeline.errors import ConfigError, ModelError
from qlora_pipeline.serve.chat import (
    LlamaChat,
    check_gguf_file,
    gguf_kind,
)
from qlora_pipeline.serve.settings import (
    ModelChoice,
)

log = logging.getLogger(__name__)


def local_choices(model: Path | None, model_dir: Path | None) -> tuple[list[ModelChoice], str | None]:
    """Every .gguf next to ``model`` (or in ``model_dir``), smallest first; the default is ``model``.

    A missing file is still listed (and fails with a clear message when chosen), so that the
    app starts and tells the user in the page instead of dying at start-up.
    """
    folder = Path(model_dir) if model_dir else (Path(model).parent if model else None)
    found = sorted(_model_files(folder), key=lambda p: (p.stat().st_size, p.name)) if folder and folder.is_dir() else []
    choices = [ModelChoice(p.name, path=p) for p in found]
    if model is not None and Path(model).name not in {c.name for c in choices}:
        choices.insert(0, ModelChoice(Path(model).name, path=Path(model)))
    if not choices:
        raise ConfigError(
            f"no .gguf files in {folder}; give one with --model FILE.gguf (make demo writes "
            "runs/demo/gguf/model-Q4_K_M.gguf)"
        )
    default = Path(model).name if model is not None else default_model([c.name for c in choices])
    return choices, default


def default_model(names: list[str]) -> str:
    """The model the app opens first: the course's Q4_K_M where offered, else the first offered."""
    q4 = [n for n in names if "Q4_K_M" in n]
    return q4[0] if q4 else names[0]


def _model_files(folder: Path) -> list[Path]:
    """The regular ``*.gguf`` files of ``folder`` (links to one count); a link to nothing is skipped
    with a log line, a folder named like a model is not a model."""
    files = []
    for path in folder.glob("*.gguf"):
        if path.is_file():
            kind = gguf_kind(path)
            if kind == "model":
                files.append(path)
            else:  # RUN/gguf also holds the importance matrix and the LoRA adapter
                log.info("skipping %s: its general.type is %s, not a model", path.name, kind)
        elif path.is_symlink() and not path.exists():
            log.warning("skipping %s: it is a link to nothing", path.name)
    return files


MODELS_MANIFEST = "gguf_models.json"  # written by `qlora-pipeline push --what gguf`: the repo's model GGUFs


def hub_choices(
    repo: str, files: list[str], memory: int | None = None, on_gpu: bool = False
) -> tuple[list[ModelChoice], str]:
    """The GGUF models of a Hub repo: the ones named, or those its ``gguf_models.json`` lists (each
    file's own ``general.type``, read when it was pushed). On a CPU, only files that fit ``memory``
    next to one other loaded model: a visitor cannot make the Space load the F16 beside the Q4."""
    names = list(files)
    if not names:
        sizes = _hub_models(repo)
        budget = None if on_gpu or not memory else int(memory * MEMORY_SHARE_FOR_MODELS)
        names = sorted(n for n, size in sizes.items() if budget is None or 2 * size <= budget)
        for name in sorted(set(sizes) - set(names)):
            log.info("not offering %s: %.1f GB does not fit twice in %.1f GB", name, sizes[name] / 1e9, budget / 1e9)
        if not names:
            raise ModelError(
                f"the Hub repo {repo} has no GGUF model that fits this machine's memory; push a smaller "
                "quantization (qlora-pipeline push --what gguf) or name a file with MODEL_FILE"
            )
    return [ModelChoice(n, hub_repo=repo, hub_file=n) for n in names], default_model(names)


MEMORY_SHARE_FOR_MODELS = 0.85  # the rest: Python, Gradio, the KV cache and the page cache's working set


def _hub_models(repo: str) -> dict[str, int]:
    """{file: bytes} of the repo's model GGUFs, from its ``gguf_models.json``."""
    import json

    try:
        from huggingface_hub import hf_hub_download

        listing = json.loads(Path(hf_hub_download(repo_id=repo, filename=MODELS_MANIFEST)).read_text("utf-8"))
        models = {name: int(entry["bytes"]) for name, entry in listing["models"].items()}
    except Exception as exc:  # offline, unknown repo, no permission, an older repo: all one message
        raise ModelError(
            f"cannot read {MODELS_MANIFEST} of {repo} on the Hub ({type(exc).__name__}); push the GGUFs with "
            "`qlora-pipeline push --what gguf`, or name a file with MODEL_FILE / --hub-file FILE.gguf"
        ) from None
    if not models:
        raise ModelError(f"the Hub repo {repo} lists no GGUF model; push one (qlora-pipeline push --what gguf)")
    return models


def fetch_model(choice: ModelChoice) -> Path:
    """The local path of a choice, downloading a Hub file (into the Hub cache) when needed."""
    if choice.path is not None:
        return check_gguf_file(choice.path)
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo_id=choice.hub_repo, filename=choice.hub_file)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        why = (
            "the Hub is unreachable or HF_HUB_OFFLINE is set"
            if offline
            or "Offline" in type(exc).__name__
            or "Connect" in type(exc).__name__
            or "LocalEntryNotFound" in type(exc).__name__
            else type(exc).__name__
        )
        raise ModelError(
            f"cannot download {choice.hub_file} from {choice.hub_repo} ({why}); check the names, "
            "go online, or give a local file with --model FILE.gguf"
        ) from None
    path = check_gguf_file(Path(path))
    if gguf_kind(path) != "model":  # a named MODEL_FILE may be the importance matrix or a LoRA
        raise ModelError(f"{choice.hub_file} in {choice.hub_repo} is a {gguf_kind(path)}, not a model; pick another")
    return path


class ModelPool:
    """Loaded models shared by all users, at most ``max_loaded`` at once, never closed while in use."""

    def __init__(self, loader: Callable[[ModelChoice, int], LlamaChat], max_loaded: int = 2):
        self.loader = loader
        self.max_loaded = max(1, max_loaded)
        self._lock = threading.Lock()  # guards the tables below
        self._load_lock = threading.Lock()  # one load at a time: two at once would double the memory peak
        self._loaded: OrderedDict[tuple, LlamaChat] = OrderedDict()
        self._users: dict[int, int] = {}
        self._retired: set[int] = set()

    @contextmanager
    def use(self, choice: ModelChoice, n_gpu_layers: int = 0) -> Iterator[LlamaChat]:
        chat = self._acquire((choice, n_gpu_layers))
        try:
            yield chat
        finally:
            self._release(chat)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return [key[0].name for key in self._loaded]

    def _acquire(self, key: tuple) -> LlamaChat:
        with self._lock:
            if key in self._loaded:
                return self._take(key)
        with self._load_lock:
            with self._lock:
                if key in self._loaded:  # loaded by another request while this one waited
                    return self._take(key)
            chat = self.loader(*key)
            with self._lock:
                self._loaded[key] = chat
                self._users[id(chat)] = 0
                taken = self._take(key)
                while len(self._loaded) > self.max_loaded:
                    _, old = self._loaded.popitem(last=False)
                    if self._users[id(old)] == 0:
                        self._close(old)
                    else:  # still answering someone: closed by its last _release
                        self._retired.add(id(old))
                return taken

    def _take(self, key: tuple) -> LlamaChat:
        chat = self._loaded[key]
        self._loaded.move_to_end(key)
        self._users[id(chat)] += 1
        return chat

    def _release(self, chat: LlamaChat) -> None:
        with self._lock:
            self._users[id(chat)] -= 1
            if self._users[id(chat)] == 0 and id(chat) in self._retired:
                self._retired.discard(id(chat))
                self._close(chat)

    def _close(self, chat: LlamaChat) -> None:
        self._users.pop(id(chat), None)
        log.info("unloading %s", chat.model_path.name)
        chat.close()

    def close(self) -> None:
        with self._lock:
            for chat in self._loaded.values():
                chat.close()
            self._loaded.clear()
