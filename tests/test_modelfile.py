"""The Ollama Modelfile: its Go template renders exactly the GGUF's own chat template (Phi-3.5's
Jinja), and it stops at every Phi-3.5 turn token."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qlora_pipeline.gguf import modelfile

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import gotemplate  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "An empty system prompt is left out."}],
    [
        {"role": "user", "content": "Two lines\nof question"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "And a follow-up, with  spaces  and {{ braces }}."},
    ],
]


def gguf_template(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def jinja_prompt(template: str, messages: list[dict]) -> str:
    """The GGUF's template as llama.cpp's and transformers' Jinja renderers run it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, eos_token="<|endoftext|>")


def ollama_prompt(template: str, messages: list[dict]) -> str:
    return gotemplate.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


@pytest.fixture(scope="module")
def test_conversations(trained_run):
    lines = (trained_run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    return CONVERSATIONS + [json.loads(line)["messages"] for line in lines]


def test_the_modelfile_template_renders_the_ggufs_chat_template(trained_run, test_conversations):
    exported = (trained_run / "gguf" / "Modelfile").read_text(encoding="utf-8")
    template = modelfile.template_of(exported)
    reference = gguf_template(trained_run / "gguf" / "model-Q4_K_M.gguf")
    for messages in test_conversations:
        assert ollama_prompt(template, messages) == jinja_prompt(reference, messages), messages


def test_the_comparison_notices_a_template_that_differs(trained_run):
    """A turn without its newline after <|end|> (a common hand-written mistake) does not pass."""
    reference = gguf_template(trained_run / "gguf" / "model-Q4_K_M.gguf")
    wrong = modelfile.TEMPLATE.replace("<|end|>\n{{ else if", "<|end|>{{ else if")
    messages = CONVERSATIONS[1]
    assert ollama_prompt(wrong, messages) != jinja_prompt(reference, messages)


def test_the_modelfile_names_a_file_beside_it_and_every_stop_token(trained_run):
    text = (trained_run / "gguf" / "Modelfile").read_text(encoding="utf-8")
    source = next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FROM "))
    assert (trained_run / "gguf" / source).is_file()
    assert source == "./model-Q4_K_M.gguf"
    stops = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    assert stops == ['"<|end|>"', '"<|user|>"', '"<|assistant|>"', '"<|system|>"', '"<|endoftext|>"']
    assert "PARAMETER temperature 0.7" in text and "PARAMETER num_ctx " in text


def test_the_go_template_subset_refuses_what_it_does_not_know():
    with pytest.raises(NotImplementedError, match="'printf'"):
        gotemplate.render('{{ printf "%s" .X }}', {"X": "a"})
    assert gotemplate.render("a  {{- .X -}}  b", {"X": "!"}) == "a!b"
