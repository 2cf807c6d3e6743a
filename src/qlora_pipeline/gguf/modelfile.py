"""``RUN/gguf/Modelfile``: the chosen GGUF ready for Ollama (``ollama create NAME -f Modelfile``).

Phi-3.5's most reported problem in Ollama is answers that never end: a Modelfile without a
template makes Ollama fall back to one that does not end turns with ``<|end|>``, and without
stop tokens nothing stops at the next ``<|user|>``. This one carries:

- ``TEMPLATE``: Phi-3.5's chat template (``microsoft-Phi-3.5-mini-instruct.jinja``, the one in
  the GGUF) rewritten as the Go template Ollama runs, system prompt included;
  ``tests/test_modelfile.py`` renders both for the same conversations and requires equal text;
- ``PARAMETER stop`` for ``<|end|>``, ``<|user|>``, ``<|assistant|>``, ``<|system|>`` and
  ``<|endoftext|>``;
- our chat's sampling defaults (``chat.SamplingParams``) and the evaluation context length;
- ``SYSTEM``: the system prompt the model was trained with (``data.system_prompt``), when set, so
  that Ollama puts it in front of a conversation that brings none, as training did.

LM Studio reads the chat template from the GGUF itself (the converter writes it there).
"""

from __future__ import annotations

from pathlib import Path

from qlora_pipeline.config import check_system_prompt
from qlora_pipeline.paths import write_text_atomic
from qlora_pipeline.serve.chat import SamplingParams

# Phi-3.5's Jinja template, branch by branch: a system message only when it has content, every
# turn ended by <|end|> and a newline, and the generation prompt <|assistant|> at the end.
TEMPLATE = (
    '{{ range .Messages }}{{ if and (eq .Role "system") .Content }}<|system|>\n{{ .Content }}<|end|>\n'
    '{{ else if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
    '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n'
    "{{ end }}{{ end }}<|assistant|>\n"
)
STOP_TOKENS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>")


def default_variant(quant_types: tuple[str, ...]) -> str:
    """The file the Modelfile names: Q4_K_M (with the matrix if made so), else the last listed."""
    for preferred in ("Q4_K_M-imat", "Q4_K_M"):
        if preferred in quant_types:
            return preferred
    return quant_types[-1]


def render(gguf_name: str, n_ctx: int, params: SamplingParams | None = None, system_prompt: str | None = None) -> str:
    params = params or SamplingParams()
    check_system_prompt(system_prompt)
    lines = [
        "# Written by qlora-pipeline's export stage. Use: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{TEMPLATE}"""',
        *([f'SYSTEM """{system_prompt}"""'] if system_prompt else []),
        *(f'PARAMETER stop "{token}"' for token in STOP_TOKENS),
        f"PARAMETER temperature {params.temperature}",
        f"PARAMETER top_p {params.top_p}",
        f"PARAMETER top_k {params.top_k}",
        f"PARAMETER repeat_penalty {params.repeat_penalty}",
        f"PARAMETER num_predict {params.max_tokens}",
        f"PARAMETER num_ctx {n_ctx}",
    ]
    return "\n".join(lines) + "\n"


def write(path: Path, gguf_name: str, n_ctx: int, system_prompt: str | None = None) -> None:
    write_text_atomic(path, render(gguf_name, n_ctx, system_prompt=system_prompt))


def template_of(modelfile_text: str) -> str:
    """The TEMPLATE of a Modelfile's text (between its triple quotes)."""
    return modelfile_text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
