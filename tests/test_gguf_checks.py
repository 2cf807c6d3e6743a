"""Export pre-checks: each problem that llama.cpp's converter would carry silently into a GGUF is
refused with one line naming the file or value and the fix, before anything is converted."""

from __future__ import annotations

import json
import shutil

import pytest

from qlora_pipeline.gguf import checks as export_checks
from qlora_pipeline.gguf.checks import ExportCheckError


class StubTokenizer:
    def __init__(self, size: int = 32011, end: bool = True, template: str | None = "{{ messages }}"):
        self.size, self.end, self.chat_template = size, end, template

    def __len__(self):
        return self.size

    def get_vocab(self):
        return {"<|end|>": 32007} if self.end else {"<|user|>": 32010}


@pytest.fixture
def merged(trained_run, tmp_path):
    folder = tmp_path / "merged"
    shutil.copytree(trained_run / "merged", folder)
    return folder


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_the_trained_run_passes(trained_run):
    export_checks.check_before_export(trained_run / "merged", "Phi-3.5 tiny")


def test_vocab_size_not_the_embedding_rows(merged):
    config = config_of(merged)
    config["vocab_size"] = 32000
    with pytest.raises(ExportCheckError, match=r"config.json: vocab_size is 32000 but .* has 32064 rows"):
        export_checks.check_vocabulary(merged, config, StubTokenizer())


def test_a_tokenizer_larger_than_the_embedding(merged):
    with pytest.raises(ExportCheckError, match="the tokenizer has 32100 tokens but the embedding only 32064 rows"):
        export_checks.check_vocabulary(merged, config_of(merged), StubTokenizer(size=32100))
    # Phi-3.5's own tokenizer is smaller than its (padded) embedding: that converts fine.
    export_checks.check_vocabulary(merged, config_of(merged), StubTokenizer(size=32011))


def test_no_end_of_turn_token(merged):
    with pytest.raises(ExportCheckError, match=r"<\|end\|> is not in the tokenizer's vocabulary"):
        export_checks.check_vocabulary(merged, config_of(merged), StubTokenizer(end=False))


def test_no_chat_template(merged):
    with pytest.raises(ExportCheckError, match="no chat template"):
        export_checks.check_chat_template(merged, StubTokenizer(template=None))


def test_a_name_that_switches_off_phi3s_token_rules():
    with pytest.raises(ExportCheckError, match="export.model_name='my-assistant' lacks 'Phi-3'"):
        export_checks.check_model_name("my-assistant")
    export_checks.check_model_name("my Phi3 assistant")


@pytest.mark.parametrize(
    "rope, message",
    [
        ({"rope_type": "linear", "factor": 2.0}, "rope type 'linear' without long and short factors"),
        ({"rope_type": "longrope"}, "rope type 'longrope' without long and short factors"),
        ({"rope_type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}, r"\[8\] entries"),
    ],
)
def test_a_rope_config_the_converter_would_drop(merged, rope, message):
    config = config_of(merged)
    config["rope_parameters"] = {"rope_theta": 10000.0, "original_max_position_embeddings": 4096, **rope}
    with pytest.raises(ExportCheckError, match=message):
        export_checks.check_rope(merged, config)


def test_export_refuses_before_writing_anything(trained_run, tmp_path, test_config):
    from qlora_pipeline.export import export

    run = tmp_path / "run"
    shutil.copytree(trained_run / "merged", run / "merged")
    (run / "merged" / "chat_template.jinja").unlink()
    with pytest.raises(ExportCheckError, match="no chat template"):
        export(test_config, run, log=lambda *a: None)
    assert not (run / "gguf").exists() or not any((run / "gguf").iterdir())
