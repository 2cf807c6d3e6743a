"""The Gradio chat app (the course's Hugging Face Space), on llama-cpp-python or an OpenAI-compatible server.

    qlora-pipeline app --model runs/demo/gguf/model-Q4_K_M.gguf          # http://127.0.0.1:7860
    qlora-pipeline app --hub-repo you/phi35-oasst1-gguf --hub-file model-Q4_K_M.gguf
    qlora-pipeline app --backend openai --base-url http://127.0.0.1:8000/v1

This module imports only gradio, llama-cpp-python, huggingface_hub, openai and the light chat
modules (never torch), so that ``qlora-pipeline space`` can ship it in a Space with
``chat``, ``chat_format`` and ``errors``.

Under real use: one loaded model serves every user. Gradio's queue runs one answer at a time
per event (``concurrency``), ``LlamaChat``'s lock keeps a llama context to one thread whatever
the queue does, and ``ModelPool`` counts the answers using each model, so loading another one
never closes a model that is still answering.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.errors import ConfigError, ModelError, PipelineError
from qlora_pipeline.runtime import usable_memory
from qlora_pipeline.serve.chat import (
    LlamaChat,
    SamplingParams,
    check_gguf_file,
    check_lora_file,
    gguf_kind,
    timed_answer,
)

log = logging.getLogger(__name__)

DEFAULT_SYSTEM = "You are a helpful, concise assistant."
# Phi-3.5's card samples with temperature 0 to 0.7; these keep answers varied but on topic.
DEFAULTS = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, repeat_penalty=1.1, max_tokens=256)
EXAMPLES = ["What is the capital of France?", "Explain LoRA in two sentences.", "Write a haiku about quantization."]


@dataclass(frozen=True)
class Limits:
    """What one request may carry, checked before anything is tokenized: a request's cost grows
    with its text, and a visitor's request must not hold the model (or the RAM) for long."""

    history_messages: int = 200
    """Messages of earlier turns (user and assistant); the context holds far fewer anyway."""
    message_chars: int = 16_000
    """Characters of one message, the new one or an earlier one (n_ctx 2048 holds ~8,000)."""
    system_chars: int = 4_000
    """Characters of the system prompt."""
    total_chars: int = 64_000
    """Characters of the whole request: system prompt, history and the new message."""
    model_name_chars: int = 200
    """Characters of a model name (longer ones are refused without being echoed)."""
    request_bytes: int = 2_000_000
    """Bytes of one HTTP request body, refused (413) before it is read or parsed; well above what
    the character caps allow as JSON (Gradio's uploads have their own 1 MB cap)."""


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model picker: a local file, a file in a Hub repo, or a server's model."""

    name: str
    path: Path | None = None
    hub_repo: str | None = None
    hub_file: str | None = None


@dataclass
class AppSettings:
    backend: str = "local"
    models: list[ModelChoice] = field(default_factory=list)
    default_model: str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None
    n_gpu_layers: int = 0
    lora: Path | None = None
    """A LoRA GGUF applied to every local model (``--lora``)."""
    base_url: str | None = None
    api_key: str | None = None
    concurrency: int = 1
    max_loaded: int = 2
    queue_size: int = 64
    limits: Limits = field(default_factory=Limits)
    title: str = "Phi-3.5 mini, fine-tuned on oasst1 (QLoRA → GGUF)"


# ----------------------------------------------------------------------------- model sources


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
    if model is not None:
        default = Path(model).name
    else:
        q4 = [c.name for c in choices if "Q4_K_M" in c.name]
        default = q4[0] if q4 else choices[0].name
    return choices, default


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
    choices = [ModelChoice(n, hub_repo=repo, hub_file=n) for n in names]
    q4 = [n for n in names if "Q4_K_M" in n]
    return choices, q4[0] if q4 else names[0]


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


# ----------------------------------------------------------------------------- backends


def message_text(content) -> str:
    """The text of a Gradio message's content: a string, or (Gradio 6) a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    if isinstance(content, (list, tuple)):  # parts are strings or {"text": ...}; nothing nested deeper
        return "".join(
            part if isinstance(part, str) else (part.get("text") or "") if isinstance(part, dict) else ""
            for part in content
        )
    return ""


def to_messages(system: str, history: list[dict], message: str) -> list[dict]:
    """The conversation for the chat template: system prompt, earlier turns, the new message."""
    messages = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    for turn in history:
        role = turn.get("role")
        text = message_text(turn.get("content"))
        if role in ("user", "assistant") and text and not (turn.get("metadata") or {}).get("title"):
            messages.append({"role": role, "content": text})
    messages.append({"role": "user", "content": message})
    return messages


class LocalBackend:
    """GGUF files run in this process with llama-cpp-python."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.by_name = {c.name: c for c in settings.models}
        self.pool = ModelPool(self._load, settings.max_loaded)

    def _load(self, choice: ModelChoice, n_gpu_layers: int) -> LlamaChat:
        path = fetch_model(choice)
        log.info("loading %s (n_ctx %d, n_gpu_layers %d)", path.name, self.settings.n_ctx, n_gpu_layers)
        return LlamaChat(
            path,
            n_ctx=self.settings.n_ctx,
            n_threads=self.settings.n_threads,
            n_gpu_layers=n_gpu_layers,
            lora_path=self.settings.lora,
        )

    def model_names(self) -> list[str]:
        return list(self.by_name)

    def preload(self, name: str) -> None:
        with self.pool.use(self._choice(name), self.settings.n_gpu_layers):
            pass

    def _choice(self, name: str) -> ModelChoice:
        if name not in self.by_name:
            raise ConfigError(f"model {_clip(name)!r} is not one of this app's models: {', '.join(self.by_name)}")
        return self.by_name[name]

    def stream(self, messages: list[dict], params: SamplingParams, model: str, stats: dict) -> Iterator[str]:
        # GPU layers are the operator's setting (--n-gpu-layers), never a request's: a value per
        # request would reload the model for every visitor who changes it.
        with self.pool.use(self._choice(model), self.settings.n_gpu_layers) as chat:
            stats["n_ctx"] = chat.n_ctx
            yield from chat.stream(messages, params, stats)

    def close(self) -> None:
        self.pool.close()


class OpenAIBackend:
    """A model served elsewhere through the OpenAI chat API (llama-cpp-python's server, llama-server, ...).

    The server applies the GGUF's own chat template. It counts tokens, not this app, so an
    over-long conversation is trimmed by dropping the oldest pair and asking again when the
    server answers that the context is exceeded.
    """

    def __init__(self, settings: AppSettings):
        from openai import OpenAI

        if not settings.base_url:
            raise ConfigError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        self.settings = settings
        # One retry: a server that broke off a stream (llama-cpp-python's does on an over-long
        # prompt) has dropped the kept-alive connection the next request would use.
        self.client = OpenAI(
            base_url=settings.base_url, api_key=settings.api_key or "not-needed", timeout=600, max_retries=1
        )

    def model_names(self) -> list[str]:
        if self.settings.models:
            return [c.name for c in self.settings.models]
        try:
            return [m.id for m in self.client.models.list().data] or ["default"]
        except Exception as exc:
            raise ModelError(
                f"cannot reach the server at {self.settings.base_url} ({type(exc).__name__}); start "
                "it (see app/README.md) or fix --base-url"
            ) from None

    def preload(self, name: str) -> None:
        """Nothing to load here; the server loads its model itself."""

    def stream(self, messages: list[dict], params: SamplingParams, model: str, stats: dict) -> Iterator[str]:
        import time

        started = time.perf_counter()
        first_chunk, chunks, dropped = self._open_fitting(messages, params, model)
        stats["dropped_turns"] = dropped
        yield from self._relay(first_chunk, chunks, params, started, stats)

    def _open_fitting(self, messages: list[dict], params: SamplingParams, model: str) -> tuple[Any, Any, int]:
        """Open the answer's stream, dropping the oldest pair of turns while the server says the
        conversation does not fit; (first chunk, the stream, messages dropped)."""
        head = messages[:1] if messages and messages[0]["role"] == "system" else []
        turns = messages[len(head) :]
        dropped = 0
        while True:
            try:
                chunks = self._open(model, head + turns, params, stream=True)
                first_chunk = next(chunks, None)
                if first_chunk is not None:
                    return first_chunk, chunks, dropped
                # llama-cpp-python's server reports an over-long prompt only inside the stream,
                # which then ends empty; a one-token request without streaming gets it as a 400.
                self._refused_or_none(model, head + turns)
            except _ContextExceeded:
                pass
            if len(turns) <= 1:
                raise ModelError(
                    f"the message is too long for the server's context (with {params.max_tokens} new "
                    "tokens); shorten it or lower max new tokens"
                )
            turns = turns[2:]
            dropped += 2

    @staticmethod
    def _relay(first_chunk, chunks, params: SamplingParams, started: float, stats: dict) -> Iterator[str]:
        """Yield the stream's text through ``chat.timed_answer`` (as LlamaChat does), then say in
        ``stats`` whether the server cut the answer to fit its context."""
        finish = []

        def texts() -> Iterator[str]:
            try:
                for chunk in _chain(first_chunk, chunks):
                    if not chunk.choices:
                        continue
                    finish.append(chunk.choices[0].finish_reason)
                    if chunk.choices[0].delta.content:  # not the role-only first chunk
                        yield chunk.choices[0].delta.content
            finally:
                chunks.close()

        yield from timed_answer(texts(), started, stats)
        # A server fits the answer into what the prompt leaves of its context: say so when it did.
        reason = next((r for r in reversed(finish) if r), None)
        stats["cut_by_context"] = reason == "length" and stats["completion_chunks"] < params.max_tokens

    def _open(self, model: str, messages: list[dict], params: SamplingParams, stream: bool):
        import openai

        messages = [{**m, "content": neutralise_special_text(m["content"])} for m in messages]
        try:
            return self.client.chat.completions.create(
                model=model,
                messages=messages,
                stream=stream,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                stop=[END_OF_TURN],
                # Not in the OpenAI API, but read by llama-cpp-python's server and llama-server.
                extra_body={"top_k": params.top_k, "repeat_penalty": params.repeat_penalty},
            )
        except openai.BadRequestError as exc:
            if _is_context_error(exc):
                raise _ContextExceeded() from None
            raise ModelError(f"the server refused the request: {_error_text(exc)}") from None
        except openai.APIConnectionError:
            raise ModelError(
                f"cannot reach the server at {self.settings.base_url}; start it (see app/README.md) or fix --base-url"
            ) from None
        except openai.APIError as exc:
            raise ModelError(f"the server failed: {_error_text(exc)}") from None

    def _refused_or_none(self, model: str, messages: list[dict]) -> None:
        """Ask again for one token without streaming: a context error returns, any other raises."""
        try:
            self._open(model, messages, SamplingParams(temperature=0, max_tokens=1), stream=False)
        except _ContextExceeded:
            return
        raise ModelError("the server ended the answer without a word; see its log")

    def close(self) -> None:
        self.client.close()


_SPECIAL_OPEN = re.compile(r"<\|")
WORD_JOINER = "\u2060"


def neutralise_special_text(text: str) -> str:
    """Text that no server reads as a control token. An OpenAI-compatible server renders the
    template and tokenizes the result with special tokens parsed, so a user's ``<|end|><|assistant|>``
    would become real turn markers (the injection the local path prevents by tokenizing contents as
    plain text). An invisible word joiner after each ``<`` of ``<|`` keeps the text readable and
    makes it ordinary text for the tokenizer."""
    return _SPECIAL_OPEN.sub("<" + WORD_JOINER + "|", text)


class _ContextExceeded(Exception):
    """The server said the conversation does not fit its context."""


def _is_context_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "context" in text and ("exceed" in text or "length" in text or "too long" in text)


def _error_text(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200]


def _chain(first, rest):
    yield first
    yield from rest


def make_backend(settings: AppSettings):
    if settings.backend == "local":
        return LocalBackend(settings)
    if settings.backend == "openai":
        return OpenAIBackend(settings)
    raise ConfigError(f"backend={settings.backend!r} is invalid: use local or openai")


# ----------------------------------------------------------------------------- the chat handler


def status_line(stats: dict, model: str, params: SamplingParams | None = None) -> str:
    parts = [f"`{model}`"]
    if stats.get("completion_chunks") is not None:
        parts.append(f"{stats['completion_chunks']} tokens")
    if stats.get("tokens_per_s"):
        parts.append(f"{stats['tokens_per_s']:.1f} tokens/s")
    if stats.get("time_to_first_token") is not None:
        parts.append(f"first token after {stats['time_to_first_token']:.2f} s")
    if stats.get("dropped_turns"):
        where = f"the {stats['n_ctx']}-token context" if stats.get("n_ctx") else "the server's context"
        parts.append(f"⚠️ {stats['dropped_turns']} oldest messages left out to fit {where}")
    if stats.get("cut_by_context"):
        parts.append("⚠️ answer cut short: the server's context is full (clear the chat or lower max new tokens)")
    if params is not None:
        parts.append(
            f"temperature {params.temperature:g}, top-p {params.top_p:g}, top-k {params.top_k}, "
            f"repetition penalty {params.repeat_penalty:g}"
        )
    return " · ".join(parts)


def make_respond(backend, settings: AppSettings):
    """The ChatInterface function: validates everything first, then streams (answer, status line)."""

    def respond(message, history, system, model, temperature, top_p, top_k, repeat_penalty, max_tokens):
        import gradio as gr

        try:
            text, earlier, system_text, model = check_request(settings, message, history, system, model)
            params = SamplingParams(
                temperature=_number(temperature, "temperature", float),
                top_p=_number(top_p, "top_p", float),
                top_k=_number(top_k, "top_k", int),
                repeat_penalty=_number(repeat_penalty, "repeat_penalty", float),
                max_tokens=_number(max_tokens, "max_tokens", int),
            )
            messages = to_messages(system_text, earlier, text)
            stats: dict = {}
            answer = ""
            for piece in backend.stream(messages, params, model, stats):
                answer += piece
                yield answer, f"`{model}` · answering…"
            yield answer, status_line(stats, model, params)
        except PipelineError as exc:
            raise gr.Error(public_message(str(exc), settings), print_exception=False) from None

    return respond


def _clip(value, limit: int = 80) -> str:
    """A user-supplied value short enough to quote in a message or a log line."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def _valid_text(text: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"the {what} holds characters that are not valid text (unpaired surrogates); retype it"
        ) from None
    return text


def check_request(settings: AppSettings, message, history, system, model) -> tuple[str, list[dict], str, str]:
    """The request's message, history, system prompt and model name, each within settings.limits:
    checked on counts and lengths alone, before anything is rendered or tokenized."""
    limits = settings.limits
    if model is None:
        model = settings.default_model
    if not isinstance(model, str):
        raise ConfigError("the model must be one of this app's model names (a string)")
    if len(model) > limits.model_name_chars:
        raise ConfigError(f"the model name has {len(model):,} characters; choose one of this app's models")
    text = _valid_text(message_text(message), "message")
    if not text.strip():
        raise ConfigError("the message is empty: type something to ask")
    if len(text) > limits.message_chars:
        raise ConfigError(
            f"the message has {len(text):,} characters; the limit is {limits.message_chars:,} "
            f"(and the context holds {settings.n_ctx} tokens): shorten it"
        )
    system = system if isinstance(system, str) else ""
    if len(system) > limits.system_chars:
        raise ConfigError(f"the system prompt has {len(system):,} characters; the limit is {limits.system_chars:,}")
    _valid_text(system, "system prompt")
    history = history if history is not None else []
    if not isinstance(history, list) or not all(isinstance(turn, dict) for turn in history):
        raise ConfigError("the chat history must be a list of messages; clear the chat")
    if len(history) > limits.history_messages:
        raise ConfigError(
            f"the chat history has {len(history):,} messages; the limit is {limits.history_messages:,}: clear the chat"
        )
    total = len(text) + len(system)
    for turn in history:
        turn_text = message_text(turn.get("content"))
        if len(turn_text) > limits.message_chars:
            raise ConfigError(
                f"a message in the chat history has {len(turn_text):,} characters; the limit is "
                f"{limits.message_chars:,}: clear the chat"
            )
        _valid_text(turn_text, "chat history")
        total += len(turn_text)
    if total > limits.total_chars:
        raise ConfigError(
            f"the conversation has {total:,} characters; the limit is {limits.total_chars:,}: clear the chat"
        )
    return text, history, system, model


def public_message(text: str, settings: AppSettings) -> str:
    """An error for the page: model files named relative to their folder, never a server path."""
    for folder in {str(c.path.parent) for c in settings.models if c.path is not None}:
        text = text.replace(folder + os.sep, "")
    return text[:500]


def _number(value, name: str, kind: type):
    """A slider value that came through the API: numbers only (a bool or a string is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}={value!r} is invalid: give a number")
    if kind is int:
        if value != int(value):
            raise ConfigError(f"{name}={value!r} is invalid: give a whole number")
        return int(value)
    return float(value)


# ----------------------------------------------------------------------------- the page


def _start_backend(backend, settings: AppSettings) -> tuple[list[str], str | None, str | None]:
    """The model names, the default one (loaded now, so that the first answer is fast and a bad
    file is reported at once), and the start-up error to show instead, if any."""
    try:
        names = backend.model_names()
    except PipelineError as exc:
        return [], None, str(exc)
    default = settings.default_model if settings.default_model in names else (names[0] if names else None)
    if default is not None:
        try:
            backend.preload(default)
        except PipelineError as exc:
            log.error("%s", exc)
            return names, default, str(exc)
    return names, default, None


def _settings_panel(gr, settings: AppSettings, names: list[str], default: str | None) -> list:
    """The model picker and sampling controls; the chat's additional inputs, in respond's order."""
    system = gr.Textbox(DEFAULT_SYSTEM, label="System prompt", lines=2, elem_id="system-prompt")
    # The app checks the name itself (check_request): Gradio's own check would echo a 10 MB name
    # whole in its error.
    model = gr.Dropdown(names, value=default, label="Model", elem_id="model-picker", allow_custom_value=True)
    slider = lambda low, high, value, step, label, elem: gr.Slider(  # noqa: E731
        low, high, value=value, step=step, label=label, elem_id=elem
    )
    half_ctx = max(16, settings.n_ctx // 2)
    return [
        system,
        model,
        slider(0.0, 2.0, DEFAULTS.temperature, 0.05, "Temperature", "temperature"),
        slider(0.05, 1.0, DEFAULTS.top_p, 0.05, "Top-p", "top-p"),
        slider(0, 200, DEFAULTS.top_k, 1, "Top-k (0 = off)", "top-k"),
        slider(1.0, 2.0, DEFAULTS.repeat_penalty, 0.05, "Repetition penalty", "repeat-penalty"),
        slider(16, half_ctx, min(DEFAULTS.max_tokens, settings.n_ctx // 2), 16, "Max new tokens", "max-tokens"),
    ]


def _chat_panel(gr, backend, settings: AppSettings, inputs: list, accordion, status) -> None:
    gr.ChatInterface(
        make_respond(backend, settings),
        chatbot=gr.Chatbot(height=560, elem_id="chatbot", placeholder="Ask the fine-tuned model something."),
        textbox=gr.Textbox(
            placeholder="Type a message and press Enter",
            elem_id="chat-input",
            render=False,
            show_label=False,
            submit_btn=True,
            stop_btn=True,
        ),
        additional_inputs=inputs,
        additional_inputs_accordion=accordion,
        additional_outputs=[status],
        examples=[[e] for e in EXAMPLES],
        cache_examples=False,
        concurrency_limit=settings.concurrency,
        api_name="chat",
        fill_height=True,
    )


def build_app(settings: AppSettings, backend=None):
    """The Gradio Blocks app (not launched); returns (demo, backend)."""
    import gradio as gr

    backend = backend or make_backend(settings)
    names, default, startup_error = _start_backend(backend, settings)
    settings.default_model = default
    # Uploaded and generated files are removed after an hour (the chat takes no uploads; this
    # bounds what Gradio's own upload route can leave behind).
    with gr.Blocks(title=settings.title, fill_height=True, delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            f"## {settings.title}\nAnswers stream from a quantized GGUF through llama.cpp; "
            "the prompt is built with the model's own chat template and stops at `<|end|>`."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                status_text = f"⚠️ {startup_error}" if startup_error else f"`{default}` ready"
                status = gr.Markdown(status_text, elem_id="status-line")
                with gr.Accordion("Model and sampling", open=True) as accordion:
                    inputs = _settings_panel(gr, settings, names, default)
            with gr.Column(scale=2):
                _chat_panel(gr, backend, settings, inputs, accordion, status)
    # ChatInterface's internal events (copying the chat into its state, retry, undo, ...) are
    # "undocumented": callable by name. Only /chat is the app's API.
    for fn in demo.fns.values():
        if fn.api_name != "chat":
            fn.api_visibility = "private"
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    return demo, backend


# ----------------------------------------------------------------------------- command line


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The app's options; each also read from an environment variable (a Space sets those)."""
    _add_model_arguments(parser)
    _add_server_arguments(parser)
    _add_limit_arguments(parser)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--model",
        type=Path,
        default=env("MODEL_PATH"),
        help="a .gguf file; the picker lists every .gguf beside it (env MODEL_PATH)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="list the .gguf files of this folder")
    parser.add_argument("--hub-repo", default=env("MODEL_REPO"), help="a Hub repo with GGUF files (env MODEL_REPO)")
    parser.add_argument(
        "--hub-file",
        action="append",
        default=[f for f in (env("MODEL_FILE") or "").split(",") if f],
        help="a GGUF file in --hub-repo (repeat for several; env MODEL_FILE, comma-separated)",
    )
    parser.add_argument("--backend", choices=["local", "openai"], default=env("BACKEND", "local"))
    parser.add_argument(
        "--base-url",
        default=env("OPENAI_BASE_URL"),
        help="the OpenAI-compatible server for --backend openai (env OPENAI_BASE_URL)",
    )
    parser.add_argument(
        "--api-model",
        action="append",
        default=[],
        help="model name(s) on the server (default: the server's /v1/models)",
    )
    parser.add_argument("--n-ctx", type=int, default=int(env("N_CTX", "2048")))
    parser.add_argument(
        "--threads",
        type=int,
        default=int(env("N_THREADS")) if env("N_THREADS") else None,
        help="llama.cpp threads (default: the CPUs this process may use, affinity and cgroup "
        "quota counted; env N_THREADS)",
    )
    parser.add_argument(
        "--n-gpu-layers",
        type=int,
        default=int(env("N_GPU_LAYERS", "0")),
        help="layers to offload to a GPU (-1 = all; env N_GPU_LAYERS)",
    )
    parser.add_argument(
        "--lora",
        type=Path,
        default=Path(env("LORA_GGUF")) if env("LORA_GGUF") else None,
        help="a LoRA GGUF applied to the local model, e.g. gguf/adapter-F16.gguf on gguf/base-F16.gguf (env LORA_GGUF)",
    )


def _add_server_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--host",
        default=None,
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network; "
        "env GRADIO_SERVER_NAME); any other than loopback prints a warning naming its source",
    )
    parser.add_argument("--port", type=int, default=int(env("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--concurrency",
        type=int,
        default=int(env("CONCURRENCY", "1")),
        help="answers generated at once per event (a llama context runs one at a time)",
    )
    parser.add_argument(
        "--auth-env",
        default="APP_AUTH",
        help="environment variable holding user:password for Gradio's login form (a session "
        "cookie after it; unset: no login)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="open a public gradio.live link (off by default; refused without a login, see --auth-env)",
    )


# The Limits an operator sets (--max-<name>, env MAX_<NAME>), with what each counts.
LIMIT_FLAGS = {
    "history_messages": "messages of earlier turns",
    "message_chars": "characters per message",
    "system_chars": "characters of the system prompt",
    "total_chars": "characters of a whole request",
    "request_bytes": "bytes of one HTTP request body (413 before it is read)",
}


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    limits = Limits()
    for name, doc in LIMIT_FLAGS.items():
        flag, variable = name.replace("_", "-"), f"MAX_{name.upper()}"
        parser.add_argument(
            f"--max-{flag}",
            type=int,
            default=int(env(variable, getattr(limits, name))),
            help=f"most {doc} one request may carry, checked before tokenizing "
            f"(default {getattr(limits, name):,}; env {variable})",
        )


def settings_from_args(args) -> AppSettings:
    if args.concurrency < 1:
        raise ConfigError(f"--concurrency={args.concurrency} is invalid: use 1 or more")
    if args.n_ctx < 64:
        raise ConfigError(f"--n-ctx={args.n_ctx} is invalid: use at least 64 tokens")
    for name in LIMIT_FLAGS:
        if getattr(args, f"max_{name}") < 1:
            raise ConfigError(
                f"--max-{name.replace('_', '-')}={getattr(args, f'max_{name}')} is invalid: use 1 or more"
            )
    settings = AppSettings(
        backend=args.backend,
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        lora=check_lora_file(args.lora) if args.lora else None,
        base_url=args.base_url,
        api_key=os.environ.get("OPENAI_API_KEY"),
        concurrency=args.concurrency,
        limits=Limits(**{name: getattr(args, f"max_{name}") for name in LIMIT_FLAGS}),
    )
    if args.backend == "openai":
        settings.models = [ModelChoice(n) for n in args.api_model]
        settings.default_model = args.api_model[0] if args.api_model else None
    elif args.hub_repo and not args.model:
        settings.models, settings.default_model = hub_choices(
            args.hub_repo, args.hub_file, usable_memory(), on_gpu=args.n_gpu_layers != 0
        )
    elif args.model or args.model_dir:
        settings.models, settings.default_model = local_choices(args.model, args.model_dir)
    else:
        raise ConfigError(
            "no model given: use --model FILE.gguf (e.g. runs/demo/gguf/model-Q4_K_M.gguf), "
            "--hub-repo REPO --hub-file FILE.gguf, or --backend openai --base-url URL"
        )
    return settings


def basic_auth(env_name: str) -> tuple[str, str] | None:
    value = os.environ.get(env_name)
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError(f"{env_name} must be user:password (both non-empty)")
    return user, password


def bind_address(args) -> tuple[str, str]:
    """The address to bind and where it came from: --host, then GRADIO_SERVER_NAME, then loopback."""
    if args.host:
        return args.host, "--host"
    if os.environ.get("GRADIO_SERVER_NAME"):
        return os.environ["GRADIO_SERVER_NAME"], "the GRADIO_SERVER_NAME environment variable"
    return "127.0.0.1", "the default"


def app_main(args) -> int:
    from starlette.middleware import Middleware

    from qlora_pipeline.serve.body_limit import BodyLimit

    settings = settings_from_args(args)
    auth = basic_auth(args.auth_env)
    if args.share and auth is None:
        raise ConfigError(
            f"--share publishes the app on a public gradio.live link: set {args.auth_env}=user:password "
            "first (a login form then guards it)"
        )
    host, source = bind_address(args)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {host} (from {source}): anyone who can reach this machine can use the app"
            + ("" if auth else f"; set {args.auth_env}=user:password for a login"),
            flush=True,
        )
    demo, backend = build_app(settings)
    print(
        f"serving {settings.default_model or 'no model'} on http://{host}:{args.port}"
        + (" (login form on)" if auth else ""),
        flush=True,
    )
    try:
        demo.launch(
            server_name=host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            max_file_size="1mb",
            show_error=True,
            footer_links=["api", "settings"],
            quiet=True,
            app_kwargs={"middleware": [Middleware(BodyLimit, max_bytes=settings.limits.request_bytes)]},
        )
    finally:
        backend.close()
    return 0
