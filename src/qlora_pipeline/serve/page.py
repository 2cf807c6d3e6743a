"""The Gradio page: the chat, the settings panel, the status line."""

from __future__ import annotations

import logging

from qlora_pipeline.errors import PipelineError
from qlora_pipeline.serve.backends import make_backend
from qlora_pipeline.serve.requests import make_respond
from qlora_pipeline.serve.settings import (
    DEFAULT_SYSTEM,
    DEFAULTS,
    EXAMPLES,
    AppSettings,
)

log = logging.getLogger(__name__)


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
