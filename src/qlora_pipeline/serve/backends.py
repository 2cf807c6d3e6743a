"""The two backends an answer comes from: a GGUF through llama-cpp-python, or an OpenAI-compatible server."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

from qlora_pipeline.chat_format import END_OF_TURN
from qlora_pipeline.errors import ConfigError, ModelError
from qlora_pipeline.serve.chat import (
    LlamaChat,
    SamplingParams,
    timed_answer,
)
from qlora_pipeline.serve.settings import (
    AppSettings,
    ModelChoice,
    clip_text,
)
from qlora_pipeline.serve.sources import ModelPool, fetch_model

log = logging.getLogger(__name__)


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
            raise ConfigError(f"model {clip_text(name)!r} is not one of this app's models: {', '.join(self.by_name)}")
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
            # the oldest pair; a lone older turn (the history need not alternate: empty turns are
            # left out) goes alone, so the new message itself is never dropped
            step = 2 if len(turns) > 2 else 1
            turns = turns[step:]
            dropped += step

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
