"""The app's settings: the models offered, the limits a request must keep to, the sampling defaults."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qlora_pipeline.serve.chat import (
    SamplingParams,
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


# The Limits an operator sets (--max-<name>, env MAX_<NAME>), with what each counts.
LIMIT_FLAGS = {
    "history_messages": "messages of earlier turns",
    "message_chars": "characters per message",
    "system_chars": "characters of the system prompt",
    "total_chars": "characters of a whole request",
    "request_bytes": "bytes of one HTTP request body (413 before it is read)",
}


def clip_text(value, limit: int = 80) -> str:
    """A user-supplied value short enough to quote in a message or a log line."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"
