"""A chat request, checked field by field before any work (one-line messages), then streamed."""

from __future__ import annotations

import logging
import os

from qlora_pipeline.errors import ConfigError, PipelineError
from qlora_pipeline.serve.backends import message_text, to_messages
from qlora_pipeline.serve.chat import (
    SamplingParams,
)
from qlora_pipeline.serve.settings import (
    AppSettings,
)

log = logging.getLogger(__name__)


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
