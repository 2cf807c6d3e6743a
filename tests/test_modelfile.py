"""The Ollama Modelfile: its TEMPLATE, rendered by Go's own text/template (the engine Ollama runs,
through the small program in tests/modelfile_render/), gives token for token the prompt the GGUF's
Jinja chat template gives; it stops at every Phi-3.5 turn token; its SYSTEM is the training one.

Go is required: ``make setup`` installs Debian's golang-go (scripts/install_go.sh). The hand-written
Python subset of text/template this test used before is retired: it rendered a template with a
stray ``{{ end }}`` exactly as the correct one, where Go (and so ``ollama create``) refuses it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import copy_run, make_config

from qlora_pipeline.errors import ConfigError
from qlora_pipeline.export import export
from qlora_pipeline.gguf import modelfile

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

import ollama_modelfile  # noqa: E402

RENDERER = Path(__file__).resolve().parent / "modelfile_render"
TRICKY_SYSTEM = 'Say "hi" {like this} and never {{ .Content }} or {{- end }} }}{{'

# With and without a system prompt, one to four turns, and text a template engine could misread.
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "An empty system prompt is left out."}],
    [{"role": "system", "content": TRICKY_SYSTEM}, {"role": "user", "content": "Go on."}],
    [
        {"role": "user", "content": "Two lines\nof question"},
        {"role": "assistant", "content": "An answer."},
        {"role": "user", "content": "And a follow-up, with  spaces  and {{ braces }}."},
    ],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bonjour !"},
        {"role": "user", "content": "And goodbye?"},
    ],
    [
        {"role": "user", "content": "One"},
        {"role": "assistant", "content": "Two"},
        {"role": "user", "content": "Three"},
        {"role": "assistant", "content": "Four"},
        {"role": "user", "content": "Five"},
    ],
    [
        {"role": "system", "content": TRICKY_SYSTEM},
        *[
            {"role": role, "content": f"turn {i} {'{{'} {role} {'}}'} ünïcødé ✓"}
            for i in range(4)
            for role in ("user", "assistant")
        ][:-1],
    ],
    [{"role": "user", "content": "  leading and trailing spaces  "}],
    [
        {"role": "system", "content": "Multi-line\n\nsystem prompt\n"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y\n"},
        {"role": "user", "content": "A message that mentions <|user|> as text."},
    ],
    [
        {"role": "system", "content": "{{"},
        {"role": "user", "content": "}}"},
        {"role": "assistant", "content": "{% raw %}"},
        {"role": "user", "content": '"""'},
    ],
]


class GoTemplateError(Exception):
    """Go refused the template (to parse or to run it): what ``ollama create`` or a chat would do."""


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is missing: run `make setup` (it installs Debian's golang-go via scripts/install_go.sh)")
    binary = tmp_path_factory.mktemp("go") / "modelfile_render"
    subprocess.run([go, "build", "-o", str(binary), "."], cwd=RENDERER, check=True, capture_output=True)
    return binary


def go_prompts(renderer: Path, template: str, conversations: list[list[dict]]) -> list[str]:
    request = json.dumps({"template": template, "conversations": conversations})
    done = subprocess.run([str(renderer)], input=request, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise GoTemplateError(done.stderr.strip())
    return json.loads(done.stdout)


def gguf_template(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def jinja_prompt(template: str, messages: list[dict]) -> str:
    """The GGUF's template as llama.cpp's and transformers' Jinja renderers run it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def q4(trained_run) -> Path:
    return trained_run / "gguf" / "model-Q4_K_M.gguf"


@pytest.fixture(scope="module")
def gguf_tokens(q4):
    """The GGUF's own tokenizer, special tokens parsed, as Ollama (llama.cpp) tokenizes a prompt."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(q4), vocab_only=True, verbose=False)
    return lambda text: vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)


@pytest.fixture(scope="module")
def test_conversations(trained_run):
    lines = (trained_run / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:20]
    return CONVERSATIONS + [json.loads(line)["messages"] for line in lines]


def test_go_renders_the_modelfile_template_token_for_token_as_the_ggufs_jinja(
    trained_run, q4, go_renderer, gguf_tokens, test_conversations
):
    template = modelfile.template_of((trained_run / "gguf" / "Modelfile").read_text(encoding="utf-8"))
    reference = gguf_template(q4)
    rendered = go_prompts(go_renderer, template, test_conversations)
    assert len(rendered) == len(test_conversations) >= 10 + 20
    for messages, by_go in zip(test_conversations, rendered):
        by_jinja = jinja_prompt(reference, messages)
        assert gguf_tokens(by_go) == gguf_tokens(by_jinja), messages
        assert by_go == by_jinja, messages
    # the turn tokens are single control tokens, not text: the comparison is of what the model sees
    assert gguf_tokens(rendered[1]).count(gguf_tokens("<|end|>")[0]) == 2


def test_the_comparison_notices_an_assistant_turn_left_open(q4, go_renderer, gguf_tokens):
    """An assistant turn without <|end|> (answers that never end, the most reported Phi-3 problem in
    Ollama) changes the tokens the model sees, and the comparison fails."""
    wrong = modelfile.TEMPLATE.replace("<|assistant|>\n{{ .Content }}<|end|>\n", "<|assistant|>\n{{ .Content }}\n")
    messages = CONVERSATIONS[4]
    [by_go] = go_prompts(go_renderer, wrong, [messages])
    assert gguf_tokens(by_go) != gguf_tokens(jinja_prompt(gguf_template(q4), messages))


def test_a_missing_newline_after_a_turn_token_changes_the_text_not_the_tokens(q4, go_renderer, gguf_tokens):
    """Phi-3.5's turn tokens carry rstrip: llama.cpp drops the whitespace after them, so this common
    hand-written slip is invisible to the model; the text comparison above still refuses it."""
    wrong = modelfile.TEMPLATE.replace("<|end|>\n{{ else if", "<|end|>{{ else if")
    messages = CONVERSATIONS[1]
    [by_go] = go_prompts(go_renderer, wrong, [messages])
    by_jinja = jinja_prompt(gguf_template(q4), messages)
    assert by_go != by_jinja
    assert gguf_tokens(by_go) == gguf_tokens(by_jinja)


@pytest.mark.parametrize(
    "bug, error",
    [
        (modelfile.TEMPLATE + "{{ end }}", "unexpected {{end}}"),
        (modelfile.TEMPLATE + "{{ else }}", "unexpected {{else}}"),
        (modelfile.TEMPLATE.replace("{{ .Content }}", "{{-.Content }}", 1), "bad number syntax"),
        (modelfile.TEMPLATE.replace(".Content", ".content", 1), "can't evaluate field content"),
    ],
    ids=["stray-end", "stray-else", "trim-marker-without-space", "jinja-lowercase-field"],
)
def test_go_refuses_templates_ollama_would_refuse(go_renderer, bug, error):
    """Templates Ollama cannot load or run. The retired Python subset rendered the first two exactly
    as the correct template (it stopped at the stray action), so its comparison passed them."""
    with pytest.raises(GoTemplateError, match=error):
        go_prompts(go_renderer, bug, CONVERSATIONS[:2])


def test_the_modelfile_names_a_file_beside_it_and_every_stop_token(trained_run):
    text = (trained_run / "gguf" / "Modelfile").read_text(encoding="utf-8")
    source = next(line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("FROM "))
    assert (trained_run / "gguf" / source).is_file()
    assert source == "./model-Q4_K_M.gguf"
    stops = [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop ")]
    assert stops == ['"<|end|>"', '"<|user|>"', '"<|assistant|>"', '"<|system|>"', '"<|endoftext|>"']
    assert "PARAMETER temperature 0.7" in text and "PARAMETER num_ctx " in text
    assert "SYSTEM" not in text  # the test run trains without a system prompt


def test_the_modelfile_carries_the_training_system_prompt(trained_run, tmp_path, q4, go_renderer, gguf_tokens):
    """Trained with a system prompt, the model gets it in Ollama too: SYSTEM, which Ollama puts in
    front of a conversation that brings none; read back by Ollama's rules, rendered by Go."""
    run = copy_run(trained_run, tmp_path / "run")
    export(make_config(f"data.system_prompt={TRICKY_SYSTEM}"), run, log=lambda *a: None)
    read = dict(ollama_modelfile.parse((run / "gguf" / "Modelfile").read_text(encoding="utf-8")))
    assert read["system"] == TRICKY_SYSTEM
    messages = [{"role": "system", "content": read["system"]}, {"role": "user", "content": "Hi"}]
    [by_go] = go_prompts(go_renderer, read["template"], [messages])
    assert gguf_tokens(by_go) == gguf_tokens(jinja_prompt(gguf_template(q4), messages))


def test_a_system_prompt_a_modelfile_cannot_quote_is_refused_before_training():
    """Refused when the settings are read, not hours later at export."""
    with pytest.raises(ConfigError, match='data.system_prompt contains """'):
        make_config('data.system_prompt=Say """hi""" twice')
    with pytest.raises(ConfigError, match="characters Ollama drops \\(U\\+00A0\\)"):
        make_config("data.system_prompt=no\u00a0break")
