"""The LoRA as a GGUF adapter: llama.cpp's convert_lora_to_gguf.py, applied to the base F16 GGUF
at load time, gives the merged F16 GGUF's logits; chat and the app take it with --lora."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys

import pytest

from qlora_pipeline.errors import ConfigError


@pytest.fixture(scope="module")
def lora_run(trained_run, test_config, tmp_path_factory):
    """A copy of the trained run exported with export.lora=true and evaluated (GGUF part)."""
    from qlora_pipeline.evaluate import evaluate_gguf
    from qlora_pipeline.export import export

    run = tmp_path_factory.mktemp("lora") / "run"
    shutil.copytree(trained_run, run)
    cfg = dataclasses.replace(test_config, export=dataclasses.replace(test_config.export, lora=True))
    export(cfg, run, log=lambda *a: None)
    report = evaluate_gguf(cfg, run, log=lambda *a: None)
    return run, report


def test_base_plus_lora_gives_the_merged_models_logits(lora_run):
    run, report = lora_run
    lora = report["lora"]
    assert lora["passes"] and lora["relative_diff"] <= 3e-3 and lora["top1"] >= 0.999
    assert lora["tokens"] > 100
    assert lora["adapter_bytes"] == (run / "gguf" / "adapter-F16.gguf").stat().st_size
    assert lora["adapter_bytes"] < 0.05 * lora["merged_bytes"]  # a few percent of a model


def test_without_the_adapter_the_base_answers_otherwise(lora_run):
    """The parity above means something: the base alone is far from the merged model."""
    from qlora_pipeline.evaluation.parity import compare_gguf_logits
    from qlora_pipeline.evaluation.scoring import llama_logits
    from qlora_pipeline.serve.chat import LlamaChat

    run, report = lora_run
    ids = [1, 32010, 29871, 13, 5618, 338, 278, 7483, 310, 3444, 29973, 32007, 29871, 13, 32001]
    with LlamaChat(run / "gguf" / "model-F16.gguf", n_ctx=64, logits_all=True, f32_kv_cache=True) as chat:
        reference = [llama_logits(chat.llm, ids)]
    alone = compare_gguf_logits(run / "gguf" / "base-F16.gguf", [ids], reference, 64, 2)
    assert alone["relative_diff"] > 100 * report["lora"]["relative_diff"]


def test_chat_takes_the_lora_and_refuses_a_model_in_its_place(lora_run):
    run, _ = lora_run
    gguf = run / "gguf"
    cli = [sys.executable, "-m", "qlora_pipeline.cli", "chat", "--model", str(gguf / "base-F16.gguf")]
    question = ["--prompt", "What is the capital of France?"]

    def answer(*arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run([*arguments, *question], capture_output=True, text=True)

    with_lora = answer(*cli, "--lora", str(gguf / "adapter-F16.gguf"))
    merged = answer(*cli[:-1], str(gguf / "model-F16.gguf"))
    assert with_lora.returncode == 0 and with_lora.stdout == merged.stdout and with_lora.stdout.strip()
    wrong = answer(*cli, "--lora", str(gguf / "model-Q4_K_M.gguf"))
    assert wrong.returncode != 0
    assert "its general.type is model, not adapter" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_the_app_applies_the_lora_and_lists_only_models(lora_run):
    from qlora_pipeline.serve.chat import check_lora_file
    from qlora_pipeline.serve.sources import _model_files

    run, _ = lora_run
    names = sorted(p.name for p in _model_files(run / "gguf"))
    assert "adapter-F16.gguf" not in names and "base-F16.gguf" in names
    with pytest.raises(ConfigError, match="not adapter"):
        check_lora_file(run / "gguf" / "model-F16.gguf")


def test_the_app_answers_with_the_adapter_applied(lora_run):
    """--lora through the app's own backend: the base with the adapter answers as the merged model."""
    from qlora_pipeline.serve.backends import LocalBackend
    from qlora_pipeline.serve.chat import SamplingParams
    from qlora_pipeline.serve.settings import AppSettings, ModelChoice

    run, _ = lora_run
    greedy = SamplingParams(temperature=0.0, top_k=1, max_tokens=16)
    question = [{"role": "user", "content": "What is the capital of France?"}]

    def answer(model: str, lora=None) -> str:
        choice = ModelChoice(model, path=run / "gguf" / model)
        backend = LocalBackend(AppSettings(models=[choice], lora=lora, n_ctx=256, n_threads=2))
        try:
            return "".join(backend.stream(question, greedy, model, {}))
        finally:
            backend.close()

    merged = answer("model-F16.gguf")
    assert answer("base-F16.gguf", lora=run / "gguf" / "adapter-F16.gguf") == merged
    assert answer("base-F16.gguf") != merged


def test_a_gguf_whose_header_cannot_be_read_is_still_listed(tmp_path):
    """Only a readable general.type other than "model" hides a file; a damaged one stays in the
    list, so that choosing it gives the loader's clear error instead of a silently missing model."""
    from qlora_pipeline.serve.sources import _model_files

    (tmp_path / "damaged.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    assert [p.name for p in _model_files(tmp_path)] == ["damaged.gguf"]
